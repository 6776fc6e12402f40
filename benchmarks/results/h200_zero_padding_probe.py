"""Probe (#10, session 32): do zero rows in the experts' padding save power under the card's power cap?

The grouped GEMM computes each expert's last m-tile whole (128 rows); the rows past the expert's end are today the
next expert's rows (real data, outputs masked off). Laid out padded (each expert's rows starting at a multiple of
128, the gap zero-filled), those rows would be zeros, and tensor cores multiplying zeros draw less power. Same
tiles, same FLOPs in all three variants; only what the padding rows hold differs:
  U: the engine's layout (padding = the next expert's rows), R: padded layout, gap random, Z: padded, gap zero.
Each variant's graph (8 experts ops) replays for ~4 s at a time, the variants taking turns; nvidia-smi samples the
clock. python3 benchmarks/results/h200_zero_padding_probe.py"""
import json
import os
import statistics
import time

import torch

from nanoflow.bench.throughput import Clocks, gpu_id
from nanoflow.kernels import triton_moe

E, H, I = 8, 4096, 14336
dev = torch.device("cuda")
torch.manual_seed(0)
gate_up = triton_moe.interleave(torch.randn(E, 2 * I, H, device=dev, dtype=torch.bfloat16) * 0.02)
down = torch.randn(E, H, I, device=dev, dtype=torch.bfloat16) * 0.02


def variant(counts, padded, zero):
    pad = [(-(-c // 128)) * 128 if padded else c for c in counts]
    xs = torch.randn(sum(pad), H, device=dev, dtype=torch.bfloat16)
    if padded and zero:
        start = 0
        for c, p in zip(counts, pad):
            xs[start + c:start + p] = 0
            start += p
    offs = torch.tensor(pad, device=dev).cumsum(0).to(torch.int32)
    return xs, offs


def graph(xs, offs, calls=8):
    fn = lambda: [triton_moe.experts_mlp(xs, gate_up, down, offs) for _ in range(calls)]  # noqa: E731
    fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return g, calls, (xs, offs)  # (the graph reads them: kept alive with it)


def run(g, calls, seconds=4.0):
    clocks = Clocks(gpu_id(dev), period=0.2)
    n, t0 = 0, time.perf_counter()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    g.replay()
    torch.cuda.synchronize()
    with clocks:
        start.record()
        while time.perf_counter() - t0 < seconds:
            for _ in range(10):
                g.replay()
            n += 10
            torch.cuda.synchronize()
        end.record()
        end.synchronize()
    return start.elapsed_time(end) / (n * calls), clocks.summary()


results = []
for tokens in (2048, 2718, 4096):
    gen = torch.Generator().manual_seed(tokens)
    counts = torch.bincount(torch.randint(0, E, (2 * tokens,), generator=gen), minlength=E).tolist()
    waste = sum((-(-c // 128)) * 128 for c in counts) / (2 * tokens) - 1
    graphs = {name: graph(*variant(counts, padded, zero)) for name, padded, zero in
              (("U engine layout", False, False), ("R padded, gap random", True, False),
               ("Z padded, gap zero", True, True))}
    times = {name: [] for name in graphs}
    for _ in range(3):
        for name, (g, calls, _) in graphs.items():
            ms, clk = run(g, calls)
            times[name].append((ms, clk))
    for name, runs in times.items():
        ms = statistics.median(r[0] for r in runs)
        mhz = statistics.median(r[1].get("sm_clock_mhz_median", 0) for r in runs)
        watts = statistics.median(r[1].get("power_w_median", 0) for r in runs)
        flops = 2 * 2 * tokens * (2 * I * H + H * I)
        results.append(dict(tokens=tokens, variant=name, ms=ms, tflops=flops / ms / 1e9, mhz=mhz, watts=watts,
                            padding_rows=waste, runs=[r[0] for r in runs]))
        print(f"{tokens:5d} {name:22s} {ms:7.3f} ms  {flops / ms / 1e9:6.1f} TFLOP/s  {mhz:6.0f} MHz  {watts:5.0f} W"
              f"  padding {waste:.1%}  runs {[round(r[0], 3) for r in runs]}", flush=True)
json.dump(results, open(os.path.join(os.environ.get("OUT", "."), "h200_zero_padding_probe.json"), "w"), indent=1)
