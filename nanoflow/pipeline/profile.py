"""What the search needs to know of a GPU: each op's time on a nano-batch of n rows when it runs alone on
S SMs, and how much a compute-bound and a memory-bound op slow each other down when they run side by side.

Measured for one batch composition (the steady state: `decode_rows` decode rows, each over `context` tokens
of KV, then prefill rows as prompts of `context` tokens) on one decoder layer with dummy weights, with
the real kernels. decode_attn's time depends on the decode rows in its range, prefill_attn's on the prefill
rows, every other op's on the row count. Points between measured ones are interpolated linearly; below the
first measured row count an op costs what it costs there (small kernels are latency-bound).

With tensor parallelism (`tp_size` > 1) the layer is one rank's shard, with the all-gather form's o_gathered too,
and the collectives (all-reduce, the two all-gathers) are timed apart, by `tp_size` processes exchanging the rows of
each grid point (collectives.py); they run on the whole device, so their times are the same at every SM count.

On a GPU each op is captured `reps` times in a CUDA graph (as the engine runs it: no launch overhead) on a
stream confined to S SMs (pipeline/units.py) and timed with CUDA events. On the CPU there are no SMs:
one "SM count" (1), timed with perf_counter, so that the whole path runs in tests.

Profiles are cached as JSON (cache.py) and saved after every point: an interrupted run resumes.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field, replace

import numpy as np
import torch
from tqdm import tqdm

from nanoflow.config import ModelConfig
from nanoflow.models.batch import ForwardBatch
from nanoflow.distributed.parallel_state import TPGroup, all_reduce_backend
from nanoflow.models.llama import MOE_OPS, NETWORK_OPS, O_ALLGATHER, LlamaModel, Workspace, layer_ops
from nanoflow.models.loader import init_dummy
from nanoflow.pipeline.cache import (
    cache_dir,
    cache_key,
    dtype_name,
    gpu_name,
    shape_key,
)
from nanoflow.pipeline.units import partition, share

STEP = 128  # nano-batch rows are measured in steps of this
MIN_SMS = 16  # below this every kernel measured crawls (BENCHMARKS.md #4)
SMS_STEP = 8  # Hopper's green-context granularity
# the unit kind each op runs on: decode attention streams the KV cache; collectives go over the network; the GEMMs
# (a MoE layer's router and experts too), prefill attention and the small elementwise ops that feed them stay with
# the compute unit
OP_KIND = {op: "memory" if op == "decode_attn" else "network" if op in NETWORK_OPS else "compute"
           for op in layer_ops(2) + MOE_OPS + O_ALLGATHER}
# the ops that stand for their kind when interference is measured: the MLP's first GEMM (or the experts' GEMMs),
# decode attention
REPRESENTATIVE = {"compute": ("gate_up", "experts"), "memory": ("decode_attn",)}


def profiled_ops(tp_size: int, moe: bool = False) -> tuple[str, ...]:
    """The ops a profile times: the layer's, and with tensor parallelism the all-gather form's too."""
    return layer_ops(tp_size, moe) + (O_ALLGATHER if tp_size > 1 else ())


@dataclass(slots=True)
class Profile:
    gpu: str
    shape: str
    dtype: str
    budget: int  # rows of the batch
    decode_rows: int
    context: int
    total_sms: int
    sms: list[int]  # SM counts measured, ascending; the last is the whole device
    rows: dict[str, list[int]]  # per op of the layer, in order, the row counts measured (decode rows / prefill
    # rows for attention)
    times: dict[str, dict[str, list]]  # op -> str(SMs) -> µs at each of rows[op] (None: not measured yet)
    # "victim|aggressor" kinds -> str(victim's SMs) -> slowdown of the victim while the aggressor runs on
    # the rest of the device
    interference: dict[str, dict[str, float]] = field(default_factory=dict)
    tp_size: int = 1  # the layer is one rank's shard of this many

    @property
    def ops(self) -> tuple[str, ...]:
        """The layer's ops (a mixture-of-experts layer has router and experts for the dense MLP's; with tensor
        parallelism the all-reduces), without the all-gather form's, which a profile also times."""
        return tuple(op for op in self.rows if op not in O_ALLGATHER)

    @property
    def moe(self) -> bool:
        return "experts" in self.rows

    def rows_in(self, op: str, a: int, b: int) -> int:
        """The rows of [a, b) that op's time depends on."""
        d = self.decode_rows
        if op == "decode_attn":
            return max(min(b, d) - a, 0)
        if op == "prefill_attn":
            return max(b - max(a, d), 0)
        return b - a

    def time(self, op: str, a: int, b: int, sms: int) -> float:
        """µs of op over rows [a, b) on `sms` SMs (0: the whole device), alone."""
        x, grid = self.rows_in(op, a, b), self.rows[op]
        if x == 0 or not grid:
            return 0.0
        per_sms = [np.interp(x, grid, self.times[op][str(s)]) for s in self.sms]
        return float(np.interp(sms or self.total_sms, self.sms, per_sms))

    def slowdown(self, kind: str, sms: int, others: list[str]) -> float:
        """Factor on the time of a `kind` op on `sms` SMs while ops of the other kinds run beside it."""
        f = 1.0
        for other in others:
            table = self.interference.get(f"{kind}|{other}")
            if table:
                xs = sorted(map(int, table))
                f *= float(np.interp(sms or self.total_sms, xs, [table[str(x)] for x in xs]))
        return f

    def splits(self) -> list[tuple[int, int]]:
        """(compute SMs, memory SMs) splits of the device: the memory unit on a share up to half the device,
        the compute unit on the largest share that fits beside it. Interference is measured at these, and
        the search's first stage tries each."""
        if not self.rows["decode_attn"] or len(self.sms) < 2:
            return []
        pairs = []
        for m in self.sms:
            fits = [s for s in self.sms if s + m <= self.total_sms]
            if 2 * m <= self.total_sms and fits:
                pairs.append((fits[-1], m))
        return pairs

    def missing(self) -> list[tuple[str, int, int]]:
        return [(op, s, i) for s in self.sms for op in self.times if op not in NETWORK_OPS
                for i, t in enumerate(self.times[op][str(s)]) if t is None]

    def missing_collectives(self) -> bool:
        return any(t is None for op in self.times if op in NETWORK_OPS for t in self.times[op][str(self.sms[0])])

    def missing_pairs(self) -> list[tuple[int, int]]:
        done = self.interference.get("compute|memory", {})
        return [p for p in self.splits() if str(p[0]) not in done]

    def check(self) -> None:
        """ValueError where the tables are not a profile's (a hand edit, a stale file): every op of the layer timed
        at every SM count, one number (or None) a row count."""
        timed = self.times.keys() & self.rows.keys()
        if missing := [op for op in profiled_ops(self.tp_size, self.moe) if op not in timed]:
            raise ValueError(f"no times of the ops {missing}")
        for op, by_sms in self.times.items():
            for s in self.sms:
                ts = by_sms.get(str(s)) if isinstance(by_sms, dict) else None
                if not isinstance(ts, list) or len(ts) != len(self.rows.get(op, ())) or not all(
                        t is None or isinstance(t, (int, float)) and not isinstance(t, bool) for t in ts):
                    raise ValueError(f"{op}'s times on {s} SMs are not {len(self.rows.get(op, ()))} numbers")

    def save(self, path: str) -> None:
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(asdict(self), f)
        os.replace(tmp, path)  # a run killed mid-write leaves the last complete file

    @classmethod
    def load(cls, path: str) -> Profile:
        """ValueError naming the file where it is not a profile (corrupt, or another version's)."""
        try:
            with open(path) as f:
                p = cls(**json.load(f))
            p.check()
            return p
        except (ValueError, TypeError) as e:  # (JSONDecodeError, UnicodeDecodeError; missing or unknown fields)
            raise ValueError(f"the cached profile {path} is not one this version reads ({e}): delete it, and tune "
                             f"measures the profile again") from None


