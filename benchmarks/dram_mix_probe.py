"""Whether the overlapped pair (#4) loses DRAM efficiency to the GEMMs' access pattern: the layer's weights read in
[128 x 64] tiles (128 rows of 128 B, 8 KB apart) beside the attention's streamed pages, against the same weights
stored pre-tiled so that each tile is one contiguous 16 KB run.

Three steps, each on disjoint green-context shares (96 SMs for the weights, 36 for the memory-bound partner):
1. DRAM alone: a pure tile reader (TMA, no math) over both layouts, and a contiguous streaming read, each on 96 SMs,
   alone and beside a streaming read / the engine's decode attention on 36; the sum of the two sides' TB/s.
2. The same GEMM (a persistent Triton TMA matmul, 128 x 128 x 64 tiles) reading the plain and the pre-tiled layout,
   against cuBLASLt told its share, as X @ W^T and swapped (W @ X^T): alone, and beside the decode attention.
3. The pair (sm_curves.py's: 457-token layer GEMMs || decode attention over 152 x 1,280) with each GEMM, against the
   two in sequence on the whole card.

python benchmarks/dram_mix_probe.py [--output out.json]"""
import json

import torch
import triton
import triton.language as tl
from decode_sweep import case
from pair_probe import shares, under
from sm_curves import SCALE, gemm_mats, side_by_side, stream_read
from triton.tools.tensor_descriptor import TensorDescriptor

from nanoflow.kernels import gpu
from nanoflow.kernels.sm_share import sm_share

BM, BN, BK = 128, 128, 64
TOKENS = 457  # the nano-batch's rows


@triton.jit
def _tiles(w_desc, OUT, NT, KT, BN: tl.constexpr, BK: tl.constexpr, PRETILED: tl.constexpr):
    """Every [BN, BK] tile of w once, each program walking k along its n-tiles (as a GEMM's programs do), summed so
    that nothing is dead."""
    acc = tl.zeros([BN, BK], tl.float32)
    for n in range(tl.program_id(0), NT, tl.num_programs(0)):
        for k in tl.range(0, KT, num_stages=4):
            if PRETILED:
                acc += w_desc.load([(n * KT + k) * BN, 0]).to(tl.float32)
            else:
                acc += w_desc.load([n * BN, k * BK]).to(tl.float32)
    tl.store(OUT + tl.program_id(0), tl.sum(acc))


@triton.jit
def _mm(a_desc, w_desc, c_desc, M, N, K, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
        PRETILED: tl.constexpr, STAGES: tl.constexpr):
    """C = A @ W^T, persistent; the m-tiles of one n-tile run side by side so that W's tile is read from DRAM once."""
    mt, nt, kt = tl.cdiv(M, BM), N // BN, K // BK
    for t in range(tl.program_id(0), mt * nt, tl.num_programs(0)):
        n, m = t // mt, t % mt
        acc = tl.zeros([BM, BN], tl.float32)
        for k in tl.range(0, kt, num_stages=STAGES):
            a = a_desc.load([m * BM, k * BK])
            if PRETILED:
                b = w_desc.load([(n * kt + k) * BN, 0])
            else:
                b = w_desc.load([n * BN, k * BK])
            acc = tl.dot(a, b.T, acc)
        c_desc.store([m * BM, n * BN], acc.to(tl.bfloat16))


