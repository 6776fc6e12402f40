"""Kernel backends. Every backend exposes the functions of `reference` with the same signatures:
rms_norm, qk_norm, add_rms_norm, silu_mul, rope_append_kv, decode_attention, prefill_attention, experts_mlp,
experts_capturable, experts_interleaved, experts_scratch (what experts_mlp allocates), moe_route, moe_gather,
moe_combine, exponential_race and moe_pad (the slots each expert's sorted pairs start at a multiple of, by the
batch's rows)."""
from __future__ import annotations

import types

import torch


def backend(device: torch.device) -> types.ModuleType:
    """Plain torch on the CPU; Triton + torch.compile on CUDA (imported only there)."""
    if device.type == "cuda":
        from nanoflow.kernels import gpu
        return gpu
    from nanoflow.kernels import reference
    return reference
