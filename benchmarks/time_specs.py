"""Time hand-written pipeline specs against non-overlap on steady-state batches, as `nanoflow tune` times its
candidates: each spec's layers captured in a CUDA graph and replayed (pipeline/measure.py), with any engine
setting (tune itself profiles a 16-bit cache only). The specs take turns, `--rounds` times; the median of each is
kept (the card's clock drifts under its power cap).

python benchmarks/time_specs.py --model mixtral-8x7b --load-format dummy --kv-cache-dtype fp8
    --max-num-batched-tokens 4096 --batch 2688:720:1000 1376:524:1280 --spec FILE ... [--output F]

--batch ROWS:DECODE:CONTEXT: DECODE decode rows over CONTEXT tokens, then prompts of CONTEXT tokens up to ROWS. A
spec's row boundaries are scaled to each batch's rows (PipelineSpec.scaled)."""
import argparse
import json
import statistics

from nanoflow.entrypoints.cli import add_engine_args, engine_kwargs
from nanoflow.models.loader import resolve
from nanoflow.pipeline.measure import close, time_iteration
from nanoflow.pipeline.spec import load_spec, non_overlap


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_engine_args(p)
    p.add_argument("--batch", nargs="+", required=True)
    p.add_argument("--spec", nargs="+", required=True, help="spec files or shipped specs' names")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--output")
    a = p.parse_args()
    cfg = resolve(a.model, a.num_layers).config
    # one engine (model and KV cache) for every batch: time_iteration keys it by its arguments
    kwargs = engine_kwargs(a) | {"max_num_seqs": max(int(b.split(":")[0]) for b in a.batch)}
    rows = []
    try:
        for b in a.batch:
            budget, decode, context = map(int, b.split(":"))
            specs = [non_overlap(budget, 1, cfg.is_moe)] + [load_spec(f) for f in a.spec]
            times = {s.name: [] for s in specs}
            for _ in range(a.rounds):
                for s in specs:
                    times[s.name].append(time_iteration(kwargs, a.model, s, decode, context, budget, a.reps))
            base = statistics.median(times["non-overlap"])
            for s in specs:
                t = statistics.median(times[s.name])
                rows.append(dict(batch=b, spec=s.name, ms=t * 1e3, runs_ms=[x * 1e3 for x in times[s.name]],
                                 speedup=base / t))
                print(rows[-1], flush=True)
    finally:
        close()
    print(f"\n{'batch':<16} {'spec':<40} {'ms/iteration':>13} {'vs non-overlap':>15}")
    for r in rows:
        print(f"{r['batch']:<16} {r['spec']:<40} {r['ms']:>13.3f} {r['speedup']:>14.3f}x")
    if a.output:
        with open(a.output, "w") as f:
            json.dump(dict(command=vars(a), rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
