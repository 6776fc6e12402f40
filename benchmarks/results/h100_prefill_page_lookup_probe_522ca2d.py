"""Ad-hoc probe (session 21): is prefill attention bound by its per-key page lookups? The engine's kernel against the
same kernel whose key tiles take one page lookup a tile (pages contiguous here, so both read the same keys).
PYTHONPATH=.:benchmarks python benchmarks/results/h100_prefill_page_lookup_probe_522ca2d.py engine|direct"""
import itertools
import sys

import torch
import triton
import triton.language as tl
import triton.testing
from prefill_sweep import flash_rate  # run from the repository root, benchmarks on the path: PYTHONPATH=.:benchmarks

from nanoflow.kernels import reference as ref
from nanoflow.kernels import triton_attention as ta
from nanoflow.models.batch import PREFILL, ForwardBatch


@triton.jit
def _load_kv_tile_direct(K, V, BT, s, kvh, n0, limit, stride_kb, stride_ks, stride_kh, stride_bt, offs_d,
                         PAGE: tl.constexpr, BLOCK_N: tl.constexpr):
    offs_n = n0 + tl.arange(0, BLOCK_N)
    valid = offs_n < limit
    page = tl.load(BT + s * stride_bt + n0 // PAGE) + (offs_n - n0) // PAGE
    kv_off = page[:, None] * stride_kb + (offs_n % PAGE)[:, None] * stride_ks + kvh * stride_kh + offs_d[None, :]
    k = tl.load(K + kv_off, mask=valid[:, None], other=0.0)
    v = tl.load(V + kv_off, mask=valid[:, None], other=0.0)
    return offs_n, valid, k, v


variant = sys.argv[1]
if variant == "direct":
    ta._load_kv_tile = _load_kv_tile_direct
for spec in ("1024:1024,524:1024", "2048:2048,512:4096", "3000:3000,1000:1000"):
    prompts = [tuple(map(int, p.split(":"))) for p in spec.split(",")]
    hq, hkv, d, page = 32, 8, 128, 16
    pages = [-(-s // page) for _, s in prompts]
    kc = torch.randn(sum(pages) + 1, page, hkv, d, device="cuda", dtype=torch.bfloat16)
    vc = torch.randn_like(kc)
    ends = list(itertools.accumulate(pages))
    tables = [list(range(1 + e - n, 1 + e)) for n, e in zip(pages, ends)]  # contiguous pages
    rows = sum(q for q, _ in prompts)
    starts = [0, *itertools.accumulate(q for q, _ in prompts)]
    batch = ForwardBatch(torch.zeros(rows), torch.zeros(rows), torch.zeros(rows), starts, [s for _, s in prompts],
                         tables, 0, torch.zeros(1))
    meta = batch.build_attention(PREFILL, 0, rows)
    meta = type(meta)(*(t.cuda() for t in (meta.q_start, meta.q_len, meta.seq_lens, meta.block_tables)))
    q = torch.randn(rows, hq, d, device="cuda", dtype=torch.bfloat16)
    flops = 4 * d * hq * sum(n for ql, s in prompts for n in range(s - ql + 1, s + 1))
    expect = torch.empty(q.shape, device="cuda")
    ref.paged_attention(q, kc, vc, meta, d ** -0.5, expect)
    for kw in (dict(), dict(num_stages=3), dict(num_stages=4), dict(block_n=64, num_stages=3)):
        out = torch.empty_like(q)
        try:
            ta.prefill_attention(q, kc, vc, meta, d ** -0.5, out, **kw)
            err = ((out.float() - expect).norm() / expect.norm()).item()
            ms = triton.testing.do_bench(lambda: ta.prefill_attention(q, kc, vc, meta, d ** -0.5, out, **kw),
                                         warmup=25, rep=100, return_mode="median")
            print(f"{variant:7s} {spec:22s} {str(kw):32s} {flops / ms / 1e9:7.1f} TFLOP/s  err {err:.1e}")
        except Exception as e:
            print(variant, spec, kw, "failed", type(e).__name__, str(e)[:100])
    if variant == "engine":
        print(f"flash   {spec:22s} {'':32s} {flash_rate(prompts, hq, hkv):7.1f} TFLOP/s")
