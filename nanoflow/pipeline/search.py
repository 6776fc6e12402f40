"""NanoFlow's two-stage search for a pipeline spec, as MILPs (scipy.optimize.milp: HiGHS).

The model. Each nano-op runs on a unit (a stream on its own SMs); a unit runs its nano-ops in issue order,
layer after layer. With that order fixed the steady state is a cyclic schedule: nano-op j of layer l
starts at s_j + l·T, and the period T (the time per layer) is the least T for which starts exist with
    s_j     >= s_i + dur_i + wait    for each input i of j in the same layer (graph.dependencies)
    s_j + T >= s_i + dur_i + wait    for each input i of j in the layer before (attn_norm reads down)
    s_j     >= s_i + dur_i           for i, j consecutive on a unit's stream
    s_j + T >= s_i + dur_i           for i the last and j the first op of a unit (its next layer)
(wait: the cost of a cross-unit event, 0 within a unit). With the durations fixed this is an LP, and its
optimum is the period the GPU settles into (the maximum cycle ratio of this event graph): `predict`.
The two stages make the durations linear in binaries:
  stage 1 (structure; no interference): for an issue-order template of k nano-batches and one split of
    the SMs, w[i, (a, b)] picks nano-batch i's rows [a, b) among the cut positions (multiples of 128 and
    the decode/prefill boundary), one per nano-batch, each starting where the one before ends;
    dur = sum of w · time(op, a, b, unit's share).
  stage 2 (SM shares; with interference): for one structure, x[u, S] picks each unit's SM count, one per
    unit, sum of S · x <= the device's SMs; dur = sum of x · time(op, rows, S) · slowdown(unit kind, S).

What is enumerated rather than solved, and why: the issue-order template (k nano-batches; the attention
half of nano-batch i + lag is issued before the MLP half of nano-batch i) and stage 1's SM split. Making
the order a variable needs a big-M disjunction per pair of nano-ops on a unit (hundreds of binaries with
weak relaxations) where a handful of templates cover the orders that overlap anything at all; and the
split times the row choice would make durations bilinear. Both lists are short (templates: k <= 4, lag <
k, 6 in all; splits: the memory share's steps up to half the device), so every combination is solved
exactly, and stage 2 re-optimizes the shares of every distinct structure with interference.

With tensor parallelism one more split is tried for every order: no memory unit, the attention on the compute
unit over the whole device, so that only the collectives overlap the compute (NanoFlow's network overlap without
an SM split, which #5 measured to cost more than it hides on a single GPU). Its shares are fixed: stage 2 predicts it.
"""
from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field, replace
from itertools import pairwise

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp

from nanoflow.models.llama import LAYER_OPS, O_ALLGATHER
from nanoflow.pipeline.graph import dependencies, previous_layer_dependencies
from nanoflow.pipeline.profile import OP_KIND, STEP, Profile
from nanoflow.pipeline.spec import NanoOp, PipelineSpec, Unit, non_overlap

UNITS = ("compute", "memory")  # on SM shares the search picks; with TP also "network", on the whole device
GATHER = ("none", "first", "all")  # which nano-batches project their attention output by the all-gather form
WAIT_US = 2.0  # a cross-unit event wait inside a CUDA graph (estimate; the measured candidates settle it)
MAX_K = 4


@dataclass(slots=True)
class Candidate:
    spec: PipelineSpec
    period_us: float  # predicted time per layer in the steady state
    breakdown: dict  # units' busy time, the critical cycle, the schedule
    measured_s: float | None = None  # seconds per iteration, when tune measured it


@dataclass(slots=True)
class Search:
    candidates: list[Candidate]  # best first; the non-overlap spec always among them
    seconds: float
    milps: int
    notes: list[str] = field(default_factory=list)

    @property
    def baseline(self) -> Candidate:
        return next(c for c in self.candidates if c.spec.name == "non-overlap")


@dataclass(slots=True)
class _Solution:
    period: float
    starts: np.ndarray
    durations: list[float]
    chosen: np.ndarray  # the binaries
    edges: list[tuple[int, int, int, float]]


