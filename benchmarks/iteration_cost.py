"""What an iteration costs, fitted to GPU runs: a + b_p * prefill tokens + b_d * decode tokens (ms).

`bench throughput` reports, per stage of a run (fill, steady, drain), its iterations, tokens and GPU time; the
scheduler's replay (`nanoflow bench schedule`) gives each iteration's prefill and decode tokens for the same lengths,
budget, KV blocks and policy. Least squares over every stage of the given runs gives the three costs, and each stage's
predicted time against its measured one. A workload fixes its prefill and decode tokens, so between two schedules of
it only the iteration count differs: the gain of a policy is a times the iterations it saves.

python benchmarks/iteration_cost.py RUN.json [RUN.json ...] [--max-model-len 32768] [--output fit.json]"""
import argparse
import json

import numpy as np

from nanoflow.bench.replay import replay
from nanoflow.bench.throughput import stage_of
from nanoflow.bench.workloads import parse
from nanoflow.config import EngineConfig
from nanoflow.engine.scheduler import Scheduler
from nanoflow.engine.sequence import Status

STAGES = ("fill", "steady", "drain")  # (stage_of's)


def stage_sums(run: dict, max_model_len: int) -> dict[str, np.ndarray]:
    """Per stage of the run (`bench throughput`'s stage_of), replayed: [iterations, prefill tokens, decode tokens]."""
    r = run["results"][0]
    config = EngineConfig(max_num_batched_tokens=run["max_num_batched_tokens"], max_num_seqs=run["max_num_seqs"],
                          block_size=run["block_size"], admission=run["admission"],
                          schedule_policy=run.get("schedule_policy") or "fcfs")
    sched = Scheduler(config, run["kv_blocks"], config.max_num_batched_tokens, max_model_len)
    sums = {s: np.zeros(3) for s in STAGES}
    seqs, waited = [], True  # every sequence; whether any waited before this iteration's admission
    for out in replay(sched, parse(r["workload"]).lengths):
        seqs = seqs or list(sched.running) + list(sched.waiting)
        done = sum(s.status is Status.FINISHED for s in seqs)
        sums[stage_of(done, waited)] += (1, out.num_tokens - out.num_decode, out.num_decode)
        waited = bool(sched.waiting)  # (finishing changes only the running)
    for s in STAGES:
        if s in r["stages"] and r["stages"][s]["iterations"] != sums[s][0]:
            raise ValueError(f"{r['workload']}: the replay's {s} has {sums[s][0]:.0f} iterations, the run's "
                             f"{r['stages'][s]['iterations']} (another scheduler, or another seed?)")
    return sums


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", help="bench throughput JSON reports (one workload each, with stages)")
    ap.add_argument("--max-model-len", type=int, default=32768)
    ap.add_argument("--output")
    a = ap.parse_args()
    rows, x, y = [], [], []
    for path in a.runs:
        run = json.load(open(path))
        for s, v in stage_sums(run, a.max_model_len).items():
            if v[0]:
                rows.append((path.rsplit("/", 1)[-1], s))
                x.append(v)
                y.append(run["results"][0]["stages"][s]["gpu_ms"])
    x, y = np.array(x), np.array(y)
    coef = np.linalg.lstsq(x, y, rcond=None)[0]
    pred = x @ coef
    print(f"a = {coef[0]:.2f} ms an iteration, b_p = {coef[1] * 1e3:.2f} us a prefill token, "
          f"b_d = {coef[2] * 1e3:.2f} us a decode token")
    print(f"{'run':64s} {'stage':>6s} {'iterations':>10s} {'GPU ms':>9s} {'predicted':>9s} {'error':>6s}")
    for (name, s), v, t, p in zip(rows, x, y, pred):
        print(f"{name[:64]:64s} {s:>6s} {v[0]:10.0f} {t:9.0f} {p:9.0f} {100 * (p / t - 1):5.1f}%")
    if a.output:
        with open(a.output, "w") as f:
            json.dump({"a_ms": coef[0], "b_prefill_ms": coef[1], "b_decode_ms": coef[2],
                       "stages": [{"run": n, "stage": s, "iterations": v[0], "prefill_tokens": v[1],
                                   "decode_tokens": v[2], "gpu_ms": t, "predicted_ms": p}
                                  for (n, s), v, t, p in zip(rows, x.tolist(), y.tolist(), pred.tolist())]},
                      f, indent=1)


if __name__ == "__main__":
    main()
