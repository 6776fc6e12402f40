"""Ad-hoc probe (session 21): the Mixtral layer GEMMs at 4,096 tokens (the bench's C) timed as the bench does, then
back to back for 40 s in 2-s windows with the SM clock and power beside each, then as the bench does again.
PYTHONPATH=. python benchmarks/results/h200_sustained_gemm_rate_c755486.py"""
import subprocess
import time

import torch

from nanoflow.bench.cost_model import gemm_rate, layer_gemms
from nanoflow.config import preset

cfg = preset("mixtral-8x7b")
dev = torch.device("cuda")
first = gemm_rate(cfg, 4096, torch.bfloat16, dev)["rate"] / 1e12
mats = []
for name, (m, n, k) in layer_gemms(cfg, 4096).items():
    a = torch.randn(m, k, dtype=torch.bfloat16, device=dev)
    w = torch.randn(n, k, dtype=torch.bfloat16, device=dev)
    mats.append((a, w, torch.empty(m, n, dtype=torch.bfloat16, device=dev), 2 * m * n * k))
rows = []
t_end = time.time() + 40
while time.time() < t_end:
    torch.cuda.synchronize()
    t0, flops = time.perf_counter(), 0
    while time.perf_counter() - t0 < 2.0:
        for a, w, o, f in mats:
            torch.mm(a, w.t(), out=o)
            flops += f
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    smi = subprocess.run(["nvidia-smi", "--query-gpu=clocks.sm,power.draw", "--format=csv,noheader"],
                         capture_output=True, text=True).stdout.strip()
    rows.append((flops / dt / 1e12, smi))
last = gemm_rate(cfg, 4096, torch.bfloat16, dev)["rate"] / 1e12
print(f"C as the bench times it, before: {first:.1f} TFLOP/s")
for i, (r, smi) in enumerate(rows):
    print(f"  {2 * i:3d}-{2 * i + 2:3d} s of back-to-back layer GEMMs: {r:6.1f} TFLOP/s   ({smi})")
print(f"C as the bench times it, after: {last:.1f} TFLOP/s")
