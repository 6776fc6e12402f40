"""The whole card, short contexts: the engine's call vs the page kernel with four KV heads a unit (session 18's
whole-card short-context config and three more), by sm_curves.py's timing. Session 20, calls 17-18:
python benchmarks/results/decode_transposed_kv4_whole_card_f1408a4.py, from the repository root."""
import sys

sys.path[:0] = ["benchmarks"]
import torch  # noqa: E402
from decode_sweep import case  # noqa: E402
from sm_curves import run_decode, run_engine  # noqa: E402

from nanoflow.pipeline.units import share, total_sms  # noqa: E402

for rnd in (1, 2):
    for seqs, ctx in ((1024, 256), (305, 1280)):
        q, kc, vc, meta, nbytes = case(seqs, ctx)
        out = torch.empty_like(q)
        granted, stream = share(total_sms())
        res = {"engine": nbytes / run_engine(granted, q, kc, vc, meta, out, stream) / 1e9}
        for w, s, k in ((2, 4, 16), (1, 6, 8), (2, 6, 8), (1, 6, 4)):
            c = dict(pages=True, num_warps=w, num_stages=s, per_sm=k, block_g=16, kv_heads=4)
            res[f"kv4 w{w} s{s} k{k}"] = nbytes / run_decode(c, granted, q, kc, vc, meta, out, stream) / 1e9
        print("whole card", rnd, seqs, ctx, " ".join(f"{n}={v:.3f}" for n, v in res.items()), flush=True)
