"""Ad-hoc probe (session 23): #4's overlapped pair over an fp8 cache (sm_curves.pair: a 457-token nano-batch's
GEMMs || decode attention over 152 x 1,280 tokens) with the cache's V transposed and pages of 32 tokens, against
the engine's layout with pages of 16 and of 32; two rounds each. Run from the repository root with session 21's
patch applied to a copy of the package (probe_vt/): PYTHONPATH=probe_vt:benchmarks python probe_vt/probe_vt_pair.py"""
import json
import os

import torch

import sm_curves
from nanoflow.kernels import triton_attention as ta

real_case = sm_curves.case


def cache(page, vt):
    def make(*a, **k):
        q, kc, vc, meta, n = real_case(*a, page=page, **k)
        return q, kc, vc.permute(0, 2, 3, 1).contiguous() if vt else vc, meta, n
    return make


rows = []
for rnd in range(2):
    for page, vt in ((16, False), (32, False), (32, True)):
        ta.V_TRANSPOSED = vt
        sm_curves.case = cache(page, vt)
        print(f"round {rnd}: pages of {page}, V transposed {vt}", flush=True)
        for r in sm_curves.pair([(96, 36), (104, 28), (112, 20), (88, 44)],
                                dict(pages=True, num_warps=1, num_stages=6, per_sm=8, block_g=4), torch.float8_e4m3fn):
            if r["gemm"] == "cublaslt_target":
                rows.append(dict(round=rnd, page=page, vt=vt, **r))
json.dump(rows, open(os.path.join(os.environ.get("OUT", "."), "h100_pair_fp8_vt_pages_probe_8997ce4.json"), "w"),
          indent=1)
