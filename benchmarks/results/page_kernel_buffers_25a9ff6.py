"""How many K and V pages the page kernel keeps in flight at each STAGES (session 20): compile it for sm_90 on the
CPU (no GPU needed: triton.compile stops at PTX's text here) and read its shared-memory buffers from the TTGIR.
python benchmarks/results/page_kernel_buffers_25a9ff6.py  ->  STAGES, buffers, shared bytes (Triton 3.6:
2 -> 1 buffer, 4 -> 1, 6 -> 2, 7 and 8 -> 3, 10 -> 4, 12 -> 5, 16 -> 7: max(1, (STAGES - 1) // 2))."""
import re

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from nanoflow.kernels.triton_attention import _decode_page_kernel as fn

desc = "tensordesc<bf16[1,16,1,128]>"  # a page of one KV head: Llama-3-8B's cache, bf16
for stages in (2, 4, 6, 7, 8, 10, 12, 16):
    sig = {n: "i32" for n in fn.arg_names}
    sig.update(Q="*bf16", k_desc=desc, v_desc=desc, OUT="*bf16", Q_START="*i32", TILE_UNIT="*i32",
               TILE_PAGE="*i32", TILE_SPAN="*i32", UNIT_START="*i32", NUM_TILES="*i32", CHUNK="*i32",
               PART_O="*fp32", PART_LSE="*fp32", scale="fp32")
    const = dict(NUM_KV=8, G=4, BLOCK_G=4, D=128, PAGE=16, DOT=tl.bfloat16, STAGES=stages, HEADS=1, GROUP=4)
    sig.update({c: "constexpr" for c in const})
    k = triton.compile(ASTSource(fn, sig, const), target=GPUTarget("cuda", 90, 32),
                       options=dict(num_warps=1, num_stages=stages))
    bufs = re.findall(r"memdesc<(\d+)x1x16x1x128xbf16", k.asm["ttgir"])
    print(stages, max(map(int, bufs)), k.metadata.shared)
