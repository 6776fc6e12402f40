"""Decode attention: effective KV bandwidth of the stream-K kernel's configurations on one case, on the whole card.
Default case: the Llama-3-8B 1024/512 steady state, 305 sequences x 1,280 tokens, 32 query / 8 KV heads, head dim
128, bf16. --ctx-max spreads the contexts
uniformly over [ctx, ctx-max] as in a running batch; --width pads the block tables to the engine's width
(max_model_len / 16 pages), which bounds the tiles per sequence.

#9's shape (Llama-3-70B at TP = 2, the 1024/512 steady state):
python benchmarks/decode_sweep.py --seqs 682 --ctx 1024 --ctx-max 1536 --hkv 4 --width 512
Mixtral 8x7B at TP = 2 with the fp8 cache (#10):
python benchmarks/decode_sweep.py --seqs 663 --ctx 1024 --ctx-max 1536 --hq 16 --hkv 4 --width 2048 --kv-cache-dtype fp8
python benchmarks/decode_sweep.py [--seqs 305] [--ctx 1280] [--default-only] [--kv-cache-dtype fp8] [--output out.json]
--page sets the cache's page (block) size; --head-dim the heads' width (64 over a 16-bit cache reads the bytes of 128
over fp8, without widening them); --sms times every config on a share of that many SMs (a green context,
as a pipeline's memory unit), the engine's call told its share.

The grid: the gather kernel's tiles, warps, depth and programs per SM with the query block's rows (16, the MMA's,
or the group's own power of 2: block_g); the page kernel's KV heads a unit (kv_heads), warps, pages in flight and
programs per SM, with the unit's own query block."""
import argparse
import itertools
import json

import torch
import triton.testing

from nanoflow.kernels import gpu
from nanoflow.kernels import reference as ref
from nanoflow.kernels.sm_share import sm_share, total_sms
from nanoflow.kernels.triton_attention import decode_attention
from nanoflow.models.batch import DECODE, ForwardBatch
from nanoflow.pipeline.units import share


