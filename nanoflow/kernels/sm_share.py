"""The SM share that the kernels being issued will run on, set by the pipeline while it issues one
execution unit's nano-ops (so, at CUDA-graph capture time, which is when kernels and grids are chosen).

cuBLAS picks its kernel and grid for the whole GPU; on a share it can leave a last wave nearly empty.
cuBLASLt takes a target SM count (CUBLASLT_MATMUL_DESC_SM_COUNT_TARGET), which torch sets from its SM
"carveout"; our persistent kernels (decode attention, the experts' grouped GEMMs) size their grids from `current`."""
from __future__ import annotations

import functools
from contextlib import contextmanager

import torch

current: int | None = None  # SMs of the unit being issued; None: the whole device


@functools.cache
def total_sms(device: int = 0) -> int:
    """The SMs of CUDA device `device`."""
    return torch.cuda.get_device_properties(device).multi_processor_count


@contextmanager
def sm_share(sms: int, total: int):
    global current
    if sms >= total:
        yield
        return
    library = torch.backends.cuda.preferred_blas_library()
    carveout = torch._C._get_sm_carveout_experimental()
    torch.backends.cuda.preferred_blas_library("cublaslt")
    torch._C._set_sm_carveout_experimental(total - sms)
    current = sms
    try:
        yield
    finally:
        current = None
        torch._C._set_sm_carveout_experimental(carveout)
        torch.backends.cuda.preferred_blas_library(library)
