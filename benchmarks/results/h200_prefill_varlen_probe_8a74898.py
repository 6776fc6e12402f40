"""Probe: the engine's paged prefill kernel against torch's varlen flash attention on the fresh prompts of a batch.
Fresh = chunks at position 0 (their keys are their own rows, bf16, before the cache's fp8). Continued chunks stay on
the paged kernel. Also: what varlen costs with its batch padded and max_q inflated (a CUDA graph's static shapes)."""
import itertools, sys, json
import torch, triton.testing
sys.path.insert(0, "benchmarks")  # run from the repository root
from decode_sweep import paged_cache
from nanoflow.kernels import gpu
from nanoflow.models.batch import PREFILL, ForwardBatch
print("torch", torch.__version__)
try:
    from torch.nn.attention.varlen import varlen_attn
    import inspect; print(inspect.signature(varlen_attn))
except Exception as e:
    print("no varlen_attn:", e); varlen_attn = None

HQ, HKV, D, PAGE = 32, 8, 128, 32
def bench(fn):
    return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")

def paged(prompts, kv_dtype):
    g = torch.Generator().manual_seed(0)
    kc, vc, tables = paged_cache([s for _, s in prompts], HKV, D, PAGE, kv_dtype, g)
    rows = sum(q for q, _ in prompts)
    starts = [0, *itertools.accumulate(q for q, _ in prompts)]
    b = ForwardBatch(torch.zeros(rows), torch.zeros(rows), torch.zeros(rows), starts, [s for _, s in prompts], tables, 0, torch.zeros(1))
    m = b.build_attention(PREFILL, 0, rows)
    m = type(m)(*(t.cuda() for t in (m.q_start, m.q_len, m.seq_lens, m.block_tables)))
    return kc, vc, m, rows

def flops(prompts):
    return 4 * D * HQ * sum(n for ql, s in prompts for n in range(s - ql + 1, s + 1))

cases = {
  "splitwise-like": [(1313, 1313), (879, 879), (396, 396), (381, 381), (600, 2100)],
  "const 1024": [(1024, 1024), (524, 1024)],
  "long": [(2048, 2048), (1000, 3000)],
  "many short": [(91, 91)] * 12 + [(374, 374)] * 4,
}
out = {}
for name, prompts in cases.items():
    fresh = [p for p in prompts if p[0] == p[1]]
    cont = [p for p in prompts if p[0] != p[1]]
    r = {}
    for dt in (torch.float8_e4m3fn, torch.bfloat16):
        kc, vc, m, rows = paged(prompts, dt)
        q = torch.randn(rows, HQ, D, device="cuda", dtype=torch.bfloat16); o = torch.empty_like(q)
        r[f"engine all {dt}"] = bench(lambda: gpu.prefill_attention(q, kc, vc, m, D ** -0.5, o))
        if cont:
            kc2, vc2, m2, rows2 = paged(cont, dt)
            q2 = torch.randn(rows2, HQ, D, device="cuda", dtype=torch.bfloat16); o2 = torch.empty_like(q2)
            r[f"engine continued {dt}"] = bench(lambda: gpu.prefill_attention(q2, kc2, vc2, m2, D ** -0.5, o2))
        kc3, vc3, m3, rows3 = paged(fresh, dt)
        q3 = torch.randn(rows3, HQ, D, device="cuda", dtype=torch.bfloat16); o3 = torch.empty_like(q3)
        r[f"engine fresh {dt}"] = bench(lambda: gpu.prefill_attention(q3, kc3, vc3, m3, D ** -0.5, o3))
    if varlen_attn is not None:
        T = sum(s for s, _ in fresh)
        qkv = torch.randn(T, (HQ + 2 * HKV) * D, device="cuda", dtype=torch.bfloat16)
        qf = qkv[:, :HQ * D].view(T, HQ, D); kf = qkv[:, HQ * D:(HQ + HKV) * D].view(T, HKV, D)
        vf = qkv[:, (HQ + HKV) * D:].view(T, HKV, D)
        cu = torch.tensor([0, *itertools.accumulate(s for s, _ in fresh)], device="cuda", dtype=torch.int32)
        mx = max(s for s, _ in fresh)
        try:
            r["varlen fresh (strided views)"] = bench(lambda: varlen_attn(qf, kf, vf, cu, cu, mx, mx, window_size=(-1, 0)))
        except Exception as e:
            print("strided failed:", repr(e)[:300])
            qc, kc_, vc_ = qf.contiguous(), kf.contiguous(), vf.contiguous()
            r["varlen fresh (contig)"] = bench(lambda: varlen_attn(qc, kc_, vc_, cu, cu, mx, mx, window_size=(-1, 0)))
        # graph-like padding: batch padded to 64 / 256 entries, max_q = 4096
        for pad in (64, 256):
            cup = torch.cat([cu, cu[-1:].repeat(pad - len(fresh))])
            try:
                r[f"varlen fresh, B={pad}, max 4096"] = bench(lambda: varlen_attn(qf, kf, vf, cup, cup, 4096, 4096, window_size=(-1, 0)))
            except Exception as e:
                print("pad failed:", repr(e)[:300])
        # correctness vs engine on bf16 cache with the same values
        ref = torch.empty_like(qf)
        for (s0, s1) in zip(cu[:-1].tolist(), cu[1:].tolist()):
            ref[s0:s1] = torch.nn.functional.scaled_dot_product_attention(qf[s0:s1].transpose(0, 1)[None], kf[s0:s1].transpose(0, 1)[None], vf[s0:s1].transpose(0, 1)[None], is_causal=True, enable_gqa=True)[0].transpose(0, 1)
        got = varlen_attn(qf, kf, vf, cu, cu, mx, mx, window_size=(-1, 0))
        r["varlen rel err vs sdpa"] = ((got.float() - ref.float()).norm() / ref.float().norm()).item()
    out[name] = r
    fl = flops(prompts); flf = flops(fresh)
    print(f"\n== {name}: {prompts}")
    for k, v in r.items():
        print(f"  {k:45s} {v:9.4f}" + ("" if "err" in k else f" ms"))
json.dump(out, open(__import__("os").environ.get("OUT", ".") + "/prefill_flash_probe.json", "w"), indent=1)
