"""The GPU backend: Triton paged attention and rope + KV append, torch.compile fusions of the reference norms
and activation, the experts' routing (a counting sort) and MLPs (grouped GEMMs) in Triton.

GEMMs stay in the model (torch.mm: cuBLAS). The fusions are the reference functions themselves,
compiled: one source of truth for the math, one fused kernel each on the GPU.
"""
from __future__ import annotations

import functools

import torch

from nanoflow.kernels import reference, sm_share, triton_attention, triton_moe
from nanoflow.kernels.triton_attention import prefill_attention  # noqa: F401
from nanoflow.kernels.triton_rope import rope_append_kv  # noqa: F401


def _compile(fn):
    """fn compiled for any row count: only the first dim of its tensors is dynamic, the widths are constants, and
    a new width compiles anew rather than turning dynamic (dynamo's default on a second width: two activation
    widths in one process, e.g. Qwen2-MoE's experts and shared expert). With dynamic widths the activation ran
    2.3x slower in #9's layer and 1.6-1.8x slower at Mixtral's TP = 2 width (BENCHMARKS.md): its 2-D indexing by
    a runtime width."""
    compiled = torch.compile(fn, fullgraph=True)

    @functools.wraps(fn)
    def run(*args, **kwargs):
        for t in (*args, *kwargs.values()):
            if isinstance(t, torch.Tensor) and t.dim() > 1:
                torch._dynamo.maybe_mark_dynamic(t, 0)
                for d in range(1, t.dim()):
                    torch._dynamo.mark_static(t, d)
        return compiled(*args, **kwargs)
    return run


rms_norm = _compile(reference.rms_norm)
add_rms_norm = _compile(reference.add_rms_norm)
silu_mul = _compile(reference.silu_mul)
exponential_race = _compile(reference.exponential_race)
moe_combine = _compile(reference.moe_combine)


# The reference's with the compiled norm, once for q and once for k: q and k, views of one buffer, compiled as one
# function's two inputs became a "synthetic base" of the whole buffer, its size fixed at the first call (another
# buffer's views then failed an assertion, and on the CPU views at an offset came out wrong).
qk_norm = functools.partial(reference.qk_norm, norm=rms_norm)


def decode_attention(q, k_cache, v_cache, meta, scale, out, sliding_window=None) -> None:
    """The persistent decode kernel sized to the SMs it runs on (the unit's share, or the device), in the
    configuration that measured best on an H100 (BENCHMARKS.md, #4), with a query block of the group's own rows:
    on a share, or over an fp8 cache, the page kernel where it runs, 8 programs per SM; on the whole device over a
    16-bit cache, the gather kernel, 4 programs per SM (there it read 1-2 % faster on short and mid contexts)."""
    total = sm_share.total_sms(q.device.index or 0)
    sms = sm_share.current or total
    gather = sms >= total and k_cache.element_size() == 2
    triton_attention.decode_attention(q, k_cache, v_cache, meta, scale, out, sliding_window,
                                      programs=(4 if gather else 8) * sms, pages=False if gather else None,
                                      block_g=1 << (q.shape[1] // k_cache.shape[2] - 1).bit_length())


# Triton's grouped GEMMs in 16-bit floats: they read the offsets on the device, and take gate and up interleaved
experts_capturable = experts_interleaved = triton_moe.supported
moe_route = triton_moe.route
moe_gather = _compile(reference.moe_gather)
# Where the experts average two tiles of pairs or more, each expert's rows start at a multiple of the grouped GEMM's
# tile rows (block_m), the gap zero rows: its last tile then multiplies zeros, not the next expert's rows. Under the
# power cap that ran Mixtral's experts' GEMMs 1.02-1.04x faster on an H200 (the clock up to 60 MHz higher) and its
# splitwise run 1.012-1.018x (~680 pairs an expert). Qwen3-30B-A3B (128 experts), padded, ran 0.96x: at ~128 pairs
# an expert half its slots were gaps, more in small batches, and its GEMMs there are bound by reading their weights
# (BENCHMARKS.md, #10).
moe_pad = functools.partial(reference.moe_pad, tile=triton_moe.BLOCK_M)


def experts_scratch(slots, hidden, intermediate, dtype):
    """The bytes experts_mlp allocates: Triton's (gate|up never written; split-K pieces sized by the device's SMs),
    else the reference loop's."""
    if triton_moe.supported(dtype):
        return triton_moe.scratch_bytes(slots, hidden, intermediate, dtype, sm_share.total_sms(
            torch.cuda.current_device()))
    return reference.experts_scratch(slots, hidden, intermediate, dtype)


def experts_mlp(x, gate_up, down, offs, pad=1):
    """Triton's grouped GEMMs in 16-bit floats (triton_moe.supported), else the reference's loop over the experts
    (which a CUDA graph cannot capture: the runner then runs eagerly)."""
    if triton_moe.supported(x.dtype):
        return triton_moe.experts_mlp(x, gate_up, down, offs, pad)
    return reference.experts_mlp(x, gate_up, down, offs, pad, silu_mul)