def layer_edges(ops: list[NanoOp], wait_us: float) -> list[tuple[int, int, int, float]]:
    """(i, j, layers back, gap): nano-op j starts after i of this layer (0) or of the layer before (1) ends."""
    index = {id(n): i for i, n in enumerate(ops)}
    edges = []
    for j, n in enumerate(ops):
        for back, deps in ((0, dependencies(n, ops)), (1, previous_layer_dependencies(n, ops))):
            edges += [(index[id(d)], j, back, wait_us if d.unit != n.unit else 0.0) for d in deps]
    for unit in dict.fromkeys(n.unit for n in ops):
        seq = [j for j, n in enumerate(ops) if n.unit == unit]
        edges += [(i, j, 0, 0.0) for i, j in pairwise(seq)] + [(seq[-1], seq[0], 1, 0.0)]
    return edges


def _solve(ops: list[NanoOp], dur: list[dict[int, float]], nbin: int, rows: list[tuple[dict[int, float], float, float]],
           wait_us: float, time_limit: float) -> _Solution:
    """Minimize the period. dur[j]: binary index -> µs (index -1: a constant); rows: linear constraints on
    the binaries (coefficients, lower, upper). Variables: [T, s_0 .. s_n-1, binaries]."""
    n = len(ops)
    edges = layer_edges(ops, wait_us)
    a = np.zeros((len(edges) + len(rows), 1 + n + nbin))
    lb, ub = np.zeros(len(a)), np.full(len(a), np.inf)
    for r, (i, j, back, gap) in enumerate(edges):
        a[r, 0] = back
        a[r, 1 + j] += 1
        a[r, 1 + i] -= 1
        for b, t in dur[i].items():
            if b < 0:
                lb[r] += t
            else:
                a[r, 1 + n + b] -= t
        lb[r] += gap
    for r, (coefs, lo, hi) in enumerate(rows, len(edges)):
        for b, c in coefs.items():
            a[r, 1 + n + b] = c
        lb[r], ub[r] = lo, hi
    cost = np.zeros(1 + n + nbin)
    cost[0] = 1
    cost[1:1 + n] = 1e-6  # among schedules of the least period, the earliest starts (what the GPU does)
    res = milp(cost, constraints=LinearConstraint(a, lb, ub), integrality=[0] * (1 + n) + [1] * nbin,
               bounds=Bounds(0, [np.inf] * (1 + n) + [1] * nbin), options={"time_limit": time_limit})
    if res.x is None:
        raise RuntimeError(f"the schedule MILP found no solution: {res.message}")
    chosen = np.round(res.x[1 + n:])
    durations = [float(sum(t if b < 0 else t * chosen[b] for b, t in d.items())) for d in dur]
    return _Solution(float(res.x[0]), res.x[1:1 + n], durations, chosen, edges)


def _critical_cycle(sol: _Solution) -> list[tuple[int, int]]:
    """A cycle of tight constraints: the chain of nano-ops (and layer crossings) that sets the period."""
    tol = 1e-6 * sol.period + 1e-6
    tight: dict[int, list[tuple[int, int]]] = {}
    for i, j, back, gap in sol.edges:
        if sol.starts[j] + back * sol.period - sol.starts[i] - sol.durations[i] - gap <= tol:
            tight.setdefault(i, []).append((j, back))
    state: dict[int, int] = {}  # 1: on the path, 2: done
    path: list[tuple[int, int]] = []

    def visit(i: int) -> list[tuple[int, int]] | None:
        state[i] = 1
        for j, back in tight.get(i, []):
            path.append((j, back))
            if state.get(j) == 1:  # the cycle: the nano-ops after j's first visit, back to j
                return path[next(k for k, (m, _) in enumerate(path) if m == j) + 1:]
            if j not in state and (cycle := visit(j)):
                return cycle
            path.pop()
        state[i] = 2
        return None
    for i in range(len(sol.durations)):
        if i not in state:
            path[:] = [(i, 0)]
            if cycle := visit(i):
                return cycle
    return []


def _candidate(spec: PipelineSpec, ops: list[NanoOp], sol: _Solution, shares: dict[str, int],
               slowdown: dict[str, float]) -> Candidate:
    busy = {u.name: sum(d for n, d in zip(ops, sol.durations) if n.unit == u.name) for u in spec.units}

    def name(j):
        return f"{ops[j].unit}: {ops[j].op}[{ops[j].start}:{ops[j].end}] {sol.durations[j]:.1f} µs"
    breakdown = {
        "period_us": sol.period,
        "units": {u: {"sms": shares[u], "busy_us": busy[u], "busy_share": busy[u] / sol.period,
                      "slowdown": slowdown[u]} for u in busy},
        "critical": [name(j) + (" (next layer)" if back else "") for j, back in _critical_cycle(sol)],
        "schedule": [{"unit": n.unit, "op": n.op, "start": n.start, "end": n.end, "start_us": float(s),
                      "dur_us": d} for n, s, d in zip(ops, sol.starts, sol.durations)],
    }
    return Candidate(spec, sol.period, breakdown)


