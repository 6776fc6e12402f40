"""filter_probs before (31df7c8: top_p on the raw distribution) and after (top_p on what top_k and min_p left), on
the GPU: time a batch of rows with top_k and top_p, at Llama-3's vocabulary; CUDA events, median of 50."""
import importlib.util
import statistics
import sys

import torch

sys.path.insert(0, ".")
from nanoflow.layers import sampler as new  # noqa: E402

# the before: 31df7c8's sampler.py, written by `git show 31df7c8:nanoflow/layers/sampler.py > sampler_old.py` (the run
# carried it as ab_base/sampler_old.py: the device's copy of the tree has no git history)
spec = importlib.util.spec_from_file_location("sampler_old", "sampler_old.py")
old = sys.modules["sampler_old"] = importlib.util.module_from_spec(spec)
spec.loader.exec_module(old)
print("| rows | vocab | before ms | after ms | after / before |")
for rows in (64, 256, 1024):
    V = 128256
    probs = torch.randn(rows, V, device="cuda").mul(3).softmax(-1)
    z = torch.zeros(rows, device="cuda")
    md = new.SamplingMetadata(z + 1, (z + 50).long(), z + 0.9, z + 0.05, [None] * rows)
    times = {}
    for name, mod in (("before", old), ("after", new), ("before", old), ("after", new)):
        for _ in range(5):
            mod.filter_probs(probs, md)
        ts = []
        for _ in range(50):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            mod.filter_probs(probs, md)
            b.record()
            torch.cuda.synchronize()
            ts.append(a.elapsed_time(b))
        times.setdefault(name, []).append(statistics.median(ts))
    b, n = min(times["before"]), min(times["after"])
    print(f"| {rows} | {V} | {b:.3f} | {n:.3f} | {n / b:.3f} |")