def paged_cache(lens, hkv, d, page, kv_dtype, g):
    """Random K and V caches holding sequences of these lengths, each sequence's pages scattered over the cache
    (block 0 left over, for padding); their block tables."""
    pages = [-(-n // page) for n in lens]
    blocks = sum(pages) + 1
    kc = torch.randn(blocks, page, hkv, d, device="cuda").to(kv_dtype)
    vc = torch.randn(blocks, page, hkv, d, device="cuda").to(kv_dtype)
    perm = torch.randperm(blocks - 1, generator=g).tolist()
    ends = list(itertools.accumulate(pages))
    return kc, vc, [perm[e - n:e] for n, e in zip(pages, ends)]


def case(seqs, ctx, hq=32, hkv=8, d=128, page=16, ctx_max=None, width=None, kv_dtype=torch.bfloat16):
    """Queries, caches (kv_dtype: bf16, or float8_e4m3fn as --kv-cache-dtype fp8 stores them) and metadata of
    `seqs` decode sequences; their pages scattered over the cache."""
    g = torch.Generator().manual_seed(0)
    lens = torch.randint(ctx, (ctx_max or ctx) + 1, (seqs,), generator=g).tolist()
    kc, vc, tables = paged_cache(lens, hkv, d, page, kv_dtype, g)
    tables[0] = tables[0] + [0] * ((width or 0) - len(tables[0]))  # the metadata's width is its widest table
    batch = ForwardBatch(torch.zeros(seqs), torch.zeros(seqs), torch.zeros(seqs), list(range(seqs + 1)), lens,
                         tables, seqs, torch.zeros(1))
    meta = batch.build_attention(DECODE, 0, seqs)
    meta = type(meta)(*(t.cuda() for t in (meta.q_start, meta.q_len, meta.seq_lens, meta.block_tables)))
    q = torch.randn(seqs, hq, d, device="cuda", dtype=torch.bfloat16)
    return q, kc, vc, meta, 2 * sum(lens) * hkv * d * kc.element_size()


def time_configs(runs, out: torch.Tensor, error) -> list[dict]:
    """Each (config, fn(out)) of runs: its relative error (error(out)) and median ms by do_bench. A config the
    compiler rejects (shared memory, registers) is skipped, named."""
    rows = []
    for config, fn in runs:
        try:
            fn(out)
            err = error(out)
            ms = triton.testing.do_bench(lambda: fn(out), warmup=25, rep=100, return_mode="median")
        except Exception as e:
            print(config, "failed:", type(e).__name__, str(e)[:120])
            continue
        rows.append({"config": config, "ms": ms, "rel_err": err})
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seqs", type=int, default=305)
    ap.add_argument("--ctx", type=int, default=1280)
    ap.add_argument("--ctx-max", type=int)
    ap.add_argument("--hq", type=int, default=32)
    ap.add_argument("--hkv", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--width", type=int, help="block table width in pages (the engine's: max_model_len / 16)")
    ap.add_argument("--page", type=int, default=16, help="tokens per page (the engine's --block-size)")
    ap.add_argument("--sms", type=int, help="run on a share of this many SMs (default: the whole card)")
    ap.add_argument("--kernel", choices=["both", "page", "gather"], default="both", help="the configs of which kernel")
    ap.add_argument("--kv-heads", type=int, nargs="+", default=[1, 2, 4],
                    help="the page kernel's KV heads a unit to try (those dividing --hkv)")
    ap.add_argument("--default-only", action="store_true", help="time the engine's configuration alone")
    ap.add_argument("--kv-cache-dtype", choices=["auto", "fp8"], default="auto", help="auto: bf16")
    ap.add_argument("--output")
    a = ap.parse_args()
    kv_dtype = torch.float8_e4m3fn if a.kv_cache_dtype == "fp8" else torch.bfloat16
    q, kc, vc, meta, nbytes = case(a.seqs, a.ctx, a.hq, a.hkv, a.head_dim, a.page, a.ctx_max, a.width, kv_dtype)
    scale = a.head_dim ** -0.5
    sms, stream = share(a.sms) if a.sms else (total_sms(), torch.cuda.current_stream())
    expect = torch.empty(8, a.hq, a.head_dim, device="cuda")
    ref.paged_attention(q[:8], kc, vc, type(meta)(meta.q_start[:8], meta.q_len[:8], meta.seq_lens[:8],
                                                 meta.block_tables[:8]), scale, expect)
    runs = [("engine default", lambda out: gpu.decode_attention(q, kc, vc, meta, scale, out))]
    tight = max(1, a.hq // a.hkv)
    blocks_g = (None,) if tight >= 16 or tight & (tight - 1) else (None, tight)
    gather = itertools.product((32, 64), (2, 4), (2, 3), (4, 8, 16), blocks_g)
    configs = [dict(pages=False, block_n=bn, num_warps=w, num_stages=st, programs=k * sms, block_g=bg)
               for bn, w, st, k, bg in gather] if a.kernel != "page" else []
    # the page kernel: one KV head a unit in the grid that set its defaults; units of several heads (larger tiles:
    # fewer in flight fit in shared memory) over more warps and fewer programs per SM
    page = [(1, w, st, k) for w, st, k in itertools.product((1, 2), (4, 6, 8, 10), (4, 8, 16)) if 1 in a.kv_heads]
    page += [(n, w, st, k) for n, w, st, k in itertools.product(a.kv_heads, (1, 2, 4), (4, 6, 8), (2, 4, 8))
             if n > 1 and a.hkv % n == 0]
    configs += [dict(pages=True, num_warps=w, num_stages=st, programs=k * sms, kv_heads=n,
                     block_g=1 << (tight * n - 1).bit_length()) for n, w, st, k in page] if a.kernel != "gather" else []
    for kw in () if a.default_only else configs:
        runs.append((kw, lambda out, kw=kw: decode_attention(q, kc, vc, meta, scale, out, **kw)))
    with torch.cuda.stream(stream), sm_share(sms, total_sms()):
        rows = time_configs(runs, torch.empty_like(q), lambda out: ((out[:8].float() - expect).norm() /
                                                                       expect.norm()).item())
    for r in rows:
        r["tb_s"] = nbytes / r["ms"] / 1e9
    print(f"{a.seqs} seqs x {a.ctx}..{a.ctx_max or a.ctx} tokens, {a.hq}/{a.hkv} heads of {a.head_dim}, "
          f"pages of {a.page}, {nbytes / 1e6:.0f} MB of KV per call, {sms} SMs of {torch.cuda.get_device_name()}")
    for r in [rows[0]] + sorted(rows[1:], key=lambda r: r["ms"])[:8]:
        print(f"{r['ms']:.3f} ms  {r['tb_s']:.2f} TB/s  err {r['rel_err']:.1e}  {r['config']}")
    if a.output:
        json.dump({"seqs": a.seqs, "ctx": a.ctx, "ctx_max": a.ctx_max, "hq": a.hq, "hkv": a.hkv,
                   "head_dim": a.head_dim, "width": a.width,
                   "page": a.page, "sms": sms,
                   "kv_cache_dtype": str(kv_dtype),
                   "bytes": nbytes, "device": torch.cuda.get_device_name(), "configs": rows},
                  open(a.output, "w"), indent=1)


if __name__ == "__main__":
    main()
