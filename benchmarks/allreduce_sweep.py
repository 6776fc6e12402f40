"""NCCL all-reduce time of #9's collectives (rows x 8,192 bf16: one all-reduce of a layer at TP = 2), captured
in a CUDA graph as the engine runs them, under the NCCL environment this process was started with. Run it once
per setting (NCCL reads its environment at init) and compare the lines:

NCCL_NVLS_ENABLE=0 [NCCL_MIN_NCHANNELS=32 ...] python benchmarks/allreduce_sweep.py [--tp 2] [--output f.json]"""
import argparse
import json
import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

ROWS = (1024, 2048)
HIDDEN = 8192
REPS = 20


def rank_main(rank, size, port, output):
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=size)
    results = {}
    for rows in ROWS:
        x = torch.randn(rows, HIDDEN, device="cuda", dtype=torch.bfloat16)
        for _ in range(3):
            dist.all_reduce(x)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(REPS):
                dist.all_reduce(x)
        graph.replay()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(5):
            graph.replay()
        end.record()
        end.synchronize()
        us = start.elapsed_time(end) * 1000 / (5 * REPS)
        # bus bandwidth as nccl-tests reports it: the bytes each rank must move, 2 (n - 1) / n of the tensor
        results[rows] = {"us": us, "busbw_gb_s": x.numel() * 2 * 2 * (size - 1) / size / us / 1e3}
    if rank == 0:
        report(results, size, output)
    os._exit(0)  # NCCL's teardown can hang after CUDA graphs captured its collectives (pytorch#115388)


def report(results, size, output):
    env = {k: v for k, v in sorted(os.environ.items()) if k.startswith("NCCL_")}
    line = "  ".join(f"{rows} rows {r['us']:7.1f} us {r['busbw_gb_s']:5.0f} GB/s" for rows, r in results.items())
    print(f"{line}  {' '.join(f'{k}={v}' for k, v in env.items())}", flush=True)
    if output:
        with open(output, "a") as f:
            f.write(json.dumps({"env": env, "tp": size, "device": torch.cuda.get_device_name(),
                                "nccl": ".".join(map(str, torch.cuda.nccl.version())), "results": results}) + "\n")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tp", type=int, default=2)
    ap.add_argument("--output")
    a = ap.parse_args()
    mp.spawn(rank_main, args=(a.tp, 29600 + os.getpid() % 1000, a.output), nprocs=a.tp)


if __name__ == "__main__":
    main()
