"""Paged attention in Triton: decode (stream-K over the batch's KV tiles, then a combine step) and chunked prefill
(flash style).

Both read every shape they need from `AttentionMeta` device tensors, with grids fixed by their arguments and the
metadata's capacity, so they replay inside CUDA graphs whatever the batch holds. Grouped-query attention: a program
serves all query heads of one KV head, so each KV tile is read once for them.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

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
def _softmax_step(scores, v, m, l, acc):
    """Fold one tile of scores (-inf where excluded) and its values into the online softmax."""
    m_new = tl.maximum(m, tl.max(scores, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with nothing allowed yet
    p = tl.exp(scores - m_safe[:, None])
    alpha = tl.exp(m - m_safe)
    l = l * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
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
def _decode_kernel(Q, K, V, OUT, BT, Q_START, SEQ_LENS, TILE_UNIT, UNIT_START, NUM_TILES, CHUNK, PART_O, PART_LSE,
                   stride_qt, stride_qh, stride_ot, stride_oh, stride_kb, stride_ks, stride_kh, stride_bt,
                   stride_po_s, stride_po_h, stride_po_p, stride_pl_s, stride_pl_h, scale, window,
                   NUM_KV: tl.constexpr, G: tl.constexpr, BLOCK_G: tl.constexpr, D: tl.constexpr,
                   PAGE: tl.constexpr, BLOCK_N: tl.constexpr, HAS_WINDOW: tl.constexpr, DOT: tl.constexpr):
    """A persistent program: the KV tiles [pid * CHUNK, (pid + 1) * CHUNK) of the batch's tiles, units (sequence,
    KV head) one after another, each of its sequence's tiles in order, as ONE flat loop (stream-K: every program
    gets the same number of tiles, none of them empty). A unit whole in one program writes its output; a unit cut
    by programs' bounds writes a part per program, which the combine kernel merges. Where tile g + 1 is (its pages
    included) is loaded during tile g: with the page loads of a tile inside its own iteration, Triton's pipeliner
    keeps a single K/V buffer (measured: 45 KB of shared memory at any depth, ~40 GB/s per SM); carried over, it
    keeps `num_stages` tiles in flight."""
    pid = tl.program_id(0)
    chunk = tl.load(CHUNK)
    first_g = pid * chunk
    last_g = tl.minimum(first_g + chunk, tl.load(NUM_TILES)) - 1
    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, D)
    m = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, D], tl.float32)
    q = tl.zeros([BLOCK_G, D], DOT)
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
        if (t == 0) | (g == first_g):  # a new unit: its queries, and a fresh online softmax
            q = tl.load(Q + row * stride_qt + heads[:, None] * stride_qh + offs_d[None, :],
                        mask=offs_g[:, None] < G, other=0.0).to(DOT)
            m = tl.full([BLOCK_G], float("-inf"), tl.float32)
            l = tl.zeros([BLOCK_G], tl.float32)
            acc = tl.zeros([BLOCK_G, D], tl.float32)
        scores = tl.where(valid[None, :], tl.dot(q, tl.trans(k)) * scale, float("-inf"))
        m, l, acc = _softmax_step(scores, v, m, l, acc)
        if (t == tiles - 1) | (g == last_g):  # the unit's or the program's last tile
            unit_first = g - t
            if (unit_first >= first_g) & (t == tiles - 1):  # whole in this program: the output itself
                tl.store(OUT + row * stride_ot + heads[:, None] * stride_oh + offs_d[None, :],
                         (acc / l[:, None]).to(OUT.dtype.element_ty), mask=(offs_g < G)[:, None])
            else:  # this program's part
                part = pid - unit_first // chunk
                base = s * stride_po_s + heads * stride_po_h + part * stride_po_p
                tl.store(PART_O + base[:, None] + offs_d[None, :], acc / l[:, None], mask=(offs_g < G)[:, None])
                tl.store(PART_LSE + s * stride_pl_s + heads * stride_pl_h + part, m + tl.log(l), mask=offs_g < G)
        u, s, t, tiles, row, seq_len, offs_n, page = _decode_tile(
            TILE_UNIT, UNIT_START, SEQ_LENS, Q_START, BT, tl.minimum(g + 1, last_g), stride_bt, window, NUM_KV,
            PAGE, BLOCK_N, HAS_WINDOW)


@triton.jit
def _decode_combine_kernel(PART_O, PART_LSE, OUT, Q_START, SEQ_LENS, UNIT_START, CHUNK, stride_ot, stride_oh,
                           stride_po_s, stride_po_h, stride_po_p, stride_pl_s, stride_pl_h, window,
                           NUM_KV: tl.constexpr, G: tl.constexpr, D: tl.constexpr, MAX_PARTS: tl.constexpr,
                           BLOCK_N: tl.constexpr, HAS_WINDOW: tl.constexpr):
    """Merge by log-sum-exp the parts of each query head whose unit the decode kernel's programs cut."""
    s = tl.program_id(0)
    h = tl.program_id(1)
    seq_len = tl.load(SEQ_LENS + s)
    if seq_len == 0:
        return
    lo = 0
    if HAS_WINDOW:
        lo = tl.maximum(seq_len - window, 0)
    chunk = tl.load(CHUNK)
    unit_first = tl.load(UNIT_START + s * NUM_KV + h // G)
    used = (unit_first + tl.cdiv(seq_len - lo, BLOCK_N) - 1) // chunk - unit_first // chunk + 1
    if used == 1:  # written whole by its program
        return
    row = tl.load(Q_START + s)
    offs_p = tl.arange(0, MAX_PARTS)
    offs_d = tl.arange(0, D)
    lse = tl.load(PART_LSE + s * stride_pl_s + h * stride_pl_h + offs_p, mask=offs_p < used, other=float("-inf"))
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


def _decode_tiles(meta: AttentionMeta, num_kv: int, block_n: int, max_tiles: int, window: int | None, programs: int,
                  min_chunk: int):
    """The batch's KV tiles in units (sequence, KV head): each tile's unit, each unit's first tile, the tile count,
    and the tiles per program. Device ops only, so a CUDA graph recomputes them from the metadata it replays with."""
    key = ("decode_tiles", num_kv, block_n, programs, min_chunk)
    if key not in meta.derived:
        kv = meta.seq_lens.long()
        if window is not None:
            kv = kv.clamp(max=window)
        tiles = (kv + block_n - 1) // block_n  # per sequence
        unit_tiles = tiles.repeat_interleave(num_kv)
        unit_end = unit_tiles.cumsum(0).int()
        total = unit_end[-1:]
        # int32 throughout: the table has a row per possible tile (capacity x KV heads x max_model_len / block_n)
        ids = torch.arange(meta.capacity * num_kv * max_tiles, dtype=torch.int32, device=kv.device)
        tile_unit = torch.searchsorted(unit_end, ids, right=True, out_int32=True).clamp_(max=unit_end.shape[0] - 1)
        chunk = ((total + programs - 1) // programs).clamp(min=min_chunk)
        meta.derived[key] = (tile_unit, (unit_end - unit_tiles).int(), total, chunk)
    return meta.derived[key]


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMeta,
                     scale: float, out: torch.Tensor, sliding_window: int | None = None, block_n: int = 64,
                     num_warps: int = 2, num_stages: int = 2, programs: int = 8, max_parts: int = 16,
                     block_g: int | None = None) -> None:
    """q, out [T, Hq, D] (rows picked by meta); caches [blocks, page, Hkv, D].

    A unit of work is one sequence's KV for one KV head (its query heads served together: GQA), cut into tiles of
    block_n tokens; `programs` persistent programs take equal runs of the batch's tiles (on an execution unit of
    S SMs, a few programs per SM keep every SM streaming with no tail). A unit cut across programs leaves a part
    in each (at most max_parts: a program takes at least enough tiles for that), which a second kernel merges by
    log-sum-exp (flash-decoding).

    block_g: the rows of a program's query block (its KV head's query heads, padded). None: at least 16, the
    MMA's rows; a smaller power of 2 >= the group size is accepted by Triton 3.6 (it pads a small dot itself)
    and leaves less softmax and accumulator work per tile (sm_curves.py compares the two)."""
    num_heads, d = q.shape[1], q.shape[2]
    num_kv, page = k_cache.shape[2], k_cache.shape[1]
    g = num_heads // num_kv
    cap = meta.capacity
    if max_parts < 4 or max_parts & (max_parts - 1):
        raise ValueError(f"max_parts {max_parts} must be a power of 2, at least 4")
    if block_g is None:
        block_g = max(16, triton.next_power_of_2(g))
    elif block_g < g or block_g & (block_g - 1):
        raise ValueError(f"block_g {block_g} must be a power of 2, at least the {g} query heads per KV head")
    max_tiles = triton.cdiv(meta.block_tables.shape[1] * page, block_n)
    # a unit of n tiles meets at most (n - 1) // chunk + 2 programs
    min_chunk = max(1, triton.cdiv(max_tiles - 1, max_parts - 2))
    parts = meta.derived.get(("decode_parts", max_parts))
    if parts is None:
        parts = (torch.empty(cap, num_heads, max_parts, d, dtype=torch.float32, device=q.device),
                 torch.empty(cap, num_heads, max_parts, dtype=torch.float32, device=q.device))
        meta.derived[("decode_parts", max_parts)] = parts
    part_o, part_lse = parts
    tile_unit, unit_start, num_tiles, chunk = _decode_tiles(meta, num_kv, block_n, max_tiles, sliding_window,
                                                            programs, min_chunk)
    assert q.stride(2) == 1 and k_cache.stride(3) == 1 and out.stride(2) == 1
    _decode_kernel[(programs,)](
        q, k_cache, v_cache, out, meta.block_tables, meta.q_start, meta.seq_lens, tile_unit, unit_start, num_tiles,
        chunk, part_o, part_lse, q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), meta.block_tables.stride(0),
        part_o.stride(0), part_o.stride(1), part_o.stride(2), part_lse.stride(0), part_lse.stride(1), scale,
        sliding_window or 0,
        NUM_KV=num_kv, G=g, BLOCK_G=block_g, D=d, PAGE=page, BLOCK_N=block_n,
        HAS_WINDOW=sliding_window is not None, DOT=_dot_dtype(q, k_cache), num_warps=num_warps,
        num_stages=num_stages)
    _decode_combine_kernel[(cap, num_heads)](
        part_o, part_lse, out, meta.q_start, meta.seq_lens, unit_start, chunk, out.stride(0), out.stride(1),
        part_o.stride(0), part_o.stride(1), part_o.stride(2), part_lse.stride(0), part_lse.stride(1),
        sliding_window or 0, NUM_KV=num_kv, G=g, D=d, MAX_PARTS=max_parts, BLOCK_N=block_n,
        HAS_WINDOW=sliding_window is not None, num_warps=4)


