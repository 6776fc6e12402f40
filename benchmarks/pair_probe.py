"""What the overlapped pair's two ops contend for (#4): each op timed on its share while an interferer runs without
pause on the other share, against the op alone.

The pair is sm_curves.py's: the Llama-3-8B layer GEMMs of a 457-token nano-batch (cuBLASLt told its share) on the
compute SMs, the engine's decode attention over 152 x 1,280 tokens on the memory SMs. Interferers:
- on the memory SMs: the attention itself; a streaming read of 1 GB (plain loads, or marked evict-first so that it
  does not push the GEMMs' weights out of L2); an FMA spin that touches no memory (power and clocks only); a read of
  16 MB again and again, which L2 serves (L2 and its crossbar, no HBM traffic);
- on the compute SMs: the GEMMs themselves; a GEMM whose operands stay in L2 (tensor-core power, no HBM traffic);
  the same L2 read.
Then the attention's grid and depth (programs per SM, pages in flight) on its share, under the GEMMs; its kernels'
times (plan, decode, combine); the same KV bytes in a layout where a page's KV head is contiguous (1 KV head, 8x
the sequences) against the cache's [blocks, page, KV heads, D]; and the pair itself on several splits.

python benchmarks/pair_probe.py [--split 96 36] [--output out.json]"""
import argparse
import json
import math

import torch
import triton
import triton.language as tl
from decode_sweep import case
from sm_curves import SCALE, gemm_mats, pair, stream_read, timed

from nanoflow.kernels import gpu
from nanoflow.kernels.sm_share import sm_share
from nanoflow.kernels.triton_attention import decode_attention
from nanoflow.pipeline.units import partition, total_sms

L2_REPS = 24  # passes over the L2 read's 16 MB: a call of a few tenths of a millisecond


@triton.jit
def _spin(OUT, iters, BLOCK: tl.constexpr):
    x = tl.arange(0, BLOCK).to(tl.float32) * 1e-3
    for _ in range(iters):
        x = x * 0.999 + 1e-3
    tl.store(OUT + tl.program_id(0) * BLOCK + tl.arange(0, BLOCK), x)


@triton.jit
def _reread(X, OUT, n, reps, BLOCK: tl.constexpr):
    """X's n elements read `reps` times over, each program the same blocks each time: after the first pass, from L2."""
    acc = tl.zeros([BLOCK], tl.float32)
    for _ in range(reps):
        for start in tl.range(tl.program_id(0) * BLOCK, n, tl.num_programs(0) * BLOCK, num_stages=4):
            acc += tl.load(X + start + tl.arange(0, BLOCK)).to(tl.float32)
    tl.store(OUT + tl.program_id(0), tl.sum(acc))


def under(fn, stream, other, other_stream, reps=20):
    """Milliseconds per call of fn on stream while `other` runs without pause on other_stream; None for `other` times
    fn alone. `other` is replayed from a CUDA graph, queued to outlast the timed calls three times over: issued call
    by call, short kernels let the queue run dry on a host slower than the GPU, and fn was then timed nearly alone
    (BENCHMARKS.md, #4 session 25). Raises if `other` ended before the timed calls did."""
    if other is None:
        return timed(fn, stream, reps)
    alone = timed(fn, stream, 4)
    with torch.cuda.stream(other_stream):
        other()  # compiled and allocated before the capture
    other_stream.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=other_stream):
        other()
    other_ms = timed(graph.replay, other_stream, 4)
    with torch.cuda.stream(other_stream):
        for _ in range(math.ceil(3 * (reps + 2) * alone / other_ms) + 4):
            graph.replay()
        done = torch.cuda.Event(enable_timing=True)
        done.record(other_stream)
    ms = timed(fn, stream, reps)
    after = torch.cuda.Event(enable_timing=True)
    after.record(stream)
    done.synchronize()
    if after.elapsed_time(done) <= 0:
        raise RuntimeError("the interferer's queue ended before the timed calls did")
    return ms


