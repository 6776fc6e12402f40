"""Ad-hoc probe (session 23): over an fp8 cache, V stored transposed ([pages, heads, D, positions]) with pages of
16, 32 and 64 tokens (V's TMA box rows of 16, 32 and 64 bytes), against the engine's layout at the same page size;
Mixtral's decode shape (524 sequences of 1,024-1,536 tokens, 32/8 heads) on the whole card and on 32 SMs, several
configs each. Run from the repository root with session 21's patch applied to a copy of the package (probe_vt/):
PYTHONPATH=probe_vt:benchmarks python probe_vt/probe_vt_pages.py"""
import itertools
import json
import os

import torch

import sm_curves
from decode_sweep import case
from nanoflow.kernels import triton_attention as ta
from nanoflow.pipeline.units import share

rows = []
for page in (16, 32, 64):
    q, kc, vc, meta, nbytes = case(524, 1024, 32, 8, 128, page, ctx_max=1536, width=2048 * 16 // page,
                                   kv_dtype=torch.float8_e4m3fn)
    vt = vc.permute(0, 2, 3, 1).contiguous()
    for sms in (132, 32):
        granted, stream = share(sms)
        best = {}
        for (w, st, per), flag in itertools.product(itertools.product((1, 2), (4, 6, 8), (4, 8)), (False, True)):
            ta.V_TRANSPOSED = flag
            out = torch.empty_like(q)
            try:
                ms = min(sm_curves.timed(lambda: ta.decode_attention(
                    q, kc, vt if flag else vc, meta, sm_curves.SCALE, out, programs=per * granted, pages=True,
                    block_g=4, num_warps=w, num_stages=st), stream) for _ in range(2))
            except Exception as e:  # shared memory
                print(f"page {page} {sms} SMs {w} warps {st} stages {per}/SM vt={flag}: {type(e).__name__}")
                continue
            rows.append(dict(page=page, sms=granted, warps=w, stages=st, per_sm=per, vt=flag, ms=ms,
                             tb_s=nbytes / ms / 1e9))
            if flag not in best or ms < best[flag][0]:
                best[flag] = (ms, (w, st, per))
        eng = [r for r in rows if r["page"] == page and r["sms"] == granted and not r["vt"] and
               (r["warps"], r["stages"], r["per_sm"]) == (1, 6, 8)]
        print(f"page {page:2d} on {granted:3d} SMs: engine config {eng[0]['tb_s'] if eng else float('nan'):.2f} TB/s;"
              f" best engine layout {nbytes / best[False][0] / 1e9:.2f} {best[False][1]}; best V^T "
              f"{nbytes / best[True][0] / 1e9:.2f} {best[True][1]}", flush=True)
json.dump(rows, open(os.path.join(os.environ.get("OUT", "."), "h100_decode_fp8_vt_pages_probe_994f8ad.json"), "w"),
          indent=1)
