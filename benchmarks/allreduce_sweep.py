"""NCCL all-reduce time of #9's collectives (rows x 8,192 bf16: one all-reduce of a Llama-3-70B layer), timed by
the profile's own collective timing (nanoflow.pipeline.collectives), under the environment this process was started
with: NCCL's settings, or NANOFLOW_ALL_REDUCE=symm-mem (torch's two-shot all-reduce in symmetric memory). Run it once
per setting (NCCL reads its environment at init) and compare the lines:

[NCCL_MIN_NCHANNELS=32 ... | NANOFLOW_ALL_REDUCE=symm-mem] python benchmarks/allreduce_sweep.py [--output f.jsonl]"""
import argparse
import json
import os

import torch

from nanoflow.config import preset
from nanoflow.distributed.parallel_state import ALL_REDUCE_ENV
from nanoflow.pipeline.collectives import time_collectives

ROWS = [1024, 2048]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tp", type=int, default=2)
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--output")
    a = ap.parse_args()
    cfg = preset("llama-3-70b")
    us = time_collectives(cfg, torch.bfloat16, "cuda", a.tp, {"o_allreduce": ROWS}, a.reps)["o_allreduce"]
    # bus bandwidth as nccl-tests reports it: the bytes each rank must move, 2 (n - 1) / n of the tensor
    results = {rows: {"us": t, "busbw_gb_s": rows * cfg.hidden_size * 2 * 2 * (a.tp - 1) / a.tp / t / 1e3}
               for rows, t in zip(ROWS, us)}
    env = {k: v for k, v in sorted(os.environ.items()) if k.startswith("NCCL_") or k == ALL_REDUCE_ENV}
    line = "  ".join(f"{rows} rows {r['us']:7.1f} us {r['busbw_gb_s']:5.0f} GB/s" for rows, r in results.items())
    print(f"{line}  {' '.join(f'{k}={v}' for k, v in env.items())}", flush=True)
    if a.output:
        with open(a.output, "a") as f:
            f.write(json.dumps({"env": env, "tp": a.tp, "device": torch.cuda.get_device_name(),
                                "nccl": ".".join(map(str, torch.cuda.nccl.version())), "results": results}) + "\n")


if __name__ == "__main__":
    main()
