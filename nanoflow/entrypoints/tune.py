"""`nanoflow tune`: profile the GPU (cached) → search pipeline specs (two MILP stages) → measure the best
few as real pipelined iterations → keep the fastest in the cache, where `--pipeline-spec auto` finds it."""
from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import replace


def add_parser(subparsers) -> None:
    from nanoflow.entrypoints.cli import add_engine_args
    p = subparsers.add_parser("tune", help="search the pipeline spec for this GPU, model, dtype and token budget")
    add_engine_args(p)
    p.add_argument("--decode-rows", type=int, default=None,
                   help="decode rows of the steady-state batch (default: a third of the budget, the share of "
                        "decode tokens in const 1024/512)")
    p.add_argument("--context", type=int, default=1280,
                   help="KV tokens of each decode row, and the prompt length of the prefill rows (default: "
                        "1024 + 512 / 2)")
    p.add_argument("--top", type=int, default=3, help="measure this many of the best predicted specs")
    p.add_argument("--max-nano-batches", type=int, default=4)
    p.add_argument("--output", help="also write the chosen spec to this file")
    p.add_argument("--save-candidates", metavar="DIR",
                   help="also write every candidate run or predicted to DIR/<name>.json, and DIR/ranking.json: "
                        "their names and times, fastest first (to bench the runner-up, say)")
    p.set_defaults(func=main)


def _measure_hook():
    """How a candidate is timed: a real iteration (every rank's, with tensor parallelism). A seam for the tests."""
    from nanoflow.pipeline.measure import time_iteration
    return time_iteration


def save_candidates(picks, best, folder: str) -> None:
    import json
    os.makedirs(folder, exist_ok=True)
    ranked = sorted(picks, key=lambda c: (c.measured_s is None, c.measured_s or 0.0, c.period_us))
    for c in ranked:
        c.spec.save(os.path.join(folder, f"{c.spec.name}.json"))
    with open(os.path.join(folder, "ranking.json"), "w") as f:
        json.dump([{"name": c.spec.name, "predicted_us_per_layer": c.period_us, "measured_s_per_iteration":
                    c.measured_s, "chosen": c is best} for c in ranked], f, indent=1)
    print(f"written: {len(ranked)} candidates and ranking.json in {folder}")


