"""Mixture-of-experts kernels in Triton: the routing of rows to experts, and the experts' MLPs as grouped GEMMs.

Routing (`route`): two kernels over blocks of rows compute what reference.moe_route does with a dozen torch
kernels (softmax, top-k, sorts, searchsorted, scatter: ~85 us a layer on an H200 at 1,600-1,900 rows, more than
their bytes need). Its sort is a counting sort: a pair's place is its expert's start plus the pairs of that expert
in earlier rows, so counting each block's pairs per expert, then placing them, sorts stably without comparisons.

The grouped GEMMs: x's rows sorted by expert, expert e's rows ending at offs[e], each multiplied by w[e].T. On an
H100 at Mixtral's TP = 2 shard it runs the experts' GEMMs 1.1-1.2x faster than torch._grouped_mm (CUTLASS), which
it replaced (BENCHMARKS.md, #10; benchmarks/moe_ops.py). The gate_up GEMM also applies the SwiGLU to its fp32 sums
before storing (`gated`), over gate and up rows interleaved so that each tile holds matching pairs: the [rows, 2 I]
product is never written and no separate activation pass runs.

No host sync, so a CUDA graph captures it: the launch depends on the shapes alone, and the kernel reads offs on
the device to count each expert's m-tiles (block_m rows of one expert; at most cdiv(M, block_m) + E of them,
since each expert adds at most one partial tile) and to find the expert and rows of each (m-tile, n-tile).

Two kernels share that bookkeeping (_expert_tiles, _tile_coords) and the masked store (_store_result):
- the TMA kernel (Hopper and later): x and w read through host-built TMA tensor descriptors, persistent (one
  program per SM at most, each looping over tiles). A last round of fewer tiles than programs would leave most
  SMs idle for a whole tile, so it is cut by k-chunks among them (_split_round: 1.02x on the two GEMMs over
  1,024-4,096 tokens of Mixtral on an H200, up to 1.08x);
- the pointer kernel, the fallback (older GPUs, x or w not TMA-aligned): one program per tile there could be,
  the spare ones returning at once.
The store is a masked pointer store in both: a tile's rows past its expert's end are the next expert's, written
by another program, so a TMA store (whole boxes) would clobber them. The engine lays the rows out padded instead
(route's and grouped_mm's `pad`): each expert from a multiple of the tile rows on, the gap after it zero rows, so
that its last tile multiplies zeros rather than the next expert's rows. Under the card's power cap that drew less
power and ran the two GEMMs 1.02-1.04x faster on an H200 (BENCHMARKS.md, #10 session 32).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from nanoflow.kernels import reference, sm_share
from nanoflow.kernels import tma as tma_engine  # (grouped_mm's `tma` argument picks the kernel)

INTERPRETER_PROGRAMS = 3  # the TMA kernel's programs off a GPU (Triton's interpreter)
# The part round is cut only for tiles of at least this many k-iterations. On an H100, shorter ones lost 3-4 % to
# the cut's fixed costs (its sums, a second pipeline fill): Qwen1.5-MoE's 22 and 32, and Mixtral's 28 at TP = 8
# tied; Mixtral's 56-224 gained 1-4 % (BENCHMARKS.md, #10 session 23).
SPLIT_MIN_K_ITERS = 48
# grouped_mm's tile rows and columns, measured best on an H100 at 512-2,048 tokens of Mixtral's shard
BLOCK_M, BLOCK_N = 128, 256


@triton.jit
def _expert_tiles(OFFS, N, E: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  PAD: tl.constexpr):
    """Per expert (vectors over BLOCK_E): row starts and ends, m-tile counts and their running sum; then the
    number of m-tiles in all and of n-tiles. All E at once as vectors, rather than a loop of scalar loads.
    With PAD > 1 (a multiple of BLOCK_M) each expert starts at a multiple of PAD rows and the gap after its rows is
    its own (zero rows): its end is then its last tile's, so that the store writes whole tiles."""
    e = tl.arange(0, BLOCK_E)
    ends = tl.load(OFFS + e, mask=e < E, other=0)
    starts = tl.cdiv(tl.load(OFFS + e - 1, mask=(e > 0) & (e < E), other=0), PAD) * PAD
    tiles = tl.cdiv(tl.maximum(ends - starts, 0), BLOCK_M)
    if PAD > 1:
        ends = starts + tiles * BLOCK_M
    return starts, ends, tiles, tl.cumsum(tiles, 0), tl.sum(tiles), tl.cdiv(N, BLOCK_N)


