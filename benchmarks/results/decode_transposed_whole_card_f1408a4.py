"""The whole card over bf16: the engine's call (the gather kernel) vs the page kernel's configs (1 warp). Session 20,
call 16: python benchmarks/results/decode_transposed_whole_card_f1408a4.py OUT.json, from the repository root."""
import json
import sys

sys.path[:0] = ["benchmarks"]
import torch  # noqa: E402
from decode_sweep import case  # noqa: E402
from sm_curves import run_decode, run_engine  # noqa: E402

from nanoflow.pipeline.units import share, total_sms  # noqa: E402

rows = []
for rnd in (1, 2):
    for seqs, ctx, ctx_max in ((1024, 256, None), (305, 1280, None), (32, 16384, None), (524, 1024, 1536)):
        q, kc, vc, meta, nbytes = case(seqs, ctx, ctx_max=ctx_max, width=2048 if ctx_max else None)
        out = torch.empty_like(q)
        granted, stream = share(total_sms())
        res = {"engine": nbytes / min(run_engine(granted, q, kc, vc, meta, out, stream) for _ in range(3)) / 1e9}
        for s, k in ((6, 4), (6, 8), (8, 4), (8, 8), (6, 6)):
            c = dict(pages=True, num_warps=1, num_stages=s, per_sm=k, block_g=4)
            best = min(run_decode(c, granted, q, kc, vc, meta, out, stream) for _ in range(3))
            res[f"s{s} k{k}"] = nbytes / best / 1e9
        rows.append(dict(round=rnd, seqs=seqs, ctx=ctx, sms=granted, tb_s=res))
        print(rnd, seqs, ctx, granted, " ".join(f"{n}={v:.3f}" for n, v in res.items()), flush=True)
json.dump(rows, open(sys.argv[1], "w"), indent=1)
