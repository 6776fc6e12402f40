"""Paged attention in Triton: decode (stream-K over the batch's KV tiles, then a combine step) and chunked prefill
(flash style).

Decode has two kernels over the same stream-K plan, sharing how a unit opens and closes and the combine step:
- the page kernel (Hopper and later, pages of 16+ tokens): a tile is one page, fetched by TMA through a 4-D
  descriptor of the cache; its unit, page and span come from flat tables indexed by the tile alone, so Triton's
  pipeliner keeps pages in flight per program (on 32 H100 SMs 1.5x the gather kernel's bandwidth).
  A unit may hold several adjacent KV heads (kv_heads), whose page rows then make one tile;
- the gather kernel, the fallback (older GPUs, small pages): tiles of block_n tokens gathered through pointers.

Both read every shape they need from `AttentionMeta` device tensors, with grids fixed by their arguments and the
metadata's capacity, so they replay inside CUDA graphs whatever the batch holds. Grouped-query attention: a program
serves all query heads of one KV head, so each KV tile is read once for them.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from nanoflow.kernels import tma
from nanoflow.models.batch import AttentionMeta


@triton.jit
def _load_kv_tile(K, V, BT, s, kvh, n0, limit, stride_kb, stride_ks, stride_kh, stride_bt, offs_d,
                  PAGE: tl.constexpr, BLOCK_N: tl.constexpr):
    """Keys and values of positions [n0, n0 + BLOCK_N) of sequence s (up to limit), through its pages."""
    offs_n = n0 + tl.arange(0, BLOCK_N)
    valid = offs_n < limit
    page = tl.load(BT + s * stride_bt + offs_n // PAGE, mask=valid, other=0)
    kv_off = page[:, None] * stride_kb + (offs_n % PAGE)[:, None] * stride_ks + kvh * stride_kh + offs_d[None, :]
    k = tl.load(K + kv_off, mask=valid[:, None], other=0.0)
    v = tl.load(V + kv_off, mask=valid[:, None], other=0.0)
    return offs_n, valid, k, v


@triton.jit
def _softmax_step(scores, v, m, l, acc, KEYS_AXIS: tl.constexpr = 1):
    """Fold one tile of scores (-inf where excluded) and its values into the online softmax. The keys run along
    KEYS_AXIS of scores: 1 (query rows x keys; acc [rows, D]) or 0 (keys x query rows; acc [D, rows])."""
    m_new = tl.maximum(m, tl.max(scores, KEYS_AXIS))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with nothing allowed yet
    p = tl.exp(scores - tl.expand_dims(m_safe, KEYS_AXIS))
    alpha = tl.exp(m - m_safe)
    l = l * alpha + tl.sum(p, KEYS_AXIS)
    if KEYS_AXIS == 1:
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    else:
        acc = acc * alpha[None, :] + tl.dot(tl.trans(v), p.to(v.dtype))
    return m_new, l, acc


@triton.jit
def _decode_tile(TILE_UNIT, UNIT_START, SEQ_LENS, Q_START, BT, g, stride_bt, window, NUM_KV: tl.constexpr,
                 PAGE: tl.constexpr, BLOCK_N: tl.constexpr, HAS_WINDOW: tl.constexpr):
    """Where global tile g is: its unit (sequence s, KV head), its index t in the unit and the unit's tile count,
    its query row, the sequence's KV end, its token positions and their pages."""
    u = tl.load(TILE_UNIT + g)
    s = u // NUM_KV
    seq_len = tl.load(SEQ_LENS + s)
    lo = 0
    if HAS_WINDOW:
        lo = tl.maximum(seq_len - window, 0)
    t = g - tl.load(UNIT_START + u)
    offs_n = lo + t * BLOCK_N + tl.arange(0, BLOCK_N)
    page = tl.load(BT + s * stride_bt + offs_n // PAGE, mask=offs_n < seq_len, other=0)
    return u, s, t, tl.cdiv(seq_len - lo, BLOCK_N), tl.load(Q_START + s), seq_len, offs_n, page


@triton.jit
def _fresh_softmax(BLOCK_G: tl.constexpr, D: tl.constexpr):
    """An online softmax with nothing folded in: running max, sum and accumulator."""
    return tl.full([BLOCK_G], float("-inf"), tl.float32), tl.zeros([BLOCK_G], tl.float32), \
        tl.zeros([BLOCK_G, D], tl.float32)


@triton.jit
def _program_start(CHUNK, NUM_TILES, BLOCK_G: tl.constexpr, D: tl.constexpr, DOT: tl.constexpr):
    """This program's run of the batch's tiles (the tiles per program, its first and last), and an empty state:
    queries and a fresh online softmax."""
    chunk = tl.load(CHUNK)
    first_g = tl.program_id(0) * chunk
    m, l, acc = _fresh_softmax(BLOCK_G, D)
    return chunk, first_g, tl.minimum(first_g + chunk, tl.load(NUM_TILES)) - 1, tl.zeros([BLOCK_G, D], DOT), m, l, acc


@triton.jit
def _open_unit(Q, row, heads, offs_g, offs_d, stride_qt, stride_qh, G: tl.constexpr, BLOCK_G: tl.constexpr,
               D: tl.constexpr, DOT: tl.constexpr):
    """A new unit: its queries, and a fresh online softmax."""
    q = tl.load(Q + row * stride_qt + heads[:, None] * stride_qh + offs_d[None, :],
                mask=offs_g[:, None] < G, other=0.0).to(DOT)
    m, l, acc = _fresh_softmax(BLOCK_G, D)
    return q, m, l, acc


@triton.jit
def _close_unit(OUT, PART_O, PART_LSE, acc, m, l, row, s, heads, offs_g, offs_d, whole, part, stride_ot, stride_oh,
                stride_po_s, stride_po_h, stride_po_p, stride_pl_s, stride_pl_h, G: tl.constexpr,
                HEADS_AXIS: tl.constexpr = 0):
    """A unit's last tile in this program: the output itself if the whole unit was here, else this program's part
    (its normalized output and log-sum-exp, for the combine kernel). The query heads run along HEADS_AXIS of acc:
    0 ([heads, D]) or 1 ([D, heads])."""
    o = acc / tl.expand_dims(l, 1 - HEADS_AXIS)
    h = tl.expand_dims(heads, 1 - HEADS_AXIS)
    d = tl.expand_dims(offs_d, HEADS_AXIS)
    keep = tl.expand_dims(offs_g < G, 1 - HEADS_AXIS)
    if whole:
        tl.store(OUT + row * stride_ot + h * stride_oh + d, o.to(OUT.dtype.element_ty), mask=keep)
    else:
        tl.store(PART_O + s * stride_po_s + h * stride_po_h + part * stride_po_p + d, o, mask=keep)
        tl.store(PART_LSE + s * stride_pl_s + heads * stride_pl_h + part, m + tl.log(l), mask=offs_g < G)


@triton.jit
def _decode_kernel(Q, K, V, OUT, BT, Q_START, SEQ_LENS, TILE_UNIT, UNIT_START, NUM_TILES, CHUNK, PART_O, PART_LSE,
                   stride_qt, stride_qh, stride_ot, stride_oh, stride_kb, stride_ks, stride_kh, stride_bt,
                   stride_po_s, stride_po_h, stride_po_p, stride_pl_s, stride_pl_h, scale, window,
                   NUM_KV: tl.constexpr, G: tl.constexpr, BLOCK_G: tl.constexpr, D: tl.constexpr,
                   PAGE: tl.constexpr, BLOCK_N: tl.constexpr, HAS_WINDOW: tl.constexpr, DOT: tl.constexpr):
    """The gather kernel. A persistent program: the KV tiles [pid * CHUNK, (pid + 1) * CHUNK) of the batch's tiles,
    units (sequence, KV head) one after another, each of its sequence's tiles in order, as ONE flat loop
    (stream-K: every program gets the same number of tiles, none of them empty). Where tile g + 1 is (its pages
    included) is loaded during tile g: with the page loads of a tile inside its own iteration, Triton's pipeliner
    keeps a single K/V buffer (measured: 45 KB of shared memory at any depth, ~40 GB/s per SM)."""
    pid = tl.program_id(0)
    chunk, first_g, last_g, q, m, l, acc = _program_start(CHUNK, NUM_TILES, BLOCK_G, D, DOT)
    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, D)
    u, s, t, tiles, row, seq_len, offs_n, page = _decode_tile(
        TILE_UNIT, UNIT_START, SEQ_LENS, Q_START, BT, tl.maximum(tl.minimum(first_g, last_g), 0), stride_bt, window,
        NUM_KV, PAGE, BLOCK_N, HAS_WINDOW)
    for g in tl.range(first_g, last_g + 1):
        kvh = u % NUM_KV
        valid = offs_n < seq_len
        kv_off = page[:, None] * stride_kb + (offs_n % PAGE)[:, None] * stride_ks + kvh * stride_kh + offs_d[None, :]
        k = tl.load(K + kv_off, mask=valid[:, None], other=0.0).to(DOT)
        v = tl.load(V + kv_off, mask=valid[:, None], other=0.0).to(DOT)
        heads = kvh * G + offs_g
        if (t == 0) | (g == first_g):
            q, m, l, acc = _open_unit(Q, row, heads, offs_g, offs_d, stride_qt, stride_qh, G, BLOCK_G, D, DOT)
        scores = tl.where(valid[None, :], tl.dot(q, tl.trans(k)) * scale, float("-inf"))
        m, l, acc = _softmax_step(scores, v, m, l, acc)
        if (t == tiles - 1) | (g == last_g):
            unit_first = g - t
            _close_unit(OUT, PART_O, PART_LSE, acc, m, l, row, s, heads, offs_g, offs_d,
                        (unit_first >= first_g) & (t == tiles - 1), pid - unit_first // chunk, stride_ot,
                        stride_oh, stride_po_s, stride_po_h, stride_po_p, stride_pl_s, stride_pl_h, G)
        u, s, t, tiles, row, seq_len, offs_n, page = _decode_tile(
            TILE_UNIT, UNIT_START, SEQ_LENS, Q_START, BT, tl.minimum(g + 1, last_g), stride_bt, window, NUM_KV,
            PAGE, BLOCK_N, HAS_WINDOW)


