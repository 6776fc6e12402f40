"""Where the page kernel's instructions go over an fp8 cache (session 21): compile it for sm_90 on the CPU (no GPU
needed) in Mixtral's engine config (4 query heads a unit, dots transposed, 1 warp, 6 stages), over a bf16 and an
fp8 cache, assemble with Triton's ptxas and count the shared-memory loads and conversions in the SASS.
python benchmarks/results/page_kernel_fp8_sass_fcd8845.py  ->  per cache: registers, LDSM / LDS.U8 / LDS.64 / F2FP /
PRMT / HMMA counts, and how the TTGIR loads V (the layout its local_load produces)."""
import os
import re
import subprocess
import tempfile
from collections import Counter

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from nanoflow.kernels.triton_attention import _decode_page_kernel as fn

BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
for name, dtype, dot in (("bf16", "bf16", tl.bfloat16), ("fp8", "fp8e4nv", tl.float16)):
    desc = f"tensordesc<{dtype}[1,16,1,128]>"
    sig = {n: "i32" for n in fn.arg_names}
    sig.update(Q="*bf16", k_desc=desc, v_desc=desc, OUT="*bf16", Q_START="*i32", TILE_UNIT="*i32",
               TILE_PAGE="*i32", TILE_SPAN="*i32", UNIT_START="*i32", NUM_TILES="*i32", CHUNK="*i32",
               PART_O="*fp32", PART_LSE="*fp32", scale="fp32")
    const = dict(NUM_KV=8, G=4, BLOCK_G=4, D=128, PAGE=16, DOT=dot, STAGES=6, HEADS=1, GROUP=4, KEYS_AXIS=0)
    sig.update({c: "constexpr" for c in const})
    k = triton.compile(ASTSource(fn, sig, const), target=GPUTarget("cuda", 90, 32),
                       options=dict(num_warps=1, num_stages=6))
    with tempfile.TemporaryDirectory() as d:
        ptx, cubin = os.path.join(d, "k.ptx"), os.path.join(d, "k.cubin")
        open(ptx, "w").write(k.asm["ptx"])
        regs = re.search(r"Used (\d+) registers", subprocess.run(
            [os.path.join(BIN, "ptxas"), "-arch=sm_90a", "-v", ptx, "-o", cubin], capture_output=True,
            text=True).stderr).group(1)
        sass = subprocess.run([os.path.join(BIN, "cuobjdump"), "-sass", cubin], capture_output=True, text=True).stdout
    ops = Counter(re.findall(r"\b(LDSM\.16\.MT?88\.4|LDS\.U8|LDS\.64|LDS\.128|F2FP\.[A-Z0-9_.]+|PRMT|HMMA\.[0-9A-Z.]+)",
                             sass))
    v_load = re.search(r"local_load %v\S* : .*? -> tensor<[^,]+, #(\w+)>", k.asm["ttgir"])
    print(name, "registers", regs, dict(sorted(ops.items())), "V loaded as #" + (v_load.group(1) if v_load else "?"))