def _grid(n: int) -> list[int]:
    return sorted({min(i, n) for i in range(STEP, n + STEP, STEP)}) if n > 0 else []


def new_profile(cfg: ModelConfig, dtype: torch.dtype, device: torch.device, budget: int, decode_rows: int,
                context: int, tp_size: int = 1) -> Profile:
    if not 0 <= decode_rows <= budget:
        raise ValueError(f"decode rows ({decode_rows}) must be within the token budget ({budget})")
    if device.type == "cuda":
        from nanoflow.pipeline.units import partition, total_sms
        total = total_sms(device.index or 0)
        granted = {total}
        for s in range(MIN_SMS, total, SMS_STEP):
            try:  # what the driver grants (it rounds up to its granularity), where it grants anything
                granted.add(partition((s,), device.index or 0)[0][0])
            except (RuntimeError, ValueError) as e:
                print(f"no {s}-SM partition: {e}")
        sms = sorted(granted)
    else:
        total, sms = 1, [1]
    rows = {op: _grid(decode_rows if op == "decode_attn" else budget - decode_rows if op == "prefill_attn"
                      else budget) for op in profiled_ops(tp_size, cfg.is_moe)}
    times = {op: {str(s): [None] * len(rows[op]) for s in sms} for op in rows}
    return Profile(gpu_name(device), shape_key(cfg), dtype_name(dtype), budget, decode_rows, context, total, sms,
                   rows, times, tp_size=tp_size)


