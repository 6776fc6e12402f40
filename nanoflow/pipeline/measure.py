"""Time one steady-state iteration of a pipeline spec on the GPU, as `nanoflow tune` ranks candidates.

The batch is the search's: `decode_rows` decode sequences of `context` tokens, then a prefill chunk filling
the budget. The model and its KV cache are built once per process; each spec gets its forward (the plain
one for the non-overlap spec, else a Pipeline on its units) captured in a CUDA graph of that batch's bucket.
"""
from __future__ import annotations

import functools

import torch

from nanoflow.executor.cuda_graphs import GraphRunner
from nanoflow.models.batch import ForwardBatch
from nanoflow.pipeline.executor import Pipeline
from nanoflow.pipeline.spec import PipelineSpec


@functools.cache
def _engine(model: str, kwargs: tuple):
    from nanoflow.engine.llm_engine import LLMEngine
    return LLMEngine(model, **{**dict(kwargs), "cuda_graph": False, "mode": "non-overlap"})


def steady_batch(block_size: int, num_blocks: int, decode_rows: int, context: int, budget: int) -> ForwardBatch:
    """Decode sequences at positions context - 1, then one prompt's first budget - decode_rows tokens."""
    prefill = budget - decode_rows
    per_seq = -(-context // block_size)
    need = decode_rows * per_seq + -(-prefill // block_size)
    if need > num_blocks:
        raise ValueError(f"{decode_rows} x {context} tokens of KV need {need} blocks; the cache has {num_blocks}")
    tables = [list(range(i * per_seq, (i + 1) * per_seq)) for i in range(decode_rows)]
    tables.append(list(range(decode_rows * per_seq, need)))

    def slot(table, pos):
        return table[pos // block_size] * block_size + pos % block_size
    positions = [context - 1] * decode_rows + list(range(prefill))
    slots = [slot(t, context - 1) for t in tables[:-1]] + [slot(tables[-1], p) for p in range(prefill)]
    starts = list(range(decode_rows + 1)) + [budget]
    return ForwardBatch(torch.zeros(budget, dtype=torch.long), torch.tensor(positions), torch.tensor(slots), starts,
                        [context] * decode_rows + [prefill], tables, decode_rows, torch.arange(decode_rows))


def time_iteration(engine_kwargs: dict, model: str, spec: PipelineSpec, decode_rows: int, context: int,
                   budget: int, reps: int = 10) -> float:
    """Seconds per iteration (the layers' CUDA graph replayed) of `spec` on the steady-state batch."""
    kwargs = {k: v for k, v in engine_kwargs.items() if k not in ("mode", "pipeline_spec", "cuda_graph")}
    runner = _engine(model, tuple(sorted(kwargs.items()))).runner
    batch = steady_batch(runner.block_size, runner.num_blocks, decode_rows, context, budget)
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
