"""`nanoflow bench throughput`: offline throughput of a workload, as a share of the cost model's optimum.

Metric names follow `vllm bench throughput` (requests_per_second, tokens_per_second = prompt + output,
output_tokens_per_second). With --baseline hf the same workload also runs through HF transformers'
continuous batching on the same weights, in the same process, and the ratio is reported.
"""
from __future__ import annotations

import datetime
import json
import os
import subprocess
import time

import torch
from tqdm import tqdm

from nanoflow.bench import cost_model
from nanoflow.bench.workloads import Workload, parse
from nanoflow.entrypoints.llm import LLM
from nanoflow.executor.profiling import IterationClock, OpTimer
from nanoflow.sampling_params import SamplingParams


def _commit() -> str | None:
    if os.environ.get("NANOFLOW_COMMIT"):  # a copy of the tree without .git (the GPU host) is told it
        return os.environ["NANOFLOW_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
                              cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def run_workload(llm: LLM, workload: Workload, seed: int = 0, temperature: float = 1.0, breakdown: bool = False,
                 progress: bool = True) -> dict:
    """Run every request of the workload to completion; returns timings and counts."""
    eng = llm.engine
    prompts = workload.prompts(eng.model_config.vocab_size, seed)
    for i, (prompt, (_, out_len)) in enumerate(zip(prompts, workload.lengths)):
        eng.add_request(f"bench-{i}", prompt, SamplingParams(temperature=temperature, max_tokens=out_len,
                                                                     ignore_eos=True))
    on_gpu = eng.device.type == "cuda"
    eng.runner.clock = IterationClock() if on_gpu else None
    timer = None
    peak_running, steps, out_tokens = 0, 0, 0
    bar = tqdm(total=len(prompts), desc=workload.name, disable=not progress)
    start = time.perf_counter()
    while eng.has_unfinished_requests():
        if breakdown and on_gpu and timer is None and steps == 20:  # once past the first admissions
            timer = eng.runner.op_timer = OpTimer()
        for out in eng.step():
            if out.finished:
                bar.update(1)
                out_tokens += len(out.outputs[0].token_ids)
        peak_running = max(peak_running, len(eng.scheduler.running))
        steps += 1
    if on_gpu:
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    bar.close()
    prompt_tokens = sum(p for p, _ in workload.lengths)
    result = {
        "num_requests": len(prompts), "elapsed_time": elapsed, "iterations": steps,
        "total_prompt_tokens": prompt_tokens, "total_output_tokens": out_tokens,
        "requests_per_second": len(prompts) / elapsed,
        "tokens_per_second": (prompt_tokens + out_tokens) / elapsed,
        "output_tokens_per_second": out_tokens / elapsed,
        "mean_tokens_per_iteration": (prompt_tokens + out_tokens) / steps,
        "peak_running_requests": peak_running,
    }
    if eng.runner.clock is not None:
        result.update(eng.runner.clock.summary())
        eng.runner.clock = None
    if timer is not None:
        result["op_breakdown_ms"] = timer.summary()
    return result


def throughput(args) -> dict:
    from nanoflow.entrypoints.cli import engine_kwargs
    workload = parse(args.workload, args.num_requests, args.seed)
    kwargs = engine_kwargs(args)
    report = {"command": args.command_line, "date": datetime.date.today().isoformat(), "commit": _commit(),
              "workload": args.workload, "model": args.model, "load_format": args.load_format,
              "temperature": args.temperature}
    hf_weights = None
    if args.baseline == "hf":
        from nanoflow.bench import hf_baseline
        from nanoflow.models.loader import resolve
        if not args.workload.startswith("const:"):
            raise ValueError("--baseline hf takes a const:IN:OUT workload (generate_batch has one max_new_tokens)")
        cfg = resolve(args.model).config
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        from nanoflow.config import resolve_dtype
        hf = hf_baseline.build(cfg, resolve_dtype(args.dtype, device, cfg.torch_dtype), device, args.seed)
        report["hf"] = hf_baseline.run(hf, workload.prompts(cfg.vocab_size, args.seed), workload.lengths[0][1],
                                       args.temperature)
        hf_weights = {k: v.to("cpu") for k, v in hf.state_dict().items()}
        del hf
        if device.type == "cuda":
            torch.cuda.empty_cache()
    llm = LLM(args.model, **kwargs)
    eng = llm.engine
    if hf_weights is not None:
        from nanoflow.models.loader import load_hf_weights
        load_hf_weights(eng.runner.model, hf_weights.items())
        del hf_weights
    cfg = eng.model_config
    rate = cost_model.gemm_rate(cfg, eng.runner.max_num_tokens, eng.dtype, eng.device)
    optimal = cost_model.optimal_throughput(rate["rate"], cfg)
    report.update({
        "device": device_name(eng.device), "dtype": str(eng.dtype).removeprefix("torch."),
        "params": cfg.num_params(), "max_num_batched_tokens": eng.runner.max_num_tokens,
        "kv_blocks": eng.runner.num_blocks, "block_size": eng.runner.block_size,
        "kv_capacity_tokens": eng.runner.num_blocks * eng.runner.block_size,
        "cuda_graphs": eng.runner.graphs is not None, "async_scheduling": eng.async_scheduling,
        "gemm_tflops": rate["rate"] / 1e12, "optimal_tokens_per_second": optimal,
    })
    p, o = workload.lengths[0]
    if args.workload.startswith("const:"):
        report["max_concurrent_requests"] = min(report["kv_capacity_tokens"] // (p + o), eng.config.max_num_seqs)
    if args.warmup_requests:
        run_workload(llm, Workload("warm-up", workload.lengths[: args.warmup_requests]), args.seed + 1,
                     args.temperature, progress=False)
    report.update(run_workload(llm, workload, args.seed, args.temperature, breakdown=args.breakdown))
    report["percent_of_optimal"] = 100 * report["tokens_per_second"] / optimal
    if "hf" in report:
        report["speedup_vs_hf"] = report["tokens_per_second"] / report["hf"]["total_tok_s"]
    return report


def print_report(r: dict) -> None:
    rows = [("workload", r["workload"]), ("device", r["device"]), ("requests/s", f"{r['requests_per_second']:.2f}"),
            ("total tok/s", f"{r['tokens_per_second']:.1f}"), ("output tok/s", f"{r['output_tokens_per_second']:.1f}"),
            ("optimal tok/s (C/2P)", f"{r['optimal_tokens_per_second']:.1f}  (C = {r['gemm_tflops']:.1f} TFLOP/s)"),
            ("% of optimal", f"{r['percent_of_optimal']:.1f}%"),
            ("tokens / iteration", f"{r['mean_tokens_per_iteration']:.0f}"),
            ("KV blocks", f"{r['kv_blocks']} x {r['block_size']} tokens; peak running {r['peak_running_requests']}")]
    if "gpu_idle_share" in r:
        rows.append(("GPU idle between iterations", f"{100 * r['gpu_idle_share']:.2f}%  (gap p50 "
                     f"{r['gpu_idle_gap_ms_p50']:.3f} ms, p99 {r['gpu_idle_gap_ms_p99']:.3f}, "
                     f"max {r['gpu_idle_gap_ms_max']:.1f})"))
    if "hf" in r:
        rows.append(("HF transformers total tok/s", f"{r['hf']['total_tok_s']:.1f}  (x{r['speedup_vs_hf']:.2f})"))
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    if "op_breakdown_ms" in r:
        total = sum(r["op_breakdown_ms"].values())
        print("one iteration, per op (eager, all layers):")
        for name, ms in sorted(r["op_breakdown_ms"].items(), key=lambda x: -x[1]):
            print(f"  {name:<14} {ms:8.3f} ms  {100 * ms / total:5.1f}%")


def main(args) -> int:
    report = throughput(args)
    print_report(report)
    if args.output:
        with open(args.output, "w") as f:
            json.dump(report, f, indent=1)
    return 0
