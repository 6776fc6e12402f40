"""Ad-hoc probe (session 23): over an fp8 cache, the page kernel with V stored transposed ([pages, heads, D,
positions]) against the engine's layout, on SM shares (where the fp8 kernel is bound by its instructions) and in
#4's overlapped pair. Run from the repository root with the patched copy first on the path:
PYTHONPATH=probe_vt:benchmarks python probe_vt/probe_vt_shares.py"""
import json
import os

import torch

import sm_curves
from decode_sweep import case
from nanoflow.kernels import triton_attention as ta
from nanoflow.pipeline.units import share

FP8 = torch.float8_e4m3fn
rows = []
for seqs, ctx, ctx_max, hq in ((305, 1280, None, 32), (524, 1024, 1536, 32)):
    q, kc, vc, meta, nbytes = case(seqs, ctx, hq, 8, 128, 16, ctx_max=ctx_max, width=2048, kv_dtype=FP8)
    vt = vc.permute(0, 2, 3, 1).contiguous()
    outs = {}
    for flag, v in ((False, vc), (True, vt)):
        ta.V_TRANSPOSED = flag
        outs[flag] = torch.empty_like(q)
        ta.decode_attention(q, kc, v, meta, sm_curves.SCALE, outs[flag], programs=8 * 132, pages=True, block_g=4)
    err = ((outs[True].float() - outs[False].float()).norm() / outs[False].float().norm()).item()
    print(f"{seqs} x {ctx}: rel diff V^T vs engine layout {err:.1e}", flush=True)
    for sms in (16, 32, 36, 64, 132):
        granted, stream = share(sms)
        configs = [(1, 6, 8)] if sms in (16, 64) else [(1, 6, 8), (1, 4, 8), (1, 8, 8), (1, 6, 4), (2, 6, 8)]
        for w, st, per in configs:
            line = []
            for flag, v in ((False, vc), (True, vt)):
                ta.V_TRANSPOSED = flag
                ms = min(sm_curves.timed(lambda: ta.decode_attention(
                    q, kc, v, meta, sm_curves.SCALE, outs[flag], programs=per * granted, pages=True, block_g=4,
                    num_warps=w, num_stages=st), stream) for _ in range(3))
                line.append(ms)
                rows.append(dict(seqs=seqs, ctx=ctx, sms=granted, warps=w, stages=st, per_sm=per, vt=flag, ms=ms,
                                 tb_s=nbytes / ms / 1e9))
            print(f"{seqs} x {ctx} on {granted:3d} SMs, {w} warp {st} stages {per}/SM: "
                  f"engine {nbytes / line[0] / 1e9:.2f} TB/s, V^T {nbytes / line[1] / 1e9:.2f} TB/s "
                  f"({line[0] / line[1]:.2f}x)", flush=True)

real_case = sm_curves.case
for flag in (False, True, False, True):
    ta.V_TRANSPOSED = flag
    sm_curves.case = (lambda *a, **k: (lambda r: (r[0], r[1], r[2].permute(0, 2, 3, 1).contiguous(), r[3], r[4]))(
        real_case(*a, **k))) if flag else real_case
    print(f"pair, V^T={flag}", flush=True)
    for r in sm_curves.pair([(96, 36), (104, 28), (88, 44), (112, 20)],
                            dict(pages=True, num_warps=1, num_stages=6, per_sm=8, block_g=4), FP8):
        rows.append(dict(pair=True, vt=flag, **r))
json.dump(rows, open(os.path.join(os.environ.get("OUT", "."), "h100_decode_fp8_vt_shares_probe_d1e2d23.json"), "w"),
          indent=1)
