"""Decode attention: effective KV bandwidth of kernel configurations on one case (default: the Llama-3-8B
1024/512 steady state, 305 sequences x 1,280 tokens, 32 query / 8 KV heads, head dim 128, bf16).

python benchmarks/decode_sweep.py [--seqs 305] [--ctx 1280] [--default-only] [--output out.json]"""
import argparse
import itertools
import json

import torch
import triton.testing

from nanoflow.kernels import reference as ref
from nanoflow.kernels.triton_attention import decode_attention
from nanoflow.models.batch import DECODE, ForwardBatch


def case(seqs, ctx, hq=32, hkv=8, d=128, page=16):
    blocks = seqs * (ctx // page) + 1
    kc = torch.randn(blocks, page, hkv, d, device="cuda", dtype=torch.bfloat16)
    vc = torch.randn_like(kc)
    perm = torch.randperm(blocks - 1).tolist()
    tables = [perm[i * (ctx // page):(i + 1) * (ctx // page)] for i in range(seqs)]
    batch = ForwardBatch(torch.zeros(seqs), torch.zeros(seqs), torch.zeros(seqs), list(range(seqs + 1)), [ctx] * seqs,
                         tables, seqs, torch.zeros(1))
    meta = batch.build_attention(DECODE, 0, seqs)
    meta = type(meta)(*(t.cuda() for t in (meta.q_start, meta.q_len, meta.seq_lens, meta.block_tables)))
    q = torch.randn(seqs, hq, d, device="cuda", dtype=torch.bfloat16)
    return q, kc, vc, meta


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seqs", type=int, default=305)
    ap.add_argument("--ctx", type=int, default=1280)
    ap.add_argument("--default-only", action="store_true", help="time the default configuration alone")
    ap.add_argument("--output")
    a = ap.parse_args()
    q, kc, vc, meta = case(a.seqs, a.ctx)
    nbytes = 2 * a.seqs * a.ctx * kc.shape[2] * kc.shape[3] * kc.element_size()
    expect = torch.empty(q.shape, device="cuda")
    ref.paged_attention(q[:8], kc, vc, type(meta)(meta.q_start[:8], meta.q_len[:8], meta.seq_lens[:8],
                                                 meta.block_tables[:8]), 128 ** -0.5, expect)
    rows = []
    grid = ((512,), (64,), (4,), (2,)) if a.default_only else ((512, 1024), (32, 64, 128), (4, 8), (2, 3, 4))
    for split, bn, warps, stages in itertools.product(*grid):
        out = torch.empty_like(q)
        kw = dict(split_tokens=split, block_n=bn, num_warps=warps, num_stages=stages)
        try:
            decode_attention(q, kc, vc, meta, 128 ** -0.5, out, **kw)
            err = ((out[:8].float() - expect[:8]).norm() / expect[:8].norm()).item()
            ms = triton.testing.do_bench(lambda: decode_attention(q, kc, vc, meta, 128 ** -0.5, out, **kw),
                                         warmup=25, rep=100, return_mode="median")
        except Exception as e:  # a config the compiler rejects (shared memory)
            print(kw, "failed:", type(e).__name__)
            continue
        rows.append({**kw, "ms": ms, "tb_s": nbytes / ms / 1e9, "rel_err": err})
    rows.sort(key=lambda r: r["ms"])
    print(f"{a.seqs} seqs x {a.ctx} tokens, {nbytes / 1e6:.0f} MB of KV per call")
    for r in rows[:8]:
        print(f"split {r['split_tokens']:5d} block_n {r['block_n']:4d} warps {r['num_warps']} stages "
              f"{r['num_stages']}: {r['ms']:.3f} ms  {r['tb_s']:.2f} TB/s  err {r['rel_err']:.1e}")
    if a.output:
        json.dump({"seqs": a.seqs, "ctx": a.ctx, "bytes": nbytes, "configs": rows}, open(a.output, "w"), indent=1)


if __name__ == "__main__":
    main()
