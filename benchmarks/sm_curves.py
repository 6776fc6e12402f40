"""Performance vs SM count (#4): decode attention and the layer GEMMs, each on a stream confined to S SMs
(nanoflow.pipeline.units), then GEMMs of one nano-batch overlapped with the decode attention of the other.

Decode: the engine's own call (kernels/gpu.py: its kernel and grid for the share and cache) vs the best over
configs (the gather kernel's tiles and depth, query blocks of 16 or 4 rows; the page kernel's warps and pages in
flight; programs = k x S), and a plain streaming read as the ceiling.
GEMMs: cuBLAS vs cuBLASLt told the unit's SM count (a persistent Triton matmul measured 1.2-1.8x slower than
ideal scaling at commit 1dafcc2 and was dropped). Pair: nano-batch GEMMs on S_c SMs || decode attention on the
disjoint S_m SMs, against the two run one after the other on the whole card.

python benchmarks/sm_curves.py [--output out.json] [--plot out.png] [--quick] [--kv-cache-dtype fp8]
(fp8: the decode caches in float8 e4m3, as the engine's --kv-cache-dtype fp8; TB/s counts the bytes read.)"""
import argparse
import itertools
import json

import torch
import triton
import triton.language as tl
from decode_sweep import case

from nanoflow.bench.cost_model import layer_gemms
from nanoflow.config import preset
from nanoflow.kernels import gpu
from nanoflow.kernels.sm_share import sm_share
from nanoflow.kernels.triton_attention import decode_attention
from nanoflow.pipeline.units import partition, share, total_sms

SCALE = 128 ** -0.5


def timed(fn, stream, reps=10):
    """Milliseconds per call of fn issued on stream."""
    with torch.cuda.stream(stream):
        fn()
        fn()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record(stream)
        for _ in range(reps):
            fn()
        end.record(stream)
    end.synchronize()
    return start.elapsed_time(end) / reps


def run_engine(sms, q, kc, vc, meta, out, stream):
    """The engine's own call (kernels/gpu.py), told its share as the pipeline tells it."""
    def call():
        with sm_share(sms, total_sms()):
            gpu.decode_attention(q, kc, vc, meta, SCALE, out)
    return timed(call, stream)


def decode_configs(quick):
    """The gather kernel: tile, warps, depth and programs per SM, query blocks of 16 rows and of the group's 4.
    The page kernel: warps, pages in flight and programs per SM."""
    if quick:
        gather = itertools.product((64,), (2,), (2,), (4, 8), (None, 4))
        page = itertools.product((1,), (6, 8), (4, 8, 16))
    else:
        gather = itertools.product((32, 64), (2, 4), (2, 3), (2, 4, 8), (None, 4))
        page = itertools.product((1, 2), (4, 6, 8, 10), (4, 8, 16))
    return ([dict(pages=False, block_n=b, num_warps=w, num_stages=s, per_sm=k, block_g=g) for b, w, s, k, g in gather]
            + [dict(pages=True, num_warps=w, num_stages=s, per_sm=k, block_g=4) for w, s, k in page])


def run_decode(config, sms, q, kc, vc, meta, out, stream):
    kw = {k: v for k, v in config.items() if k != "per_sm"}
    return timed(lambda: decode_attention(q, kc, vc, meta, SCALE, out, programs=config["per_sm"] * sms, **kw), stream)


@triton.jit
def stream_read(X, OUT, n, BLOCK: tl.constexpr, EVICT: tl.constexpr = ""):
    """The ceiling: a persistent streaming read of n contiguous elements, nothing else (EVICT: the loads' eviction
    policy, as pair_probe.py varies it)."""
    acc = tl.zeros([BLOCK], tl.float32)
    for start in tl.range(tl.program_id(0) * BLOCK, n, tl.num_programs(0) * BLOCK, num_stages=4):
        acc += tl.load(X + start + tl.arange(0, BLOCK), eviction_policy=EVICT).to(tl.float32)
    tl.store(OUT + tl.program_id(0), tl.sum(acc))


