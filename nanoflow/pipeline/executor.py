"""Running a layer's nano-ops. `run_sequential` issues them in the spec's order on the current stream:
the CPU reference of the pipeline and the `nanobatch-only` mode (the cost of nano-batching alone)."""
from __future__ import annotations

from nanoflow.models.batch import ForwardBatch
from nanoflow.models.llama import LlamaModel, Workspace
from nanoflow.pipeline.spec import PipelineSpec


def run_sequential(model: LlamaModel, spec: PipelineSpec, batch: ForwardBatch, ws: Workspace) -> None:
    n = batch.num_tokens
    nano_ops = [op for op in spec.scaled(n) if op.start < op.end]
    model.embed_tokens(ws, batch, 0, n)
    for l in range(model.cfg.num_layers):
        for op in nano_ops:
            getattr(model, op.op)(l, ws, batch, op.start, op.end)
