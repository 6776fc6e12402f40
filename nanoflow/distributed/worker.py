"""The processes of a tensor-parallel engine, one per rank.

Rank 0 is the engine's own process: it schedules, prepares each iteration, broadcasts it (`ModelRunner.launch`) and
samples (or, for `nanoflow tune`, broadcasts a candidate spec to time, and for `bench throughput --timeline` an
iteration to time op by op: pipeline/measure.py). Ranks 1..N-1 are
spawned here: each builds its shard of the model (reading only its part of each weight) and a ModelRunner (same KV
blocks, same CUDA graphs), then runs the steps rank 0 broadcasts until it sends None.
"""
from __future__ import annotations

import atexit
import os
import time
from dataclasses import dataclass

import torch
import torch.multiprocessing as mp

from nanoflow.config import EngineConfig
from nanoflow.distributed.parallel_state import (
    TIMEOUT,
    TPGroup,
    broadcast_object,
    check_can_start,
    close_group,
    init_group,
    local_init_method,
)

JOIN_TIMEOUT_S = 30
_running: list[Workers] = []  # this process's live groups of workers (shutdown_all)


@dataclass(slots=True)
class WorkerArgs:
    """What a worker needs to build its shard: the engine's arguments, as rank 0 resolved them."""
    model: str | None
    load_format: str
    dtype: torch.dtype
    device_type: str
    config: EngineConfig
    max_model_len: int
    hf_overrides: dict | None = None


def rank_device(device_type: str, rank: int) -> torch.device:
    return torch.device("cuda", rank) if device_type == "cuda" else torch.device("cpu")


def check_size(size: int, device_type: str) -> None:
    """One process per GPU; on the CPU, at most one per core (more would only take turns)."""
    available = torch.cuda.device_count() if device_type == "cuda" else os.cpu_count() or 1
    if size > available:
        what = "GPUs" if device_type == "cuda" else "CPU cores"
        raise ValueError(f"tensor_parallel_size {size} is more than the {available} {what} available")


class Workers:
    """Rank 0's side: starts ranks 1..size-1 and joins the group with them; `shutdown` stops them."""

    def __init__(self, size: int, args: WorkerArgs):
        check_can_start()
        init_method = local_init_method()
        if args.device_type == "cuda":
            os.environ["NCCL_NVLS_ENABLE"] = "0"  # inherited by the workers, set before NCCL starts anywhere
        ctx = mp.get_context("spawn")  # (fork would copy rank 0's CUDA context and threads)
        started = [ctx.Event() for _ in range(1, size)]
        self._closing = False  # shutdown began: the workers' exits are not losses
        self.procs = [ctx.Process(target=_worker, args=(r, size, init_method, args, started[r - 1]),
                                  name=f"nanoflow-tp{r}") for r in range(1, size)]
        for p in self.procs:
            p.start()
        try:
            _wait_started(self.procs, started)
            self.group: TPGroup = init_group(0, size, init_method, rank_device(args.device_type, 0))
        except BaseException:
            self._stop()
            raise
        atexit.register(self.shutdown)
        _running.append(self)

    def lost(self, wait_s: float = 0.0) -> list[str]:
        """The workers that have exited (killed, or crashed): with any, no collective can complete again. wait_s:
        give them that long to finish exiting (a peer's closed socket fails a collective before its process is
        gone)."""
        if self._closing:  # (exits asked for)
            return []
        deadline = time.monotonic() + wait_s
        for p in self.procs if wait_s else ():
            p.join(max(deadline - time.monotonic(), 0))
        return [p.name for p in self.procs if not p.is_alive()]

    def shutdown(self, clean: bool = True) -> None:
        """clean: tell the workers to exit (if all are still there to hear it) and wait for them; else (rank 0
        failed, the workers may be waiting in a collective) kill them. Then leave the group."""
        if not self.procs:
            return
        self._closing = True
        atexit.unregister(self.shutdown)
        _running.remove(self)
        if clean and all(p.is_alive() for p in self.procs):
            broadcast_object(self.group, None)
            close_group()
            self._stop(JOIN_TIMEOUT_S)
        else:
            self._stop()
            close_group(abort=True)

    def _stop(self, timeout: float = 0) -> None:
        for p in self.procs:
            p.join(timeout)
            if p.is_alive():  # stuck (e.g. in a collective rank 0 left): no clean exit to wait for
                p.kill()
                p.join()
        self.procs = []


def shutdown_all() -> None:
    """Stop every live group of workers now (their engines were not shut down), rather than at exit."""
    while _running:
        _running[-1].shutdown()


def _wait_started(procs: list, started: list) -> None:
    """Until every rank runs _worker. One that exits first (a script without a main guard, whose import spawn
    repeats, fails so) is an error now, not the group's ten-minute wait for it; one that never starts, after that
    wait."""
    deadline = time.monotonic() + TIMEOUT.total_seconds()
    while not all(e.is_set() for e in started):
        if time.monotonic() > deadline:
            late = [p.name for p, e in zip(procs, started) if not e.is_set()]
            raise RuntimeError(f"tensor-parallel ranks {late} did not start within {TIMEOUT}")
        for p, e in zip(procs, started):
            if not e.is_set() and p.exitcode is not None:
                raise RuntimeError(f"tensor-parallel rank {p.name} exited (code {p.exitcode}) before it started; a "
                                   f"script that starts ranks runs them in new processes that import its main "
                                   f"module: guard its work with `if __name__ == '__main__':`")
        time.sleep(0.05)


def _worker(rank: int, size: int, init_method: str, args: WorkerArgs, started) -> None:
    started.set()
    from nanoflow.executor.model_runner import ModelRunner, settle_gc
    from nanoflow.models.loader import build_model, resolve
    from nanoflow.pipeline.measure import TimelineSpec, TimeSpec, run_timeline, run_timing
    device = rank_device(args.device_type, rank)
    if device.type == "cpu":  # the CPU's cores are shared among the ranks
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // size))
    tp = init_group(rank, size, init_method, device)
    try:
        source = resolve(args.model, args.config.num_layers, hf_overrides=args.hf_overrides)
        model = build_model(source, args.load_format, args.dtype, device, args.max_model_len, args.config.seed, tp)
        runner = ModelRunner(model, args.config, set(), args.max_model_len)
        settle_gc()
        while (step := broadcast_object(tp)) is not None:
            if isinstance(step, TimeSpec):  # (nanoflow tune timing a candidate on every rank)
                try:
                    run_timing(runner, step)
                except (RuntimeError, ValueError):  # rank 0 meets it too, reports it and goes on to the next
                    pass
            elif isinstance(step, TimelineSpec):  # (bench throughput --timeline)
                run_timeline(runner, step)
            else:
                runner.run_step(step)
    finally:
        if not close_group():
            os._exit(0)  # (finalizing would wait on the group its teardown left behind)