def pretile(w):
    n, k = w.shape
    return w.view(n // BN, BN, k // BK, BK).permute(0, 2, 1, 3).contiguous().view(-1, BK)


def w_desc(w, pretiled):
    return TensorDescriptor(w, list(w.shape), [w.stride(0), 1], [BN, BK]) if not pretiled else \
        TensorDescriptor(w, list(w.shape), [BK, 1], [BN, BK])


def triton_gemms(mats, sms, pretiled):
    """The layer's four GEMMs through _mm on `sms` programs, weights plain or pre-tiled."""
    calls = []
    for x, w, o, _ in mats.values():
        m, k = x.shape
        n = w.shape[0]
        wd = w_desc(pretile(w) if pretiled else w, pretiled)
        ad = TensorDescriptor(x, [m, k], [k, 1], [BM, BK])
        cd = TensorDescriptor(o, [m, n], [n, 1], [BM, BN])
        calls.append((ad, wd, cd, m, n, k))

    def run():
        for ad, wd, cd, m, n, k in calls:
            _mm[(sms,)](ad, wd, cd, m, n, k, BM, BN, BK, PRETILED=pretiled, STAGES=4, num_warps=8)
    return run


def main():
    a, full, (gc, cs), (gm, ms_) = shares()
    res = {"device": torch.cuda.get_device_name(), "split": [gc, gm]}
    print(f"{res['device']}: weights on {gc} SMs, partner on {gm}", flush=True)
    q, kc, vc, meta, attn_bytes = case(152, 1280)
    out = torch.empty_like(q)
    big = torch.empty(1 << 29, device="cuda", dtype=torch.bfloat16).normal_()  # 1 GB, the partner's stream
    sink = torch.empty(64 * full, device="cuda")

    def attn():
        with sm_share(gm, full):
            gpu.decode_attention(q, kc, vc, meta, SCALE, out)

    def partner_read():
        stream_read[(4 * gm,)](big, sink, big.numel(), BLOCK=8192, num_warps=8)

    # 1. DRAM alone: ~400 MB of weights (the layer has 436 MB), whole n-tiles for every program
    w = torch.randn(4 * gc * BN, 4096, device="cuda", dtype=torch.bfloat16)  # 4 n-tiles a program
    wt = pretile(w)
    nt, kt = w.shape[0] // BN, w.shape[1] // BK
    wbytes = w.numel() * 2
    readers = {
        "stream": lambda: stream_read[(4 * gc,)](w, sink, w.numel(), BLOCK=8192, num_warps=8),
        "tiles plain": lambda: _tiles[(gc,)](w_desc(w, False), sink, nt, kt, BN, BK, PRETILED=False, num_warps=4),
        "tiles pre-tiled": lambda: _tiles[(gc,)](w_desc(wt, True), sink, nt, kt, BN, BK, PRETILED=True,
                                                     num_warps=4),
    }
    res["dram"] = {}
    for name, fn in readers.items():
        row = {"alone": wbytes / under(fn, cs, None, ms_) / 1e9}
        for pname, partner, pbytes in (("read", partner_read, big.numel() * 2), ("attention", attn, attn_bytes)):
            mine = wbytes / under(fn, cs, partner, ms_) / 1e9
            theirs = pbytes / under(partner, ms_, fn, cs) / 1e9
            row[pname] = [mine, theirs, mine + theirs]
        res["dram"][name] = row
        print(f"{name:>16} on {gc}: alone {row['alone']:.2f} TB/s; beside a read {row['read'][0]:.2f} + "
              f"{row['read'][1]:.2f} = {row['read'][2]:.2f}; beside attention {row['attention'][0]:.2f} + "
              f"{row['attention'][1]:.2f} = {row['attention'][2]:.2f}", flush=True)
    res["partner alone"] = {"read": big.numel() * 2 / under(partner_read, ms_, None, cs) / 1e9,
                            "attention": attn_bytes / under(attn, ms_, None, cs) / 1e9}
    print(f"partners alone on {gm}: read {res['partner alone']['read']:.2f}, attention "
          f"{res['partner alone']['attention']:.2f} TB/s", flush=True)

    # 2. and 3. the GEMMs
    mats = gemm_mats(TOKENS)
    ref = {name: (x @ w_.t()).float() for name, (x, w_, _, _) in mats.items()}

    # swapped: the tokens padded to a multiple of 8 (457 -> 464), the output's rows being the tokens' (cuBLAS runs
    # an output of 457 columns, rows not 16-byte aligned, ~10x slower)
    pad = -(-TOKENS // 8) * 8
    xs_pad = {name: torch.cat([x, x.new_zeros(pad - x.shape[0], x.shape[1])]) for name, (x, _, _, _) in mats.items()}
    swapped = {name: torch.empty(o.shape[1], pad, device="cuda", dtype=o.dtype) for name, (_, _, o, _) in mats.items()}

    def cublas(target=gc, swap=False):
        """The GEMMs through cuBLASLt told its share; swap: as W @ X^T (the output transposed), so that the weights'
        rows are the GEMM's M and its tiles re-read them for fewer token tiles."""
        def run():
            with sm_share(target, full):
                for name, (x, w_, o, _) in mats.items():
                    if swap:
                        torch.mm(w_, xs_pad[name].t(), out=swapped[name])
                    else:
                        torch.mm(x, w_.t(), out=o)
        return run
    gemms = {"cublaslt": cublas(), "cublaslt swapped": cublas(swap=True),
             "triton plain": triton_gemms(mats, gc, False), "triton pre-tiled": triton_gemms(mats, gc, True)}
    full_gemms = {"cublaslt": cublas(full), "cublaslt swapped": cublas(full, swap=True),
                  "triton plain": triton_gemms(mats, full, False), "triton pre-tiled": triton_gemms(mats, full, True)}
    main_s = torch.cuda.Stream()
    res["gemm"] = {}
    for name, fn in gemms.items():
        fn()
        torch.cuda.synchronize()
        outs = {k: swapped[k].t()[:TOKENS] if name == "cublaslt swapped" else o for k, (_, _, o, _) in mats.items()}
        err = max(((outs[k].float() - ref[k]).abs().max() / ref[k].abs().max()).item() for k in mats)
        alone = under(fn, cs, None, ms_)
        beside = under(fn, cs, attn, ms_)
        attn_beside = under(attn, ms_, fn, cs)

        def sequence(g=full_gemms[name]):
            g()
            gpu.decode_attention(q, kc, vc, meta, SCALE, out)

        seq, pair = side_by_side(main_s, sequence, [(fn, cs), (attn, ms_)])
        res["gemm"][name] = row = {"rel_err": err, "alone_ms": alone, "beside_attention_ms": beside,
                                   "attention_beside_ms": attn_beside, "pair_ms": pair, "sequence_ms": seq,
                                   "speedup": seq / pair}
        print(f"{name:>16}: err {err:.1e}; on {gc} SMs alone {alone:.3f} ms, beside attention {beside:.3f} "
              f"(x{beside / alone:.2f}); attention beside it {attn_beside:.3f} ms; pair {pair:.3f} vs sequence "
              f"{seq:.3f} = x{seq / pair:.2f}", flush=True)
    print("\nreader            alone   +read (sum)   +attention (sum)   TB/s")
    for name, r in res["dram"].items():
        print(f"{name:16s} {r['alone']:6.2f}   {r['read'][2]:11.2f}   {r['attention'][2]:16.2f}")
    print("\nGEMMs             alone ms  beside attn  attn beside  pair  sequence  speedup")
    for name, r in res["gemm"].items():
        print(f"{name:16s} {r['alone_ms']:9.3f}  {r['beside_attention_ms']:11.3f}  {r['attention_beside_ms']:11.3f}"
              f"  {r['pair_ms']:.3f}  {r['sequence_ms']:.3f}  x{r['speedup']:.2f}")
    if a.output:
        json.dump(res, open(a.output, "w"), indent=1)


if __name__ == "__main__":
    main()
