"""Ad-hoc probe (session 21): does a grouped GEMM run faster under the power cap when some of its rows are zeros?
Mixtral's experts at TP = 1 (gate_up gated, then down) over 8,192 rows (4,096 tokens, top-2), back to back in 10-s
windows: rows all random, then the last 8 % of each expert's rows zeroed (as an expert's padding would be if it
were zeros), alternating, with the SM clock and power beside each window.
PYTHONPATH=. python benchmarks/results/h200_moe_zero_rows_power_ccf5f37.py"""
import subprocess
import time

import torch

from nanoflow.kernels import triton_moe

torch.manual_seed(0)
dev = torch.device("cuda")
E, H, I = 8, 4096, 14336
counts = [1000, 1030, 990, 1050, 1010, 1040, 1020, 1052]
offs = torch.tensor(counts, device=dev).cumsum(0).to(torch.int32)
gate_up = torch.randn(E, 2 * I, H, device=dev, dtype=torch.bfloat16) * 0.02
down = torch.randn(E, H, I, device=dev, dtype=torch.bfloat16) * 0.02
x = torch.randn(sum(counts), H, device=dev, dtype=torch.bfloat16)
x0 = x.clone()
start = 0
for c in counts:
    x0[start + c - c * 8 // 100:start + c] = 0
    start += c
flops = 2 * sum(counts) * (2 * I * H + H * I)


def window(inp, seconds=10.0):
    torch.cuda.synchronize()
    t0, n = time.perf_counter(), 0
    while time.perf_counter() - t0 < seconds:
        for _ in range(5):
            triton_moe.experts_mlp(inp, gate_up, down, offs)
        torch.cuda.synchronize()
        n += 5
    rate = n * flops / (time.perf_counter() - t0) / 1e12
    smi = subprocess.run(["nvidia-smi", "--query-gpu=clocks.sm,power.draw", "--format=csv,noheader"],
                         capture_output=True, text=True).stdout.strip()
    return rate, smi


window(x, 5.0)  # to the power cap first
for name, inp in (("random", x), ("8 % zero rows", x0)) * 3:
    rate, smi = window(inp)
    print(f"{name:14s} {rate:6.1f} TFLOP/s of all rows' FLOPs   ({smi})")
