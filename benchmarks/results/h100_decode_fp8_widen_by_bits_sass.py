"""The SASS of the page kernel over fp8 (pages of 32, the engine config) for each way of widening e4m3 (session 25),
compiled for sm_90a on the CPU. Run with the patch h100_decode_fp8_widen_by_bits_experiment.diff applied to a copy of
the package on PYTHONPATH: python h100_decode_fp8_widen_by_bits_sass.py 0 1 2"""
import os
import re
import subprocess
import sys
import tempfile
from collections import Counter

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from nanoflow.kernels.triton_attention import _decode_page_kernel as fn

BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
PAGE = 32
for widen in [int(w) for w in sys.argv[1:]]:
    kdesc = f"tensordesc<fp8e4nv[1,{PAGE},1,128]>"
    sig = {n: "i32" for n in fn.arg_names}
    sig.update(Q="*bf16", k_desc=kdesc, v_desc=kdesc, OUT="*bf16", Q_START="*i32", TILE_UNIT="*i32",
               TILE_PAGE="*i32", TILE_SPAN="*i32", UNIT_START="*i32", NUM_TILES="*i32", CHUNK="*i32",
               PART_O="*fp32", PART_LSE="*fp32", scale="fp32")
    const = dict(NUM_KV=8, G=4, BLOCK_G=4, D=128, PAGE=PAGE, DOT=tl.float16, STAGES=6, HEADS=1, GROUP=4,
                 KEYS_AXIS=0, WIDEN=widen)
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
    ins = re.findall(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]+)", sass)
    ops = Counter(i.split(".")[0] for i in ins)
    print(f"page {PAGE} widen {widen}: regs {regs}, {len(ins)} instructions;", dict(ops.most_common(18)))
