"""Ad-hoc probe (session 21): the page kernel over an fp8 cache whose V is stored transposed ([pages, heads, D,
positions]), against the engine's kernel over the same values in the engine's layout; Mixtral's decode shape
(524 sequences of 1,024-1,536 tokens, 32/8 heads), the engine's config on the whole card. Run from the repository
root, the package patched by h200_decode_fp8_vt_probe_fdc9592.diff in a copy (probe_vt/) first on the path:
PYTHONPATH=probe_vt:benchmarks python probe_vt/probe_vt_run.py"""
import torch
import triton.testing
from decode_sweep import case

from nanoflow.kernels import gpu
from nanoflow.kernels import triton_attention as ta

for ctx, ctx_max in ((1024, 1536), (256, 256), (4096, 4096)):
    seqs = 524 if ctx == 1024 else (1024 if ctx == 256 else 128)
    q, kc, vc, meta, nbytes = case(seqs, ctx, 32, 8, 128, 16, ctx_max=ctx_max, width=2048, kv_dtype=torch.float8_e4m3fn)
    vt = vc.permute(0, 2, 3, 1).contiguous()
    scale = 128 ** -0.5
    outs, times = {}, {"engine": [], "V transposed": []}
    for name, flag, v in (("engine", False, vc), ("V transposed", True, vt)):
        ta.V_TRANSPOSED = flag
        outs[name] = torch.empty_like(q)
        gpu.decode_attention(q, kc, v, meta, scale, outs[name])
    err = ((outs["V transposed"].float() - outs["engine"].float()).norm() / outs["engine"].float().norm()).item()
    for _ in range(3):
        for name, flag, v in (("engine", False, vc), ("V transposed", True, vt)):
            ta.V_TRANSPOSED = flag
            out = outs[name]
            times[name].append(triton.testing.do_bench(lambda: gpu.decode_attention(q, kc, v, meta, scale, out),
                                                       warmup=25, rep=100, return_mode="median"))
    print(f"{seqs} x {ctx}..{ctx_max} fp8 on {torch.cuda.get_device_name()}: rel diff {err:.1e}; "
          + "; ".join(f"{n} {min(t):.4f} ms {nbytes / min(t) / 1e9:.2f} TB/s (rounds "
                      + " ".join(f"{x:.4f}" for x in t) + ")" for n, t in times.items()))
