"""Time the layer's collectives for the profile: `tp_size` processes (one per GPU, or gloo on the CPU) run each
collective of a rank's layer on every grid point's rows, as the model issues them (models/llama.py), and rank 0
reports µs per call.

The collectives: o_allreduce / down_allreduce sum [rows, hidden]; attn_allgather gathers the ranks' attention
outputs [rows, q_size / tp] into [rows, q_size]; o_allgather the ranks' hidden slices [rows, hidden / tp].
"""
from __future__ import annotations

import time

import torch
import torch.multiprocessing as mp

from nanoflow.config import ModelConfig
from nanoflow.distributed.parallel_state import (
    all_gather_columns,
    all_reduce,
    close_group,
    init_group,
    local_init_method,
    row_buffer,
)
from nanoflow.distributed.worker import check_size, rank_device


def _calls(cfg: ModelConfig, dtype: torch.dtype, device: torch.device, tp: int, op: str, rows: int):
    """The collective op over `rows` rows, as a function of no arguments, with its buffers."""
    shard = cfg.shard(tp)

    def buf(width):
        return torch.randn(rows, width, device=device).to(dtype)
    if op in ("o_allreduce", "down_allreduce"):  # in the kind of buffer the model sums (Workspace.hidden)
        x = row_buffer(rows, cfg.hidden_size, dtype=dtype, device=device)
        x.copy_(buf(cfg.hidden_size))
        return lambda: all_reduce(x)
    x, out = ((buf(shard.q_size), buf(shard.q_size * tp)) if op == "attn_allgather" else
              (buf(cfg.hidden_size // tp), buf(cfg.hidden_size)))
    return lambda: all_gather_columns(x, out)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _rank(rank: int, tp: int, init_method: str, cfg, dtype, device_type: str, grids: dict, reps: int, results):
    device = rank_device(device_type, rank)
    init_group(rank, tp, init_method, device)
    try:
        out = {}
        for op, grid in grids.items():
            out[op] = []
            for rows in grid:
                call = _calls(cfg, dtype, device, tp, op, rows)
                call()  # warm: NCCL sets up its channels on the first call
                _sync(device)
                all_reduce(torch.zeros(1, device=device))  # start together
                _sync(device)
                t = time.perf_counter()
                for _ in range(reps):
                    call()
                _sync(device)
                out[op].append((time.perf_counter() - t) / reps * 1e6)
        if rank == 0:
            results.put(out)
    finally:
        close_group()


def time_collectives(cfg: ModelConfig, dtype: torch.dtype, device_type: str, tp_size: int,
                     grids: dict[str, list[int]], reps: int) -> dict[str, list[float]]:
    """µs per call of each collective op at each of its grid's row counts (cfg: the whole model)."""
    check_size(tp_size, device_type)
    init_method = local_init_method()
    ctx = mp.get_context("spawn")
    results = ctx.SimpleQueue()
    procs = [ctx.Process(target=_rank, args=(r, tp_size, init_method, cfg, dtype, device_type, grids, reps, results))
             for r in range(tp_size)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    if any(p.exitcode for p in procs) or results.empty():
        raise RuntimeError(f"timing the collectives failed (exit codes {[p.exitcode for p in procs]})")
    return results.get()