def predict(spec: PipelineSpec, p: Profile, wait_us: float = WAIT_US) -> Candidate:
    """The steady-state period of a given spec on the profiled batch (its shares fixed), interference
    applied to every unit beside another unit's kind (a pipelined unit runs beside the others nearly all
    the time)."""
    ops = [n for n in spec.scaled(p.budget) if n.start < n.end]
    shares = {u.name: u.sms or p.total_sms for u in spec.units}
    slowdown = {u.name: p.slowdown(u.kind, shares[u.name], [v.kind for v in spec.units if v.kind != u.kind])
                for u in spec.units}
    dur = [{-1: p.time(n.op, n.start, n.end, shares[n.unit]) * slowdown[n.unit]} for n in ops]
    return _candidate(spec, ops, _solve(ops, dur, 0, [], wait_us, 60.0), shares, slowdown)


# -- the structures searched -------------------------------------------------------------------------------
@dataclass(slots=True, frozen=True)
class Order:
    """An issue-order template: k nano-batches, issued from the first rows (or, reversed, from the last:
    the decode rows come first in a batch, so reversed puts their attention beside the prefill rows' MLP);
    the attention half of the nano-batch `lag` places later is issued before the MLP half of each, so that
    the compute unit has one nano-batch's GEMMs to run while the memory unit runs another's attention.
    With tensor parallelism, `gather` says which nano-batches (none, the first issued, all) take the all-gather
    form of the attention output's projection (NanoFlow's 70B pipeline: the first), and each MLP half is issued in
    two segments, the projection then the MLP, the MLP of a nano-batch after the projection of the next, so that a
    collective always has compute beside it."""
    k: int
    lag: int
    reverse: bool
    gather: str | None = None  # None: no tensor parallelism

    def nano_ops(self, cuts: list[int], ops: tuple[str, ...] = LAYER_OPS) -> list[NanoOp]:
        """The layer's nano-ops (of `ops`, the layer's) in issue order, nano-batch i being rows
        [cuts[i], cuts[i + 1])."""
        attn, mlp = ops[:5], ops[5:]  # a layer's halves: up to the attention outputs, then o_proj and the MLP
        seq = list(range(self.k))[::-1 if self.reverse else 1]

        def half(ops, i):
            return [NanoOp(op, cuts[i], cuts[i + 1], OP_KIND[op]) for op in ops]

        def second(step):
            """The MLP half of the step-th nano-batch issued, as segments that each end in a collective."""
            if self.gather is None:
                return [mlp]
            cut = mlp.index("mlp_norm")
            gathers = self.gather == "all" or (self.gather == "first" and step == 0)
            return [O_ALLGATHER if gathers else mlp[:cut], mlp[cut:]]
        wanted, held = [], []  # held: the MLP segment of the nano-batch before, issued after this one's first
        for step in range(self.k + self.lag):
            if step < self.k:
                wanted += half(attn, seq[step])
            if step >= self.lag:
                first, *rest = second(step - self.lag)
                wanted += half(first, seq[step - self.lag])
                # with collectives, staggered: the compute unit projects this nano-batch while the one before is
                # all-reduced, then runs that one's MLP while this one's projection is reduced
                for seg in held:
                    wanted += seg
                held = [half(seg, seq[step - self.lag]) for seg in rest]
        for seg in held:
            wanted += seg
        # each nano-op as early as wanted, but after its inputs (reversed, prefill attention reads the KV
        # appended by the earlier rows' nano-batches, issued after it)
        issued, done, pending = [], set(), wanted
        while pending:
            n = next(n for n in pending if all(id(d) in done for d in dependencies(n, wanted)))
            pending = [m for m in pending if m is not n]
            issued.append(n)
            done.add(id(n))
        return issued

    def __str__(self) -> str:
        gather = "" if self.gather in (None, "none") else f"-ag{self.gather}"
        return f"{self.k}nb{'-rev' if self.reverse else ''}-lag{self.lag}{gather}"


def orders(max_k: int, tp: bool = False) -> list[Order]:
    return [Order(k, lag, rev, g) for k in range(2, max_k + 1) for lag in range(1, k) for rev in (False, True)
            for g in (GATHER if tp else (None,))]


