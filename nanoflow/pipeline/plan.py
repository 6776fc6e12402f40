"""From a spec to launches on execution units: each nano-op of each layer on its unit's stream, waiting
only on the events of its inputs that run on other units (the latest per unit: a stream runs in order).

`simulate` runs a plan on the CPU in an arbitrary order that respects every stream's order and every
wait, the way the GPU may: if a plan misses a dependency, some order gives a wrong result.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field

from nanoflow.models.batch import ForwardBatch
from nanoflow.models.llama import LlamaModel, Workspace
from nanoflow.pipeline.graph import dependencies, previous_layer_dependencies
from nanoflow.pipeline.spec import NanoOp


@dataclass(slots=True)
class Launch:
    layer: int  # -1: the embedding
    op: NanoOp
    waits: list[int] = field(default_factory=list)  # indices of launches (on other units) to wait for


def plan(nano_ops: list[NanoOp], num_layers: int, embed_unit: str) -> list[Launch]:
    """nano_ops: one layer's nano-ops in issue order (scaled to the batch; empty ones are dropped)."""
    layer_ops = [n for n in nano_ops if n.start < n.end]
    rows = max(n.end for n in layer_ops)
    launches = [Launch(-1, NanoOp("embed", 0, rows, embed_unit))]
    previous: dict[int, int] = {}  # id of a nano-op of the previous layer -> its launch index
    for l in range(num_layers):
        current: dict[int, int] = {}
        for n in layer_ops:
            deps = [current[id(d)] for d in dependencies(n, layer_ops)]
            if n.op == "attn_norm":
                deps += ([previous[id(d)] for d in previous_layer_dependencies(n, layer_ops)] if l else [0])
            latest: dict[str, int] = {}
            for d in deps:
                unit = launches[d].op.unit
                if unit != n.unit:
                    latest[unit] = max(latest.get(unit, -1), d)
            current[id(n)] = len(launches)
            launches.append(Launch(l, n, sorted(latest.values())))
        previous = current
    return launches


def run_launch(model: LlamaModel, launch: Launch, ws: Workspace, batch: ForwardBatch) -> None:
    n = launch.op
    if launch.layer < 0:
        model.embed_tokens(ws, batch, n.start, n.end)
    else:
        getattr(model, n.op)(launch.layer, ws, batch, n.start, n.end)


def simulate(model: LlamaModel, launches: list[Launch], ws: Workspace, batch: ForwardBatch, seed: int) -> None:
    """Run the plan on the CPU, picking at random which unit advances next (among those whose next launch
    has all its waits satisfied)."""
    rng = random.Random(seed)
    queues: dict[str, list[int]] = {}
    for i, launch in enumerate(launches):
        queues.setdefault(launch.op.unit, []).append(i)
    done = [False] * len(launches)
    heads = {u: 0 for u in queues}

    def can_run(u: str) -> bool:
        q = queues[u]
        return heads[u] < len(q) and all(done[w] for w in launches[q[heads[u]]].waits)
    while not all(done):
        ready = [u for u in queues if can_run(u)]
        if not ready:
            raise RuntimeError("the plan deadlocks: no unit can advance")
        u = rng.choice(ready)
        i = queues[u][heads[u]]
        run_launch(model, launches[i], ws, batch)
        done[i] = True
        heads[u] += 1