def shares():
    """The probes' command line (--split COMPUTE MEMORY, --output) and their two disjoint shares: (args, the device's
    SMs, (compute SMs, stream), (memory SMs, stream))."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--split", type=int, nargs=2, default=(96, 36), metavar=("COMPUTE", "MEMORY"))
    ap.add_argument("--output")
    a = ap.parse_args()
    torch.manual_seed(0)
    return a, total_sms(), *partition(tuple(a.split))


def main():
    a, full, (gc, cs), (gm, ms_) = shares()
    q, kc, vc, meta, nbytes = case(152, 1280)
    out = torch.empty_like(q)
    mats = gemm_mats(457)
    big = torch.empty(1 << 29, device="cuda", dtype=torch.bfloat16).normal_()  # 1 GB
    sink = torch.empty(64 * full, device="cuda")
    spin_out = torch.empty(16 * full * 1024, device="cuda")
    small = [torch.randn(1024, 2048, device="cuda", dtype=torch.bfloat16) for _ in range(2)]
    small_out = torch.empty(1024, 1024, device="cuda", dtype=torch.bfloat16)
    l2_buf = torch.randn(8 << 20, device="cuda", dtype=torch.bfloat16)  # 16 MB: read again and again, from L2

    def gemms():
        with sm_share(gc, full):
            for x, w, o, _ in mats.values():
                torch.mm(x, w.t(), out=o)

    def attn(**kw):
        if not kw:
            with sm_share(gm, full):
                return gpu.decode_attention(q, kc, vc, meta, SCALE, out)
        per_sm = kw.pop("per_sm")
        decode_attention(q, kc, vc, meta, SCALE, out, programs=per_sm * gm, block_g=4, **kw)

    def read(evict):
        return lambda: stream_read[(4 * gm,)](big, sink, big.numel(), BLOCK=8192, EVICT=evict, num_warps=8)

    def l2_read(sms):
        return lambda: _reread[(4 * sms,)](l2_buf, sink, l2_buf.numel(), L2_REPS, BLOCK=8192, num_warps=8)

    def spin():
        _spin[(4 * gm,)](spin_out, 20000, BLOCK=1024, num_warps=8)

    def l2_gemm():
        with sm_share(gc, full):
            for _ in range(8):
                torch.mm(small[0], small[1].t(), out=small_out)

    res = {"device": torch.cuda.get_device_name(), "split": [gc, gm], "gemms": {}, "attention": {}}
    print(f"{res['device']}: GEMMs on {gc} SMs, attention on {gm}")
    for name, other in (("alone", None), ("attention", attn), ("read", read("")), ("read evict_first",
                        read("evict_first")), ("spin", spin), ("L2 read", l2_read(gm))):
        res["gemms"][name] = under(gemms, cs, other, ms_)
        print(f"GEMMs on {gc} SMs, beside {name:>17} on {gm}: {res['gemms'][name]:.3f} ms", flush=True)
    read_alone = timed(read(""), ms_, 5)
    for name, fn in (("read", read("")), ("read evict_first", read("evict_first"))):
        ms = under(fn, ms_, gemms, cs, 5)
        res[f"{name} TB/s"] = [big.numel() * 2 / read_alone / 1e9, big.numel() * 2 / ms / 1e9]
        print(f"{name} on {gm} SMs: {res[f'{name} TB/s'][0]:.2f} TB/s alone, {res[f'{name} TB/s'][1]:.2f} beside the "
              f"GEMMs", flush=True)
    for sms, stream in ((gm, ms_), (gc, cs)):
        ms = timed(l2_read(sms), stream, 5)
        res[f"L2 read on {sms} SMs TB/s"] = L2_REPS * l2_buf.numel() * 2 / ms / 1e9
        print(f"L2 read on {sms} SMs alone: {res[f'L2 read on {sms} SMs TB/s']:.2f} TB/s", flush=True)
    for name, other in (("alone", None), ("GEMMs", gemms), ("L2-resident GEMM", l2_gemm), ("L2 read", l2_read(gc)),
                        ("spin", lambda: _spin[(4 * gc,)](spin_out, 20000, BLOCK=1024, num_warps=8))):
        res["attention"][name] = under(attn, ms_, other, cs)
        print(f"attention (engine) on {gm} SMs, beside {name:>16} on {gc}: {res['attention'][name]:.3f} ms "
              f"({nbytes / res['attention'][name] / 1e9:.2f} TB/s)", flush=True)
    res["attention configs"] = []
    for per_sm in (4, 8, 16):
        for stages in (4, 6, 8):
            kw = dict(pages=True, num_warps=1, num_stages=stages, per_sm=per_sm)
            try:
                alone = under(lambda: attn(**dict(kw)), ms_, None, cs)
                with_g = under(lambda: attn(**dict(kw)), ms_, gemms, cs)
            except Exception as e:  # a config the compiler rejects (shared memory)
                print(f"  {kw}: {type(e).__name__}")
                continue
            res["attention configs"].append({**kw, "alone_ms": alone, "beside_gemms_ms": with_g})
            print(f"attention {kw}: {alone:.3f} ms alone, {with_g:.3f} beside the GEMMs", flush=True)
    for seqs, hq, hkv in ((152, 32, 8), (152 * 8, 4, 1)):
        q2, kc2, vc2, meta2, nb2 = case(seqs, 1280, hq=hq, hkv=hkv)
        out2 = torch.empty_like(q2)

        def engine():
            with sm_share(gm, full):
                gpu.decode_attention(q2, kc2, vc2, meta2, SCALE, out2)
        res[f"layout {seqs} x {hq}/{hkv}"] = ms = timed(engine, ms_, 20)
        print(f"attention on {gm} SMs, {seqs} seqs, {hq}/{hkv} heads: {ms:.3f} ms ({nb2 / ms / 1e9:.2f} TB/s)")
        with torch.cuda.stream(ms_), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(10):
                engine()
            torch.cuda.synchronize()
        kernels = {e.key: e.device_time_total / 10 / 1e3 for e in prof.key_averages() if e.device_time_total > 0}
        res[f"kernels {seqs} x {hq}/{hkv}"] = kernels
        print("   kernels (ms):", {k[:40]: round(v, 4) for k, v in kernels.items()}, flush=True)
    res["pairs"] = pair([(104, 28), (96, 36), (88, 44)],
                        dict(pages=True, num_warps=1, num_stages=8, per_sm=8, block_g=4), torch.bfloat16)
    g, at = res["gemms"], res["attention"]
    print(f"\nsummary: GEMMs {g['alone']:.3f} -> {g['attention']:.3f} beside attention "
          f"(x{g['attention'] / g['alone']:.2f}),"
          f" beside a read x{g['read'] / g['alone']:.2f}, evict-first read x{g['read evict_first'] / g['alone']:.2f},"
          f" spin x{g['spin'] / g['alone']:.2f}, an L2 read x{g['L2 read'] / g['alone']:.2f}; attention "
          f"{at['alone']:.3f} -> {at['GEMMs']:.3f} beside the GEMMs (x{at['GEMMs'] / at['alone']:.2f}), beside an "
          f"L2-resident GEMM x{at['L2-resident GEMM'] / at['alone']:.2f}, an L2 read "
          f"x{at['L2 read'] / at['alone']:.2f}")
    if a.output:
        json.dump(res, open(a.output, "w"), indent=1)


if __name__ == "__main__":
    main()
