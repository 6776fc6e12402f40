"""A pipeline spec: plain data that a person can read and edit (JSON).

For each op of a decoder layer: its nano-batches as row ranges of a batch of `tokens` rows, each on an
execution unit; and the order in which the nano-ops of a layer are issued. A batch of another size runs
the same spec with its boundaries scaled (rounded to multiples of 8 rows).

A spec for a tensor-parallel model also places the all-reduces (o_allreduce, down_allreduce; typically on a unit
of kind "network"), all on one unit: every rank must run its collectives in the same order, which only one stream
guarantees. A spec without them runs a tensor-parallel model with each all-reduce issued right after its
producer, on the unit of the first o_proj (`for_tensor_parallel`). Under tensor parallelism each nano-batch's
attention output is projected in one of two forms (models/llama.py): o_proj then o_allreduce, or attn_allgather,
o_gathered, o_allgather; the nano-batches of both forms together cover the rows. A spec for a mixture-of-experts
model has router and experts where a dense one has gate_up, act and down.
"""
from __future__ import annotations

import json
import os
from importlib import resources
from dataclasses import MISSING, asdict, dataclass, fields

from nanoflow.models.llama import LAYER_OPS, MOE_OPS, NETWORK_OPS, O_ALLGATHER, O_ALLREDUCE, layer_ops

UNIT_KINDS = ("compute", "memory", "network", "other")
ALIGN = 8
# the JSON type of each field of a spec file (a hand-edited "64", 8.5 or true is refused, not coerced)
FIELD_TYPES = {"name": str, "tokens": int, "notes": str, "units": list, "nano_ops": list, "kind": str, "sms": int,
               "op": str, "start": int, "end": int, "unit": str}


@dataclass(slots=True)
class Unit:
    """An execution unit: a stream on a green context of `sms` SMs (0: the whole device)."""
    name: str
    kind: str
    sms: int = 0


@dataclass(slots=True)
class NanoOp:
    op: str
    start: int  # rows [start, end) of a batch of spec.tokens rows
    end: int
    unit: str