def stream_ceiling(x, sms, stream):
    out = torch.empty(16 * sms, device="cuda")
    best = min(timed(lambda: stream_read[(k * sms,)](x, out, x.numel() // 8192 * 8192, BLOCK=8192, num_warps=8),
                     stream) for k in (2, 4, 8))
    return x.numel() // 8192 * 8192 * x.element_size() / best / 1e9


def decode_curves(sm_list, quick, kv_dtype):
    q, kc, vc, meta, nbytes = case(305, 1280, kv_dtype=kv_dtype)
    out = torch.empty_like(q)
    rows = []
    for sms in sm_list:
        granted, stream = share(sms)
        row = {"sms": granted}
        ms = run_engine(granted, q, kc, vc, meta, out, stream)
        row["default_ms"], row["default_tb_s"] = ms, nbytes / ms / 1e9
        row["stream_read_tb_s"] = stream_ceiling(kc.view(-1), granted, stream)
        best = None
        for c in decode_configs(quick):
            try:
                ms = run_decode(c, granted, q, kc, vc, meta, out, stream)
            except Exception as e:  # a config the compiler rejects (shared memory)
                print(f"  {c}: {type(e).__name__}")
                continue
            if best is None or ms < best[0]:
                best = (ms, c)
        row["persistent_ms"], row["persistent_config"] = best
        row["persistent_tb_s"] = nbytes / best[0] / 1e9
        rows.append(row)
        print(f"decode {granted:4d} SMs: streaming-read ceiling {row['stream_read_tb_s']:.2f}, "
              f"engine config {row['default_tb_s']:.2f} TB/s, "
              f"persistent {row['persistent_tb_s']:.2f} TB/s {best[1]}", flush=True)
    return rows


def decode_contexts(config, sm_list, kv_dtype):
    """The engine's config and the given one on short and long contexts."""
    rows = []
    for seqs, ctx in ((1024, 256), (305, 1280), (32, 16384)):
        q, kc, vc, meta, nbytes = case(seqs, ctx, kv_dtype=kv_dtype)
        out = torch.empty_like(q)
        for sms in sm_list:
            granted, stream = share(sms)
            default = run_engine(granted, q, kc, vc, meta, out, stream)
            pers = run_decode(config, granted, q, kc, vc, meta, out, stream)
            rows.append({"seqs": seqs, "ctx": ctx, "sms": granted, "default_tb_s": nbytes / default / 1e9,
                         "persistent_tb_s": nbytes / pers / 1e9})
            print(f"decode {seqs} x {ctx} on {granted} SMs: engine config {rows[-1]['default_tb_s']:.2f} TB/s, "
                  f"persistent {rows[-1]['persistent_tb_s']:.2f} TB/s", flush=True)
    return rows


def gemm_mats(tokens):
    return {name: (torch.randn(m, k, device="cuda", dtype=torch.bfloat16),
                   torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k ** 0.5,
                   torch.empty(m, n, device="cuda", dtype=torch.bfloat16), 2 * m * n * k)
            for name, (m, n, k) in layer_gemms(preset("llama-3-8b"), tokens).items()}


def gemm_curves(sm_list, token_list):
    rows = []
    for tokens in token_list:
        mats = gemm_mats(tokens)
        for sms in sm_list:
            granted, stream = share(sms)
            row = {"tokens": tokens, "sms": granted, "cublas_ms": 0.0, "cublaslt_target_ms": 0.0}
            for name, (x, w, o, _) in mats.items():
                row["cublas_ms"] += timed(lambda: torch.mm(x, w.t(), out=o), stream)
                with sm_share(granted, total_sms()):
                    row["cublaslt_target_ms"] += timed(lambda: torch.mm(x, w.t(), out=o), stream)
            row["tflops_cublas"] = sum(f for *_, f in mats.values()) / row["cublas_ms"] / 1e9
            rows.append(row)
            print(f"GEMMs {tokens} tokens on {granted:3d} SMs: cuBLAS {row['cublas_ms']:.3f} ms, cuBLASLt with SM "
                  f"target {row['cublaslt_target_ms']:.3f} ms", flush=True)
    for r in rows:  # ideal: the best full-card time scaled by 132 / S
        full = next(x for x in rows if x["tokens"] == r["tokens"] and x["sms"] == total_sms())
        ideal = min(full["cublas_ms"], full["cublaslt_target_ms"]) * total_sms() / r["sms"]
        r["cublas_vs_ideal"], r["cublaslt_target_vs_ideal"] = r["cublas_ms"] / ideal, r["cublaslt_target_ms"] / ideal
    return rows


def side_by_side(main, sequence, work, reps=20):
    """(ms of `sequence` on stream `main`, ms of `work`'s (fn, stream) pairs run side by side, forked from and
    joined back to `main`). The sequence is timed on either side of the overlapped run and the faster kept: after
    heavy GEMM work the GEMMs run up to 15 % slower for some seconds (BENCHMARKS.md, #4 session 11), and one slow
    timing of the sequence would flatter the overlap."""
    def both():
        fork = torch.cuda.Event()
        fork.record(main)
        for fn, s in work:
            s.wait_event(fork)
            with torch.cuda.stream(s):
                fn()
        for _, s in work:
            join = torch.cuda.Event()
            join.record(s)
            main.wait_event(join)
    seq = timed(sequence, main, reps)
    t = timed(both, main, reps)
    return min(seq, timed(sequence, main, reps)), t


def pair(splits, decode_config, kv_dtype):
    """Nano-batch 1's layer GEMMs (457 tokens) || nano-batch 2's decode attention (152 x 1280 tokens)."""
    q, kc, vc, meta, _ = case(152, 1280, kv_dtype=kv_dtype)
    out = torch.empty_like(q)
    mats = gemm_mats(457)
    kw = {k: v for k, v in decode_config.items() if k != "per_sm"}
    main = torch.cuda.Stream()
    rows = []

    def gemms(target=None):
        with sm_share(target or total_sms(), total_sms()):
            for x, w, o, _ in mats.values():
                torch.mm(x, w.t(), out=o)

    def attn(sms):
        decode_attention(q, kc, vc, meta, SCALE, out, programs=decode_config["per_sm"] * sms, **kw)

    def sequence():
        gemms()
        attn(total_sms())
    for sc, sm in splits:
        (gc, cs), (gm, ms_) = partition((sc, sm))
        for gemm_kind in ("cublas", "cublaslt_target"):
            def kind_gemms():
                gemms(gc if gemm_kind == "cublaslt_target" else None)
            seq, t = side_by_side(main, sequence, [(kind_gemms, cs), (lambda: attn(gm), ms_)])
            alone_g = timed(kind_gemms, cs)
            alone_a = timed(lambda: attn(gm), ms_)
            rows.append({"compute_sms": gc, "memory_sms": gm, "gemm": gemm_kind, "overlapped_ms": t,
                         "sequential_ms": seq, "speedup": seq / t, "gemm_alone_ms": alone_g, "attn_alone_ms": alone_a})
            print(f"pair {gc}+{gm} SMs ({gemm_kind}): {t:.3f} ms vs {seq:.3f} in sequence = x{seq / t:.2f} "
                  f"(alone on their shares: GEMMs {alone_g:.3f}, attention {alone_a:.3f})", flush=True)
    return rows


def plot(res, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.2))
    d = res["decode"]
    a.plot([r["sms"] for r in d], [r["default_tb_s"] for r in d], "o-", label="engine config")
    a.plot([r["sms"] for r in d], [r["persistent_tb_s"] for r in d], "s-", label="best config")
    a.axhline(2.4, ls=":", c="gray")
    a.set(xlabel="SMs", ylabel="effective KV bandwidth (TB/s)", title="decode attention, 305 x 1280 tokens")
    a.legend(fontsize=8)
    for tokens in sorted({r["tokens"] for r in res["gemm"]}):
        g = [r for r in res["gemm"] if r["tokens"] == tokens]
        b.plot([r["sms"] for r in g], [r["cublas_vs_ideal"] for r in g], "o-", label=f"cuBLAS, {tokens} tok")
        b.plot([r["sms"] for r in g], [r["cublaslt_target_vs_ideal"] for r in g], "s--",
               label=f"cuBLASLt, SM target, {tokens} tok")
    b.axhline(1.1, ls=":", c="gray")
    b.set(xlabel="SMs", ylabel="time / (full-card time x 132 / S)", title="Llama-3-8B layer GEMMs")
    b.legend(fontsize=7)
    fig.suptitle(f"{res['device']}: performance vs SM count (disjoint green-context partitions)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--output")
    ap.add_argument("--plot")
    ap.add_argument("--quick", action="store_true", help="few configs (a smoke run)")
    ap.add_argument("--kv-cache-dtype", choices=["auto", "fp8"], default="auto", help="auto: bf16")
    a = ap.parse_args()
    kv_dtype = torch.float8_e4m3fn if a.kv_cache_dtype == "fp8" else torch.bfloat16
    torch.manual_seed(0)
    full = total_sms()
    res = {"device": torch.cuda.get_device_name(), "total_sms": full, "kv_cache_dtype": str(kv_dtype)}
    res["decode"] = decode_curves([16, 32, 64, full], a.quick, kv_dtype)
    best_full = res["decode"][-1]["persistent_config"]
    best_32 = next(r for r in res["decode"] if r["sms"] >= 32)["persistent_config"]
    res["decode_contexts"] = decode_contexts(best_32, [32, full], kv_dtype)
    # the pair before the GEMM curves, whose minutes of GEMMs leave the card's GEMMs slower for a while
    res["pair"] = pair([(96, 32), (104, 24), (112, 16), (88, 40), (80, 48), (64, 64)], best_32, kv_dtype)
    res["gemm"] = gemm_curves([32, 64, 96, 104, 120, full], [256, 915, 2048])
    res["best_full_card_decode_config"] = best_full
    print("\nSMs  streaming read  engine config  best config  (TB/s)")
    for r in res["decode"]:
        print(f"{r['sms']:4d}  {r['stream_read_tb_s']:14.2f}  {r['default_tb_s']:13.2f}  {r['persistent_tb_s']:11.2f}")
    print("\ntokens SMs  cuBLAS/ideal  cuBLASLt-target/ideal")
    for r in res["gemm"]:
        print(f"{r['tokens']:6d} {r['sms']:4d}  {r['cublas_vs_ideal']:12.2f}  {r['cublaslt_target_vs_ideal']:21.2f}")
    best = max(res["pair"], key=lambda r: r["speedup"])
    print(f"\nbest pair: GEMMs ({best['gemm']}) on {best['compute_sms']} SMs || attention on {best['memory_sms']}: "
          f"x{best['speedup']:.2f} vs sequence")
    if a.output:
        json.dump(res, open(a.output, "w"), indent=1)
    if a.plot:
        plot(res, a.plot)


if __name__ == "__main__":
    main()