@triton.jit
def _decode_page_kernel(Q, k_desc, v_desc, OUT, Q_START, TILE_UNIT, TILE_PAGE, TILE_SPAN, UNIT_START, NUM_TILES,
                        CHUNK, PART_O, PART_LSE, stride_qt, stride_qh, stride_ot, stride_oh,
                        stride_po_s, stride_po_h, stride_po_p, stride_pl_s, stride_pl_h, scale,
                        NUM_KV: tl.constexpr, G: tl.constexpr, BLOCK_G: tl.constexpr, D: tl.constexpr,
                        PAGE: tl.constexpr, DOT: tl.constexpr, STAGES: tl.constexpr, HEADS: tl.constexpr,
                        GROUP: tl.constexpr, KEYS_AXIS: tl.constexpr):
    """The page kernel: the gather kernel's stream-K plan with one page per tile, fetched by TMA. Everything an
    iteration needs to fetch its page comes from tables indexed by the tile, so the loop's loads depend on the
    loop index alone and the pipeliner prefetches them (a tile's unit, page, and span: the first and
    last valid positions in the page and whether it opens or closes its unit). The tables and the pages they
    point to are two levels of loads, which share the STAGES: Triton 3.6 keeps max(1, (STAGES - 1) // 2) pages of
    K and V in flight (2 at 6 stages, 3 at 8), in that many shared-memory buffers.

    A unit holds HEADS adjacent KV heads (NUM_KV units a sequence, G = HEADS x GROUP query heads): a tile is their
    PAGE x HEADS rows of the page (row j: position j // HEADS, head j % HEADS), and a query row attends only to
    its own head's rows. The dots then fill more of the MMA's rows and each tile carries HEADS times the bytes,
    for the same loop and softmax work a tile.

    KEYS_AXIS 0 runs the dots transposed, for query blocks under the MMA's 16 rows: scores keys x query heads
    (K q^T) and the accumulator D x query heads (V^T P^T), so the few query heads are the MMA's N (8 wide), not
    its M (16). At 4 heads that is half the MMAs and a quarter of the accumulator (168 registers against 199; on 32
    H100 SMs 1.04-1.05x the bandwidth, BENCHMARKS.md #4). KEYS_AXIS 1 (16 or more query rows, which fill M):
    scores query heads x keys, the accumulator query heads x D."""
    pid = tl.program_id(0)
    chunk, first_g, last_g, q, m, l, acc = _program_start(CHUNK, NUM_TILES, BLOCK_G, D, DOT)
    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, D)
    offs_n = tl.arange(0, PAGE * HEADS)
    own_head = tl.expand_dims(offs_n % HEADS, 1 - KEYS_AXIS) == tl.expand_dims(offs_g // GROUP, KEYS_AXIS)
    unit_first = first_g
    row = first_g
    if KEYS_AXIS == 0:
        q = tl.trans(q)
        acc = tl.trans(acc)
    for g in tl.range(first_g, last_g + 1, num_stages=STAGES):
        u = tl.load(TILE_UNIT + g)
        page = tl.load(TILE_PAGE + g)
        span = tl.load(TILE_SPAN + g)
        kvh = u % NUM_KV
        s = u // NUM_KV
        k = k_desc.load([page, 0, kvh * HEADS, 0]).reshape(PAGE * HEADS, D).to(DOT)
        v = v_desc.load([page, 0, kvh * HEADS, 0]).reshape(PAGE * HEADS, D).to(DOT)
        heads = kvh * G + offs_g
        opens = ((span >> 1) & 1) == 1
        if opens | (g == first_g):  # the unit's query row and first tile kept, so that closing it waits on no load
            row = tl.load(Q_START + s)
            q, m, l, acc = _open_unit(Q, row, heads, offs_g, offs_d, stride_qt, stride_qh, G, BLOCK_G, D, DOT)
            if KEYS_AXIS == 0:
                q = tl.trans(q)
                acc = tl.trans(acc)
            if opens:
                unit_first = g
            else:  # a unit that an earlier program began: once per program
                unit_first = tl.load(UNIT_START + u)
        pos = offs_n // HEADS
        allowed = tl.expand_dims((pos >= (span >> 16)) & (pos < ((span >> 2) & 0x3FFF)), 1 - KEYS_AXIS)
        if HEADS > 1:  # (compiled in only then: one head a unit runs the kernel as it was)
            allowed = allowed & own_head
        if KEYS_AXIS == 0:
            scores = tl.dot(k, q)
        else:
            scores = tl.dot(q, tl.trans(k))
        scores = tl.where(allowed, scores * scale, float("-inf"))
        m, l, acc = _softmax_step(scores, v, m, l, acc, KEYS_AXIS)
        if ((span & 1) == 1) | (g == last_g):
            _close_unit(OUT, PART_O, PART_LSE, acc, m, l, row, s, heads, offs_g, offs_d,
                        (unit_first >= first_g) & ((span & 1) == 1), pid - unit_first // chunk, stride_ot,
                        stride_oh, stride_po_s, stride_po_h, stride_po_p, stride_pl_s, stride_pl_h, G, 1 - KEYS_AXIS)


@triton.jit
def _decode_combine_kernel(PART_O, PART_LSE, OUT, Q_START, TILE_UNIT, UNIT_START, UNIT_TILES, NUM_TILES, CHUNK,
                           stride_ot, stride_oh, stride_po_s, stride_po_h, stride_po_p, stride_pl_s, stride_pl_h,
                           NUM_KV: tl.constexpr, G: tl.constexpr, D: tl.constexpr, MAX_PARTS: tl.constexpr):
    """Merge by log-sum-exp the parts of the units the decode kernel's programs cut. Only a unit crossed by a
    boundary between two programs' runs is cut, so there is one combine program per boundary: program p takes
    the unit holding tile p * chunk if that is the first boundary inside it (one grid of `programs`, not one
    program per sequence and head of the capacity, nearly all of which would have nothing to merge)."""
    p = tl.program_id(0)
    chunk = tl.load(CHUNK)
    if (p == 0) | (p * chunk >= tl.load(NUM_TILES)):
        return
    u = tl.load(TILE_UNIT + p * chunk)
    unit_first = tl.load(UNIT_START + u)
    if unit_first // chunk != p - 1:  # the unit starts at this boundary, or an earlier boundary cut it
        return
    used = (unit_first + tl.load(UNIT_TILES + u) - 1) // chunk - unit_first // chunk + 1
    s = u // NUM_KV
    row = tl.load(Q_START + s)
    offs_p = tl.arange(0, MAX_PARTS)
    offs_d = tl.arange(0, D)
    for i in tl.static_range(G):
        h = (u % NUM_KV) * G + i
        lse = tl.load(PART_LSE + s * stride_pl_s + h * stride_pl_h + offs_p, mask=offs_p < used,
                      other=float("-inf"))
        w = tl.exp(lse - tl.max(lse, 0))
        o = tl.load(PART_O + s * stride_po_s + h * stride_po_h + offs_p[:, None] * stride_po_p + offs_d[None, :],
                    mask=(offs_p < used)[:, None], other=0.0)
        out = tl.sum(o * w[:, None], 0) / tl.sum(w, 0)
        tl.store(OUT + row * stride_ot + h * stride_oh + offs_d, out.to(OUT.dtype.element_ty))


def _dot_dtype(q: torch.Tensor, k_cache: torch.Tensor):
    """The dtype the attention dots run in: the queries' own, but fp16 over an fp8 cache. e4m3 widens to fp16
    exactly and in one instruction per pair (to bf16 it takes several: bf16 dots over fp8 measured 3.3x slower per
    byte on 32 H100 SMs), and fp16 holds any query a model makes (up to 65,504)."""
    if k_cache.element_size() == 1:
        return tl.float16
    return getattr(tl, str(q.dtype).removeprefix("torch."))


def _stream_k(tiles: torch.Tensor, num_kv: int, programs: int, min_chunk: int):
    """Stream-K's plan from each sequence's tile count: each unit's first tile and tile count, the batch's tile
    count and the tiles per program. Device ops only, so a CUDA graph recomputes them from the metadata it
    replays with."""
    unit_tiles = tiles.int().repeat_interleave(num_kv)
    unit_end = unit_tiles.cumsum(0, dtype=torch.int32)
    total = unit_end[-1:]
    return unit_end - unit_tiles, unit_tiles, total, ((total + programs - 1) // programs).clamp(min=min_chunk)


def _gather_tiles(meta: AttentionMeta, num_kv: int, block_n: int, max_tiles: int, window: int | None,
                  programs: int, min_chunk: int):
    """The gather kernel's plan: tiles of block_n tokens from the window's start, and each tile's unit (a table
    of capacity x KV heads x max_tiles rows: int32 throughout)."""
    key = ("decode_tiles", num_kv, block_n, programs, min_chunk)
    if key not in meta.derived:
        kv = meta.seq_lens
        if window is not None:
            kv = kv.clamp(max=window)
        unit_start, unit_tiles, total, chunk = _stream_k((kv + block_n - 1) // block_n, num_kv, programs, min_chunk)
        ids = torch.arange(meta.capacity * num_kv * max_tiles, dtype=torch.int32, device=kv.device)
        tile_unit = torch.searchsorted(unit_start + unit_tiles, ids, right=True, out_int32=True)
        meta.derived[key] = (tile_unit.clamp_(max=unit_tiles.shape[0] - 1), unit_start, unit_tiles, total, chunk)
    return meta.derived[key]


@triton.jit
def _page_plan_kernel(SEQ_LENS, BT, UNIT_START, TILE_UNIT, TILE_PAGE, TILE_SPAN, stride_bt, window,
                      NUM_KV: tl.constexpr, PAGE: tl.constexpr, BLOCK: tl.constexpr, HAS_WINDOW: tl.constexpr):
    """One unit's rows of the page kernel's tables: per tile, its unit, its page, and its span (start << 16 |
    stop << 2 | opens << 1 | closes: positions [start, stop) of the page are attended)."""
    u = tl.program_id(0)
    s = u // NUM_KV
    seq_len = tl.load(SEQ_LENS + s)
    lo = 0
    if HAS_WINDOW:
        lo = tl.maximum(seq_len - window, 0)
    first_page = lo // PAGE
    tiles = tl.cdiv(seq_len, PAGE) - first_page
    start = tl.load(UNIT_START + u)
    for t0 in range(0, tiles, BLOCK):
        t = t0 + tl.arange(0, BLOCK)
        keep = t < tiles
        begin = (first_page + t) * PAGE
        span = (tl.maximum(lo - begin, 0) << 16 | tl.minimum(seq_len - begin, PAGE) << 2
                | (t == 0).to(tl.int32) << 1 | (t == tiles - 1).to(tl.int32))
        tl.store(TILE_UNIT + start + t, u, mask=keep)
        tl.store(TILE_PAGE + start + t, tl.load(BT + s * stride_bt + first_page + t, mask=keep), mask=keep)
        tl.store(TILE_SPAN + start + t, span, mask=keep)


def _page_tiles(meta: AttentionMeta, num_kv: int, page: int, window: int | None, programs: int, min_chunk: int):
    """The page kernel's plan: tiles of one page from the page holding the window's start. The tables have a row
    per possible tile (capacity x KV heads x the block tables' width); a unit's rows are written by one program
    of _page_plan_kernel, the rows past the batch's tiles are left unwritten (no program reads them). That is 12
    bytes x capacity x KV heads x max_model_len / page (100 MB at 1,024 sequences, 4 KV heads and 32 k tokens), a
    static bound because sequences that share a prefix share its blocks but each holds its own tiles."""
    key = ("decode_pages", num_kv, programs, min_chunk)
    if key not in meta.derived:
        kv = meta.seq_lens
        first_page = (kv - window).clamp(min=0) // page if window is not None else 0
        unit_start, unit_tiles, total, chunk = _stream_k((kv + page - 1) // page - first_page, num_kv, programs,
                                                         min_chunk)
        units, width = unit_tiles.shape[0], meta.block_tables.shape[1]
        tile_unit, tile_page, span = torch.empty(3, units * width, dtype=torch.int32, device=kv.device)
        _page_plan_kernel[(units,)](kv, meta.block_tables, unit_start, tile_unit, tile_page, span,
                                    meta.block_tables.stride(0), window or 0, NUM_KV=num_kv, PAGE=page, BLOCK=256,
                                    HAS_WINDOW=window is not None, num_warps=2)
        meta.derived[key] = (tile_unit, tile_page, span, unit_start, unit_tiles, total, chunk)
    return meta.derived[key]


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMeta,
                     scale: float, out: torch.Tensor, sliding_window: int | None = None, block_n: int = 64,
                     num_warps: int | None = None, num_stages: int | None = None, programs: int = 8,
                     max_parts: int = 16, block_g: int | None = None, pages: bool | None = None,
                     kv_heads: int = 1) -> None:
    """q, out [T, Hq, D] (rows picked by meta); caches [blocks, page, Hkv, D].

    A unit of work is one sequence's KV for one KV head, or for kv_heads adjacent ones (their query heads served
    together: GQA), cut into tiles; `programs` persistent programs take equal runs of the batch's tiles (on an
    execution unit of S SMs, a few programs per SM keep every SM streaming with no tail). A unit cut across
    programs leaves a part in each (at most max_parts: a program takes at least enough tiles for that), which a
    second kernel merges by log-sum-exp (flash-decoding).

    pages: None takes the page kernel (a tile is a page, fetched by TMA; about num_stages / 2 in flight) where it
    runs: a CUDA device of compute capability >= 9, TMA-aligned caches and pages of 16 to 256 tokens (a power of
    2); True forces it (it also runs in Triton's interpreter) and raises ValueError where it cannot; False takes
    the gather kernel (tiles of block_n tokens). num_warps and num_stages default to what measured best for the
    kernel taken (BENCHMARKS.md, #4): 1 warp and 6 pipeline stages; 2 warps and 2 stages. (With the transposed
    dots, 8 stages read 3.5-6 % more over 16-bit caches on 32 H100 SMs but 2-6 % less on 32 H200 SMs; over fp8
    they move it by under 2 % either way: no one depth wins both cards.)

    kv_heads: the page kernel's KV heads per unit (a divisor of the cache's KV heads; the gather kernel takes 1):
    a tile is a page of that many heads, attended by all their query heads at once.

    block_g: the rows of a program's query block (its unit's query heads, padded). None: at least 16, the
    MMA's rows; a smaller power of 2 >= the unit's query heads is accepted by Triton 3.6 (it pads a small dot
    itself) and leaves less softmax and accumulator work per tile (sm_curves.py compares the two)."""
    num_heads, d = q.shape[1], q.shape[2]
    num_kv, page = k_cache.shape[2], k_cache.shape[1]
    g = num_heads // num_kv
    cap = meta.capacity
    if max_parts < 4 or max_parts & (max_parts - 1):
        raise ValueError(f"max_parts {max_parts} must be a power of 2, at least 4")
    if kv_heads < 1 or num_kv % kv_heads:
        raise ValueError(f"kv_heads {kv_heads} must divide the cache's {num_kv} KV heads")
    if block_g is None:
        block_g = max(16, triton.next_power_of_2(g * kv_heads))
    elif block_g < g * kv_heads or block_g & (block_g - 1):
        raise ValueError(f"block_g {block_g} must be a power of 2, at least the {g * kv_heads} query heads of a "
                         f"unit ({kv_heads} KV heads of {g})")
    page_ok = 16 <= page <= 256 and page & (page - 1) == 0 and tma.aligned(k_cache) and tma.aligned(v_cache)
    if pages is None:
        pages = page_ok and tma.available(k_cache)
    elif pages and not page_ok:
        raise ValueError(f"the page kernel needs pages of 16 to 256 tokens (a power of 2; here {page}) and "
                         "TMA-aligned caches (16-byte base and strides)")
    if kv_heads > 1 and not pages:
        raise ValueError(f"kv_heads {kv_heads}: only the page kernel serves several KV heads a unit")
    parts = meta.derived.get(("decode_parts", max_parts))
    if parts is None:
        parts = (torch.empty(cap, num_heads, max_parts, d, dtype=torch.float32, device=q.device),
                 torch.empty(cap, num_heads, max_parts, dtype=torch.float32, device=q.device))
        meta.derived[("decode_parts", max_parts)] = parts
    part_o, part_lse = parts
    assert q.stride(2) == 1 and k_cache.stride(3) == 1 and out.stride(2) == 1
    num_warps = num_warps or (1 if pages else 2)
    num_stages = num_stages or (6 if pages else 2)
    units_kv = num_kv // kv_heads  # units a sequence
    common = dict(NUM_KV=units_kv, G=g * kv_heads, BLOCK_G=block_g, D=d, PAGE=page, DOT=_dot_dtype(q, k_cache),
                  num_warps=num_warps)
    strides = (q.stride(0), q.stride(1), out.stride(0), out.stride(1), part_o.stride(0), part_o.stride(1),
               part_o.stride(2), part_lse.stride(0), part_lse.stride(1))
    if pages:
        # a unit of n tiles meets at most (n - 1) // chunk + 2 programs
        min_chunk = max(1, triton.cdiv(meta.block_tables.shape[1] - 1, max_parts - 2))
        tile_unit, tile_page, span, unit_start, unit_tiles, num_tiles, chunk = _page_tiles(
            meta, units_kv, page, sliding_window, programs, min_chunk)
        box = [1, page, kv_heads, d]
        _decode_page_kernel[(programs,)](
            q, TensorDescriptor(k_cache, list(k_cache.shape), list(k_cache.stride()), box),
            TensorDescriptor(v_cache, list(v_cache.shape), list(v_cache.stride()), box), out, meta.q_start,
            tile_unit, tile_page, span, unit_start, num_tiles, chunk, part_o, part_lse, *strides, scale,
            STAGES=num_stages, HEADS=kv_heads, GROUP=g, KEYS_AXIS=0 if block_g < 16 else 1, **common)
    else:
        max_tiles = triton.cdiv(meta.block_tables.shape[1] * page, block_n)
        min_chunk = max(1, triton.cdiv(max_tiles - 1, max_parts - 2))
        tile_unit, unit_start, unit_tiles, num_tiles, chunk = _gather_tiles(
            meta, num_kv, block_n, max_tiles, sliding_window, programs, min_chunk)
        _decode_kernel[(programs,)](
            q, k_cache, v_cache, out, meta.block_tables, meta.q_start, meta.seq_lens, tile_unit, unit_start,
            num_tiles, chunk, part_o, part_lse, *strides[:4], k_cache.stride(0), k_cache.stride(1),
            k_cache.stride(2), meta.block_tables.stride(0), *strides[4:], scale, sliding_window or 0,
            BLOCK_N=block_n, HAS_WINDOW=sliding_window is not None, num_stages=num_stages, **common)
    _decode_combine_kernel[(programs,)](
        part_o, part_lse, out, meta.q_start, tile_unit, unit_start, unit_tiles, num_tiles, chunk, *strides[2:],
        NUM_KV=units_kv, G=g * kv_heads, D=d, MAX_PARTS=max_parts, num_warps=4)


@triton.jit
def _prefill_step(q, K, V, BT, s, kvh, n0, hi, pos_q, window, scale, m, l, acc, stride_kb, stride_ks, stride_kh,
                  stride_bt, offs_d, PAGE: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr,
                  HAS_WINDOW: tl.constexpr, DOT: tl.constexpr):
    """Fold key tile [n0, n0 + BLOCK_N) into the online softmax of the tile's query rows (at positions pos_q);
    MASKED: with the causal (and window) mask, else every key allowed for every row."""
    offs_n, valid, k, v = _load_kv_tile(K, V, BT, s, kvh, n0, hi, stride_kb, stride_ks, stride_kh, stride_bt, offs_d,
                                        PAGE, BLOCK_N)
    scores = tl.dot(q, tl.trans(k.to(DOT))) * scale
    if MASKED:
        allowed = valid[None, :] & (offs_n[None, :] <= pos_q[:, None])
        if HAS_WINDOW:
            allowed = allowed & (pos_q[:, None] - offs_n[None, :] < window)
        scores = tl.where(allowed, scores, float("-inf"))
    return _softmax_step(scores, v.to(DOT), m, l, acc)


@triton.jit
def _prefill_kernel(Q, K, V, OUT, BT, Q_START, Q_LEN, SEQ_LENS, TILE_SEQ, TILE_Q,
                    stride_qt, stride_qh, stride_ot, stride_oh, stride_kb, stride_ks, stride_kh, stride_bt,
                    scale, window,
                    G: tl.constexpr, G_PAD: tl.constexpr, BLOCK_Q: tl.constexpr, D: tl.constexpr,
                    PAGE: tl.constexpr, BLOCK_N: tl.constexpr, HAS_WINDOW: tl.constexpr, DOT: tl.constexpr,
                    NUM_KV: tl.constexpr):
    # One program per (tile, KV head), the KV head fastest and the tiles taken last to first: programs launch in
    # that order, so each sequence's later query tiles, which have the most keys, start first and the short ones
    # fill the tail.
    kvh = tl.program_id(0) % NUM_KV
    tile = tl.num_programs(0) // NUM_KV - 1 - tl.program_id(0) // NUM_KV
    s = tl.load(TILE_SEQ + tile)
    if s < 0:  # no work for this tile
        return
    q0 = tl.load(TILE_Q + tile)
    q_start = tl.load(Q_START + s)
    q_len = tl.load(Q_LEN + s)
    seq_len = tl.load(SEQ_LENS + s)
    offs_m = tl.arange(0, BLOCK_Q * G_PAD)  # (query row, head in group) flattened
    r = q0 + offs_m // G_PAD
    g = offs_m % G_PAD
    row_ok = (r < q_len) & (g < G)
    head = kvh * G + g
    offs_d = tl.arange(0, D)
    q = tl.load(Q + (q_start + r)[:, None] * stride_qt + head[:, None] * stride_qh + offs_d[None, :],
                mask=row_ok[:, None], other=0.0).to(DOT)
    pos_q = seq_len - q_len + r
    pos_first = seq_len - q_len + q0  # the tile's first row's position
    hi = tl.minimum(pos_first + BLOCK_Q, seq_len)  # causal limit of the tile's last row
    lo = 0
    unmasked_from = 0
    if HAS_WINDOW:
        lo = tl.maximum(pos_first - window + 1, 0) // BLOCK_N * BLOCK_N  # the first row's window
        unmasked_from = tl.cdiv(tl.maximum(hi - window, 0), BLOCK_N) * BLOCK_N  # inside the last row's window
    # Whole key tiles inside every row's window and at or before the first row's position are allowed for every
    # row: they need no mask. Only the tiles at the window's start and across the diagonal are masked.
    masked_from = tl.maximum((pos_first + 1) // BLOCK_N * BLOCK_N, lo)
    unmasked_from = tl.minimum(tl.maximum(unmasked_from, lo), masked_from)
    m = tl.full([BLOCK_Q * G_PAD], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_Q * G_PAD], tl.float32)
    acc = tl.zeros([BLOCK_Q * G_PAD, D], tl.float32)
    if HAS_WINDOW:  # (without a window this loop is empty: compiled only where it can run)
        for n0 in range(lo, unmasked_from, BLOCK_N):
            m, l, acc = _prefill_step(q, K, V, BT, s, kvh, n0, hi, pos_q, window, scale, m, l, acc, stride_kb,
                                      stride_ks, stride_kh, stride_bt, offs_d, PAGE, BLOCK_N, True, HAS_WINDOW, DOT)
    for n0 in range(unmasked_from, masked_from, BLOCK_N):
        m, l, acc = _prefill_step(q, K, V, BT, s, kvh, n0, hi, pos_q, window, scale, m, l, acc, stride_kb,
                                  stride_ks, stride_kh, stride_bt, offs_d, PAGE, BLOCK_N, False, HAS_WINDOW, DOT)
    for n0 in range(masked_from, hi, BLOCK_N):
        m, l, acc = _prefill_step(q, K, V, BT, s, kvh, n0, hi, pos_q, window, scale, m, l, acc, stride_kb,
                                  stride_ks, stride_kh, stride_bt, offs_d, PAGE, BLOCK_N, True, HAS_WINDOW, DOT)
    o = acc / tl.where(l == 0, 1.0, l)[:, None]
    tl.store(OUT + (q_start + r)[:, None] * stride_ot + head[:, None] * stride_oh + offs_d[None, :],
             o.to(OUT.dtype.element_ty), mask=row_ok[:, None])


def _tiles(meta: AttentionMeta, num_rows: int, block_q: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Map each program to (sequence, first query row) with device ops only (graph-capturable)."""
    key = ("prefill_tiles", block_q)
    if key not in meta.derived:
        per_seq = (meta.q_len.long() + block_q - 1) // block_q
        ends = per_seq.cumsum(0)
        ids = torch.arange(num_rows // block_q + meta.capacity + 1, device=meta.q_len.device)
        seq = torch.searchsorted(ends, ids, right=True)
        inside = seq < meta.capacity
        seq = seq.clamp(max=meta.capacity - 1)
        first = ends[seq] - per_seq[seq]
        meta.derived[key] = (torch.where(inside, seq, -1).int(), ((ids - first) * block_q).int())
    return meta.derived[key]


def prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMeta,
                      scale: float, out: torch.Tensor, sliding_window: int | None = None, block_n: int = 128,
                      block_m: int | None = None, num_warps: int | None = None, num_stages: int = 2) -> None:
    """Flash-style causal attention of each prefill sequence's query rows over its pages. A tile is block_m rows:
    block_m / (the group's heads, to a power of 2) query rows, with all the query heads of one KV head. The defaults
    measured best on an H100 over bf16 and fp8 caches (BENCHMARKS.md, #10: benchmarks/prefill_sweep.py)."""
    num_heads, d = q.shape[1], q.shape[2]
    num_kv, page = k_cache.shape[2], k_cache.shape[1]
    g = num_heads // num_kv
    g_pad = triton.next_power_of_2(g)
    block_m = block_m or (128 if d <= 128 else 64)  # rows of a tile: query rows times the group's heads
    block_q = max(block_m // g_pad, 1)
    tile_seq, tile_q = _tiles(meta, q.shape[0], block_q)
    assert q.stride(2) == 1 and k_cache.stride(3) == 1 and out.stride(2) == 1
    _prefill_kernel[(num_kv * tile_seq.shape[0],)](
        q, k_cache, v_cache, out, meta.block_tables, meta.q_start, meta.q_len, meta.seq_lens, tile_seq, tile_q,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), k_cache.stride(0), k_cache.stride(1),
        k_cache.stride(2), meta.block_tables.stride(0), scale, sliding_window or 0,
        G=g, G_PAD=g_pad, BLOCK_Q=block_q, D=d, PAGE=page, BLOCK_N=block_n, HAS_WINDOW=sliding_window is not None,
        DOT=_dot_dtype(q, k_cache), NUM_KV=num_kv, num_warps=num_warps or (4 if block_q * g_pad <= 64 else 8),
        num_stages=num_stages)
