"""Prefill attention: TFLOP/s of the paged Triton kernel's configurations on one batch of prompts, on the whole card,
next to torch's flash attention (scaled_dot_product_attention, causal, contiguous bf16) on the fresh prompts of the
same lengths: the rate a kernel that needs no pages reaches.

--prompts Q:S,... are the batch's prefill sequences: Q query rows at the last Q of S positions (Q < S is a chunk
that continues a prompt whose first S - Q tokens are cached). The default is the kind of prefill part a 2,048-token
batch of the 1024/512 steady state holds beside ~500 decodes: one whole prompt and the second half of another.

--sliding-window W times a model with a window (Mistral's): each query attends to its last W positions; torch's
flash has no window, so its rate is not given then.

python benchmarks/prefill_sweep.py [--prompts 1024:1024,524:1024] [--hq 32 --hkv 8] [--kv-cache-dtype fp8]
                                   [--sliding-window W] [--default-only] [--output out.json]"""
import argparse
import itertools
import json

import torch
import triton.testing
from decode_sweep import paged_cache, time_configs

from nanoflow.kernels import gpu
from nanoflow.kernels import reference as ref
from nanoflow.kernels.triton_attention import prefill_attention
from nanoflow.models.batch import PREFILL, ForwardBatch


def case(prompts, hq, hkv, d=128, page=16, kv_dtype=torch.bfloat16, window=None):
    """Queries, caches and metadata of the prefill sequences (q_len, seq_len); their pages scattered over the
    cache. Returns also the FLOPs: 4 * d * hq per (query, allowed key) pair."""
    g = torch.Generator().manual_seed(0)
    kc, vc, tables = paged_cache([s for _, s in prompts], hkv, d, page, kv_dtype, g)
    rows = sum(q for q, _ in prompts)
    starts = [0, *itertools.accumulate(q for q, _ in prompts)]
    batch = ForwardBatch(torch.zeros(rows), torch.zeros(rows), torch.zeros(rows), starts, [s for _, s in prompts],
                         tables, 0, torch.zeros(1))
    meta = batch.build_attention(PREFILL, 0, rows)
    meta = type(meta)(*(t.cuda() for t in (meta.q_start, meta.q_len, meta.seq_lens, meta.block_tables)))
    q = torch.randn(rows, hq, d, device="cuda", dtype=torch.bfloat16)
    pairs = sum(min(n, window or n) for ql, s in prompts for n in range(s - ql + 1, s + 1))  # n keys a query sees
    return q, kc, vc, meta, 4 * d * hq * pairs


def flash_rate(prompts, hq, hkv, d=128) -> float:
    """TFLOP/s of torch's SDPA (flash) on fresh prompts of the sequences' lengths, one call per prompt."""
    qs = [torch.randn(1, hq, s, d, device="cuda", dtype=torch.bfloat16) for _, s in prompts]
    ks = [torch.randn(1, hkv, s, d, device="cuda", dtype=torch.bfloat16) for _, s in prompts]

    def run():
        for q, k in zip(qs, ks):
            torch.nn.functional.scaled_dot_product_attention(q, k, k, is_causal=True, enable_gqa=True)
    ms = triton.testing.do_bench(run, warmup=25, rep=100, return_mode="median")
    return 4 * d * hq * sum(s * (s + 1) // 2 for _, s in prompts) / (ms * 1e-3) / 1e12


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", default="1024:1024,524:1024")
    ap.add_argument("--hq", type=int, default=32)
    ap.add_argument("--hkv", type=int, default=8)
    ap.add_argument("--kv-cache-dtype", choices=["auto", "fp8"], default="auto", help="auto: bf16")
    ap.add_argument("--sliding-window", type=int)
    ap.add_argument("--default-only", action="store_true", help="time the engine's configuration alone")
    ap.add_argument("--output")
    a = ap.parse_args()
    prompts = [tuple(map(int, p.split(":"))) for p in a.prompts.split(",")]
    kv_dtype = torch.float8_e4m3fn if a.kv_cache_dtype == "fp8" else torch.bfloat16
    window = a.sliding_window
    q, kc, vc, meta, flops = case(prompts, a.hq, a.hkv, kv_dtype=kv_dtype, window=window)
    scale = 128 ** -0.5
    expect = torch.empty(q.shape, device="cuda")
    ref.paged_attention(q, kc, vc, meta, scale, expect, window)
    runs = [("engine default", lambda out: gpu.prefill_attention(q, kc, vc, meta, scale, out, window))]
    grid = [dict(block_m=bm, block_n=bn, num_warps=w, num_stages=st)
            for bm, bn, w, st in itertools.product((64, 128), (64, 128), (4, 8), (2, 3, 4))]
    for kw in () if a.default_only else grid:
        runs.append((kw, lambda out, kw=kw: prefill_attention(q, kc, vc, meta, scale, out, window, **kw)))
    rows = time_configs(runs, torch.empty_like(q), lambda out: ((out.float() - expect).norm() / expect.norm()).item())
    for r in rows:
        r["tflops"] = flops / (r["ms"] * 1e-3) / 1e12
    flash = None if window else flash_rate(prompts, a.hq, a.hkv)
    rows.sort(key=lambda r: r["ms"])
    print(f"prompts {a.prompts}, {a.hq}/{a.hkv} heads, cache {kv_dtype}, window {window}; torch flash on fresh prompts "
          f"of these lengths: {'-' if flash is None else f'{flash:.0f}'} TFLOP/s")
    print(f"{'ms':>8} {'TFLOP/s':>8} {'error':>8}  config")
    for r in rows:
        print(f"{r['ms']:8.4f} {r['tflops']:8.0f} {r['rel_err']:8.1e}  {r['config']}")
    if a.output:
        with open(a.output, "w") as f:
            json.dump({"prompts": prompts, "hq": a.hq, "hkv": a.hkv, "kv_dtype": str(kv_dtype),
                       "sliding_window": window, "flash_tflops": flash, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