def units_of(p: Profile) -> tuple[str, ...]:
    return UNITS + (("network",) if p.tp_size > 1 else ())


def on_compute(ops: list[NanoOp]) -> list[NanoOp]:
    """The nano-ops with the memory unit's moved onto the compute unit (the split without a memory share)."""
    return [replace(n, unit="compute") if n.unit == "memory" else n for n in ops]


def cut_positions(p: Profile) -> list[int]:
    return sorted(set(range(0, p.budget, STEP)) | {p.budget} | ({p.decode_rows} if 0 < p.decode_rows else set()))


def stage1(p: Profile, order: Order, shares: dict[str, int], wait_us: float = WAIT_US,
           time_limit: float = 30.0) -> tuple[list[int], float]:
    """The nano-batch boundaries that minimize the period of this order at these shares, no interference."""
    k = order.k
    ops = order.nano_ops(list(range(k + 1)), p.ops)  # placeholder rows (the nano-batch's index): dependencies
    if not shares["memory"]:                         # only need their order
        ops = on_compute(ops)
    pos = cut_positions(p)
    pairs = [[(a, b) for a in pos for b in pos if a < b and (i or a == 0) and (i < k - 1 or b == p.budget)]
             for i in range(k)]
    index, nbin = [], 0
    for pr in pairs:
        index.append(range(nbin, nbin + len(pr)))
        nbin += len(pr)
    dur = [{b: p.time(n.op, a0, b0, shares[n.unit]) for b, (a0, b0) in zip(index[n.start], pairs[n.start])}
           for n in ops]
    rows = [({b: 1.0 for b in index[i]}, 1, 1) for i in range(k)]  # one range per nano-batch
    for i in range(k - 1):  # nano-batch i + 1 starts where i ends
        coefs = {b: float(end) for b, (_, end) in zip(index[i], pairs[i])}
        for b, (start, _) in zip(index[i + 1], pairs[i + 1]):
            coefs[b] = -float(start)
        rows.append((coefs, 0, 0))
    sol = _solve(ops, dur, nbin, rows, wait_us, time_limit)
    cuts = [0] + [next(pr[m] for m, b in enumerate(index[i]) if sol.chosen[b])[1] for i, pr in enumerate(pairs)]
    return cuts, sol.period


_GATHER = {None: "", "none": "",
           "first": "; the first nano-batch issued all-gathers the attention output's projection, the others "
                    "all-reduce it",
           "all": "; every nano-batch all-gathers the attention output's projection"}


def _structure_notes(order: Order, cuts: list[int]) -> str:
    """A candidate's notes: its nano-batches and issue order."""
    return (f"nanoflow tune: nano-batches at rows {cuts}, issued {'last' if order.reverse else 'first'} rows first, "
            f"the attention half of the nano-batch {order.lag} later before each MLP half{_GATHER[order.gather]}")


def stage2(p: Profile, order: Order, cuts: list[int], wait_us: float = WAIT_US,
           time_limit: float = 30.0) -> Candidate:
    """The SM shares of the compute and memory units for this structure, with interference."""
    ops = order.nano_ops(cuts, p.ops)
    options = [s for s in p.sms if s < p.total_sms]
    bin_of = {(u, s): m for m, (u, s) in enumerate((u, s) for u in UNITS for s in options)}
    slow = {(u, s): p.slowdown(u, s, [v for v in UNITS if v != u]) for u, s in bin_of}
    # the network unit runs on the whole device beside the others: its ops' times are fixed
    dur = [{bin_of[n.unit, s]: p.time(n.op, n.start, n.end, s) * slow[n.unit, s] for s in options}
           if n.unit in UNITS else {-1: p.time(n.op, n.start, n.end, 0)} for n in ops]
    rows = [({bin_of[u, s]: 1.0 for s in options}, 1, 1) for u in UNITS]  # one share per unit
    rows.append(({m: float(s) for (_, s), m in bin_of.items()}, 0, p.total_sms))  # that fit the device
    sol = _solve(ops, dur, len(bin_of), rows, wait_us, time_limit)
    shares = {u: s for (u, s), m in bin_of.items() if sol.chosen[m]}
    network = "; collectives on a network unit over the whole device" if p.tp_size > 1 else ""
    notes = (f"{_structure_notes(order, cuts)}; compute unit {shares['compute']} SMs, memory unit "
             f"{shares['memory']}{network}; predicted {sol.period:.1f} µs per layer on {p.gpu} (batch of {p.budget} "
             f"rows, {p.decode_rows} decode over {p.context} tokens)")
    shares["network"] = 0
    units = [Unit(u, u, shares[u]) for u in units_of(p)]
    spec = PipelineSpec(f"tuned-{order}-c{shares['compute']}-m{shares['memory']}", p.budget, units, ops,
                        notes).validate()
    return _candidate(spec, ops, sol, {u: shares[u] or p.total_sms for u in shares},
                      {u: slow[u, shares[u]] if u in UNITS else 1.0 for u in shares})


