"""Time one steady-state iteration of a pipeline spec on the GPU, as `nanoflow tune` ranks candidates.

The batch is the profiler's: `decode_rows` decode sequences of `context` tokens, then prompts filling the
budget. The model and its KV cache are built once per process; each spec gets its forward (the plain
one for the non-overlap spec, else a Pipeline on its units) captured in a CUDA graph of that batch's bucket.
"""
from __future__ import annotations

import functools

import torch

from nanoflow.executor.cuda_graphs import GraphRunner
from nanoflow.pipeline.executor import Pipeline
from nanoflow.pipeline.profile import steady_batch
from nanoflow.pipeline.spec import PipelineSpec


@functools.cache
def _engine(model: str, kwargs: tuple):
    from nanoflow.engine.llm_engine import LLMEngine
    return LLMEngine(model, **{**dict(kwargs), "cuda_graph": False, "mode": "non-overlap"})


def time_iteration(engine_kwargs: dict, model: str, spec: PipelineSpec, decode_rows: int, context: int,
                   budget: int, reps: int = 10) -> float:
    """Seconds per iteration (the layers' CUDA graph replayed) of `spec` on the steady-state batch."""
    kwargs = {k: v for k, v in engine_kwargs.items() if k not in ("mode", "pipeline_spec", "cuda_graph")}
    runner = _engine(model, tuple(sorted(kwargs.items()))).runner
    # a cache smaller than the batch's KV (Mixtral on one H200) lends its blocks more than once
    batch, _ = steady_batch(budget, decode_rows, context, runner.block_size, runner.cfg.vocab_size, runner.num_blocks)
    forward = runner.model.forward_layers if spec.name == "non-overlap" else Pipeline(runner.model, spec)
    graphs = GraphRunner(forward, runner.ws, runner.max_num_tokens, runner.config.max_num_seqs,
                         -(-runner.max_model_len // runner.block_size), runner.pad_slot)
    size = graphs.bucket(budget)
    graphs.capture_all([size])
    graphs.load(batch)
    graph = graphs.graphs[size]
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / reps / 1e3
