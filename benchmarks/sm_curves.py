"""Performance vs SM count on green contexts (H100): the decode attention kernel and the layer's cuBLAS GEMMs.

Baseline curves for #4 (partition-efficient kernels) and the search of #6. Each green context is created once
and kept alive for the process. python benchmarks/sm_curves.py [--output out.json]"""
import argparse
import json

import torch

from decode_sweep import case
from nanoflow.bench.cost_model import layer_gemms
from nanoflow.config import preset
from nanoflow.kernels.triton_attention import decode_attention

KEEP = []  # green contexts must outlive every use of their streams


def timed(fn, stream, reps=20):
    with torch.cuda.stream(stream):
        fn()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record(stream)
        for _ in range(reps):
            fn()
        end.record(stream)
    end.synchronize()
    return start.elapsed_time(end) / reps


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--output")
    a = ap.parse_args()
    from torch.cuda.green_contexts import GreenContext
    total = torch.cuda.get_device_properties(0).multi_processor_count
    q, kc, vc, meta = case(305, 1280)
    out = torch.empty_like(q)
    kv_bytes = 2 * 305 * 1280 * 8 * 128 * 2
    cfg = preset("llama-3-8b")
    mats = {}
    for name, (m, n, k) in layer_gemms(cfg, 915).items():
        mats[name] = (torch.randn(m, k, device="cuda", dtype=torch.bfloat16),
                      torch.randn(n, k, device="cuda", dtype=torch.bfloat16),
                      torch.empty(m, n, device="cuda", dtype=torch.bfloat16), 2 * m * n * k)
    rows = []
    for sms in (8, 16, 24, 32, 48, 64, 100, 116, total):
        try:
            if sms == total:
                stream = torch.cuda.Stream()
            else:
                ctx = GreenContext.create(sms, 0)
                KEEP.append(ctx)
                stream = ctx.Stream()
        except Exception as e:
            print(f"{sms} SMs: no green context ({type(e).__name__}: {e})")
            continue
        row = {"sms": sms}
        ms = timed(lambda: decode_attention(q, kc, vc, meta, 128 ** -0.5, out), stream)
        row["decode_ms"], row["decode_tb_s"] = ms, kv_bytes / ms / 1e9
        flops = secs = 0
        for name, (x, w, o, f) in mats.items():
            t = timed(lambda: torch.mm(x, w.t(), out=o), stream)
            row[f"{name}_ms"] = t
            flops, secs = flops + f, secs + t
        row["gemm_ms"], row["gemm_tflops"] = secs, flops / secs / 1e9
        rows.append(row)
        print(f"{sms:4d} SMs  decode {ms:7.3f} ms {row['decode_tb_s']:5.2f} TB/s   layer GEMMs (915 tok) "
              f"{secs:6.3f} ms {row['gemm_tflops']:6.1f} TFLOP/s", flush=True)
    full = rows[-1]
    print("\nSMs  decode TB/s  per-SM GB/s  GEMM time vs ideal (full x 132 / S)")
    for r in rows:
        ideal = full["gemm_ms"] * total / r["sms"]
        print(f"{r['sms']:4d}  {r['decode_tb_s']:10.2f}  {1000 * r['decode_tb_s'] / r['sms']:11.1f}  "
              f"{r['gemm_ms'] / ideal:5.2f}x")
    if a.output:
        json.dump({"total_sms": total, "rows": rows, "decode_case": "305 x 1280, GQA 32/8, d128, bf16",
                   "gemm_tokens": 915}, open(a.output, "w"), indent=1)


if __name__ == "__main__":
    main()
