"""A/B of the engine's decode call over short, mid and long contexts (sm_curves.py's timing), on 32 SMs and the
whole card; the nanoflow on PYTHONPATH decides which code runs. python ab_ctx.py LABEL OUT.json"""
import json
import os
import sys

import torch

sys.path[:0] = [os.environ.get("NF_CODE", "."), "benchmarks"]  # whose nanoflow runs
from decode_sweep import case  # noqa: E402
from sm_curves import run_engine  # noqa: E402

from nanoflow.pipeline.units import share, total_sms  # noqa: E402

rows = []
QUICK = os.environ.get("QUICK")  # bf16 on 32 SMs only
for kv_dtype, cases in ((torch.bfloat16, ((1024, 256, None), (305, 1280, None), (32, 16384, None))),
                        (torch.float8_e4m3fn, () if QUICK else ((1024, 256, None), (524, 1024, 1536)))):
    for seqs, ctx, ctx_max in cases:
        q, kc, vc, meta, nbytes = case(seqs, ctx, ctx_max=ctx_max, kv_dtype=kv_dtype)
        out = torch.empty_like(q)
        for sms in (32,) if QUICK else (32, total_sms()):
            granted, stream = share(sms)
            best = min(run_engine(granted, q, kc, vc, meta, out, stream) for _ in range(3))
            rows.append(dict(label=sys.argv[1], kv=str(kv_dtype), seqs=seqs, ctx=ctx, ctx_max=ctx_max, sms=granted,
                             tb_s=nbytes / best / 1e9))
            print(f"{sys.argv[1]:5s} {str(kv_dtype)[6:]:14s} {seqs:5d} x {ctx:5d} {granted:4d} SMs "
                  f"{rows[-1]['tb_s']:.3f} TB/s", flush=True)
json.dump(rows, open(sys.argv[2], "w"), indent=1)
