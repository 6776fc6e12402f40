"""The tensor-parallel group of this process and the collectives the model and the runner use.

One process per rank. Tensors go through the default group (NCCL on CUDA, gloo on the CPU); host objects (the
iteration's batch, sent by rank 0) through a gloo group of their own, so that they never pass through the GPU.
"""
from __future__ import annotations

import datetime
import os
import socket
import threading
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist

# Loading a large checkpoint on one rank can keep the others waiting at their first collective that long.
TIMEOUT = datetime.timedelta(minutes=10)
TEARDOWN_TIMEOUT_S = 20.0
ABORT_TIMEOUT_S = 5.0  # an abort's bound: the peers are gone, nothing to wait for (a supervisor waits on the exit)
_abandoned = False  # a teardown that hung, or a thread stuck in a collective: this process's group is left behind
# How the ranks' partial rows are summed on CUDA: "nccl", or "symm-mem": torch's two-shot all-reduce, each rank
# reading and writing its peers' buffers over NVLink directly, in place in buffers allocated by row_buffer (1.25x
# NCCL's speed on 2 x H100 at 2,048 x 8,192 bf16, BENCHMARKS #9); "auto": symm-mem at TP = 2 between GPUs with
# peer access (measured there), else NCCL.
ALL_REDUCE_ENV = "NANOFLOW_ALL_REDUCE"
ALL_REDUCE_CHOICES = ("auto", "nccl", "symm-mem")
_symmetric: set[int] = set()  # the storages of row_buffer's symmetric allocations


@dataclass(frozen=True, slots=True)
class TPGroup:
    rank: int = 0
    size: int = 1
    cpu_group: object = None  # gloo group for host objects; None without tensor parallelism


SINGLE = TPGroup()


