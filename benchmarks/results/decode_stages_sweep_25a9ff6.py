"""Deeper page-kernel pipelines: the page kernel's TMA buffers are max(1, (STAGES - 1) // 2) deep (its tables
take the other half of the stages), so STAGES 6 keeps 2 pages of K and V. Engine call vs page-kernel configs
(1 warp, STAGES, programs per SM) by sm_curves.py's timing, on 32 SMs and the whole card (session 20, calls 8, 9).
python benchmarks/results/decode_stages_sweep_25a9ff6.py OUT.json [QUICK=1 in the environment]"""
import json
import os
import sys

import torch

sys.path[:0] = ["benchmarks"]
from decode_sweep import case  # noqa: E402
from sm_curves import run_decode, run_engine  # noqa: E402

from nanoflow.pipeline.units import share, total_sms  # noqa: E402

rows = []
QUICK = os.environ.get("QUICK")  # call 9: 32 SMs, bf16, and two KV heads a unit
# (warps, STAGES, programs per SM, KV heads a unit)
if QUICK:
    configs = [(1, s, k, 1) for s in (6, 7, 8) for k in (8, 9, 10, 12)]
    configs += [(1, 6, 6, 2), (1, 6, 5, 2), (1, 8, 4, 2), (1, 8, 5, 2), (2, 6, 6, 2), (2, 8, 4, 2)]
else:
    configs = [(1, s, k, 1) for s in (6, 8, 10, 12, 14) for k in (4, 6, 8)] + [(2, 10, 4, 1), (2, 12, 4, 1)]
for kv_dtype, cases in ((torch.bfloat16, ((1024, 256, None), (305, 1280, None), (32, 16384, None))),
                        (torch.float8_e4m3fn, () if QUICK else ((524, 1024, 1536),))):
    for seqs, ctx, ctx_max in cases:
        q, kc, vc, meta, nbytes = case(seqs, ctx, ctx_max=ctx_max, kv_dtype=kv_dtype, width=2048 if ctx_max else None)
        out = torch.empty_like(q)
        for sms in (32,) if QUICK else (32, total_sms()):
            granted, stream = share(sms)
            res = {"engine": nbytes / min(run_engine(granted, q, kc, vc, meta, out, stream) for _ in range(3)) / 1e9}
            for w, s, k, n in configs:
                c = dict(pages=True, num_warps=w, num_stages=s, per_sm=k, block_g=4 * n, kv_heads=n)
                try:
                    res[f"w{w} s{s} k{k} n{n}"] = nbytes / min(run_decode(c, granted, q, kc, vc, meta, out, stream)
                                                          for _ in range(3)) / 1e9
                except Exception as e:  # shared memory or registers
                    res[f"w{w} s{s} k{k} n{n}"] = type(e).__name__
            best = max((v, n) for n, v in res.items() if isinstance(v, float))
            rows.append(dict(kv=str(kv_dtype)[6:], seqs=seqs, ctx=ctx, ctx_max=ctx_max, sms=granted, tb_s=res))
            print(f"{str(kv_dtype)[6:]:14s} {seqs:5d} x {ctx:5d} {granted:4d} SMs: engine {res['engine']:.3f}, "
                  f"best {best[1]} {best[0]:.3f}; " + " ".join(f"{n}={v:.3f}" if isinstance(v, float) else f"{n}={v}"
                                                            for n, v in res.items() if n != "engine"), flush=True)
json.dump(rows, open(sys.argv[1], "w"), indent=1)
