"""Where the MoE layer's time goes (#10): the engine's experts op and its pieces at one rank's shard of Mixtral,
against the same FLOPs as one dense cuBLAS GEMM pair and as a loop of per-expert cuBLAS GEMMs; the Triton grouped
GEMM (kernels/triton_moe.py) in its configs, gate_up with the activation in its epilogue as the engine runs it. Each
variant is captured in a CUDA graph and replayed; the variants of one row count are interleaved (the card's clock
drifts under its power cap). The experts op also runs eagerly, as is and with a loop of cuBLAS GEMMs after a host
sync for the offsets (reference.experts_mlp): what an engine without CUDA graphs would run.

With FlashInfer installed, its CUTLASS fused MoE runs too, for the same routing, as the issue's other candidate
for the experts; its layout of fc1's halves is found by checking both against the experts op. Never run here: its
first call JIT-compiles FlashInfer's sm90 fused-MoE module, a build that does not fit the device's limits
(BENCHMARKS.md, #10, session 13).

--sms S: everything captured and replayed on a stream confined to S SMs, issued as the pipeline issues a unit's ops
(sm_share: cuBLASLt told its share, the persistent kernels' grids sized to it).

python benchmarks/moe_ops.py [--tp 2] [--tokens 512 1024 1447 2048] [--variants REGEX] [--sms S] [--output out.json]"""
import argparse
import contextlib
import json
import re
import types

import torch

from nanoflow.config import preset
from nanoflow.kernels import gpu, reference
from nanoflow.models.llama import LlamaModel, Workspace
from nanoflow.models.loader import init_dummy
from nanoflow.pipeline.units import share


def graphed(fn):
    fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g, stream=torch.cuda.current_stream()):  # main's stream: a share's, if run on one
        fn()
    return g


