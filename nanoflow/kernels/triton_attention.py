"""Paged attention in Triton: decode (split-KV, then a combine step) and chunked prefill (flash style).

Both read every shape they need from `AttentionMeta` device tensors, with a grid fixed by the
metadata's capacity, so they replay inside CUDA graphs whatever the batch holds. Grouped-query
attention: a program serves all query heads of one KV head, so each KV tile is read once for them.
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
def _decode_tile(ITEM_SEQ, ITEM_SPLIT, SEQ_LENS, Q_START, BT, j, pid, num_programs, last_work, stride_bt, window,
                 NUM_KV: tl.constexpr, PAGE: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT_TOKENS: tl.constexpr,
                 HAS_WINDOW: tl.constexpr):
    """Where the program's j-th tile is: its work item's sequence, query row, KV head and split end, its
    token positions, and their pages."""
    TILES: tl.constexpr = SPLIT_TOKENS // BLOCK_N
    item = pid + (j // TILES) * num_programs
    work = tl.minimum(item // NUM_KV, last_work)  # j past the program's last tile: any valid entry
    s = tl.load(ITEM_SEQ + work)
    seq_len = tl.load(SEQ_LENS + s)
    lo = 0
    if HAS_WINDOW:
        lo = tl.maximum(seq_len - window, 0)
    start = lo + tl.load(ITEM_SPLIT + work) * SPLIT_TOKENS
    end = tl.minimum(start + SPLIT_TOKENS, seq_len)
    offs_n = start + (j % TILES) * BLOCK_N + tl.arange(0, BLOCK_N)
    page = tl.load(BT + s * stride_bt + offs_n // PAGE, mask=offs_n < end, other=0)
    return s, tl.load(Q_START + s), item % NUM_KV, tl.load(ITEM_SPLIT + work), end, offs_n, page


@triton.jit
def _decode_step(q, k, v, valid, scale, m, l, acc):
    scores = tl.where(valid[None, :], tl.dot(q, tl.trans(k)) * scale, float("-inf"))
    return _softmax_step(scores, v, m, l, acc)


@triton.jit
def _decode_split_kernel(Q, K, V, BT, Q_START, SEQ_LENS, ITEM_SEQ, ITEM_SPLIT, NUM_ITEMS, PART_O, PART_LSE,
                         last_work, stride_qt, stride_qh, stride_kb, stride_ks, stride_kh, stride_bt,
                         stride_po_s, stride_po_h, stride_po_p, stride_pl_s, stride_pl_h, scale, window,
                         NUM_KV: tl.constexpr, G: tl.constexpr, BLOCK_G: tl.constexpr, D: tl.constexpr,
                         PAGE: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT_TOKENS: tl.constexpr,
                         HAS_WINDOW: tl.constexpr):
    """A persistent program: work items (sequence, split, KV head) pid, pid + P, ... as ONE flat loop over
    their KV tiles. Where tile j + 1 is (its pages included) is loaded during tile j: with the page loads
    of a tile inside its own iteration, Triton's pipeliner keeps a single K/V buffer (measured: 45 KB of
    shared memory at any depth, ~40 GB/s per SM); carried over, it keeps `num_stages` tiles in flight.
    Every item runs SPLIT_TOKENS / BLOCK_N tiles; in a sequence's last split those past its end load nothing
    and run their math on masked scores (skipping that math behind a branch measured 4 % slower at best)."""
    pid = tl.program_id(0)
    num_programs = tl.num_programs(0)
    TILES: tl.constexpr = SPLIT_TOKENS // BLOCK_N
    num_items = tl.load(NUM_ITEMS) * NUM_KV
    mine = tl.cdiv(tl.maximum(num_items - pid, 0), num_programs)
    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, D)
    m = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, D], tl.float32)
    s, row, kvh, split, end, offs_n, page = _decode_tile(
        ITEM_SEQ, ITEM_SPLIT, SEQ_LENS, Q_START, BT, 0, pid, num_programs, last_work, stride_bt, window,
        NUM_KV, PAGE, BLOCK_N, SPLIT_TOKENS, HAS_WINDOW)
    q = tl.zeros([BLOCK_G, D], Q.dtype.element_ty)
    for j in tl.range(0, mine * TILES):
        t = j % TILES
        valid = offs_n < end
        kv_off = page[:, None] * stride_kb + (offs_n % PAGE)[:, None] * stride_ks + kvh * stride_kh + offs_d[None, :]
        k = tl.load(K + kv_off, mask=valid[:, None], other=0.0).to(Q.dtype.element_ty)  # (fp8 KV: widened)
        v = tl.load(V + kv_off, mask=valid[:, None], other=0.0).to(Q.dtype.element_ty)
        heads = kvh * G + offs_g
        if t == 0:  # a new item: its queries, and a fresh online softmax
            q = tl.load(Q + row * stride_qt + heads[:, None] * stride_qh + offs_d[None, :],
                        mask=offs_g[:, None] < G, other=0.0)
            m = tl.full([BLOCK_G], float("-inf"), tl.float32)
            l = tl.zeros([BLOCK_G], tl.float32)
            acc = tl.zeros([BLOCK_G, D], tl.float32)
        m, l, acc = _decode_step(q, k, v, valid, scale, m, l, acc)
        if t == TILES - 1:  # tiles past the split's end load nothing and leave the state as it was
            base = s * stride_po_s + heads * stride_po_h + split * stride_po_p
            tl.store(PART_O + base[:, None] + offs_d[None, :], acc / l[:, None], mask=(offs_g < G)[:, None])
            tl.store(PART_LSE + s * stride_pl_s + heads * stride_pl_h + split, m + tl.log(l), mask=offs_g < G)
        s, row, kvh, split, end, offs_n, page = _decode_tile(
            ITEM_SEQ, ITEM_SPLIT, SEQ_LENS, Q_START, BT, j + 1, pid, num_programs, last_work, stride_bt, window,
            NUM_KV, PAGE, BLOCK_N, SPLIT_TOKENS, HAS_WINDOW)


@triton.jit
def _decode_combine_kernel(PART_O, PART_LSE, OUT, Q_START, SEQ_LENS, stride_ot, stride_oh,
                           stride_po_s, stride_po_h, stride_po_p, stride_pl_s, stride_pl_h, window,
                           D: tl.constexpr, SPLITS: tl.constexpr, SPLIT_TOKENS: tl.constexpr,
                           HAS_WINDOW: tl.constexpr):
    s = tl.program_id(0)
    h = tl.program_id(1)
    seq_len = tl.load(SEQ_LENS + s)
    if seq_len == 0:
        return
    lo = 0
    if HAS_WINDOW:
        lo = tl.maximum(seq_len - window, 0)
    used = tl.cdiv(seq_len - lo, SPLIT_TOKENS)
    row = tl.load(Q_START + s)
    offs_p = tl.arange(0, SPLITS)
    offs_d = tl.arange(0, D)
    lse = tl.load(PART_LSE + s * stride_pl_s + h * stride_pl_h + offs_p, mask=offs_p < used, other=float("-inf"))
    w = tl.exp(lse - tl.max(lse, 0))
    o = tl.load(PART_O + s * stride_po_s + h * stride_po_h + offs_p[:, None] * stride_po_p + offs_d[None, :],
                mask=(offs_p < used)[:, None], other=0.0)
    out = tl.sum(o * w[:, None], 0) / tl.sum(w, 0)
    tl.store(OUT + row * stride_ot + h * stride_oh + offs_d, out.to(OUT.dtype.element_ty))


def _work_items(meta: AttentionMeta, split_tokens: int, splits: int, window: int | None):
    """(sequence, split) of every work item, items of a sequence together, and their count: device ops only,
    so a CUDA graph recomputes them from the metadata it replays with."""
    key = ("decode_items", split_tokens)
    if key not in meta.derived:
        kv = meta.seq_lens.long()
        if window is not None:
            kv = kv.clamp(max=window)
        per_seq = (kv + split_tokens - 1) // split_tokens
        ends = per_seq.cumsum(0)
        ids = torch.arange(meta.capacity * splits, device=kv.device)
        seq = torch.searchsorted(ends, ids, right=True).clamp(max=meta.capacity - 1)
        meta.derived[key] = (seq.int(), (ids - (ends[seq] - per_seq[seq])).int(), ends[-1:].int())
    return meta.derived[key]


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMeta,
                     scale: float, out: torch.Tensor, sliding_window: int | None = None,
                     split_tokens: int = 512, block_n: int = 64, num_warps: int = 4, num_stages: int = 2,
                     programs: int | None = None) -> None:
    """q, out [T, Hq, D] (rows picked by meta); caches [blocks, page, Hkv, D].

    Each sequence's KV is cut into splits of split_tokens (flash-decoding); a work item is one split of
    one KV head. `programs` persistent programs share the items round-robin (None: one program per
    possible item); a second kernel merges each sequence's splits by their log-sum-exp. On an execution
    unit of S SMs, a few programs per SM keep every SM streaming with no tail of idle programs."""
    num_heads, d = q.shape[1], q.shape[2]
    num_kv, page = k_cache.shape[2], k_cache.shape[1]
    g = num_heads // num_kv
    cap = meta.capacity
    if split_tokens % block_n:
        raise ValueError(f"split_tokens {split_tokens} must be a multiple of block_n {block_n}")
    splits = triton.next_power_of_2(triton.cdiv(meta.block_tables.shape[1] * page, split_tokens))
    parts = meta.derived.get(("decode_parts", splits))
    if parts is None:
        parts = (torch.empty(cap, num_heads, splits, d, dtype=torch.float32, device=q.device),
                 torch.empty(cap, num_heads, splits, dtype=torch.float32, device=q.device))
        meta.derived[("decode_parts", splits)] = parts
    part_o, part_lse = parts
    item_seq, item_split, num_items = _work_items(meta, split_tokens, splits, sliding_window)
    assert q.stride(2) == 1 and k_cache.stride(3) == 1 and out.stride(2) == 1
    _decode_split_kernel[(programs or cap * splits * num_kv,)](
        q, k_cache, v_cache, meta.block_tables, meta.q_start, meta.seq_lens, item_seq, item_split, num_items,
        part_o, part_lse, item_seq.shape[0] - 1,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), meta.block_tables.stride(0),
        part_o.stride(0), part_o.stride(1), part_o.stride(2), part_lse.stride(0), part_lse.stride(1), scale,
        sliding_window or 0,
        NUM_KV=num_kv, G=g, BLOCK_G=max(16, triton.next_power_of_2(g)), D=d, PAGE=page, BLOCK_N=block_n,
        SPLIT_TOKENS=split_tokens, HAS_WINDOW=sliding_window is not None,
        num_warps=num_warps, num_stages=num_stages)
    _decode_combine_kernel[(cap, num_heads)](
        part_o, part_lse, out, meta.q_start, meta.seq_lens, out.stride(0), out.stride(1),
        part_o.stride(0), part_o.stride(1), part_o.stride(2), part_lse.stride(0), part_lse.stride(1),
        sliding_window or 0, D=d, SPLITS=splits, SPLIT_TOKENS=split_tokens, HAS_WINDOW=sliding_window is not None,
        num_warps=4)


@triton.jit
def _prefill_kernel(Q, K, V, OUT, BT, Q_START, Q_LEN, SEQ_LENS, TILE_SEQ, TILE_Q,
                    stride_qt, stride_qh, stride_ot, stride_oh, stride_kb, stride_ks, stride_kh, stride_bt,
                    scale, window,
                    G: tl.constexpr, G_PAD: tl.constexpr, BLOCK_Q: tl.constexpr, D: tl.constexpr,
                    PAGE: tl.constexpr, BLOCK_N: tl.constexpr, HAS_WINDOW: tl.constexpr):
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
                mask=row_ok[:, None], other=0.0)
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
        k, v = k.to(Q.dtype.element_ty), v.to(Q.dtype.element_ty)  # (fp8 KV: widened)
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
        num_warps=4 if block_q * g_pad <= 64 else 8, num_stages=2)
