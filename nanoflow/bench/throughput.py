"""`nanoflow bench throughput`: offline throughput of a workload, as a share of the cost model's optimum.

Metric names follow `vllm bench throughput` (requests_per_second, tokens_per_second = prompt + output,
output_tokens_per_second). With --baseline hf the same workload also runs through HF transformers'
continuous batching on the same weights, in the same process, and the ratio is reported.
"""
from __future__ import annotations

import dataclasses
import datetime
import gc
import json
import os
import shutil
import statistics
import subprocess
import threading
import time

import torch
from tqdm import tqdm

from nanoflow.bench import cost_model
from nanoflow.bench.plots import check_outputs
from nanoflow.bench.workloads import Workload, parse
from nanoflow.config import resolve_device
from nanoflow.engine.block_manager import CacheStats
from nanoflow.entrypoints.llm import LLM
from nanoflow.executor.model_runner import settle_gc
from nanoflow.executor.profiling import IterationClock, op_times
from nanoflow.pipeline import measure
from nanoflow.pipeline.cache import gpu_name
from nanoflow.sampling_params import SamplingParams


def _commit() -> str | None:
    if os.environ.get("NANOFLOW_COMMIT"):  # a copy of the tree without .git (the GPU host) is told it
        return os.environ["NANOFLOW_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
                              cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


class GcPauses:
    """The host's pauses for Python's garbage collector while it is entered, per generation: a pause longer than
    the GPU's lead on the host leaves the GPU idle."""

    def __init__(self):
        self.count, self.ms, self.max_ms, self._start = [0, 0, 0], [0.0, 0.0, 0.0], 0.0, 0.0

    def __call__(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._start = time.perf_counter()
            return
        ms = (time.perf_counter() - self._start) * 1e3
        self.count[info["generation"]] += 1
        self.ms[info["generation"]] += ms
        self.max_ms = max(self.max_ms, ms)

    def __enter__(self) -> "GcPauses":
        gc.callbacks.append(self)
        return self

    def __exit__(self, *exc) -> None:
        gc.callbacks.remove(self)

    def summary(self) -> dict:
        return {"gc_collections": self.count, "gc_ms": self.ms, "gc_max_ms": self.max_ms}


class Clocks:
    """The GPU's SM clock and power draw, sampled by nvidia-smi about once a second while entered (a thread). A long
    run can hold the card at its power cap, below the clock that C was timed at: on one H200, Mixtral's run held
    1.46 GHz at 700 W against C's 1.98 (BENCHMARKS.md #10, session 21). Without nvidia-smi it samples nothing."""
    POWER_CAP = 0x4  # nvidia-smi's clocks event reason for the software power cap

    def __init__(self, gpu: str | None, command: tuple[str, ...] = ("nvidia-smi",), period: float = 1.0):
        self.cmd = [*command, f"--id={gpu}", "--query-gpu=clocks.sm,power.draw,clocks_event_reasons.active",
                    "--format=csv,noheader,nounits"]
        self.enabled = gpu is not None and shutil.which(command[0]) is not None
        self.period, self.samples = period, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while True:
            try:
                out = subprocess.run(self.cmd, capture_output=True, text=True, timeout=10).stdout
                mhz, watts, reasons = (f.strip() for f in out.strip().split(","))
                self.samples.append((float(mhz), float(watts), int(reasons, 16)))
            except (OSError, subprocess.SubprocessError, ValueError):
                pass  # a sample the tool could not give ("[N/A]", a timeout): skipped
            if self._stop.wait(self.period):
                return

    def __enter__(self) -> "Clocks":
        if self.enabled:
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.enabled:
            self._stop.set()
            self._thread.join()

    def summary(self) -> dict:
        if not self.samples:
            return {}
        mhz, watts, reasons = zip(*self.samples)
        return {"sm_clock_mhz_median": statistics.median(mhz), "sm_clock_mhz_min": min(mhz),
                "power_w_median": statistics.median(watts),
                "power_capped_share": sum(r & self.POWER_CAP != 0 for r in reasons) / len(reasons)}


def gpu_id(device: torch.device) -> str | None:
    """The device as nvidia-smi names it (its UUID, whatever CUDA_VISIBLE_DEVICES maps), or None off CUDA."""
    if device.type != "cuda":
        return None
    uuid = str(torch.cuda.get_device_properties(device).uuid)
    return uuid if uuid.startswith("GPU-") else f"GPU-{uuid}"


def stage_of(done: int, waiting: bool) -> str:
    """The stage of a run an iteration falls in, judged before it: fill until a request has finished, steady while
    others still wait, then drain."""
    return "fill" if done == 0 else "steady" if waiting else "drain"


def run_workload(llm: LLM, workload: Workload, seed: int = 0, temperature: float = 1.0, breakdown: bool = False,
                 timeline: bool = False, progress: bool = True, stream: int = 0) -> dict:
    """Run every request of the workload to completion; returns timings and counts. A multi-round
    conversation's next turn is added once its previous turn has finished.

    Besides the whole run, the steady state: the iterations after some request has finished while others still
    wait to be admitted, when the batch's mix of prefill and decode is the one an endless backlog keeps. A run whose
    requests all fit at once has none (its batches only fill, then drain); the whole-run figures are the headline."""
    eng = llm.engine
    convs = workload.conversations(eng.model_config.vocab_size, seed, stream)
    turns: dict[str, tuple[int, int, list[int]]] = {}  # request id -> (conversation, turn, prompt)

    def add(c: int, k: int, context: list[int]) -> None:
        message, out_len = convs[c][k]
        turns[f"bench-{c}-{k}"] = c, k, context + message
        eng.add_request(f"bench-{c}-{k}", context + message,
                        SamplingParams(temperature=temperature, max_tokens=out_len, ignore_eos=True))
    for c in range(len(convs)):
        add(c, 0, [])
    on_gpu = eng.device.type == "cuda"
    eng.runner.clock = IterationClock() if on_gpu else None
    profile = breakdown or timeline
    steps, prompt_tokens, out_tokens, cached_tokens = 0, 0, 0, 0
    sched, stats = eng.scheduler, eng.scheduler.blocks.stats
    sched.peak_running = 0  # (this workload's)
    before = sched.num_prefill_tokens, dataclasses.replace(stats)
    num_requests = len(workload.lengths)
    bar = tqdm(total=num_requests, desc=workload.name, disable=not progress)
    start = time.perf_counter()
    done = 0
    steady = [0, 0, 0.0]  # iterations, tokens, seconds
    with GcPauses() as pauses, Clocks(gpu_id(eng.device)) as clocks:
        while eng.has_unfinished_requests():
            if profile and done >= num_requests // 2:  # keep one batch of the steady state
                eng.runner.keep_next_batch, profile = True, False
            stage, tokens, t = stage_of(done, bool(sched.waiting)), sched.num_scheduled_tokens, time.perf_counter()
            in_steady = stage == "steady"
            if eng.runner.clock is not None:
                eng.runner.clock.stage = stage
            for out in eng.step():
                if out.finished:
                    bar.update(1)
                    done += 1
                    out_tokens += len(out.outputs[0].token_ids)
                    c, k, prompt = turns.pop(out.request_id)
                    prompt_tokens += len(prompt)
                    cached_tokens += out.num_cached_tokens or 0
                    if k + 1 < len(convs[c]):
                        add(c, k + 1, prompt + out.outputs[0].token_ids)
            steps += sched.num_scheduled_tokens > tokens  # (not the last step, which only reads back)
            if in_steady:
                steady[0] += 1
                steady[1] += sched.num_scheduled_tokens - tokens
                steady[2] += time.perf_counter() - t
    if on_gpu:
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    bar.close()
    result = {
        "num_requests": num_requests, "elapsed_time": elapsed, "iterations": steps,
        "total_prompt_tokens": prompt_tokens, "total_output_tokens": out_tokens,
        "requests_per_second": num_requests / elapsed,
        "tokens_per_second": (prompt_tokens + out_tokens) / elapsed,
        # (the tokens the GPU had to compute: a prompt's prefix served by the cache costs no FLOPs, so the optimum
        # C / 2P bounds these, not the total, which a multi-round workload's cache hits could lift past 100 %)
        "cached_prompt_tokens": cached_tokens,
        "computed_tokens_per_second": (prompt_tokens - cached_tokens + out_tokens) / elapsed,
        "output_tokens_per_second": out_tokens / elapsed,
        "mean_tokens_per_iteration": (prompt_tokens + out_tokens) / steps,
        "peak_running_requests": sched.peak_running,
        "steady_iterations": steady[0],
        "steady_tokens_per_second": steady[1] / steady[2] if steady[0] else None,
        "steady_mean_tokens_per_iteration": steady[1] / steady[0] if steady[0] else None,
        **cache_report(sched.num_prefill_tokens - before[0], stats, before[1]), **pauses.summary(),
        **clocks.summary(),
    }
    if eng.runner.clock is not None:
        result.update(eng.runner.clock.summary())
        eng.runner.clock = None
    batch = eng.runner.kept_batch
    if batch is not None:  # timed after the run: profiling replays overwrite the KV cache
        if breakdown:
            result["op_breakdown_ms"] = op_times(eng.runner, batch)
            result["op_breakdown_tokens"] = batch.num_tokens
        if timeline:
            result["timeline"] = pipeline_timeline(eng.runner, batch)
        eng.runner.kept_batch = None
    return result


def cache_report(prefill_tokens: int, stats: CacheStats, before: CacheStats) -> dict:
    """What the prefix cache and its host tier did between two snapshots of their counters."""
    delta = CacheStats(*(a - b for a, b in zip(dataclasses.astuple(stats), dataclasses.astuple(before))))
    return {"prefill_tokens_computed": prefill_tokens, "prefix_cache_queries": delta.queries,
            "prefix_cache_hit_tokens": delta.hits, "prefix_cache_host_hit_tokens": delta.host_hits,
            "prefix_cache_hit_rate": delta.hit_rate, "gpu_blocks_evicted": delta.evicted,
            "kv_offload_saved_blocks": delta.saved, "kv_offload_loaded_blocks": delta.loaded,
            "host_blocks_evicted": delta.host_evicted}


def pipeline_timeline(runner, batch) -> dict:
    """Every nano-op's span in one iteration of this batch, overlapped as the mode runs it and each alone on
    its unit; and per op, the two totals over all layers. Modes other than `pipeline`: the plain forward."""
    spec, spans = measure.timeline(runner, batch)
    per_op: dict = {}
    for kind, events in spans.items():
        for e in events:
            row = per_op.setdefault(e["op"], {"unit": e["unit"], "overlapped": 0.0, "alone": 0.0})
            row[kind] += e["end_ms"] - e["start_ms"]
    return {"spec": spec.name, "tokens": batch.num_tokens, "units": {u.name: u.sms for u in spec.units},
            "iteration_ms": {k: max(e["end_ms"] for e in v) for k, v in spans.items()}, "per_op_ms": per_op,
            **spans}


def _hf_baseline(args, workloads: list[Workload]) -> tuple[list[dict], dict]:
    """Run HF transformers on every const workload; return its results (one a workload) and its weights (on the
    CPU)."""
    from nanoflow.bench import hf_baseline
    from nanoflow.config import resolve_dtype
    from nanoflow.models.loader import resolve
    if any(not w.name.startswith("const:") for w in workloads):
        raise ValueError("--baseline hf takes const:IN:OUT workloads (generate_batch has one max_new_tokens)")
    cfg = resolve(args.model, args.num_layers, args.revision, args.hf_overrides).config
    if cfg.architecture not in hf_baseline.HF_CLASSES:
        raise ValueError(f"--baseline hf builds {', '.join(hf_baseline.HF_CLASSES)} models, not "
                         f"{cfg.architecture!r}")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    hf = hf_baseline.build(cfg, resolve_dtype(args.dtype, device, cfg.torch_dtype), device, args.seed)
    results = [hf_baseline.run(hf, w.prompts(cfg.vocab_size, args.seed, k), w.lengths[0][1], args.temperature)
               for k, w in enumerate(workloads)]
    weights = {k: v.to("cpu") for k, v in hf.state_dict().items()}
    del hf
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return results, weights


NEEDS_GRAPHS = ("--breakdown and --timeline time an iteration's CUDA graph: they need a GPU and CUDA graphs (not "
                "--enforce-eager)")


def throughput(args) -> dict:
    """Every workload through one engine (started once); returns the report."""
    from nanoflow.entrypoints.cli import engine_kwargs
    workloads = [parse(w, args.num_requests, args.seed) for w in args.workload]
    tp = args.tensor_parallel_size
    if tp > 1 and (args.baseline == "hf" or args.breakdown):
        raise ValueError("--baseline hf and --breakdown run in rank 0's process only: not with "
                         "--tensor-parallel-size > 1 (--timeline runs on every rank)")
    # (by the flags before the HF baseline's run, which this would otherwise follow; by the engine after it loads)
    if (args.breakdown or args.timeline) and (args.enforce_eager or resolve_device(args.device).type != "cuda"):
        raise ValueError(NEEDS_GRAPHS)
    report = {"command": args.command_line, "date": datetime.date.today().isoformat(), "commit": _commit(),
              "model": args.model, "load_format": args.load_format, "temperature": args.temperature}
    hf, hf_weights = _hf_baseline(args, workloads) if args.baseline == "hf" else ([], None)
    llm = LLM(args.model, **engine_kwargs(args))
    settle_gc()
    eng = llm.engine
    # (the default model by its file's name; a cut model by its layers: what tells reports apart)
    report["model"] = args.model or os.path.basename(eng.source.path).removesuffix(".gguf")
    report["num_layers"] = args.num_layers
    if (args.breakdown or args.timeline) and eng.runner.graphs is None:
        raise ValueError(NEEDS_GRAPHS)
    # (before any workload runs: a later turn refused mid-run lost the report of those done)
    if long := next((w for w in workloads if w.longest_prompt >= eng.max_model_len), None):
        turn, fewer = (" (a turn's: the conversation so far and its message)", ", or give fewer rounds") \
            if long.rounds else ("", "")
        raise ValueError(f"workload {long.name}: a prompt of {long.longest_prompt} tokens{turn} leaves no room in "
                         f"max_model_len {eng.max_model_len}: raise --max-model-len{fewer}")
    if hf_weights is not None:
        from nanoflow.models.loader import load_hf_weights
        load_hf_weights(eng.runner.model, hf_weights.items())
        del hf_weights
    cfg = eng.model_config
    # with tensor parallelism each GPU runs its shard's GEMMs, and the optimum of tp GPUs is tp times one's
    def device_rate():
        return cost_model.device_rate(eng.runner.model.cfg, eng.runner.max_num_tokens, eng.dtype, eng.device)
    rates = [device_rate()]
    report.update({
        "device": gpu_name(eng.device), "dtype": str(eng.dtype).removeprefix("torch."),
        "params": cfg.num_params(), "active_params": cfg.active_params(), "tensor_parallel_size": tp,
        "max_num_batched_tokens": eng.runner.max_num_tokens,
        "max_num_seqs": eng.config.max_num_seqs, "admission": eng.config.admission,
        "schedule_policy": eng.config.schedule_policy,
        "kv_blocks": eng.runner.num_blocks, "block_size": eng.runner.block_size,
        "kv_capacity_tokens": eng.runner.num_blocks * eng.runner.block_size,
        "mode": eng.config.mode, "pipeline_spec": eng.runner.spec.name if eng.config.mode != "non-overlap" else None,
        "cuda_graphs": eng.runner.graphs is not None, "async_scheduling": eng.async_scheduling,
        "prefix_caching": eng.config.enable_prefix_caching, "kv_offload_gb": eng.config.kv_offload_gb,
        "kv_offload_blocks": eng.runner.num_host_blocks,
        "results": [],
    })
    if args.warmup_requests:
        run_workload(llm, Workload("warm-up", workloads[0].lengths[: args.warmup_requests]), args.seed + 1,
                     args.temperature, progress=False)
    for k, w in enumerate(workloads):  # (each workload its own prompts: none starts with an earlier one's)
        preempted = eng.scheduler.num_preemptions
        r = {"workload": w.name, **run_workload(llm, w, args.seed, args.temperature, breakdown=args.breakdown,
                                                timeline=bool(args.timeline), stream=k)}
        r["preemptions"] = eng.scheduler.num_preemptions - preempted
        r["tokens_per_second_per_gpu"] = r["tokens_per_second"] / tp
        if w.name.startswith("const:"):
            p, o = w.lengths[0]
            r["max_concurrent_requests"] = min(report["kv_capacity_tokens"] // (p + o), eng.config.max_num_seqs)
        if hf:
            r["hf"] = hf[k]
            r["speedup_vs_hf"] = r["tokens_per_second"] / hf[k]["total_tok_s"]
        report["results"].append(r)
        if "timeline" in r:
            from nanoflow.bench.plots import timeline_chart
            stem, ext = os.path.splitext(args.timeline)
            path = args.timeline if len(workloads) == 1 else f"{stem}-{len(report['results'])}{ext}"
            timeline_chart(r["timeline"], path, f"{r['workload']}, {report['device']}, mode {eng.config.mode}")
    if eng.device.type == "cuda":  # (rank 0's) what gpu_memory_utilization left unused, to tune it by
        free, total = torch.cuda.mem_get_info(eng.device)
        report["gpu_memory_gib"] = {"total": total / 2**30, "in_use": (total - free) / 2**30,
                                    "peak_allocated": torch.cuda.max_memory_allocated(eng.device) / 2**30}
    # C is measured before and after the workloads and the higher taken (the stricter optimum): one run measured it
    # 10 % low at its start (BENCHMARKS #9), which would overstate every percentage
    rates.append(device_rate())
    c = max(r["rate"] for r in rates)
    optimal = tp * cost_model.optimal_throughput(c, cfg)
    report.update({"gemm_tflops": c / 1e12,
                   "gemm_tflops_measured": [r["rate"] / 1e12 for r in rates],
                   "gemm_tflops_model_shapes": [r["model"] / 1e12 for r in rates],
                   "gemm_tflops_reference": [r["reference"] and r["reference"] / 1e12 for r in rates],
                   "optimal_tokens_per_second": optimal})
    for r in report["results"]:
        r["percent_of_optimal"] = 100 * r["computed_tokens_per_second"] / optimal
        steady = r["steady_tokens_per_second"]
        r["steady_percent_of_optimal"] = None if steady is None else 100 * steady / optimal
        print_result(report, r)
    return report


def print_result(report: dict, r: dict) -> None:
    unit, tp = "rank" if report["device"] == "cpu" else "GPU", report["tensor_parallel_size"]
    rows = [("workload", r["workload"]), ("device", report["device"]),
            ("requests/s", f"{r['requests_per_second']:.2f}"), ("total tok/s", f"{r['tokens_per_second']:.1f}"),
            ("output tok/s", f"{r['output_tokens_per_second']:.1f}"),
            (f"total tok/s per {unit}", f"{r['tokens_per_second_per_gpu']:.1f} ({tp} {unit}{'s' * (tp > 1)})"),
            ("optimal tok/s (C/2P)", f"{report['optimal_tokens_per_second']:.1f}  "
                                     f"(C = {report['gemm_tflops']:.4g} TFLOP/s per {unit}, the higher of "
                                     f"{' and '.join(f'{x:.4g}' for x in report['gemm_tflops_measured'])}, "
                                     f"P = {report['active_params'] / 1e9:.3g} B active parameters)"),
            ("% of optimal", f"{r['percent_of_optimal']:.1f}%" + (
                f" (of the {r['computed_tokens_per_second']:.1f} tok/s computed: the prefix cache served "
                f"{r['cached_prompt_tokens']} prompt tokens)" if r["cached_prompt_tokens"] else "")),
            ("tokens / iteration", f"{r['mean_tokens_per_iteration']:.0f}"),
            ("steady state", "none (every request fit at once)" if r["steady_tokens_per_second"] is None else
             f"{r['steady_tokens_per_second']:.1f} tok/s, {r['steady_percent_of_optimal']:.1f}% of optimal, "
             f"{r['steady_mean_tokens_per_iteration']:.0f} tok/iter over {r['steady_iterations']} iterations "
             f"(some request done, others still waiting)"),
            ("KV blocks", f"{report['kv_blocks']} x {report['block_size']} tokens; peak running "
                          f"{r['peak_running_requests']}; preemptions {r['preemptions']}"),
            *([("GPU memory", "{peak_allocated:.1f} GiB at most in tensors, {in_use:.1f} in use after the run, of "
                              "{total:.1f}".format(**report["gpu_memory_gib"]))] if "gpu_memory_gib" in report else []),
            ("prefill tokens computed", f"{r['prefill_tokens_computed']} of {r['total_prompt_tokens']} prompt tokens; "
                                        f"prefix cache hit rate {100 * r['prefix_cache_hit_rate']:.1f}%")]
    if report["kv_offload_blocks"]:
        rows.append(("KV offload", f"{r['kv_offload_saved_blocks']} blocks saved, {r['kv_offload_loaded_blocks']} "
                                   f"loaded ({report['kv_offload_blocks']} host blocks); "
                                   f"{r['gpu_blocks_evicted']} GPU blocks evicted"))
    if "gpu_idle_share" in r:
        rows.append(("GPU idle between iterations", f"{100 * r['gpu_idle_share']:.2f}%  (gap p50 "
                     f"{r['gpu_idle_gap_ms_p50']:.3f} ms, p99 {r['gpu_idle_gap_ms_p99']:.3f}, "
                     f"max {r['gpu_idle_gap_ms_max']:.1f})"))
    if "sm_clock_mhz_median" in r:
        rows.append(("GPU clock and power", f"SM {r['sm_clock_mhz_median']:.0f} MHz median "
                     f"({r['sm_clock_mhz_min']:.0f} at least), {r['power_w_median']:.0f} W median; at the power cap "
                     f"in {100 * r['power_capped_share']:.0f}% of samples"))
    rows.append(("host GC pauses", f"{'/'.join(map(str, r['gc_collections']))} collections of generations 0/1/2, "
                 f"{'/'.join(f'{ms:.0f}' for ms in r['gc_ms'])} ms; the longest {r['gc_max_ms']:.1f} ms"))
    if r.get("stages"):
        rows.append(("GPU time by stage", "; ".join(
            f"{name} {row['iterations']} it, {row['tokens'] / row['iterations']:.0f} tok/it, "
            f"{row['tokens_per_gpu_second']:.0f} tok/s of GPU time" for name, row in r["stages"].items())))
    if r.get("phase_ms"):
        rows.append(("GPU ms per iteration", ", ".join(f"{k} {v:.2f}" for k, v in r["phase_ms"].items()) +
                     f"  (mean of {r['phase_iterations']} iterations, the steady ones if any)"))
    if "hf" in r:
        rows.append(("HF transformers total tok/s", f"{r['hf']['total_tok_s']:.1f}  (x{r['speedup_vs_hf']:.2f})"))
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    if "timeline" in r:
        t = r["timeline"]
        print(f"one iteration of {t['tokens']} tokens, spec {t['spec']}: {t['iteration_ms']['overlapped']:.3f} ms "
              f"as run, {t['iteration_ms']['alone']:.3f} ms with every nano-op alone on its unit")
        for name, row in sorted(t["per_op_ms"].items(), key=lambda x: -x[1]["alone"]):
            print(f"  {name:<14} on {row['unit']:<10} alone {row['alone']:8.3f} ms  "
                  f"overlapped {row['overlapped']:8.3f} ms")
    if "op_breakdown_ms" in r:
        total = sum(r["op_breakdown_ms"].values())
        print(f"one iteration of {r['op_breakdown_tokens']} tokens, GPU time per op over all layers:")
        for name, ms in sorted(r["op_breakdown_ms"].items(), key=lambda x: -x[1]):
            print(f"  {name:<14} {ms:8.3f} ms  {100 * ms / total:5.1f}%")


def print_summary(report: dict) -> None:
    print(f"\n{'workload':<22} {'total tok/s':>12} {'% optimal':>10} {'tok/iter':>9} {'steady %':>9} "
          f"{'GPU idle':>9} {'prefill computed':>16}")
    for r in report["results"]:
        idle = f"{100 * r['gpu_idle_share']:.1f}%" if "gpu_idle_share" in r else "-"
        prefill = f"{100 * r['prefill_tokens_computed'] / r['total_prompt_tokens']:.1f}%"
        steady = "-" if r["steady_percent_of_optimal"] is None else f"{r['steady_percent_of_optimal']:.1f}%"
        print(f"{r['workload']:<22} {r['tokens_per_second']:>12.1f} {r['percent_of_optimal']:>9.1f}% "
              f"{r['mean_tokens_per_iteration']:>9.0f} {steady:>9} {idle:>9} {prefill:>16}")


def main(args) -> int:
    check_outputs({"--output": args.output}, {"--timeline": args.timeline})
    if args.warmup_requests < 0:
        raise ValueError(f"--warmup-requests must be >= 0, not {args.warmup_requests}")
    report = throughput(args)
    print_summary(report)
    if args.output:
        with open(args.output, "w") as f:
            json.dump(report, f, indent=1)
    return 0