# Bumped when a kernel changes what a profile measures, so that older profiles are measured again (2: stream-K
# decode attention, the symmetric-memory all-reduce; 3: decode in fp16 over an fp8 cache, 4 programs per SM and a
# query block of the group's rows; 4: the TMA page kernel; 5: the combine per boundary, the gather kernel again on
# the whole device over 16-bit caches; 6: the experts' SwiGLU in gate_up's epilogue, prefill attention's unmasked
# tiles and longest-first launch; 7: the same unmasked tiles with a sliding window; 8: the page kernel's dots
# transposed under 16 query rows; 9: the experts' last round of tiles cut by k-chunks; 10: not for tiles of fewer than
# 48 k-iterations; 11: the experts' GEMMs run one program an SM of their unit's share, not of the device; 12: each
# expert's rows from a multiple of the tile rows on, the gaps zero rows; 13: only where experts average two tiles).
KERNELS = 13


def profile_path(gpu: str, cfg: ModelConfig, dtype: torch.dtype, budget: int, decode_rows: int, context: int,
                 tp_size: int = 1) -> str:
    tp = f"-tp{tp_size}-{all_reduce_backend()}" if tp_size > 1 else ""
    name = f"{cache_key(gpu, cfg, dtype, budget)}--d{decode_rows}-c{context}{tp}--k{KERNELS}.json"
    return os.path.join(cache_dir("profiles"), name)


def load_or_measure(cfg: ModelConfig, dtype: torch.dtype, device: torch.device, budget: int, decode_rows: int,
                    context: int, reps: int | None = None, progress: bool = True, tp_size: int = 1) -> Profile:
    """The cached profile, its missing points measured first. cfg: the whole model (a rank's shard is profiled)."""
    path = profile_path(gpu_name(device), cfg, dtype, budget, decode_rows, context, tp_size)
    p = Profile.load(path) if os.path.exists(path) else \
        new_profile(cfg, dtype, device, budget, decode_rows, context, tp_size)
    reps = reps or (20 if device.type == "cuda" else 3)
    if p.missing_collectives():
        from nanoflow.pipeline.collectives import time_collectives
        cols = time_collectives(cfg, dtype, device.type, tp_size, {op: p.rows[op] for op in p.times
                                                                   if op in NETWORK_OPS}, reps)
        for op, us in cols.items():
            for s in p.sms:
                p.times[op][str(s)] = us
        p.save(path)
    return measure(p, cfg, dtype, device, path, reps, progress)


