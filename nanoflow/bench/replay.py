"""`nanoflow bench schedule`: the scheduler alone, replayed over a workload's lengths with no model and no GPU.

How many iterations a run takes and how full they are depends only on the scheduler, the KV blocks and the lengths.
The replay reads each sampled token back one iteration late, as the asynchronous engine does, and on the H200 runs of
#10 (BENCHMARKS.md) it gave their iteration counts exactly. Where a forward costs a fixed part plus a part per
token, as a mixture of experts' does (its weights and each expert's partial tile, then its rows), fewer iterations for
the same tokens is a faster run: this compares token budgets and schedule policies in seconds, before a GPU run,
and against the fewest iterations any schedule could take (lower_bound). A
workload fixes its prefill and decode tokens, so the gain is the iterations saved times that fixed part, which
benchmarks/iteration_cost.py fits to GPU runs (Mixtral on one H200: 24.9 ms, a fifth of a splitwise run's time; so
8 % fewer iterations predicted 1.6 % and measured 0.7 %, BENCHMARKS.md #10).
"""
from __future__ import annotations

import argparse
import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass

from nanoflow.bench.plots import check_outputs
from nanoflow.bench.workloads import Workload, parse
from nanoflow.config import EngineConfig
from nanoflow.engine.scheduler import Scheduler, SchedulerOutput
from nanoflow.engine.sequence import Request, Status
from nanoflow.sampling_params import SamplingParams


def replay(sched: Scheduler, lengths: list[tuple[int, int]], asynchronous: bool = True) -> Iterator[SchedulerOutput]:
    """Each iteration's SchedulerOutput over requests of these (prompt, output) lengths, all waiting at the start,
    every output token generated (ignore_eos). A request's prompt shares no block with another's. Each iteration's
    sampled tokens are read back at once or, asynchronously, one iteration late."""
    for i, (p, o) in enumerate(lengths):
        room = sched.check_prompt(p, o)  # (as the engine checks and bounds a request)
        seq = Request(str(i), None, [i] * p, SamplingParams(max_tokens=o, ignore_eos=True)).seqs[0]
        seq.max_tokens = min(o, room)
        sched.add(seq)
    inflight = None
    while sched.has_work or inflight:
        out = sched.schedule()
        if not out.empty:
            sched.update(out)
            yield out
        launched = None if out.empty else out
        done, inflight = (inflight, launched) if asynchronous else (launched, None)
        if not (done or inflight):
            raise RuntimeError(f"the scheduler stalled with {len(sched.waiting)} requests waiting")
        for c in done.chunks if done else ():
            if c.samples:
                c.seq.num_inflight -= 1
                if c.seq.status is not Status.FINISHED:
                    c.seq.token_ids.append(7)
                    if c.seq.num_output_tokens >= c.seq.max_tokens:
                        sched.finish(c.seq)


@dataclass(slots=True)
class Replayed:
    workload: str
    budget: int
    schedule_policy: str
    iterations: int
    tokens: int
    tokens_per_iteration: float
    thin_iterations: int  # under a quarter of the budget: mostly the run's fill and drain
    peak_running: int
    preemptions: int
    lower_bound: int  # the fewest iterations any schedule could take (lower_bound)


def lower_bound(lengths: list[tuple[int, int]], config: EngineConfig, num_blocks: int, max_model_len: int) -> int:
    """The fewest iterations any schedule of these (prompt, output) lengths could take: the longest output (an
    iteration each); the tokens to compute over the budget; the token-iterations the sequences hold over the KV
    cache (p + i tokens during output i); their outputs over max_num_seqs (a slot an iteration each)."""
    outs = [(p, min(o, max_model_len - p)) for p, o in lengths]  # as the engine bounds max_tokens
    tokens = sum(p + m - 1 for p, m in outs)  # every prompt token, and each output but the last
    held = sum(m * p + m * (m - 1) // 2 for p, m in outs)
    return max(max(m for _, m in outs), -(-tokens // config.max_num_batched_tokens),
               -(-held // (num_blocks * config.block_size)), -(-sum(m for _, m in outs) // config.max_num_seqs))


def run(workload: Workload, config: EngineConfig, num_blocks: int, max_model_len: int) -> Replayed:
    sched = Scheduler(config, num_blocks, config.max_num_batched_tokens, max_model_len)
    sizes = [out.num_tokens for out in replay(sched, workload.lengths)]
    budget = config.max_num_batched_tokens
    return Replayed(workload.name, budget, config.schedule_policy, len(sizes), sum(sizes), sum(sizes) / len(sizes),
                    sum(n < budget / 4 for n in sizes), sched.peak_running, sched.num_preemptions,
                    lower_bound(workload.lengths, config, num_blocks, max_model_len))


def main(a: argparse.Namespace) -> int:
    check_outputs({"--output": a.output}, {"--plot": a.plot})
    if a.max_model_len is None:  # (the shared parser's auto / -1, the model's length: here there is no model)
        raise ValueError("--max-model-len auto takes the model's context length, and bench schedule replays no "
                         "model: give a number of tokens")
    for flag, value, most in (("--num-kv-blocks", a.num_kv_blocks, 2**31), ("--block-size", a.block_size, 2**16),
                              ("--max-num-seqs", a.max_num_seqs, 2**20), ("--max-model-len", a.max_model_len, 2**31),
                              *(("--max-num-batched-tokens", b, 2**31) for b in a.max_num_batched_tokens)):
        if value is None or not 1 <= value <= most:
            raise ValueError(f"{flag} must be an integer in [1, {most:,}], not {value}")
    rows = []
    for spec in a.workload:
        w = parse(spec, a.num_requests, a.seed)
        if w.rounds:
            raise ValueError(f"{spec}: a multi-round workload's turns wait on each other's answers; replay takes "
                             f"const or trace workloads")
        for budget in a.max_num_batched_tokens:
            for policy in a.schedule_policy:
                config = EngineConfig(max_num_batched_tokens=budget, max_num_seqs=a.max_num_seqs,
                                      block_size=a.block_size, admission=a.admission, schedule_policy=policy)
                rows.append(run(w, config, a.num_kv_blocks, a.max_model_len))
    print(f"{'workload':24s} {'budget':>6s} {'policy':>6s} {'iterations':>10s} {'bound':>6s} {'tok/iter':>8s} "
          f"{'thin':>5s} {'peak running':>12s} {'preempted':>9s}")
    for r in rows:
        print(f"{r.workload:24s} {r.budget:6d} {r.schedule_policy:>6s} {r.iterations:10d} {r.lower_bound:6d} "
              f"{r.tokens_per_iteration:8.0f} {r.thin_iterations:5d} {r.peak_running:12d} {r.preemptions:9d}")
    print("bound: the fewest iterations any schedule could take (the longest output; the tokens over the budget; "
          "what the sequences hold over the KV cache; their outputs over max_num_seqs)")
    if a.output:
        with open(a.output, "w") as f:
            json.dump({"command": a.command_line, "num_kv_blocks": a.num_kv_blocks, "block_size": a.block_size,
                       "admission": a.admission, "results": [asdict(r) for r in rows]}, f, indent=1)
    if a.plot:
        from nanoflow.bench.plots import schedule_bars
        schedule_bars([asdict(r) for r in rows], a.plot, f"the scheduler replayed: {a.num_kv_blocks} KV blocks of "
                      f"{a.block_size} tokens, admission {a.admission}")
    return 0
