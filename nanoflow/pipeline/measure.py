"""Time one steady-state iteration of a pipeline spec, as `nanoflow tune` ranks candidates; and time every nano-op
of one iteration as the engine runs it (`bench throughput --timeline`).

The batch is the profiler's: `decode_rows` decode sequences of `context` tokens, then prompts filling the
budget. The model and its KV cache are built once per process; each spec gets its forward (the plain one for the
non-overlap spec, else a Pipeline on its units; on the CPU its nano-ops in order) captured in a CUDA graph of that
batch's bucket. With tensor parallelism rank 0 sends the `TimeSpec` to the other ranks (distributed/worker.py), so
that every rank captures and replays the same iteration, collectives included; a `TimelineSpec` likewise.
"""
from __future__ import annotations

import functools
import json
import time
from dataclasses import dataclass

import torch

from nanoflow.distributed.parallel_state import broadcast_object
from nanoflow.executor.cuda_graphs import GraphRunner
from nanoflow.models.batch import ForwardBatch
from nanoflow.pipeline.executor import Pipeline, run_sequential
from nanoflow.pipeline.profile import steady_batch
from nanoflow.pipeline.spec import PipelineSpec, non_overlap


@dataclass(slots=True)
class TimeSpec:
    """Every rank: time `spec` on the steady-state batch, `reps` iterations."""
    spec: PipelineSpec
    decode_rows: int
    context: int
    budget: int
    reps: int = 10


@dataclass(slots=True)
class TimelineSpec:
    """Every rank: one iteration of `batch` (a host batch) through the engine's forward, every nano-op timed."""
    batch: ForwardBatch


_engines: dict = {}  # (model, engine kwargs) -> the LLMEngine whose model and KV cache the candidates share


def _engine(model: str, kwargs: dict):
    key = model, json.dumps(kwargs, sort_keys=True, default=str)  # (values may be dicts: hf_overrides)
    if key not in _engines:
        from nanoflow.engine.llm_engine import LLMEngine
        _engines[key] = LLMEngine(model, **{**kwargs, "cuda_graph": False, "mode": "non-overlap"})
    return _engines[key]


def close() -> None:
    """Shut the engines down (with tensor parallelism their worker processes)."""
    while _engines:
        _engines.popitem()[1].shutdown()


def time_iteration(engine_kwargs: dict, model: str, spec: PipelineSpec, decode_rows: int, context: int,
                   budget: int, reps: int = 10) -> float:
    """Seconds per iteration (on the GPU the layers' CUDA graph replayed) of `spec` on the steady-state batch."""
    kwargs = {k: v for k, v in engine_kwargs.items()
              if k not in ("mode", "pipeline_spec", "cuda_graph", "override_generation_config")}  # (no timing's)
    kwargs["max_num_seqs"] = max(kwargs.get("max_num_seqs", 1), budget)  # room for the steady batch's sequences
    runner = _engine(model, kwargs).runner
    t = TimeSpec(spec.for_tensor_parallel(runner.tp.size), decode_rows, context, budget, reps)
    if runner.tp.size > 1:
        broadcast_object(runner.tp, t)
    return run_timing(runner, t)


def run_timing(runner, t: TimeSpec) -> float:
    """One rank's part of a TimeSpec (runner: its ModelRunner)."""
    model, on_gpu = runner.model, runner.device.type == "cuda"
    if not 0 <= t.decode_rows <= t.budget <= runner.max_num_tokens:
        raise ValueError(f"a steady batch of {t.budget} rows, {t.decode_rows} of them decode, does not fit the "
                         f"engine's {runner.max_num_tokens} rows (max_num_batched_tokens)")
    # a cache smaller than the batch's KV (Mixtral on one H200) lends its blocks more than once
    batch, _ = steady_batch(t.budget, t.decode_rows, t.context, runner.block_size, runner.cfg.vocab_size,
                            runner.num_blocks)
    if t.spec.gathers:
        model.prepare_o_allgather()  # (a collective: every rank gets the same TimeSpec)
    if t.spec.name == "non-overlap":
        forward = model.forward_layers
    else:
        forward = Pipeline(model, t.spec) if on_gpu else functools.partial(run_sequential, model, t.spec)
    graphs = GraphRunner(forward, runner.ws, runner.max_num_tokens, runner.config.max_num_seqs,
                         -(-runner.max_model_len // runner.block_size), runner.pad_slot, capture=on_gpu)
    size = graphs.bucket(t.budget)
    if on_gpu:
        graphs.capture_all([size])
    graphs.load(batch)
    if not on_gpu:
        start = time.perf_counter()
        for _ in range(t.reps):
            graphs.run(batch)
        return (time.perf_counter() - start) / t.reps
    graph = graphs.graphs[size]
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(t.reps):
        graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / t.reps / 1e3


def timeline(runner, batch: ForwardBatch) -> tuple[PipelineSpec, dict[str, list[dict]]]:
    """Rank 0: the spans of every nano-op of one iteration of `batch` (Pipeline.timeline), overlapped as the engine
    runs it and each alone on its unit; the plain forward as the non-overlap spec. With tensor parallelism every
    rank replays the same iteration (the collectives need them all), so rank 0 sends it the TimelineSpec first."""
    t = TimelineSpec(batch)
    if runner.tp.size > 1:
        broadcast_object(runner.tp, t)
    return run_timeline(runner, t)


def run_timeline(runner, t: TimelineSpec) -> tuple[PipelineSpec, dict[str, list[dict]]]:
    """One rank's part of a TimelineSpec (runner: its ModelRunner)."""
    n = t.batch.num_tokens
    pipe = runner.forward if isinstance(runner.forward, Pipeline) else \
        Pipeline(runner.model, non_overlap(n, runner.tp.size, runner.model.cfg.is_moe))
    batch, ws = t.batch.to(runner.device), runner.ws.rows(n)
    return pipe.spec, {kind: pipe.timeline(batch, ws, serial=kind == "alone") for kind in ("overlapped", "alone")}