# -- measuring -------------------------------------------------------------------------------------------
def steady_batch(budget: int, decode_rows: int, context: int, block_size: int, vocab: int,
                 max_blocks: int | None = None) -> tuple[ForwardBatch, int]:
    """A host batch of `decode_rows` decode sequences over `context` tokens, then prompts of `context`
    tokens up to `budget` rows, each sequence in its own KV blocks, or, past `max_blocks`, in blocks reused from
    the first (for timing only: a layer's KV is far larger than the L2 cache, so the reads cost the same). Returns
    it and the blocks it would need unshared."""
    pos, slots, qs, lens, tables = [], [], [0], [], []
    blocks = 0

    def add(positions: range, seq_len: int):
        nonlocal blocks
        ids = range(blocks, blocks + -(-seq_len // block_size))
        table = [b % max_blocks for b in ids] if max_blocks else list(ids)
        blocks += len(table)
        pos.extend(positions)
        slots.extend(table[p // block_size] * block_size + p % block_size for p in positions)
        qs.append(qs[-1] + len(positions))
        lens.append(seq_len)
        tables.append(table)
    for _ in range(decode_rows):
        add(range(context - 1, context), context)
    left = budget - decode_rows
    while left:
        n = min(context, left)
        add(range(n), n)
        left -= n
    ids = torch.randint(0, vocab, (budget,), generator=torch.Generator().manual_seed(0))
    batch = ForwardBatch(ids, torch.tensor(pos), torch.tensor(slots), qs, lens, tables, decode_rows,
                         torch.empty(0, dtype=torch.long))
    return batch, blocks


def layer_setup(cfg: ModelConfig, dtype: torch.dtype, device: torch.device, budget: int, decode_rows: int,
                context: int, block_size: int = 16, tp_size: int = 1) -> tuple[LlamaModel, Workspace, ForwardBatch]:
    """One decoder layer (a rank's shard of it) with dummy weights, a filled KV cache and workspace, and the
    steady-state batch."""
    one = replace(cfg, num_layers=1)
    tp = TPGroup(0, tp_size)  # (a shard's shapes; the collectives are timed apart)
    model = LlamaModel(one, dtype, device, max(context, 1), tp)
    init_dummy(model, 0)
    one = model.cfg
    if tp_size > 1:
        layer = model.layers[0]
        layer.o_rows = torch.randn(one.hidden_size // tp_size, one.q_size * tp_size, dtype=dtype, device=device)
    batch, blocks = steady_batch(budget, decode_rows, context, block_size, cfg.vocab_size)
    model.kv_cache = torch.randn(1, 2, blocks + 1, block_size, one.num_kv_heads, one.head_dim, dtype=dtype,
                                 device=device)
    ws = Workspace.allocate(one, budget, dtype, device, tp_size)
    for f in ws.__slots__:
        getattr(ws, f).normal_()  # real values: a GEMM on zeros runs faster than on data
    return model, ws, batch.to(device)


def op_range(p: Profile, op: str, x: int) -> tuple[int, int]:
    """The rows over which op is timed at grid point x."""
    return (p.decode_rows, p.decode_rows + x) if op == "prefill_attn" else (0, x)


def _graph(fn, stream: torch.cuda.Stream, sms: int, total: int, n: int) -> torch.cuda.CUDAGraph:
    """fn called n times, captured on stream (after a warm-up that compiles and builds attention metadata),
    its kernels chosen for a share of `sms` SMs, as the pipeline issues them."""
    from nanoflow.kernels.sm_share import sm_share
    with sm_share(sms, total):
        with torch.cuda.stream(stream):
            fn()
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            for _ in range(n):
                fn()
    return graph


def _replay_us(runs: list[tuple[torch.cuda.CUDAGraph, torch.cuda.Stream, int]]) -> list[float]:
    """Replay the graphs together, each on its stream; µs per call in each."""
    for graph, stream, _ in runs:
        with torch.cuda.stream(stream):
            graph.replay()  # warm
    torch.cuda.synchronize()
    marks = []
    for graph, stream, n in runs:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        with torch.cuda.stream(stream):
            start.record(stream)
            graph.replay()
            end.record(stream)
        marks.append((start, end, n))
    torch.cuda.synchronize()
    return [s.elapsed_time(e) * 1e3 / n for s, e, n in marks]


def _cpu_us(fn, reps: int) -> float:
    fn()
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t) / reps * 1e6


def measure(p: Profile, cfg: ModelConfig, dtype: torch.dtype, device: torch.device, path: str, reps: int,
            progress: bool = True) -> Profile:
    todo, pairs = p.missing(), p.missing_pairs()
    if not todo and not pairs:
        return p
    # built outside inference mode, as the engine's buffers are (torch.compile cannot take views of inference
    # tensors apart), run inside it, as the engine runs
    model, ws, batch = layer_setup(cfg, dtype, device, p.budget, p.decode_rows, p.context, tp_size=p.tp_size)

    def call(op, x):
        a, b = op_range(p, op, x)
        return lambda: getattr(model, op)(0, ws, batch, a, b)
    on_gpu = device.type == "cuda"
    with torch.inference_mode(), tqdm(total=len(todo) + len(pairs), desc="profiling", disable=not progress) as bar:
        for op, s, i in todo:
            fn = call(op, p.rows[op][i])
            if on_gpu:
                _, stream = share(s, torch.cuda.current_device())
                p.times[op][str(s)][i] = _replay_us([(_graph(fn, stream, s, p.total_sms, reps), stream, reps)])[0]
            else:
                p.times[op][str(s)][i] = _cpu_us(fn, reps)
            p.save(path)
            bar.update()
        for sc, sm in pairs:
            # the representative ops alone, then side by side with call counts that make both last as long
            units = partition((sc, sm), torch.cuda.current_device())
            ops = [next(op for op in REPRESENTATIVE[k] if op in p.rows) for k in ("compute", "memory")]
            runs = [(call(op, p.rows[op][-1]), st, sms) for op, (_, st), sms in zip(ops, units, (sc, sm))]
            alone = [_replay_us([(_graph(fn, st, sms, p.total_sms, reps), st, reps)])[0] for fn, st, sms in runs]
            ns = [max(reps, round(reps * max(alone) / t)) for t in alone]
            both = _replay_us([(_graph(fn, st, sms, p.total_sms, n), st, n) for (fn, st, sms), n in zip(runs, ns)])
            p.interference.setdefault("compute|memory", {})[str(sc)] = both[0] / alone[0]
            p.interference.setdefault("memory|compute", {})[str(sm)] = both[1] / alone[1]
            p.save(path)
            bar.update()
    return p