@triton.jit
def _prefill_kernel(Q, K, V, OUT, BT, Q_START, Q_LEN, SEQ_LENS, TILE_SEQ, TILE_Q,
                    stride_qt, stride_qh, stride_ot, stride_oh, stride_kb, stride_ks, stride_kh, stride_bt,
                    scale, window,
                    G: tl.constexpr, G_PAD: tl.constexpr, BLOCK_Q: tl.constexpr, D: tl.constexpr,
                    PAGE: tl.constexpr, BLOCK_N: tl.constexpr, HAS_WINDOW: tl.constexpr, DOT: tl.constexpr):
    tile = tl.program_id(0)
    kvh = tl.program_id(1)
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
    hi = tl.minimum(seq_len - q_len + q0 + BLOCK_Q, seq_len)  # causal limit of the tile's last row
    lo = 0
    if HAS_WINDOW:
        lo = tl.maximum(seq_len - q_len + q0 - window + 1, 0) // BLOCK_N * BLOCK_N
    m = tl.full([BLOCK_Q * G_PAD], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_Q * G_PAD], tl.float32)
    acc = tl.zeros([BLOCK_Q * G_PAD, D], tl.float32)
    for n0 in range(lo, hi, BLOCK_N):
        offs_n, valid, k, v = _load_kv_tile(K, V, BT, s, kvh, n0, hi, stride_kb, stride_ks, stride_kh, stride_bt,
                                            offs_d, PAGE, BLOCK_N)
        k, v = k.to(DOT), v.to(DOT)
        allowed = valid[None, :] & (offs_n[None, :] <= pos_q[:, None])
        if HAS_WINDOW:
            allowed = allowed & (pos_q[:, None] - offs_n[None, :] < window)
        scores = tl.where(allowed, tl.dot(q, tl.trans(k)) * scale, float("-inf"))
        m, l, acc = _softmax_step(scores, v, m, l, acc)
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
                      scale: float, out: torch.Tensor, sliding_window: int | None = None, block_n: int = 64) -> None:
    num_heads, d = q.shape[1], q.shape[2]
    num_kv, page = k_cache.shape[2], k_cache.shape[1]
    g = num_heads // num_kv
    g_pad = triton.next_power_of_2(g)
    block_q = max(128 // g_pad, 1) if d <= 128 else max(64 // g_pad, 1)
    tile_seq, tile_q = _tiles(meta, q.shape[0], block_q)
    assert q.stride(2) == 1 and k_cache.stride(3) == 1 and out.stride(2) == 1
    _prefill_kernel[(tile_seq.shape[0], num_kv)](
        q, k_cache, v_cache, out, meta.block_tables, meta.q_start, meta.q_len, meta.seq_lens, tile_seq, tile_q,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), k_cache.stride(0), k_cache.stride(1),
        k_cache.stride(2), meta.block_tables.stride(0), scale, sliding_window or 0,
        G=g, G_PAD=g_pad, BLOCK_Q=block_q, D=d, PAGE=page, BLOCK_N=block_n, HAS_WINDOW=sliding_window is not None,
        DOT=_dot_dtype(q, k_cache), num_warps=4 if block_q * g_pad <= 64 else 8, num_stages=2)
