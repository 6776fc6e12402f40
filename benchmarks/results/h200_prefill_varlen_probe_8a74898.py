"""Probe (session 31): the engine's paged prefill kernel against torch's varlen flash attention on a batch's fresh
prompts. Fresh = chunks at position 0 (their keys are their own rows, bf16, before the cache's fp8); continued chunks
stay on the paged kernel. Also what varlen costs with its batch padded and max_q inflated (a CUDA graph's static
shapes). Run from the repository root on a GPU: python3 benchmarks/results/h200_prefill_varlen_probe_8a74898.py"""
import inspect
import itertools
import json
import os
import sys

import torch
import triton.testing

sys.path.insert(0, "benchmarks")
from prefill_sweep import case  # noqa: E402

from nanoflow.kernels import gpu  # noqa: E402

print("torch", torch.__version__)
try:
    from torch.nn.attention.varlen import varlen_attn
    print(inspect.signature(varlen_attn))
except ImportError as e:
    print("no varlen_attn:", e)
    varlen_attn = None

HQ, HKV, D, PAGE = 32, 8, 128, 32
CAUSAL = (-1, 0)


def bench(fn):
    return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")


def engine_ms(prompts, kv_dtype):
    """The engine's kernel over these (Q rows, positions) sequences, their pages scattered over a cache."""
    q, kc, vc, meta, _ = case(prompts, HQ, HKV, D, PAGE, kv_dtype)
    o = torch.empty_like(q)
    return bench(lambda: gpu.prefill_attention(q, kc, vc, meta, D ** -0.5, o))


def varlen_cases(fresh, r):
    """varlen over the fresh prompts as strided views of one packed qkv buffer (as the engine's workspace holds
    them); padded as a graph would need; its error against SDPA a prompt at a time."""
    total = sum(s for s, _ in fresh)
    qkv = torch.randn(total, (HQ + 2 * HKV) * D, device="cuda", dtype=torch.bfloat16)
    q = qkv[:, :HQ * D].view(total, HQ, D)
    k = qkv[:, HQ * D:(HQ + HKV) * D].view(total, HKV, D)
    v = qkv[:, (HQ + HKV) * D:].view(total, HKV, D)
    cu = torch.tensor([0, *itertools.accumulate(s for s, _ in fresh)], device="cuda", dtype=torch.int32)
    top = max(s for s, _ in fresh)
    r["varlen fresh (strided views)"] = bench(lambda: varlen_attn(q, k, v, cu, cu, top, top, window_size=CAUSAL))
    for pad in (64, 256):
        cup = torch.cat([cu, cu[-1:].repeat(pad - len(fresh))])
        r[f"varlen fresh, B={pad}, max 4096"] = bench(
            lambda: varlen_attn(q, k, v, cup, cup, 4096, 4096, window_size=CAUSAL))
    ref = torch.empty_like(q)
    for s0, s1 in zip(cu[:-1].tolist(), cu[1:].tolist()):
        heads = [t[s0:s1].transpose(0, 1)[None] for t in (q, k, v)]
        ref[s0:s1] = torch.nn.functional.scaled_dot_product_attention(
            *heads, is_causal=True, enable_gqa=True)[0].transpose(0, 1)
    got = varlen_attn(q, k, v, cu, cu, top, top, window_size=CAUSAL)
    r["varlen rel err vs sdpa"] = ((got.float() - ref.float()).norm() / ref.float().norm()).item()


cases = {
    "splitwise-like": [(1313, 1313), (879, 879), (396, 396), (381, 381), (600, 2100)],
    "const 1024": [(1024, 1024), (524, 1024)],
    "long": [(2048, 2048), (1000, 3000)],
    "many short": [(91, 91)] * 12 + [(374, 374)] * 4,
}
out = {}
for name, prompts in cases.items():
    fresh = [p for p in prompts if p[0] == p[1]]
    cont = [p for p in prompts if p[0] != p[1]]
    r = {}
    for dt in (torch.float8_e4m3fn, torch.bfloat16):
        r[f"engine all {dt}"] = engine_ms(prompts, dt)
        if cont:
            r[f"engine continued {dt}"] = engine_ms(cont, dt)
        r[f"engine fresh {dt}"] = engine_ms(fresh, dt)
    if varlen_attn is not None:
        varlen_cases(fresh, r)
    out[name] = r
    print(f"\n== {name}: {prompts}")
    for key, val in r.items():
        print(f"  {key:45s} {val:9.4f}" + ("" if "err" in key else " ms"))
with open(os.environ.get("OUT", ".") + "/prefill_flash_probe.json", "w") as f:
    json.dump(out, f, indent=1)