@dataclass(slots=True)
class PipelineSpec:
    name: str
    tokens: int
    units: list[Unit]
    nano_ops: list[NanoOp]  # issue order within a layer
    notes: str = ""

    @property
    def ops(self) -> tuple[str, ...]:
        """The layer ops this spec covers: with the all-reduces if it places any, the experts' if it places them."""
        return layer_ops(2 if any(n.op in NETWORK_OPS for n in self.nano_ops) else 1,
                         any(n.op in MOE_OPS for n in self.nano_ops))

    @property
    def gathers(self) -> bool:
        """Whether some nano-batch projects its attention output by the all-gather form (the model then needs
        prepare_o_allgather)."""
        return any(n.op in O_ALLGATHER for n in self.nano_ops)

    def for_tensor_parallel(self, tp_size: int) -> "PipelineSpec":
        """This spec for a model of tp_size ranks (a spec that places all-reduces only runs with tp_size > 1)."""
        if (tp_size > 1) == any(n.op in NETWORK_OPS for n in self.nano_ops):
            return self
        if tp_size == 1:
            raise ValueError(f"pipeline spec {self.name!r} places all-reduces ({', '.join(NETWORK_OPS)}): it is for "
                             f"tensor parallelism")
        after = {"o_proj": "o_allreduce", "down": "down_allreduce", "experts": "down_allreduce"}
        unit = next(n.unit for n in self.nano_ops if n.op == "o_proj")
        nano_ops = [m for n in self.nano_ops for m in
                    ([n, NanoOp(after[n.op], n.start, n.end, unit)] if n.op in after else [n])]
        return PipelineSpec(self.name, self.tokens, self.units, nano_ops, self.notes).validate()

    def validate(self) -> "PipelineSpec":
        from nanoflow.pipeline.graph import dependencies
        if self.tokens <= 0:
            raise ValueError(f"pipeline spec {self.name!r}: tokens must be positive, got {self.tokens}")
        names = [u.name for u in self.units]
        if len(set(names)) != len(names):
            raise ValueError(f"pipeline spec {self.name!r}: duplicate unit names {names}")
        for u in self.units:
            if u.kind not in UNIT_KINDS:
                raise ValueError(f"pipeline spec {self.name!r}: unit {u.name!r} has kind {u.kind!r}; "
                                 f"kinds: {UNIT_KINDS}")
            if u.sms < 0:
                raise ValueError(f"pipeline spec {self.name!r}: unit {u.name!r} has {u.sms} SMs")
        # (the layer's kind is read from the ops present: a stray op of the other kind is named, not the others)
        present = {n.op for n in self.nano_ops}
        dense = [op for op in LAYER_OPS[7:] if op in present]
        if dense and (moe := [op for op in MOE_OPS if op in present]):
            raise ValueError(f"pipeline spec {self.name!r} has a dense MLP's ops {dense} and a mixture of experts' "
                             f"{moe}: a layer has one or the other")
        if (network := [op for op in NETWORK_OPS if op in present]) and not {"o_allreduce", "o_allgather"} & present:
            raise ValueError(f"pipeline spec {self.name!r} places {network} but no o_allreduce or o_allgather: a "
                             f"tensor-parallel spec projects every nano-batch's attention output by one of them")
        tp = "o_allreduce" in self.ops
        allowed = self.ops + (O_ALLGATHER if tp else ())
        for n in self.nano_ops:
            if n.op not in allowed:
                raise ValueError(f"pipeline spec {self.name!r}: unknown op {n.op!r}; ops: {allowed}")
            if n.unit not in names:
                raise ValueError(f"pipeline spec {self.name!r}: nano-op {n.op}[{n.start}:{n.end}] names unknown "
                                 f"unit {n.unit!r}")
        if len(network := {n.unit for n in self.nano_ops if n.op in NETWORK_OPS}) > 1:
            raise ValueError(f"pipeline spec {self.name!r}: the collectives are on units {sorted(network)}; they must "
                             f"share one (the ranks run their collectives in the same order only on one stream)")

        def ranges(op):
            return sorted((n.start, n.end) for n in self.nano_ops if n.op == op)
        stages = {op: ranges(op) for op in self.ops}
        if tp:  # each nano-batch's projection in one form or the other, all of that form's ops over its rows
            for form in (O_ALLREDUCE, O_ALLGATHER):
                if any(ranges(op) != ranges(form[0]) for op in form[1:]):
                    raise ValueError(f"pipeline spec {self.name!r}: the ops {form} must have the same nano-batches, "
                                     f"got {[ranges(op) for op in form]}")
            del stages["o_allreduce"]
            stages["o_proj"] = sorted(ranges("o_proj") + ranges("o_gathered"))
        for op, rs in stages.items():
            edges = [0] + [x for r in rs for x in r] + [self.tokens]
            if not rs or any(a != b for a, b in zip(edges[::2], edges[1::2])) or any(s >= e for s, e in rs):
                what = "o_proj and o_gathered" if tp and op == "o_proj" else op
                raise ValueError(f"pipeline spec {self.name!r}: the nano-batches of {what} must cover rows "
                                 f"[0, {self.tokens}) without gaps or overlaps, got {rs}")
        # every nano-op's inputs within the layer must be issued before it
        issued = []
        for i, n in enumerate(self.nano_ops):
            for dep in dependencies(n, self.nano_ops):
                if dep not in issued:
                    raise ValueError(f"pipeline spec {self.name!r}: {n.op}[{n.start}:{n.end}] is issued before "
                                     f"its input {dep.op}[{dep.start}:{dep.end}]")
            issued.append(n)
        return self

    def scaled(self, rows: int) -> list[NanoOp]:
        """The nano-ops for a batch of `rows` rows: at the spec's own token count its boundaries as written (the
        search cuts at the decode/prefill boundary, which need not be a multiple of 8); else scaled, rounded to
        multiples of 8."""
        if rows == self.tokens:
            return list(self.nano_ops)

        def at(x):
            return rows if x == self.tokens else min(round(x * rows / self.tokens / ALIGN) * ALIGN, rows)
        return [NanoOp(n.op, at(n.start), at(n.end), n.unit) for n in self.nano_ops]

    # -- plain data ------------------------------------------------------------------------------
    def to_json(self) -> str:
        """One unit and one nano-op a line, so that a spec reads like a table."""
        def rows(items):
            return ",\n".join(f"  {json.dumps(asdict(x))}" for x in items)
        head = json.dumps({"name": self.name, "tokens": self.tokens, "notes": self.notes}, indent=1)[:-2]
        return f"{head},\n \"units\": [\n{rows(self.units)}\n ],\n \"nano_ops\": [\n{rows(self.nano_ops)}\n ]\n}}\n"

    @classmethod
    def from_json(cls, text: str, source: str = "") -> "PipelineSpec":
        """source: the file, named in the errors."""
        where = f"malformed pipeline spec{' ' + source if source else ''}: "
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}{e}") from None
        d = _checked(cls, d, "", where)
        units = [Unit(**_checked(Unit, u, f"units[{i}]", where)) for i, u in enumerate(d["units"])]
        nano_ops = [NanoOp(**_checked(NanoOp, n, f"nano_ops[{i}]", where)) for i, n in enumerate(d["nano_ops"])]
        return cls(d["name"], d["tokens"], units, nano_ops, d.get("notes", "")).validate()

    def save(self, path: str) -> None:
        with open(path, "w") as f:
            f.write(self.to_json())

    @classmethod
    def load(cls, path: str) -> "PipelineSpec":
        try:
            with open(path) as f:
                text = f.read()
        except (OSError, UnicodeDecodeError) as e:  # (a directory, no permission, not text)
            raise ValueError(f"cannot read pipeline spec {path}: {getattr(e, 'strerror', None) or e}") from None
        return cls.from_json(text, path)