def network_overlap(p: Profile, order: Order, cuts: list[int], wait_us: float = WAIT_US) -> Candidate:
    """The structure with the attention on the compute unit over the whole device: only the collectives overlap."""
    units = [Unit("compute", "compute"), Unit("network", "network")]
    notes = (f"{_structure_notes(order, cuts)}; every op but the collectives on one compute unit over the whole "
             f"device, the collectives on a network unit beside it")
    spec = PipelineSpec(f"tuned-{order}-net", p.budget, units, on_compute(order.nano_ops(cuts, p.ops)), notes)
    c = predict(spec.validate(), p, wait_us)
    c.spec.notes += f"; predicted {c.period_us:.1f} µs per layer on {p.gpu} (batch of {p.budget} rows)"
    return c


def search(p: Profile, max_k: int = MAX_K, wait_us: float = WAIT_US, time_limit: float = 30.0,
           progress=None) -> Search:
    """Stage 1 for every order and split, stage 2 for every distinct structure found; ranked."""
    t0 = time.perf_counter()
    base = predict(non_overlap(p.budget, p.tp_size, p.moe), p, wait_us)
    splits = p.splits() + ([(p.total_sms, 0)] if p.tp_size > 1 else [])  # (…, 0): no memory unit
    max_k = min(max_k, len(cut_positions(p)) - 1)  # a nano-batch is at least one step of rows
    jobs = [(o, split) for o in orders(max_k, p.tp_size > 1) for split in splits]
    structures = {}
    for o, (sc, sm) in progress(jobs) if progress else jobs:
        cuts, _ = stage1(p, o, {"compute": sc, "memory": sm, "network": 0}, wait_us, time_limit)
        structures[o, tuple(cuts), sm == 0] = None
    found = {}
    for o, cuts, shared in structures:
        c = (network_overlap(p, o, list(cuts), wait_us) if shared
             else stage2(p, o, list(cuts), wait_us, time_limit))
        found.setdefault((c.spec.name, cuts), c)
    candidates = sorted([base, *found.values()], key=lambda c: c.period_us)
    named = Counter()
    for c in candidates:  # (a name tells the order and shares, not the cuts: tune saves each spec by its name)
        named[c.spec.name] += 1
        if named[c.spec.name] > 1:
            c.spec = replace(c.spec, name=f"{c.spec.name}-{named[c.spec.name]}")
    tp = (f", with tensor parallelism x {len(GATHER)} choices of the nano-batches that all-gather instead of "
          f"all-reduce the attention output's projection {GATHER}") if p.tp_size > 1 else ""
    n_orders = len(orders(max_k, p.tp_size > 1))
    notes = [(f"stage 1: {n_orders} issue orders (k = 2..{max_k} nano-batches, lag < k, forward or reversed{tp}) "
              f"x {len(splits)} SM splits {splits} = {len(jobs)} MILPs over the nano-batch boundaries "
              f"(at multiples of {STEP} rows and the decode/prefill boundary, {p.decode_rows})"),
             (f"stage 2: {len(structures)} distinct structures, one MILP each over the units' SM shares "
              f"{[s for s in p.sms if s < p.total_sms]}, with interference"
              + (f" (those of split {(p.total_sms, 0)}, without a memory unit, only predicted)" if p.tp_size > 1
                 else "")),
             ("orders and splits are enumerated, not solved for: an order as MILP variables needs a big-M "
              "disjunction per pair of nano-ops on a unit, and a split times the row choice makes the durations "
              "bilinear; both lists are short, so each combination is solved exactly")]
    if not splits:
        notes.append("nothing to overlap (no decode rows, or no SM partitions on this device): non-overlap only")
    return Search(candidates, time.perf_counter() - t0, 1 + len(jobs) + len(structures), notes)
