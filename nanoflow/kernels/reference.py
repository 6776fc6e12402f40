"""Plain-torch kernels: the CPU path and the oracle every GPU kernel is tested against.

Layouts shared by every backend:
  qkv rows hold [q | k | v] per token; q is [tokens, num_heads, head_dim].
  KV cache of one layer: k_cache, v_cache [num_blocks, block_size, num_kv_heads, head_dim];
  a token's slot is block_id * block_size + offset.
  Attention metadata: an `AttentionMeta` (models/batch.py) whose rows index q and out absolutely.
  Padding rows of a batch write their KV to a spare slot past the last block.
  Experts' gate_up [experts, 2 I, H]: each expert's gate rows, then its up rows; on a backend whose
  experts_interleaved(dtype) is true, gate and up rows interleaved instead (the model loads them so).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from nanoflow.models.batch import AttentionMeta


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, out: torch.Tensor | None = None) -> torch.Tensor:
    xf = x.float()
    y = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * weight
    return y if out is None else out.copy_(y)


def qk_norm(q: torch.Tensor, k: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor, eps: float,
            norm=rms_norm) -> None:
    """Qwen3's: each head of q [n, Hq, D] and of k [n, Hkv, D] RMS-normalized over D, in place (norm: a backend's
    rms_norm)."""
    norm(q, q_weight, eps, q)
    norm(k, k_weight, eps, k)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                 out: torch.Tensor) -> torch.Tensor:
    """residual += x; out = rms_norm(residual)."""
    residual.add_(x)
    return rms_norm(residual, weight, eps, out)


def silu_mul(x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    gate, up = x.chunk(2, dim=-1)
    return out.copy_(F.silu(gate) * up)


def exponential_race(scores: torch.Tensor, temperature: torch.Tensor,
                     q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample each row of softmax(scores / temperature) [R, V] as argmax(p / q) with q ~ Exp(1), in log space:
    log p - log q and scores / temperature - log q differ by a per-row constant, so the softmax is never
    computed. q is clamped away from 0 so that an excluded token (score -inf) never wins. A row of temperature 0
    takes its highest score (greedy). Returns each row's (winning score, token): with tensor parallelism each rank
    races over its vocabulary slice and the best of the ranks' winners is the row's draw."""
    t = temperature[:, None]
    s = scores.float()
    return torch.where(t > 0, s / t - q.clamp_min(1e-30).log(), s).max(-1)


def rope(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor) -> None:
    """Rotate q [n, Hq, D] and k [n, Hkv, D] in place (neox layout: halves of the head dim).

    cos_sin [max_pos, D] holds cos in the first half and sin in the second, in float32.
    """
    cos, sin = cos_sin[positions].to(q.dtype).unsqueeze(1).chunk(2, dim=-1)
    for x in (q, k):
        x1, x2 = x.chunk(2, dim=-1)
        r1 = x1 * cos - x2 * sin
        r2 = x2 * cos + x1 * sin
        x.copy_(torch.cat((r1, r2), dim=-1))


def append_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
              slot_mapping: torch.Tensor) -> None:
    """Scatter this step's k, v [n, Hkv, D] into their slots (rounded to the cache's dtype: fp8 KV)."""
    k_cache.view(-1, *k_cache.shape[2:])[slot_mapping] = k.to(k_cache.dtype)
    v_cache.view(-1, *v_cache.shape[2:])[slot_mapping] = v.to(v_cache.dtype)