def timed(graphs: dict, reps: int = 20, rounds: int = 5) -> dict:
    """Median ms per replay of each graph, the graphs taking turns."""
    times = {name: [] for name in graphs}
    for _ in range(rounds):
        for name, g in graphs.items():
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            g.replay()
            start.record()
            for _ in range(reps):
                g.replay()
            end.record()
            end.synchronize()
            times[name].append(start.elapsed_time(end) / reps)
    return {name: sorted(t)[len(t) // 2] for name, t in times.items()}


def triton_configs():
    try:
        from nanoflow.kernels import triton_moe
    except ImportError:
        return None, []
    grid = [dict(block_m=128, block_n=256, block_k=64, num_warps=8, num_stages=3, tma=False)]  # the pointer path
    for bm, bn, bk, w, s, g in ((128, 256, 64, 8, 3, 8), (128, 256, 64, 8, 3, 4), (128, 256, 64, 8, 4, 8),
                                (128, 128, 64, 8, 4, 8), (128, 128, 64, 8, 5, 4), (128, 128, 64, 4, 4, 8),
                                (128, 128, 128, 8, 3, 8), (128, 256, 32, 8, 5, 8), (64, 256, 64, 4, 4, 8),
                                (64, 256, 64, 8, 4, 8), (64, 512, 32, 8, 5, 8)):
        grid.append(dict(block_m=bm, block_n=bn, block_k=bk, num_warps=w, num_stages=s, group_m=g, tma=True))
    grid.append(dict(grid[1], flatten=False))
    grid += [dict(grid[3], split_k=s) for s in (1, 4, 16)]  # the engine's config, its part round cut otherwise
    return triton_moe, grid


def flashinfer_moe(x, ids, weights, gate_up, down, expect):
    """FlashInfer's CUTLASS fused MoE for the given routing (ids int32 [M, k], weights [M, k]), as a callable, with
    fc1's halves in the order whose output matches `expect` (the experts op's): TensorRT-LLM's kernels may take
    [up; gate] where HF's gate_up is [gate; up]. None without FlashInfer or without a match."""
    try:
        from flashinfer.fused_moe import cutlass_fused_moe
    except ImportError:
        return None
    out = torch.empty_like(expect)
    i = gate_up.shape[1] // 2
    for order, fc1 in (("[gate; up]", gate_up), ("[up; gate]", torch.cat((gate_up[:, i:], gate_up[:, :i]), 1))):
        def call(fc1=fc1):
            cutlass_fused_moe(x, ids, weights, fc1, down, x.dtype, quant_scales=None, output=out)
        try:
            call()
        except Exception as e:  # an API this script does not know: named, so that the next run can mend it
            print(f"flashinfer fused MoE: {type(e).__name__}: {str(e)[:300]}")
            return None
        err = ((out.float() - expect.float()).norm() / expect.float().norm()).item()
        print(f"flashinfer fused MoE, fc1 as {order}: relative error {err:.3g} against the experts op")
        if err < 2e-2:
            return call
    return None


def run(args) -> list[dict]:
    """The rows timed: a variant at a row count each."""
    full = preset(args.model)
    cfg = preset(args.model, num_layers=1, intermediate_size=full.intermediate_size // args.tp)
    dev, dt = torch.device("cuda"), torch.bfloat16
    model = LlamaModel(cfg, dt, dev, 4096)
    init_dummy(model, 0)
    layer = model.layers[0]
    k, H, I = cfg.num_experts_per_tok, cfg.hidden_size, cfg.intermediate_size
    # gate rows, then up rows (the model holds them interleaved), for the layouts the loop and FlashInfer take
    plain_gu = layer.experts_gate_up
    if model.experts_interleaved:
        plain_gu = plain_gu.view(cfg.num_experts, I, 2, H).transpose(1, 2).reshape(plain_gu.shape)
    triton_moe, configs = triton_configs()
    batch = types.SimpleNamespace(live_rows=None)  # all the MoE ops read of a batch: every row is real
    rows = []
    for M in args.tokens:
        ws = Workspace.allocate(cfg, M, dt, dev)
        ws.normed[:M].normal_()
        model.router(0, ws, batch, 0, M)
        pair_rows, _, weights, offs = reference.moe_route(ws.router[:M], k, cfg.norm_topk_prob)
        counts = torch.diff(offs, prepend=offs.new_zeros(1)).tolist()
        xs = ws.normed[:M].index_select(0, pair_rows)
        h = torch.empty(M * k, 2 * I, dtype=dt, device=dev)
        act = torch.empty(M * k, I, dtype=dt, device=dev)
        y = torch.empty(M * k, H, dtype=dt, device=dev)
        gu_t, dn_t = layer.experts_gate_up.transpose(1, 2), layer.experts_down.transpose(1, 2)

        def loop():
            start = 0
            for e, n in enumerate(counts):
                torch.mm(xs[start:start + n], layer.experts_gate_up[e].t(), out=h[start:start + n])
                torch.mm(act[start:start + n], layer.experts_down[e].t(), out=y[start:start + n])
                start += n
        w_gu, w_dn = layer.experts_gate_up[0], layer.experts_down[0]
        variants = {
            "experts op": lambda: model.experts(0, ws, batch, 0, M),
            "grouped gate_up": lambda: h.copy_(torch._grouped_mm(xs, gu_t, offs=offs)),
            "silu_mul": lambda: gpu.silu_mul(h, out=act),
            "grouped down": lambda: y.copy_(torch._grouped_mm(act, dn_t, offs=offs)),
            "dense gate_up+down (same FLOPs)": lambda: (torch.mm(xs, w_gu.t(), out=h), torch.mm(act, w_dn.t(), out=y)),
            "loop of cuBLAS gate_up+down": loop,
        }
        for c in configs:  # each GEMM alone too: the best config of one need not be the other's
            tag = (f"{c['block_m']}x{c['block_n']}x{c['block_k']} w{c['num_warps']} s{c['num_stages']} "
                   f"g{c.get('group_m', 8)} {'tma' if c['tma'] else 'ptr'}"
                   f"{'' if c.get('flatten', True) else ' noflat'}"
                   f"{' split%d' % c['split_k'] if 'split_k' in c else ''}")
            variants["triton gate_up " + tag] = lambda c=c: triton_moe.grouped_mm(xs, layer.experts_gate_up, offs,
                                                                                    out=act, gated=True, **c)
            variants["triton down " + tag] = lambda c=c: triton_moe.grouped_mm(act, layer.experts_down, offs, out=y,
                                                                                 **c)
            variants["triton gate_up+down " + tag] = (
                lambda c=c: (triton_moe.grouped_mm(xs, layer.experts_gate_up, offs, out=act, gated=True, **c),
                             triton_moe.grouped_mm(act, layer.experts_down, offs, out=y, **c)))
        if configs:  # the Triton result against torch's, once
            ref = torch._grouped_mm(xs, gu_t, offs=offs)
            got = triton_moe.grouped_mm(xs, layer.experts_gate_up, offs, **configs[0])
            err = (got.float() - ref.float()).abs().max().item()
            print(f"M={M}: triton vs torch._grouped_mm max abs diff {err:.3g}")
        model.experts(0, ws, batch, 0, M)
        # each row's experts in increasing order, as moe_route's weights are (FlashInfer takes the row's experts)
        ids = ws.router[:M].float().topk(k, dim=-1)[1].sort(-1)[0].to(torch.int32)
        fi = flashinfer_moe(ws.normed[:M], ids, weights, plain_gu, layer.experts_down, ws.hidden[:M].clone())
        if fi is not None:
            variants["flashinfer fused MoE (routing given)"] = fi
        # eagerly, the experts op as the engine runs it without CUDA graphs: with its grouped GEMMs, and with a
        # loop of cuBLAS GEMMs after a host sync for the offsets (its time includes the sync's GPU idle)
        eager = {"experts op, eager": lambda: model.experts(0, ws, batch, 0, M)}
        grouped = model.k
        loop_k = types.SimpleNamespace(**{n: getattr(grouped, n) for n in dir(grouped) if not n.startswith("_")})
        loop_k.experts_mlp = lambda x, _, down, offs, pad: reference.experts_mlp(x, plain_gu, down, offs, pad,
                                                                               gpu.silu_mul)

        def synced_loop():
            model.k = loop_k
            model.experts(0, ws, batch, 0, M)
            model.k = grouped
        eager["experts op, cuBLAS loop after a host sync, eager"] = synced_loop
        if args.variants:
            variants = {n: f for n, f in variants.items() if re.search(args.variants, n)}
            eager = {n: f for n, f in eager.items() if re.search(args.variants, n)}
        graphs = {}
        for name, fn in variants.items():
            try:
                graphs[name] = graphed(fn)
            except Exception as e:  # a Triton config that does not fit (shared memory) is skipped, named
                print(f"M={M} {name}: {type(e).__name__}: {str(e)[:120]}")
                if name.startswith("flashinfer"):  # timed eagerly if it cannot be captured
                    graphs[name] = types.SimpleNamespace(replay=fn)
        for name, fn in eager.items():
            fn()
            graphs[name] = types.SimpleNamespace(replay=fn)
        ms = timed(graphs)
        flops = 2 * M * k * 3 * H * I
        for name, t in ms.items():
            # gate_up holds 2/3 of the FLOPs, down 1/3
            share = (1 if "gate_up+down" in name or name.startswith(("experts op", "flashinfer"))
                     else 2 / 3 if "gate_up" in name
                     else 1 / 3 if name.endswith(" down") or "down " in name else 0)
            rate = share * flops / (t * 1e-3) / 1e12 or None
            rows.append({"tokens": M, "variant": name, "ms": t, "tflops": rate, "counts": counts})
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="mixtral-8x7b")
    ap.add_argument("--tp", type=int, default=2)
    ap.add_argument("--tokens", type=int, nargs="+", default=[512, 1024, 1447, 2048])
    ap.add_argument("--output")
    ap.add_argument("--variants", help="time only the variants whose names match this regular expression")
    ap.add_argument("--sms", type=int, help="run on a share of this many SMs (default: the whole device)")
    args = ap.parse_args()
    stream = torch.cuda.Stream()  # a side stream either way: graphs cannot be captured on the default one
    with contextlib.ExitStack() as on_share:
        if args.sms:
            from nanoflow.kernels.sm_share import sm_share, total_sms
            granted, stream = share(args.sms)
            on_share.enter_context(sm_share(granted, total_sms()))
            print(f"on a share of {granted} SMs")
        on_share.enter_context(torch.cuda.stream(stream))
        rows = run(args)
    print(f"\n{'tokens':>6}  {'variant':<58} {'ms':>8} {'TFLOP/s':>8}")
    for r in rows:
        print(f"{r['tokens']:>6}  {r['variant']:<58} {r['ms']:8.3f} {r['tflops'] or 0:8.0f}")
    for gemm in ("gate_up", "down", "gate_up+down"):
        for M in args.tokens:
            mine = [r for r in rows if r["tokens"] == M and r["variant"].startswith(f"triton {gemm} ")]
            if mine:
                best = min(mine, key=lambda r: r["ms"])
                print(f"best Triton config for {gemm} at {M} tokens: {best['variant'].split(' ', 2)[2]}, "
                      f"{best['ms']:.3f} ms")
    if args.output:
        with open(args.output, "w") as f:
            json.dump({"model": args.model, "tp": args.tp, "device": torch.cuda.get_device_name(), "rows": rows}, f,
                      indent=1)


if __name__ == "__main__":
    main()
