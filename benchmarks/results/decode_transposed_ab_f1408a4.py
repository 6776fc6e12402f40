"""Engine call and page-kernel configs (1 warp) on 32 SMs (bf16, three contexts) and the whole card (fp8 Mixtral
shape): python benchmarks/results/decode_transposed_ab_f1408a4.py LABEL OUT.json, run from the repository root,
with NF_CODE naming whose nanoflow runs (session 20; calls 13-15 and 18; call 13 also timed 10 and 12 per SM)."""
import json
import os
import sys

sys.path[:0] = [os.environ.get("NF_CODE", "."), "benchmarks"]
import torch  # noqa: E402
from decode_sweep import case  # noqa: E402
from sm_curves import run_decode, run_engine  # noqa: E402

from nanoflow.pipeline.units import share, total_sms  # noqa: E402

rows = []
configs = [(6, 8), (8, 8)]
for kv_dtype, cases, shares in ((torch.bfloat16, ((1024, 256, None), (305, 1280, None), (32, 16384, None)), (32,)),
                                (torch.float8_e4m3fn, ((524, 1024, 1536),), (32, 132))):
    for seqs, ctx, ctx_max in cases:
        q, kc, vc, meta, nbytes = case(seqs, ctx, ctx_max=ctx_max, kv_dtype=kv_dtype, width=2048 if ctx_max else None)
        out = torch.empty_like(q)
        for sms in shares:
            granted, stream = share(min(sms, total_sms()))
            res = {"engine": nbytes / min(run_engine(granted, q, kc, vc, meta, out, stream) for _ in range(3)) / 1e9}
            for s, k in configs:
                c = dict(pages=True, num_warps=1, num_stages=s, per_sm=k, block_g=4)
                res[f"s{s} k{k}"] = nbytes / min(run_decode(c, granted, q, kc, vc, meta, out, stream)
                                                 for _ in range(3)) / 1e9
            rows.append(dict(label=sys.argv[1], kv=str(kv_dtype)[6:], seqs=seqs, ctx=ctx, sms=granted, tb_s=res))
            print(sys.argv[1], str(kv_dtype)[6:], seqs, ctx, granted, " ".join(f"{n}={v:.3f}" for n, v in res.items()),
                  flush=True)
json.dump(rows, open(sys.argv[2], "w"), indent=1)