def rope_append_kv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                   cos_sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                   slot_mapping: torch.Tensor) -> None:
    """The `rope_kv` op: rotate q and k in place, then store k and v in their cache slots."""
    rope(q, k, positions, cos_sin)
    append_kv(k, v, k_cache, v_cache, slot_mapping)


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMeta,
                    scale: float, out: torch.Tensor, sliding_window: int | None = None) -> None:
    """Causal attention of each sequence's queries over its paged KV (prefill chunks and decode alike)."""
    block_size, num_kv = k_cache.shape[1], k_cache.shape[2]
    tables = meta.block_tables
    for i, (qs, nq, seq_len) in enumerate(zip(meta.q_start.tolist(), meta.q_len.tolist(), meta.seq_lens.tolist())):
        if nq == 0:
            continue
        blocks = tables[i, : (seq_len + block_size - 1) // block_size].long()
        k = k_cache[blocks].flatten(0, 1)[:seq_len].float()  # [L, Hkv, D]
        v = v_cache[blocks].flatten(0, 1)[:seq_len].float()
        qi = q[qs: qs + nq].float().unflatten(1, (num_kv, -1))  # [nq, Hkv, G, D]
        scores = torch.einsum("qhgd,khd->hgqk", qi, k) * scale
        pos_q = torch.arange(seq_len - nq, seq_len, device=q.device)[:, None]
        pos_k = torch.arange(seq_len, device=q.device)[None, :]
        mask = pos_k <= pos_q
        if sliding_window is not None:
            mask &= pos_q - pos_k < sliding_window
        probs = scores.masked_fill(~mask, float("-inf")).softmax(-1)
        out[qs: qs + nq] = torch.einsum("hgqk,khd->qhgd", probs, v).flatten(1, 2).to(out.dtype)


decode_attention = paged_attention
prefill_attention = paged_attention


def moe_pad(rows: int, k: int, experts: int, tile: int = 1) -> int:
    """The sorted pairs' layout for a batch of `rows` rows: each expert's pairs start at a multiple of the returned
    number of slots. `tile` (the GPU's grouped GEMM's tile rows: a tile's rows past its expert's end are then zero
    rows, not the next expert's) where the experts average at least two tiles of pairs, else 1 (packed; always 1
    here, on the CPU). With fewer pairs an expert the gaps are a large share of the slots, and their bytes (the
    gather, the whole-tile stores) cost more than zero rows save (BENCHMARKS.md, #10)."""
    return tile if rows * k >= 2 * tile * experts else 1


def moe_slots(rows: int, k: int, experts: int, pad: int) -> int:
    """The pair slots a routing of `rows` rows takes: every pair, and with pad > 1 each expert's gap up to the next
    multiple of pad (pad - 1 slots at most, and only experts that have pairs have one)."""
    return rows * k + min(experts, rows * k) * (pad - 1)


def moe_route(logits: torch.Tensor, k: int, normalize: bool, live: torch.Tensor | None = None, first: int = 0,
              pad: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Routing as HF Mixtral: softmax of the router's logits [R, E] in float32, top-k (torch.topk's tie-break),
    the k weights renormalized to sum to 1 if `normalize`; each row's k experts in increasing order (the order its
    outputs are summed in). Then the R * k (row, expert) pairs sorted by expert, stably, each expert's pairs from a
    slot that is a multiple of `pad` on (moe_slots slots in all). Returns the source row of each slot (-1 for
    slots no pair holds: moe_gather makes them zero rows) [slots], each pair's slot [R, k], the weights [R, k]
    (float32) and where each expert's pairs end (int32 [E], counted on the device: torch.bincount on CUDA syncs for
    its size); expert e's pairs start at offs[e - 1] rounded up to a multiple of pad.

    live: the batch's real row count (a one-element tensor: a CUDA graph reads it at replay), these rows counted
    from `first`; the rows past it are a graph's padding and go to no expert, so the experts' GEMMs skip them.
    Their slots are 0 with weight 0."""
    m, e = logits.shape
    weights, ids = logits.float().softmax(-1).topk(k, dim=-1)
    if normalize:
        weights /= weights.sum(-1, keepdim=True)
    padding = None
    if live is not None:
        padding = torch.arange(m, device=logits.device) >= live - first
        ids = ids.masked_fill(padding[:, None], e)  # past every expert: sorted after their pairs, and not placed
    ids, order = ids.sort(-1)
    weights = weights.gather(-1, order)
    sorted_ids, pairs = ids.flatten().sort(stable=True)
    ends = torch.searchsorted(sorted_ids, torch.arange(e, device=ids.device), right=True)
    counts = torch.diff(ends, prepend=ends.new_zeros(1))
    padded = (counts + pad - 1) // pad * pad
    starts = padded.cumsum(0) - padded  # each expert's first slot
    # sorted pair i of expert x: its rank among x's pairs (i - (ends - counts)[x]) after x's first slot
    place = torch.arange(len(pairs), device=ids.device) + (starts + counts - ends)[sorted_ids.clamp(max=e - 1)]
    placed = sorted_ids < e
    slots = moe_slots(m, k, e, pad)
    rows = torch.full((slots + 1,), -1, dtype=torch.int64, device=ids.device)  # (slot `slots`: the unplaced pairs')
    rows.scatter_(0, torch.where(placed, place, slots), torch.where(placed, pairs // k, -1))
    where = torch.empty_like(pairs).scatter_(0, pairs, place).view(-1, k)
    if padding is not None:
        where, weights = where.masked_fill(padding[:, None], 0), weights.masked_fill(padding[:, None], 0.0)
    return rows[:slots], where, weights, (starts + counts).to(torch.int32)


def moe_gather(x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """The experts' input in moe_route's slot order: x's row rows[i] in slot i, zeros where rows[i] is -1."""
    return torch.where(rows[:, None] >= 0, x.index_select(0, rows.clamp(min=0)), 0)