@triton.jit
def _tile_coords(tile, starts, ends, tiles, tiles_end, num_pid_m, num_pid_n, BLOCK_E: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """Tile number tile (< num_pid_m * num_pid_n): its expert, first row, the expert's row end, first column."""
    # Grouped ordering: GROUP_M m-tiles in a row share each n-tile of w while it is in L2.
    per_group = GROUP_M * num_pid_n
    first_m = (tile // per_group) * GROUP_M
    group_size = min(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (tile % per_group) % group_size
    pid_n = (tile % per_group) // group_size
    # The owner of m-tile pid_m: the first expert whose running tile count passes it.
    expert = tl.sum((tiles_end <= pid_m).to(tl.int32))
    mine = tl.arange(0, BLOCK_E) == expert
    row_end = tl.sum(tl.where(mine, ends, 0))
    row_begin = tl.sum(tl.where(mine, starts, 0)) + (pid_m - tl.sum(tl.where(mine, tiles_end - tiles, 0))) * BLOCK_M
    return expert, row_begin, row_end, pid_n * BLOCK_N


@triton.jit
def _store_tile(OUT, acc, row_begin, row_end, col_begin, N, stride_om, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    rows = row_begin + tl.arange(0, BLOCK_M)
    cols = col_begin + tl.arange(0, BLOCK_N)
    mask = (rows < row_end)[:, None] & (cols < N)[None, :]  # rows past row_end: the next expert's (or no one's)
    out_ptrs = OUT + rows.to(tl.int64)[:, None] * stride_om + cols[None, :]  # int64: M * N can pass 2**31
    tl.store(out_ptrs, acc.to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _store_result(OUT, acc, row_begin, row_end, col_begin, N, stride_om, BLOCK_M: tl.constexpr,
                  BLOCK_N: tl.constexpr, GATED: tl.constexpr):
    """The tile's sums, or with GATED (w's rows gate and up interleaved, so a tile's columns pair them) the
    SwiGLU silu(gate) * up of its fp32 sums: half the columns, at half the column index."""
    if GATED:
        gate, up = tl.split(tl.reshape(acc, [BLOCK_M, BLOCK_N // 2, 2]))
        _store_tile(OUT, gate * tl.sigmoid(gate) * up, row_begin, row_end, col_begin // 2, N // 2, stride_om,
                    BLOCK_M, BLOCK_N // 2)
    else:
        _store_tile(OUT, acc, row_begin, row_end, col_begin, N, stride_om, BLOCK_M, BLOCK_N)


@triton.jit
def _grouped_mm_kernel(X, W, OUT, OFFS, N, K, stride_xm, stride_we, stride_wn, stride_om,
                       E: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                       BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, GATED: tl.constexpr, PAD: tl.constexpr):
    starts, ends, tiles, tiles_end, num_pid_m, num_pid_n = _expert_tiles(OFFS, N, E, BLOCK_E, BLOCK_M, BLOCK_N, PAD)
    pid = tl.program_id(0)
    if pid >= num_pid_m * num_pid_n:
        return  # a spare program: the experts' rows needed fewer tiles
    expert, row_begin, row_end, col_begin = _tile_coords(pid, starts, ends, tiles, tiles_end, num_pid_m, num_pid_n,
                                                         BLOCK_E, BLOCK_M, BLOCK_N, GROUP_M)
    rows = row_begin + tl.arange(0, BLOCK_M)
    cols = col_begin + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    row_ok = rows < row_end
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
    _store_result(OUT, acc, row_begin, row_end, col_begin, N, stride_om, BLOCK_M, BLOCK_N, GATED)


@triton.jit
def _k_sums(x_desc, w_desc, row_begin, w_row, k0, k1, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
            BLOCK_K: tl.constexpr):
    """A tile's fp32 sums over its k-blocks [k0, k1): x's rows from row_begin times w's rows from w_row."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(k0, k1):
        a = x_desc.load([row_begin, k * BLOCK_K])
        b = w_desc.load([w_row, k * BLOCK_K])
        acc = tl.dot(a, b.T, acc)
    return acc


@triton.jit
def _split(part_tiles, K, BLOCK_K: tl.constexpr, MAX_SPLIT: tl.constexpr):
    """How the part round's tiles are cut: into `split` chunks of `chunk` k-iterations (split 1: not cut), as many as
    the programs allow (one a chunk), at most MAX_SPLIT, and no empty chunk."""
    kt = tl.cdiv(K, BLOCK_K)
    split = tl.minimum(tl.minimum(tl.num_programs(0) // tl.maximum(part_tiles, 1), MAX_SPLIT), kt)
    chunk = tl.cdiv(kt, tl.maximum(split, 1))
    return tl.cdiv(kt, chunk), chunk, kt


@triton.jit
def _split_round(x_desc, w_desc, OUT, PARTS, LOCKS, N, K, stride_om, first_tile, num_tiles, starts, ends, tiles,
                 tiles_end, num_pid_m, num_pid_n, BLOCK_E: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, GATED: tl.constexpr,
                 MAX_SPLIT: tl.constexpr, SUM_ROWS: tl.constexpr):
    """The part round, tiles [first_tile, num_tiles), fewer than the programs: each tile cut into `split` runs of
    k-iterations, one a program. Chunk-major (program u: chunk u // tiles of tile u % tiles), so that the programs
    at one chunk read the same k-slabs of w, as a whole round does. (Stream-K's runs, staggered program by program,
    measured up to 2x slower on the experts' down GEMM: w then streams from DRAM rather than L2.) Each piece's fp32
    sums go to PARTS (slot u); the program that completes a tile's k-iterations (an atomic count in LOCKS) adds its
    pieces in chunk order, whichever came last, and stores the result. One SM reads all of a tile's pieces, which
    is why split is capped."""
    part_tiles = num_tiles - first_tile
    split, chunk, kt = _split(part_tiles, K, BLOCK_K, MAX_SPLIT)
    u = tl.program_id(0)
    if u < part_tiles * split:
        t = u % part_tiles
        k0 = (u // part_tiles) * chunk
        k1 = tl.minimum(k0 + chunk, kt)
        expert, row_begin, row_end, col_begin = _tile_coords(first_tile + t, starts, ends, tiles, tiles_end,
                                                             num_pid_m, num_pid_n, BLOCK_E, BLOCK_M, BLOCK_N, GROUP_M)
        acc = _k_sums(x_desc, w_desc, row_begin, expert * N + col_begin, k0, k1, BLOCK_M, BLOCK_N, BLOCK_K)
        tile_cells = tl.arange(0, BLOCK_M)[:, None] * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]
        tl.store(PARTS + u.to(tl.int64) * (BLOCK_M * BLOCK_N) + tile_cells, acc)
        tl.debug_barrier()  # every thread's piece written before the count says so (release, at GPU scope)
        if tl.atomic_add(LOCKS + t, k1 - k0) + k1 - k0 == kt:
            tl.debug_barrier()
            # Row group by row group, so that the sum and one piece (not the whole tile twice) sit in registers.
            cells = tl.arange(0, SUM_ROWS)[:, None] * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]
            for r in tl.static_range(0, BLOCK_M, SUM_ROWS):
                total = tl.zeros((SUM_ROWS, BLOCK_N), dtype=tl.float32)
                for c in range(0, split):
                    piece = PARTS + (c * part_tiles + t).to(tl.int64) * (BLOCK_M * BLOCK_N) + r * BLOCK_N
                    total += tl.load(piece + cells, cache_modifier=".cg")  # from L2: other SMs wrote them
                _store_result(OUT, total, row_begin + r, row_end, col_begin, N, stride_om, SUM_ROWS, BLOCK_N, GATED)


@triton.jit
def _grouped_mm_tma_kernel(x_desc, w_desc, OUT, PARTS, LOCKS, OFFS, N, K, stride_om,
                           E: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                           BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, FLATTEN: tl.constexpr,
                           GATED: tl.constexpr, MAX_SPLIT: tl.constexpr, SUM_ROWS: tl.constexpr,
                           PAD: tl.constexpr):
    # x_desc: x as [M, K], boxes [BLOCK_M, BLOCK_K]; w_desc: w as [E * N, K], boxes [BLOCK_N, BLOCK_K]. TMA
    # zero-fills past M and K; x rows past the expert's end (unpadded: the next expert's) and w rows past N (the
    # next expert's) are read but only feed outputs that the store masks off.
    starts, ends, tiles, tiles_end, num_pid_m, num_pid_n = _expert_tiles(OFFS, N, E, BLOCK_E, BLOCK_M, BLOCK_N, PAD)
    num_tiles = num_pid_m * num_pid_n  # the real count, read from offs: the loop skips the spare tiles
    step = tl.num_programs(0)  # a runtime value: a new grid size (it follows M when M is small) doesn't recompile
    # Whole tiles, one a program at a time; then, if MAX_SPLIT > 1, a part round (fewer tiles than programs) is
    # cut by k-iterations among the programs (_split_round), so that most SMs do not idle through it.
    whole = num_tiles
    if MAX_SPLIT > 1:
        split, _, _ = _split(num_tiles % step, K, BLOCK_K, MAX_SPLIT)
        if split > 1:
            whole = num_tiles - num_tiles % step
    # The epilogue recomputes its tile from a counter of its own (as Triton's persistent-matmul tutorial does), so
    # that a flattened, pipelined loop needn't carry the prologue's coordinates over to the epilogue.
    tile_c = tl.program_id(0) - step
    for tile in tl.range(tl.program_id(0), whole, step, flatten=FLATTEN):
        expert, row_begin, _, col_begin = _tile_coords(tile, starts, ends, tiles, tiles_end, num_pid_m, num_pid_n,
                                                       BLOCK_E, BLOCK_M, BLOCK_N, GROUP_M)
        acc = _k_sums(x_desc, w_desc, row_begin, expert * N + col_begin, 0, tl.cdiv(K, BLOCK_K), BLOCK_M, BLOCK_N,
                      BLOCK_K)
        tile_c += step
        _, row_begin, row_end, col_begin = _tile_coords(tile_c, starts, ends, tiles, tiles_end, num_pid_m, num_pid_n,
                                                        BLOCK_E, BLOCK_M, BLOCK_N, GROUP_M)
        _store_result(OUT, acc, row_begin, row_end, col_begin, N, stride_om, BLOCK_M, BLOCK_N, GATED)
    if MAX_SPLIT > 1:  # (compiled out when uncut: PARTS and LOCKS are then stand-ins)
        if whole < num_tiles:
            _split_round(x_desc, w_desc, OUT, PARTS, LOCKS, N, K, stride_om, whole, num_tiles, starts, ends, tiles,
                         tiles_end, num_pid_m, num_pid_n, BLOCK_E, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, GATED, MAX_SPLIT,
                         SUM_ROWS)


def _tma_aligned(x: torch.Tensor, w: torch.Tensor) -> bool:
    """x and w TMA-aligned, and w's experts stacked evenly to be viewed as [E * N, K]."""
    return tma_engine.aligned(x) and tma_engine.aligned(w) and w.stride(0) == w.shape[1] * w.stride(1)


def supported(dtype: torch.dtype) -> bool:
    """Whether experts_mlp takes this dtype (on a CUDA device): 16-bit floats."""
    return dtype in (torch.bfloat16, torch.float16)


def interleave(gate_up: torch.Tensor) -> torch.Tensor:
    """Experts' gate_up [E, 2 I, H] (gate rows, then up rows, as the reference and checkpoints hold them) with its
    rows interleaved, gate 0, up 0, gate 1, up 1, ...: the layout experts_mlp takes."""
    e, n, h = gate_up.shape
    return gate_up.view(e, 2, n // 2, h).transpose(1, 2).reshape(e, n, h)


def experts_mlp(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, offs: torch.Tensor,
                pad: int = 1) -> torch.Tensor:
    """reference.experts_mlp as two grouped GEMMs, over gate_up's rows interleaved (interleave): the first applies
    the activation to its fp32 sums before storing, so the [rows, 2 I] product is never written (measured 3-4 %
    faster than a separate silu_mul pass on an H100, BENCHMARKS.md #10). With pad > 1 its zero gap rows give zero
    activations, so down multiplies zeros there too."""
    return grouped_mm(grouped_mm(x, gate_up, offs, gated=True, pad=pad), down, offs, pad=pad)


def scratch_bytes(slots: int, hidden: int, intermediate: int, dtype: torch.dtype, programs: int) -> int:
    """What experts_mlp allocates over `slots` rows with the TMA kernel on `programs` SMs: the activation and output
    rows (gate_up's product is never written), and each grouped GEMM's split-K pieces and counts (a tile of fp32
    and an int32 a program; both GEMMs' at once at most)."""
    return (slots * (hidden + intermediate) * torch.empty((), dtype=dtype).element_size()
            + 2 * programs * (BLOCK_M * BLOCK_N * 4 + 4))


def grouped_mm(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor, out: torch.Tensor | None = None, *,
               block_m: int = BLOCK_M, block_n: int = BLOCK_N, block_k: int = 64, group_m: int = 8, num_warps: int = 8,
               num_stages: int | None = None, tma: bool | None = None, flatten: bool = True,
               gated: bool = False, split_k: int = 8, pad: int = 1) -> torch.Tensor:
    """x [M, K] sorted by expert, w [E, N, K], offs int32 [E] (expert e's rows end at offs[e] and start at offs[e - 1]
    rounded up to a multiple of pad; rows no expert holds are left untouched): out [M, N] in x's dtype, expert e's
    rows x[rows] @ w[e].T (fp32 sums). With pad > 1 (a multiple of block_m) the gap after an expert's rows is taken
    for its own (moe_route's zero rows): its last m-tile is stored whole, where unpadded the rows past the expert's
    end are the next one's, computed and masked off. Zero rows there draw less power than the next expert's data.
    The defaults measured best on an H100 at 512-2,048 tokens of Mixtral's shard; num_stages: 4 with TMA, else 3
    (the pointer kernel's tiles must also fit older GPUs' shared memory).

    tma: None picks the TMA kernel on CUDA devices of compute capability >= 9 when x and w are TMA-aligned, else
    the pointer kernel; True forces the TMA kernel (it also runs in Triton's interpreter) and raises ValueError if
    x or w is not TMA-aligned; False forces the pointer kernel. flatten: the TMA kernel's tile loop is flattened
    with its K loop into one software pipeline (num_stages deep); False pipelines the K loop alone.
    gated: w's rows are gate and up interleaved (interleave), and out [M, N / 2] gets silu(gate) * up.
    split_k (TMA kernel): a last round of fewer tiles than programs is cut into up to split_k runs of k-iterations,
    one a program, their fp32 sums added by the program that completes each tile (1: not cut; nor are tiles of
    fewer than SPLIT_MIN_K_ITERS k-iterations); it takes a scratch of a tile of fp32 a program. The TMA kernel is
    persistent over the SMs of the unit being issued (sm_share.current), else of the device."""
    m, k = x.shape
    e, n, wk = w.shape
    assert wk == k and offs.shape == (e,) and offs.dtype == torch.int32
    assert x.stride(1) == 1 and w.stride(2) == 1, "rows of x and of w must be contiguous"
    assert not gated or n % 2 == 0, "gated: gate and up rows in pairs"
    assert pad == 1 or pad % block_m == 0, "pad: a multiple of block_m"
    n_out = n // 2 if gated else n
    if out is None:
        out = x.new_empty(m, n_out)
    assert out.shape == (m, n_out) and out.dtype == x.dtype and out.stride(1) == 1
    if m == 0 or n == 0:
        return out
    if tma is None:
        tma = tma_engine.available(x) and _tma_aligned(x, w)
    elif tma and not _tma_aligned(x, w):
        raise ValueError("tma=True needs 16-byte-aligned x and w (base and row stride: K * itemsize a multiple of "
                         "16) and w stacked evenly as [E * N, K]")
    if num_stages is None:
        num_stages = 4 if tma else 3
    if triton.cdiv(k, block_k) < SPLIT_MIN_K_ITERS:
        split_k = 1
    meta = dict(E=e, BLOCK_E=triton.next_power_of_2(e), BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
                GROUP_M=group_m, GATED=gated, PAD=pad, num_warps=num_warps, num_stages=num_stages)
    tiles = (triton.cdiv(m, block_m) + e) * triton.cdiv(n, block_n)  # every tile there could be, by shapes alone
    if not tma:
        _grouped_mm_kernel[(tiles,)](x, w, out, offs, n, k, x.stride(0), w.stride(0), w.stride(1), out.stride(0),
                                     **meta)
        return out
    x_desc = TensorDescriptor(x, [m, k], [x.stride(0), 1], [block_m, block_k])
    w_desc = TensorDescriptor(w, [e * n, k], [w.stride(1), 1], [block_n, block_k])
    # Persistent: at most one program per SM of the unit's share, or of the device (a few in the interpreter, so
    # that each loops over several tiles). Programs past a share's SMs would wait for a whole first wave.
    device_programs = INTERPRETER_PROGRAMS if not x.is_cuda else sm_share.total_sms(
        x.device.index if x.device.index is not None else torch.cuda.current_device())
    programs = min(sm_share.current or device_programs, tiles)
    # Scratch from the caching allocator (a CUDA graph's pool when captured), per call: two kernels on two streams
    # never share it. The counts start at 0; the pieces need no zeros. Uncut, the kernel touches neither.
    parts, locks = out, offs
    if split_k > 1:
        parts = x.new_empty((programs, block_m * block_n), dtype=torch.float32)
        locks = torch.zeros(programs, dtype=torch.int32, device=x.device)
    _grouped_mm_tma_kernel[(programs,)](x_desc, w_desc, out, parts, locks, offs, n, k, out.stride(0), FLATTEN=flatten,
                                        MAX_SPLIT=split_k, SUM_ROWS=min(block_m, 32), **meta)
    return out


@triton.jit
def _live_rows(M, LIVE, FIRST):
    """How many of the M rows are real: all of them, or with LIVE (the batch's real row count, on the device) those
    before it, counted from this op's first row FIRST. A CUDA graph's padding rows come after the real ones."""
    if LIVE is None:
        live = M
    else:
        live = tl.minimum(tl.maximum(tl.load(LIVE) - FIRST, 0), M)
    return live


@triton.jit
def _route_rows(LOGITS, r0, M, stride_l, E: tl.constexpr, K: tl.constexpr, NORMALIZE: tl.constexpr,
                BLOCK_R: tl.constexpr, BLOCK_E: tl.constexpr):
    """Rows [r0, r0 + BLOCK_R): which k experts each picks (a [BLOCK_R, BLOCK_E] mask, none for rows past M) and
    their weights. Top-k as k rounds of the highest remaining probability, the lowest expert among equals. A row
    whose logits hold a NaN or an infinity still picks k experts, so that every pair gets a place."""
    rows = r0 + tl.arange(0, BLOCK_R)
    e = tl.arange(0, BLOCK_E)
    x = tl.load(LOGITS + rows[:, None] * stride_l + e[None, :], mask=(rows < M)[:, None] & (e < E)[None, :],
                other=0.0).to(tl.float32)
    x = tl.where((e < E)[None, :], x, float("-inf"))
    p = tl.exp(x - tl.max(x, 1)[:, None])
    p = p / tl.sum(p, 1)[:, None]
    left = tl.where((e < E)[None, :], tl.where(p == p, p, -0.5), -1.0)  # NaN: below every number, above the picked
    chosen = tl.zeros([BLOCK_R, BLOCK_E], dtype=tl.int1)
    for _ in tl.static_range(K):
        best = tl.max(left, 1)
        first = tl.min(tl.where(left == best[:, None], e[None, :], BLOCK_E), 1)
        pick = e[None, :] == first[:, None]
        chosen = chosen | pick
        left = tl.where(pick, -1.0, left)
    w = tl.where(chosen, p, 0.0)
    if NORMALIZE:
        w = w / tl.sum(w, 1)[:, None]
    return rows, chosen & (rows < M)[:, None], w


@triton.jit
def _route_count_kernel(LOGITS, COUNTS, M, LIVE, FIRST, stride_l, E: tl.constexpr, K: tl.constexpr,
                        BLOCK_R: tl.constexpr, BLOCK_E: tl.constexpr):
    """Each block of rows: how many of its pairs go to each expert."""
    pid = tl.program_id(0)
    live = _live_rows(M, LIVE, FIRST)
    _, chosen, _ = _route_rows(LOGITS, pid * BLOCK_R, live, stride_l, E, K, False, BLOCK_R, BLOCK_E)
    tl.store(COUNTS + pid * BLOCK_E + tl.arange(0, BLOCK_E), tl.sum(chosen.to(tl.int32), 0))


@triton.jit
def _route_place_kernel(LOGITS, COUNTS, ROWS, WHERE, WEIGHTS, OFFS, M, LIVE, FIRST, stride_l, E: tl.constexpr,
                        K: tl.constexpr, NORMALIZE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_E: tl.constexpr,
                        BLOCK_B: tl.constexpr, PAD: tl.constexpr):
    """Each block of rows places its pairs: an expert's pairs begin where the earlier experts' end, rounded up to
    a multiple of PAD, and within it after the pairs of earlier blocks and of earlier rows in this block. With LIVE,
    the padding rows place none, and their places are 0 with weight 0, so that the combine stays in bounds."""
    pid = tl.program_id(0)
    live = _live_rows(M, LIVE, FIRST)
    b = tl.arange(0, BLOCK_B)
    e = tl.arange(0, BLOCK_E)
    counts = tl.load(COUNTS + b[:, None] * BLOCK_E + e[None, :], mask=(b < tl.num_programs(0))[:, None], other=0)
    totals = tl.sum(counts, 0)
    padded = tl.cdiv(totals, PAD) * PAD
    firsts = tl.cumsum(padded, 0) - padded  # each expert's first slot
    if pid == 0:
        tl.store(OFFS + e, firsts + totals, mask=e < E)
    start = firsts + tl.sum(tl.where((b < pid)[:, None], counts, 0), 0)
    rows, chosen, w = _route_rows(LOGITS, pid * BLOCK_R, live, stride_l, E, K, NORMALIZE, BLOCK_R, BLOCK_E)
    c = chosen.to(tl.int32)
    place = start[None, :] + tl.cumsum(c, 0) - c
    j = tl.cumsum(c, 1) - 1  # the pair's index in its row: the row's experts in increasing order
    row_2d = tl.broadcast_to(rows[:, None], [BLOCK_R, BLOCK_E])
    tl.store(ROWS + place, row_2d.to(tl.int64), mask=chosen)
    tl.store(WHERE + row_2d * K + j, place.to(tl.int64), mask=chosen)
    tl.store(WEIGHTS + row_2d * K + j, w, mask=chosen)
    if LIVE is not None:
        padding = (rows >= live) & (rows < M)
        for i in tl.static_range(K):
            tl.store(WHERE + rows * K + i, tl.zeros([BLOCK_R], dtype=tl.int64), mask=padding)
            tl.store(WEIGHTS + rows * K + i, tl.zeros([BLOCK_R], dtype=tl.float32), mask=padding)


def route(logits: torch.Tensor, k: int, normalize: bool, live: torch.Tensor | None = None, first: int = 0,
          pad: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """reference.moe_route in two Triton kernels over blocks of rows (no host sync: a CUDA graph captures them).
    Ties in the top-k go to the lower expert (torch.topk leaves them unspecified)."""
    m, e = logits.shape
    assert logits.stride(1) == 1 and 0 < k <= e
    rows = torch.full((reference.moe_slots(m, k, e, pad),), -1, dtype=torch.int64, device=logits.device)
    where = torch.empty(m, k, dtype=torch.int64, device=logits.device)
    weights = torch.empty(m, k, dtype=torch.float32, device=logits.device)
    offs = torch.zeros(e, dtype=torch.int32, device=logits.device)
    if m == 0:
        return rows, where, weights, offs
    block_e = triton.next_power_of_2(e)
    # ~512 (row, expert) cells a block, in at most 64 blocks: every place program loads all blocks' counts
    block_r = max(16, 512 // block_e, triton.next_power_of_2(triton.cdiv(m, 64)))
    blocks = triton.cdiv(m, block_r)
    counts = torch.empty(blocks, block_e, dtype=torch.int32, device=logits.device)
    meta = dict(E=e, K=k, BLOCK_R=block_r, BLOCK_E=block_e, num_warps=4)
    _route_count_kernel[(blocks,)](logits, counts, m, live, first, logits.stride(0), **meta)
    _route_place_kernel[(blocks,)](logits, counts, rows, where, weights, offs, m, live, first, logits.stride(0),
                                   NORMALIZE=normalize, BLOCK_B=triton.next_power_of_2(blocks), PAD=pad, **meta)
    return rows, where, weights, offs
