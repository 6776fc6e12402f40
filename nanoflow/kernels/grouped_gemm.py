"""The experts' MLPs as two grouped GEMMs (torch._grouped_mm): every expert's rows in one launch, each group's
size read from the offsets on the device, so there is no host sync and a CUDA graph captures it."""
from __future__ import annotations

import functools

import torch


@functools.cache
def _fast_path(index: int) -> bool:
    """torch's CUTLASS grouped GEMM runs on sm90 and sm100 (Hopper, Blackwell); elsewhere torch._grouped_mm falls
    back to a loop over the groups that copies the offsets to the host."""
    return torch.cuda.get_device_capability(index)[0] in (9, 10)


def supported(device: torch.device, dtype: torch.dtype, *widths: int) -> bool:
    """Whether `experts_mlp` runs here without a host sync: CUDA sm90 / sm100 in bf16 (torch's fast path only
    takes bf16), and the GEMMs' widths (hidden and intermediate sizes) multiples of 16 bytes (its TMA loads)."""
    return (device.type == "cuda" and dtype == torch.bfloat16 and hasattr(torch, "_grouped_mm")
            and _fast_path(torch.cuda.current_device() if device.index is None else device.index)
            and all(w * dtype.itemsize % 16 == 0 for w in widths))


def experts_mlp(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, offs: torch.Tensor,
                silu_mul) -> torch.Tensor:
    """reference.experts_mlp as grouped GEMMs. The weights are [experts, out, in]; _grouped_mm multiplies by
    [experts, in, out], which their transposed views are (column-major, as it accepts them)."""
    h = torch._grouped_mm(x, gate_up.transpose(1, 2), offs=offs)
    act = h.new_empty(h.shape[0], h.shape[1] // 2)
    silu_mul(h, out=act)
    return torch._grouped_mm(act, down.transpose(1, 2), offs=offs)
