"""Where the page kernel's instructions go over an fp8 cache with V stored transposed (session 23): as
page_kernel_fp8_sass_fcd8845.py, compiled for sm_90 on the CPU (no GPU), Mixtral's engine config (4 query heads a
unit, dots transposed, 1 warp, 6 stages), for pages of 16 and 32 tokens, V in the engine's layout or transposed,
and the dots in fp16 (the engine's) or in fp8 (queries and probabilities rounded to e4m3). Run from the repository
root with session 21's patch (h200_decode_fp8_vt_probe_fdc9592.diff) applied to a copy of the package, probe_vt/:
PYTHONPATH=probe_vt python benchmarks/results/page_kernel_fp8_vt_sass_1f84c43.py"""
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
CASES = (("bf16, pages of 16", "bf16", tl.bfloat16, 16, False), ("fp8, pages of 16", "fp8e4nv", tl.float16, 16, False),
         ("fp8, pages of 16, V transposed", "fp8e4nv", tl.float16, 16, True),
         ("fp8, pages of 32", "fp8e4nv", tl.float16, 32, False),
         ("fp8, pages of 32, V transposed", "fp8e4nv", tl.float16, 32, True),
         ("fp8, pages of 32, V transposed, fp8 dots", "fp8e4nv", tl.float8e4nv, 32, True))
for name, dtype, dot, page, vt in CASES:
    kdesc = f"tensordesc<{dtype}[1,{page},1,128]>"
    sig = {n: "i32" for n in fn.arg_names}
    sig.update(Q="*bf16", k_desc=kdesc, v_desc=f"tensordesc<{dtype}[1,1,128,{page}]>" if vt else kdesc, OUT="*bf16",
               Q_START="*i32", TILE_UNIT="*i32", TILE_PAGE="*i32", TILE_SPAN="*i32", UNIT_START="*i32",
               NUM_TILES="*i32", CHUNK="*i32", PART_O="*fp32", PART_LSE="*fp32", scale="fp32")
    const = dict(NUM_KV=8, G=4, BLOCK_G=4, D=128, PAGE=page, DOT=dot, STAGES=6, HEADS=1, GROUP=4, KEYS_AXIS=0,
                 V_T=vt)
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
    ops = Counter(re.findall(r"\b(LDSM\.[0-9A-Z.]+|LDS\.U8|LDS\.U16|LDS\.64|LDS\.128|F2FP\.[A-Z0-9_.]+|PRMT|"
                             r"HMMA\.[0-9A-Z.]+|QMMA\.[0-9A-Z.]+|MUFU\.EX2)\b", sass))
    print(f"{name}: registers {regs}, {dict(sorted(ops.items()))}", flush=True)