def main(a: argparse.Namespace) -> int:
    from tqdm import tqdm

    from nanoflow.config import resolve_device, resolve_dtype
    from nanoflow.distributed.worker import check_size
    from nanoflow.entrypoints.cli import engine_kwargs
    from nanoflow.executor.model_runner import batch_budget
    from nanoflow.models.loader import check_load_format, resolve
    from nanoflow.pipeline.cache import (
        HAND,
        cache_key,
        fits_hand_spec,
        gpu_name,
        save_tuned,
    )
    from nanoflow.bench.plots import check_outputs
    from nanoflow.pipeline.measure import close as close_engines
    from nanoflow.pipeline.profile import load_or_measure
    from nanoflow.pipeline.spec import load_spec

    try:
        from nanoflow.pipeline.search import predict, search
    except ImportError as e:
        print(f"nanoflow: error: tune needs scipy ({e}): pip install 'nanoflow[tune]'", file=sys.stderr)
        return 2
    if a.kv_cache_dtype != "auto":  # (a tuned spec is keyed by the model's dtype, and found with any KV dtype)
        print("nanoflow: error: tune profiles and times the KV cache in the model's dtype; run it without "
              f"--kv-cache-dtype {a.kv_cache_dtype} (the spec it finds also serves an fp8 cache)", file=sys.stderr)
        return 2
    tp = a.tensor_parallel_size
    if tp < 1:
        raise ValueError(f"--tensor-parallel-size must be >= 1, not {tp}")
    source = resolve(a.model, a.num_layers, a.revision, a.hf_overrides)
    check_load_format(source, a.load_format)  # (its candidates' timing builds the model, after the profile)
    cfg = source.config
    device = resolve_device(a.device)  # (all refused before the search, as the engine refuses them)
    cfg.shard(tp)
    if tp > 1:
        check_size(tp, device.type)
    for flag, value in (("--max-num-batched-tokens", a.max_num_batched_tokens), ("--context", a.context),
                        ("--top", a.top), ("--max-nano-batches", a.max_nano_batches)):
        if value is not None and value < 1:
            raise ValueError(f"{flag} must be >= 1, not {value}")
    if a.context >= (limit := a.max_model_len or cfg.context_length):
        raise ValueError(f"--context {a.context} leaves no room in the model's context length ({limit})")
    check_outputs({"--output": a.output}, {})
    if a.save_candidates and os.path.exists(a.save_candidates) and not os.path.isdir(a.save_candidates):
        raise ValueError(f"--save-candidates {a.save_candidates}: a file, not a folder (checked before the run)")
    dtype = resolve_dtype(a.dtype, device, cfg.torch_dtype)
    budget = batch_budget(a.max_num_batched_tokens, device)
    decode = budget // 3 if a.decode_rows is None else a.decode_rows
    t = time.perf_counter()
    prof = load_or_measure(cfg, dtype, device, budget, decode, a.context, tp_size=tp)
    print(f"profile: {prof.gpu}, {budget} rows ({decode} decode over {a.context} tokens), SM counts {prof.sms} "
          f"({time.perf_counter() - t:.1f} s; cached, resumable)")
    found = search(prof, a.max_nano_batches, progress=lambda jobs: tqdm(jobs, desc="searching"))
    print(f"search: {found.seconds:.1f} s, {found.milps} MILPs")
    for note in found.notes:
        print(f"  {note}")
    picks = found.candidates[:a.top]
    extra = [found.baseline]
    if fits_hand_spec(cfg):
        extra.append(predict(load_spec(HAND).for_tensor_parallel(tp), prof))  # the hand spec of #5, for comparison
    picks += [c for c in extra if all(c.spec.name != p.spec.name for p in picks)]
    time_iteration = _measure_hook()
    if time_iteration is None:
        print("NOTE: nanoflow.pipeline.measure is not available, so no candidate was run: the choice below is "
              "by predicted time only")
        best = min(picks, key=lambda c: c.period_us)
    else:
        try:
            for c in tqdm(picks, desc="measuring"):
                try:  # one candidate that cannot run (an SM split the driver refuses, say) is no reason to stop
                    c.measured_s = time_iteration(engine_kwargs(a), a.model, c.spec, decode, a.context, budget)
                except (RuntimeError, ValueError) as e:
                    print(f"{c.spec.name}: failed to run ({type(e).__name__}: {e})")
        finally:
            close_engines()
        ran = [c for c in picks if c.measured_s is not None]
        best = min(ran, key=lambda c: c.measured_s) if ran else min(picks, key=lambda c: c.period_us)
    print(f"\n{'candidate':<36} {'predicted µs/layer':>19} {'measured ms/iteration':>22}")
    for c in picks:
        ms = "-" if c.measured_s is None else f"{c.measured_s * 1e3:.3f}"
        print(f"{c.spec.name:<36} {c.period_us:>19.1f} {ms:>22}{'   <- chosen' if c is best else ''}")
    base = found.baseline
    how = "measured" if best.measured_s is not None else "predicted"
    ratio = (base.measured_s / best.measured_s if best.measured_s and base.measured_s
             else base.period_us / best.period_us)
    print(f"\nchosen: {best.spec.name}, the fastest {how} ({ratio:.2f}x the speed of non-overlap)")
    for u, x in best.breakdown["units"].items():
        print(f"  unit {u}: {x['sms']} SMs, busy {x['busy_us']:.1f} µs of the {best.period_us:.1f} µs period "
              f"({100 * x['busy_share']:.0f}%), interference x{x['slowdown']:.2f}")
    print("  the period is set by this chain (critical cycle): " + " -> ".join(best.breakdown["critical"]))
    table = "; ".join(f"{c.spec.name} {c.period_us:.0f} µs/layer predicted"
                      + ("" if c.measured_s is None else f", {c.measured_s * 1e3:.2f} ms/iteration measured")
                      for c in picks)
    chosen = replace(best.spec, notes=f"{best.spec.notes} Chosen by nanoflow tune, the fastest {how}: {table}.".strip())
    path = save_tuned(chosen, cache_key(gpu_name(device), cfg.shard(tp), dtype, budget, tp))  # as a rank finds it
    print(f"saved: {path} (found by --pipeline-spec auto)")
    if a.output:
        chosen.save(a.output)
        print(f"written: {a.output}")
    if a.save_candidates:
        save_candidates(picks, best, a.save_candidates)
    return 0
