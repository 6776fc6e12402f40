"""Whether a tensor can be read by the Tensor Memory Accelerator (Hopper's bulk-copy engine) through Triton's
tensor descriptors."""
from __future__ import annotations

import torch


def available(t: torch.Tensor) -> bool:
    """On a CUDA device of compute capability 9 or later (Triton's interpreter runs descriptors too, when asked)."""
    return t.is_cuda and torch.version.hip is None and torch.cuda.get_device_capability(t.device)[0] >= 9


def aligned(t: torch.Tensor) -> bool:
    """TMA needs a 16-byte-aligned base and 16-byte multiples for every stride but the last (contiguous) one."""
    size = t.element_size()
    return t.data_ptr() % 16 == 0 and t.stride(-1) == 1 and all(st * size % 16 == 0 for st in t.stride()[:-1])
