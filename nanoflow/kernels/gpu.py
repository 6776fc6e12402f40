"""The GPU backend: Triton paged attention, torch.compile fusions of the reference elementwise ops.

GEMMs stay in the model (torch.mm: cuBLAS). The fusions are the reference functions themselves,
compiled: one source of truth for the math, one fused kernel each on the GPU.
"""
from __future__ import annotations

import torch

from nanoflow.kernels import reference
from nanoflow.kernels.triton_attention import decode_attention, prefill_attention  # noqa: F401


def _compile(fn):
    return torch.compile(fn, dynamic=True, fullgraph=True)


rms_norm = _compile(reference.rms_norm)
add_rms_norm = _compile(reference.add_rms_norm)
silu_mul = _compile(reference.silu_mul)
rope = _compile(reference.rope)
append_kv = reference.append_kv  # an indexed scatter (index_put_), capturable as it is