def _checked(cls, d, what: str, where: str) -> dict:
    """d, a JSON object of cls's fields of their JSON types (FIELD_TYPES), else a ValueError naming the field and
    where it is (what: e.g. 'units[0]'; '' for the spec itself)."""
    if not isinstance(d, dict):
        raise ValueError(f"{where}{what or 'the spec'} must be a JSON object, got {d!r}")
    prefix = where + (f"{what}: " if what else "")
    names = [f.name for f in fields(cls)]
    if unknown := [k for k in d if k not in names]:
        raise ValueError(f"{prefix}unknown field {unknown[0]!r} (fields: {', '.join(names)})")
    if missing := [f.name for f in fields(cls) if f.default is MISSING and f.name not in d]:
        raise ValueError(f"{prefix}missing field {missing[0]!r}")
    for k, v in d.items():
        kind = FIELD_TYPES[k]
        if not isinstance(v, kind) or isinstance(v, bool):  # (JSON's true is a Python int)
            article = "an integer" if kind is int else f"a {'string' if kind is str else kind.__name__}"
            raise ValueError(f"{prefix}{k} must be {article}, got {v!r}")
    return d


def load_spec(name_or_path: str) -> PipelineSpec:
    """A spec file, or the name of one shipped in nanoflow/pipeline/specs/."""
    if os.path.exists(name_or_path):
        return PipelineSpec.load(name_or_path)
    shipped = resources.files("nanoflow.pipeline").joinpath("specs", f"{name_or_path}.json")
    if not shipped.is_file():
        names = sorted(p.name.removesuffix(".json") for p in resources.files("nanoflow.pipeline").joinpath(
            "specs").iterdir() if p.name.endswith(".json"))
        raise FileNotFoundError(f"pipeline spec {name_or_path!r} is neither a file nor a shipped spec ({names})")
    return PipelineSpec.from_json(shipped.read_text(), f"{name_or_path!r} (shipped)")


def non_overlap(tokens: int, tp_size: int = 1, moe: bool = False) -> PipelineSpec:
    """One nano-batch per op on the whole device: the plain forward, as a spec."""
    return PipelineSpec("non-overlap", tokens, [Unit("device", "other")],
                        [NanoOp(op, 0, tokens, "device") for op in layer_ops(tp_size, moe)]).validate()