def free_ports(n: int = 1) -> list[int]:
    """n distinct free TCP ports of 127.0.0.1 (a rendezvous, the API servers' metrics)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:  # all bound at once: distinct
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def local_init_method() -> str:
    """A rendezvous for processes on this machine."""
    return f"tcp://127.0.0.1:{free_ports()[0]}"


def init_group(rank: int, size: int, init_method: str, device: torch.device) -> TPGroup:
    all_reduce_backend()  # a bad choice fails before the group forms
    if device.type == "cuda":
        os.environ["NCCL_NVLS_ENABLE"] = "0"  # NVLink multicast (NVLS) stays off: it takes memory and SMs
        os.environ["TORCH_SYMM_MEM_DISABLE_MULTICAST"] = "1"  # and in torch's symmetric memory
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "0")  # (no watchdog abort racing close_group's)
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=size, timeout=TIMEOUT,
                            **({"device_id": device} if device.type == "cuda" else {}))
    return TPGroup(rank, size, dist.new_group(backend="gloo", timeout=TIMEOUT))


def close_group(abort: bool = False, timeout_s: float | None = None) -> bool:
    """Leave the group; whether it was left. abort: the other ranks are gone. NCCL's communicators are aborted, not
    destroyed, since an abort waits for no peer; but after CUDA graphs captured its collectives, torch's NCCL
    teardown can hang on its own (pytorch#115388; seen on 2 x H200 with torch 2.11, in destroy_process_group and in
    the abort alike). So it runs on a daemon thread that is given timeout_s (default: TEARDOWN_TIMEOUT_S, or
    ABORT_TIMEOUT_S for an abort); past that the group is left behind, and this process cannot start another
    tensor-parallel engine."""
    global _abandoned
    if timeout_s is None:
        timeout_s = ABORT_TIMEOUT_S if abort else TEARDOWN_TIMEOUT_S
    if not dist.is_initialized():
        return True
    _symmetric.clear()
    abort_group = getattr(dist.distributed_c10d, "_abort_process_group", None)
    if dist.get_backend() != "nccl" or abort_group is None:
        dist.destroy_process_group()
        return True
    if not abort:
        torch.cuda.synchronize()  # this rank's own work first
    done = threading.Thread(target=abort_group, name="nanoflow-nccl-teardown", daemon=True)
    done.start()
    done.join(timeout_s)
    if done.is_alive():
        _abandoned = True
        warnings.warn(f"NCCL's teardown did not finish in {timeout_s:.0f} s (pytorch#115388: after CUDA graphs "
                      f"captured its collectives); leaving the group behind", RuntimeWarning, stacklevel=2)
        return False
    return True


def abandon_group() -> None:
    """A thread of this process waits in a collective for good (a peer died there): the group is left behind."""
    global _abandoned
    _abandoned = True


def group_abandoned() -> bool:
    """Whether this process left its group behind (close_group: NCCL's teardown hung; or abandon_group)."""
    return _abandoned


def check_can_start() -> None:
    """A process holds one group: a new tensor-parallel engine needs the last one's group gone."""
    if _abandoned:
        raise RuntimeError("this process's last tensor-parallel engine could not leave its NCCL group (its teardown "
                           "hung, pytorch#115388); start another tensor-parallel engine in a new process")
    if dist.is_initialized():  # torch.distributed has one default group per process
        raise RuntimeError("a tensor-parallel engine is already running in this process; shut it down first")


def all_reduce_backend() -> str:
    choice = os.environ.get(ALL_REDUCE_ENV, "auto")
    if choice not in ALL_REDUCE_CHOICES:
        raise ValueError(f"{ALL_REDUCE_ENV}={choice!r}: expected one of {', '.join(ALL_REDUCE_CHOICES)}")
    return choice


def _symmetric_all_reduce() -> bool:
    """Whether this process's group sums through symmetric memory (the same answer on every rank)."""
    if not (dist.is_initialized() and dist.get_backend() == "nccl"):
        return False
    choice, n = all_reduce_backend(), dist.get_world_size()
    return choice == "symm-mem" or choice == "auto" and n == 2 and all(
        torch.cuda.can_device_access_peer(a, b) for a in range(n) for b in range(n) if a != b)


def row_buffer(rows: int, width: int, dtype: torch.dtype, device) -> torch.Tensor:
    """[rows, width] that all_reduce sums in place, a range of rows at a time: with the symm-mem all-reduce in a
    tensor-parallel group, symmetric memory (a collective: every rank allocates its buffers in the same order)."""
    if not _symmetric_all_reduce():
        return torch.empty(rows, width, dtype=dtype, device=device)
    from torch.distributed import _symmetric_memory as symm_mem
    buf = symm_mem.empty(rows, width, dtype=dtype, device=device)
    symm_mem.rendezvous(buf, dist.group.WORLD.group_name)
    _symmetric.add(buf.untyped_storage().data_ptr())
    return buf


def all_reduce(x: torch.Tensor) -> None:
    """Sum x over the ranks, in place (x: contiguous, e.g. a range of workspace rows)."""
    if _symmetric and x.untyped_storage().data_ptr() in _symmetric:
        torch.ops.symm_mem.two_shot_all_reduce_(x, "sum", dist.group.WORLD.group_name)
    else:
        dist.all_reduce(x)


# all_gather_into_tensor's name from torch 2.13 on (the old one warns there; 2.11 has only the old one)
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def all_gather_columns(x: torch.Tensor, out: torch.Tensor) -> None:
    """Every rank's x ([n, cols], contiguous) side by side into out ([n, size * cols]), in rank order."""
    n, cols = x.shape
    staged = x.new_empty(out.shape[1] // cols * n, cols)  # the collective concatenates along rows
    _all_gather(staged, x)
    out.view(n, -1, cols).copy_(staged.view(-1, n, cols).transpose(0, 1))


def gather(x: torch.Tensor, tp: TPGroup) -> list[torch.Tensor] | None:
    """Rank 0: every rank's x (all of one shape), by rank; other ranks: None."""
    parts = [torch.empty_like(x) for _ in range(tp.size)] if tp.rank == 0 else None
    dist.gather(x.contiguous(), parts, dst=0)
    return parts


def gather_columns(x: torch.Tensor, tp: TPGroup, dtype: torch.dtype, width: int) -> torch.Tensor | None:
    """Rank 0: the first `width` columns of the ranks' x side by side, in dtype ([n, width]); other ranks: None.
    Each part is widened as it is placed: one pass over the gathered bytes, not a concatenation and a cast."""
    parts = gather(x, tp)
    if parts is None:
        return None
    out = x.new_empty(x.shape[0], width, dtype=dtype)
    for start, part in zip(range(0, width, x.shape[1]), parts):
        out[:, start: start + x.shape[1]] = part[:, : width - start]
    return out


def broadcast_tensor(x: torch.Tensor) -> torch.Tensor:
    """Rank 0's x to every rank, in place (the others pass a buffer of the same shape and dtype)."""
    dist.broadcast(x, src=0)
    return x


def broadcast_object(tp: TPGroup, obj=None):
    """Rank 0's obj (pickled) to every rank; the others pass nothing and get it back."""
    box = [obj]
    dist.broadcast_object_list(box, src=0, group=tp.cpu_group)
    return box[0]


def agree_min(tp: TPGroup, value: int) -> int:
    """The smallest of the ranks' values (e.g. KV blocks that fit: every rank must hold the same blocks)."""
    t = torch.tensor([value], dtype=torch.long)
    dist.all_reduce(t, op=dist.ReduceOp.MIN, group=tp.cpu_group)
    return int(t.item())