def moe_combine(y: torch.Tensor, where: torch.Tensor, weights: torch.Tensor, out: torch.Tensor,
                shared: torch.Tensor | None = None) -> torch.Tensor:
    """out[r] = sum over j of weights[r, j] * y[where[r, j]] (+ shared[r]), summed in float32 in the order of j:
    each row gathers its k expert outputs (y is in expert order) instead of scattering them with atomics."""
    acc = weights[:, 0:1] * y[where[:, 0]].float()
    for j in range(1, where.shape[1]):
        acc = acc + weights[:, j: j + 1] * y[where[:, j]].float()
    if shared is not None:
        acc = acc + shared
    return out.copy_(acc)


def experts_capturable(dtype: torch.dtype) -> bool:
    """Whether experts_mlp runs without a host sync (a CUDA graph could capture it): not the loop below."""
    return False


def experts_interleaved(dtype: torch.dtype) -> bool:
    """Whether experts_mlp takes gate_up's gate and up rows interleaved: not here."""
    return False


def experts_scratch(slots: int, hidden: int, intermediate: int, dtype: torch.dtype) -> int:
    """The bytes experts_mlp allocates over `slots` rows at most: its output, and one expert's gate|up and activation
    rows and this silu_mul's two temporaries (an expert holds every slot at most)."""
    return slots * (hidden + 5 * intermediate) * torch.empty((), dtype=dtype).element_size()


def experts_mlp(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, offs: torch.Tensor, pad: int = 1,
                activation=silu_mul) -> torch.Tensor:
    """Each expert's SwiGLU MLP over its rows of x (in moe_route's slots: expert e's rows end at offs[e], int32, and
    start at offs[e - 1] rounded up to a multiple of pad): gate_up [experts, 2 I, H] (gate rows, then up rows), down
    [experts, H, I]. One GEMM pair per expert that has rows, after one host sync for the offsets. activation:
    silu_mul's signature (a backend's own). The rows no expert holds are left as they were."""
    y = x.new_empty(x.shape[0], down.shape[1])
    start = 0
    for e, end in enumerate(offs.tolist()):
        start = -(-start // pad) * pad
        if end > start:
            h = torch.mm(x[start:end], gate_up[e].t())
            act = h.new_empty(end - start, down.shape[2])
            activation(h, out=act)
            torch.mm(act, down[e].t(), out=y[start:end])
        start = end
    return y
