"""Running a layer's nano-ops.

`run_sequential` issues them in the spec's order on the current stream: the CPU reference of the pipeline
and the `nanobatch-only` mode (the cost of nano-batching alone). `Pipeline` issues them on the spec's
execution units, each launch waiting on CUDA events of only its real inputs (plan.py): the `pipeline` mode.
"""
from __future__ import annotations

import torch

from nanoflow.kernels.sm_share import sm_share
from nanoflow.models.batch import ForwardBatch
from nanoflow.models.llama import LlamaModel, Workspace
from nanoflow.pipeline.plan import Launch, plan, run_launch
from nanoflow.pipeline.spec import PipelineSpec
from nanoflow.pipeline.units import total_sms, unit_streams


def run_sequential(model: LlamaModel, spec: PipelineSpec, batch: ForwardBatch, ws: Workspace) -> None:
    n = batch.num_tokens
    nano_ops = [op for op in spec.scaled(n) if op.start < op.end]
    model.embed_tokens(ws, batch, 0, n)
    for l in range(model.cfg.num_layers):
        for op in nano_ops:
            getattr(model, op.op)(l, ws, batch, op.start, op.end)


class Pipeline:
    """The whole forward as launches on the units' streams, forked from and joined back into the current
    stream, so that it runs eagerly or is captured whole into one CUDA graph. Each launch is issued under its
    unit's SM share, so that cuBLASLt and the decode kernel size their grids for it."""

    def __init__(self, model: LlamaModel, spec: PipelineSpec):
        self.model, self.spec = model, spec
        self.units = unit_streams(spec.units, model.device.index or 0)
        self.total = total_sms(model.device.index or 0)
        self.plans: dict[int, tuple[list[Launch], set[int]]] = {}

    def plan(self, rows: int) -> tuple[list[Launch], set[int]]:
        """The launches for a batch of `rows` rows, and which of them others wait on."""
        if rows not in self.plans:
            launches = plan(self.spec.scaled(rows), self.model.cfg.num_layers, self.spec.units[0].name)
            self.plans[rows] = launches, {w for x in launches for w in x.waits}
        return self.plans[rows]

    def __call__(self, batch: ForwardBatch, ws: Workspace, timing: list | None = None, serial: bool = False) -> None:
        """timing: if a list, gets (launch, start event, end event) of every launch (a profiling run).
        serial: every launch also waits for the one before it, so each runs alone on its unit's SMs."""
        launches, waited = self.plan(batch.num_tokens)
        main = torch.cuda.current_stream()
        fork = torch.cuda.Event()
        fork.record(main)
        streams = {name: s for name, (_, s) in self.units.items()}
        for s in streams.values():
            s.wait_event(fork)
        done: dict[int, torch.cuda.Event] = {}
        for i, launch in enumerate(launches):
            stream = streams[launch.op.unit]
            with torch.cuda.stream(stream):
                for w in launch.waits + ([i - 1] if serial and i else []):
                    stream.wait_event(done[w])
                if timing is not None:  # external: timestamps survive capture into a CUDA graph
                    timing.append((launch, *(torch.cuda.Event(enable_timing=True, external=True) for _ in "se")))
                    timing[-1][1].record(stream)
                with sm_share(self.units[launch.op.unit][0], self.total):
                    run_launch(self.model, launch, ws, batch)
                if timing is not None:
                    timing[-1][2].record(stream)
                if i in waited or serial:
                    done[i] = torch.cuda.Event()
                    done[i].record(stream)
        for s in streams.values():
            join = torch.cuda.Event()
            join.record(s)
            main.wait_event(join)

    @torch.inference_mode()
    def timeline(self, batch: ForwardBatch, ws: Workspace, serial: bool = False) -> list[dict]:
        """Every nano-op's unit, layer, op, rows and start/end (ms from the first start), timed in a CUDA
        graph replay (an eager run would time the CPU's launches). The batch's KV is rewritten with the
        same values. serial: each nano-op alone on its unit (no overlap), for comparison."""
        self(batch, ws)  # warm up: kernels compiled, the batch's attention metadata built
        timing: list = []
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self(batch, ws, timing, serial)
        graph.replay()
        graph.replay()
        torch.cuda.synchronize()
        t0 = timing[0][1]
        return [{"unit": x.op.unit, "layer": x.layer, "op": x.op.op, "start_row": x.op.start, "end_row": x.op.end,
                 "start_ms": t0.elapsed_time(a), "end_ms": t0.elapsed_time(b)} for x, a, b in timing]
