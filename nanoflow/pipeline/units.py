"""Execution units: CUDA streams confined to DISJOINT groups of SMs (green contexts).

torch's `GreenContext.create(n)` carves its n SMs from the whole device each time, so two of them share
SMs (a 100-SM and a 32-SM context overlap on 32 SMs and leave 32 idle). NanoFlow's units must not
overlap, so we split the device's SM resource ourselves through the driver API into groups of the
minimum partition size (cuDevSmResourceSplitByCount), give each unit its own groups, and make a green
context and a stream from them. Contexts are never destroyed: a destroyed green context broke later CUDA calls.
"""
from __future__ import annotations

import ctypes

import torch

from nanoflow.kernels.sm_share import total_sms

_SM = 1  # CU_DEV_RESOURCE_TYPE_SM
_DEFAULT_STREAM = 1  # CU_GREEN_CTX_DEFAULT_STREAM (required by cuGreenCtxCreate)
_NON_BLOCKING = 1  # CU_STREAM_NON_BLOCKING (required by cuGreenCtxStreamCreate)


class _Resource(ctypes.Structure):
    """CUdevResource (ABI version 1): type, 92 bytes of padding, a 48-byte union whose SM member is first."""
    _fields_ = [("type", ctypes.c_int), ("_padding", ctypes.c_ubyte * 92), ("sm_count", ctypes.c_uint),
                ("min_partition", ctypes.c_uint), ("alignment", ctypes.c_uint), ("_rest", ctypes.c_ubyte * 36)]


_lib = None
_partitions: dict[tuple, list[tuple[int, torch.cuda.Stream]]] = {}
_alive: list = []  # green contexts and their streams, for the life of the process


def _driver():
    global _lib
    if _lib is None:
        _lib = ctypes.CDLL("libcuda.so.1")
    return _lib


def _check(result: int, what: str) -> None:
    if result != 0:
        name = ctypes.c_char_p()
        _driver().cuGetErrorName(result, ctypes.byref(name))
        raise RuntimeError(f"{what} failed: {name.value.decode() if name.value else result}")


def partition(sms: tuple[int, ...], device: int = 0) -> list[tuple[int, torch.cuda.Stream]]:
    """Streams on disjoint SM groups of at least the given sizes, in order. Returns (SMs granted, stream)
    for each; the same request returns the same streams.

    The driver splits the device into equal groups of its minimum partition size (a remainder of a split
    cannot be split again); each unit takes whole groups, the last unit also the remainder if it needs it."""
    key = (tuple(sms), device)
    if key in _partitions:
        return _partitions[key]
    if sum(sms) > total_sms(device) or min(sms, default=1) <= 0:
        raise ValueError(f"SM groups {list(sms)} do not fit the device's {total_sms(device)} SMs")
    torch.cuda.init()
    lib = _driver()
    whole = _Resource()
    _check(lib.cuDeviceGetDevResource(ctypes.c_int(device), ctypes.byref(whole), _SM), "cuDeviceGetDevResource")
    size = max(whole.min_partition, 1)
    count = ctypes.c_uint(whole.sm_count // size)
    groups, remainder = (_Resource * count.value)(), _Resource()
    _check(lib.cuDevSmResourceSplitByCount(groups, ctypes.byref(count), ctypes.byref(whole), ctypes.byref(remainder),
                                           0, size), f"splitting {whole.sm_count} SMs into groups of {size}")
    free = list(groups[: count.value])
    out = []
    for i, want in enumerate(sms):
        mine = []
        while free and sum(g.sm_count for g in mine) < want:
            mine.append(free.pop(0))
        if sum(g.sm_count for g in mine) < want and i == len(sms) - 1 and remainder.sm_count:
            mine.append(remainder)
        granted = sum(g.sm_count for g in mine)
        if granted < want:
            raise ValueError(f"SM groups {list(sms)}: the driver's groups of {size} SMs leave only {granted} "
                             f"for a unit that wants {want}")
        resources = (_Resource * len(mine))(*mine)
        desc, ctx, stream = ctypes.c_void_p(), ctypes.c_void_p(), ctypes.c_void_p()
        _check(lib.cuDevResourceGenerateDesc(ctypes.byref(desc), resources, len(mine)), "cuDevResourceGenerateDesc")
        _check(lib.cuGreenCtxCreate(ctypes.byref(ctx), desc, ctypes.c_int(device), _DEFAULT_STREAM),
               "cuGreenCtxCreate")
        _check(lib.cuGreenCtxStreamCreate(ctypes.byref(stream), ctx, _NON_BLOCKING, 0), "cuGreenCtxStreamCreate")
        _alive.append((ctx, stream))
        out.append((granted, torch.cuda.ExternalStream(stream.value, device=torch.device("cuda", device))))
    _partitions[key] = out
    return out


def unit_streams(units, device: int = 0) -> dict[str, tuple[int, torch.cuda.Stream]]:
    """A stream per unit of a pipeline spec: units with sms > 0 on disjoint SM groups (in the spec's
    order), units with sms = 0 on a plain stream over the whole device. name -> (SMs, stream)."""
    sized = [u for u in units if u.sms > 0]
    groups = dict(zip((u.name for u in sized), partition(tuple(u.sms for u in sized), device))) if sized else {}
    whole = total_sms(device)
    return {u.name: groups[u.name] if u.sms > 0 else (whole, _plain_stream(u.name, device)) for u in units}


def share(sms: int, device: int = 0) -> tuple[int, torch.cuda.Stream]:
    """(SMs granted, stream) for one op timed alone on a share of `sms` SMs: a partition, or a plain stream
    when the share is the whole device."""
    whole = total_sms(device)
    return (whole, _plain_stream("whole", device)) if sms >= whole else partition((sms,), device)[0]


_plain: dict[tuple[str, int], torch.cuda.Stream] = {}


def _plain_stream(name: str, device: int) -> torch.cuda.Stream:
    return _plain.setdefault((name, device), torch.cuda.Stream(device))
