"""A grouped GEMM for the mixture-of-experts MLPs in Triton, a candidate replacement for torch._grouped_mm
(grouped_gemm.py): x's rows sorted by expert, expert e's rows ending at offs[e], each multiplied by w[e].T.

No host sync, so a CUDA graph captures it: the grid is fixed by the shapes alone (every m-tile there could be,
cdiv(M, block_m) + E since each expert adds at most one partial tile, times the n-tiles), and each program
reads offs on the device to find its expert and rows; programs past the last expert's tiles return at once.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _grouped_mm_kernel(X, W, OUT, OFFS, M, N, K, stride_xm, stride_we, stride_wn, stride_om,
                       E: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                       BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    # Grouped ordering of a flat grid: GROUP_M m-tiles in a row share each n-tile of w while it is in L2.
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M) + E
    num_pid_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * num_pid_n
    first_m = (pid // per_group) * GROUP_M
    group_size = min(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_size
    pid_n = (pid % per_group) // group_size

    # Which expert owns m-tile pid_m: every expert's tile count, their running sum, and the first expert whose
    # running sum passes pid_m (all E at once as one vector, rather than a loop of scalar loads).
    e = tl.arange(0, BLOCK_E)
    ends = tl.load(OFFS + e, mask=e < E, other=0)
    starts = tl.load(OFFS + e - 1, mask=(e > 0) & (e < E), other=0)
    tiles = tl.cdiv(tl.maximum(ends - starts, 0), BLOCK_M)
    tiles_end = tl.cumsum(tiles, 0)
    if pid_m >= tl.sum(tiles):
        return  # a spare tile: the experts' rows needed fewer
    expert = tl.sum((tiles_end <= pid_m).to(tl.int32))
    mine = e == expert
    row_end = tl.sum(tl.where(mine, ends, 0))
    row_begin = tl.sum(tl.where(mine, starts, 0)) + (pid_m - tl.sum(tl.where(mine, tiles_end - tiles, 0))) * BLOCK_M

    rows = row_begin + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    row_ok = rows < row_end  # the tile's rows past its expert's end belong to the next expert (or to none)
    col_ok = cols < N
    # int64 offsets: E * N * K and M * K can pass 2**31 at real sizes.
    x_ptrs = X + rows.to(tl.int64)[:, None] * stride_xm + ks[None, :]
    w_ptrs = W + expert.to(tl.int64) * stride_we + cols.to(tl.int64)[None, :] * stride_wn + ks[:, None]  # w[e].T
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        k_ok = ks < K - k * BLOCK_K
        a = tl.load(x_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(w_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        acc = tl.dot(a, b, acc)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    out_ptrs = OUT + rows.to(tl.int64)[:, None] * stride_om + cols[None, :]
    tl.store(out_ptrs, acc.to(OUT.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


def grouped_mm(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor, out: torch.Tensor | None = None, *,
               block_m: int = 128, block_n: int = 128, block_k: int = 64, group_m: int = 8, num_warps: int = 8,
               num_stages: int = 4) -> torch.Tensor:
    """x [M, K] sorted by expert, w [E, N, K], offs int32 [E] (expert e's rows end at offs[e]; rows from
    offs[-1] on are left untouched): out [M, N] in x's dtype, expert e's rows x[rows] @ w[e].T (fp32 sums)."""
    m, k = x.shape
    e, n, wk = w.shape
    assert wk == k and offs.shape == (e,) and offs.dtype == torch.int32
    assert x.stride(1) == 1 and w.stride(2) == 1, "rows of x and of w must be contiguous"
    if out is None:
        out = x.new_empty(m, n)
    assert out.shape == (m, n) and out.dtype == x.dtype and out.stride(1) == 1
    if m == 0 or n == 0:
        return out
    grid = ((triton.cdiv(m, block_m) + e) * triton.cdiv(n, block_n),)
    _grouped_mm_kernel[grid](x, w, out, offs, m, n, k, x.stride(0), w.stride(0), w.stride(1), out.stride(0),
                             E=e, BLOCK_E=triton.next_power_of_2(e), BLOCK_M=block_m, BLOCK_N=block_n,
                             BLOCK_K=block_k, GROUP_M=group_m, num_warps=num_warps, num_stages=num_stages)
    return out
