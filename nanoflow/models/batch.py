"""The per-iteration batch: every piece of metadata the model's ops need, in one object.

Token rows are ordered decode tokens first (one per decode sequence), then prefill chunks.
Any op can run on a sub-range [a, b) of the rows. Attention ops ask for `attention(kind, a, b)`:
the decode (or prefill) sequences whose query rows fall in [a, b), clipped to it, as device
tensors. Under CUDA graphs those tensors are static buffers that `GraphRunner.load` rewrites each
iteration.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

DECODE, PREFILL = "decode", "prefill"


@dataclass(slots=True)
class AttentionMeta:
    """Sequences of one attention op. Rows are absolute rows of the batch's q / out.

    A sequence's queries are rows [q_start, q_start + q_len) at the last q_len positions of its
    first seq_len tokens (causal, aligned bottom-right). Padding entries have q_len = 0.
    """
    q_start: torch.Tensor  # [S] int32
    q_len: torch.Tensor  # [S] int32
    seq_lens: torch.Tensor  # [S] int32
    block_tables: torch.Tensor  # [S, W] int32
    derived: dict = field(default_factory=dict)  # what a kernel computes from the above, once per iteration

    @property
    def capacity(self) -> int:
        return self.q_start.shape[0]

    def copy_(self, other: "AttentionMeta") -> None:
        """Write other (at most as large) into these static buffers; the rest becomes padding."""
        n, w = other.capacity, other.block_tables.shape[1]
        self.q_len.zero_()
        self.seq_lens.zero_()
        for mine, theirs in ((self.q_start, other.q_start), (self.q_len, other.q_len),
                             (self.seq_lens, other.seq_lens)):
            mine[:n].copy_(theirs, non_blocking=True)
        self.block_tables[:n, :w].copy_(other.block_tables, non_blocking=True)


@dataclass(slots=True)
class ForwardBatch:
    input_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    slot_mapping: torch.Tensor  # [T]
    query_start: list[int]  # [S + 1] row offsets of each sequence
    seq_lens: list[int]  # [S] KV length after this step
    block_tables: list[list[int]]  # [S] block ids of each sequence
    num_decode: int  # the first num_decode sequences are decode (one row each)
    logits_rows: torch.Tensor  # rows whose hidden state goes through the lm_head
    attn: dict = field(default_factory=dict)  # (kind, a, b) -> AttentionMeta
    # A CUDA graph's bucket: the real row count, int32 [1] on the device, rewritten each iteration (rows past it
    # are padding). None: every row is real.
    live_rows: torch.Tensor | None = None

    @property
    def num_tokens(self) -> int:
        return self.query_start[-1]

    @property
    def device(self) -> torch.device:
        return self.input_ids.device

    def to(self, device: torch.device) -> "ForwardBatch":
        def move(t):
            return t.to(device, non_blocking=True)
        return ForwardBatch(move(self.input_ids), move(self.positions), move(self.slot_mapping), self.query_start,
                            self.seq_lens, self.block_tables, self.num_decode, move(self.logits_rows))

    def attention(self, kind: str, a: int, b: int) -> AttentionMeta:
        key = (kind, a, b)
        try:
            return self.attn[key]  # (the CUDA-graph path's dict makes static buffers on a miss)
        except KeyError:
            meta = self.build_attention(kind, a, b, pin=self.device.type == "cuda")
            self.attn[key] = AttentionMeta(*(t.to(self.device, non_blocking=True) for t in
                                             (meta.q_start, meta.q_len, meta.seq_lens, meta.block_tables)))
            return self.attn[key]

    def build_attention(self, kind: str, a: int, b: int, capacity: int | None = None,
                        pin: bool = False) -> AttentionMeta:
        """On the host: the kind's sequences clipped to rows [a, b), padded to capacity entries."""
        seqs = range(self.num_decode) if kind == DECODE else range(self.num_decode, len(self.seq_lens))
        starts, lens, kv, tables = [], [], [], []
        for i in seqs:
            s, e = max(self.query_start[i], a), min(self.query_start[i + 1], b)
            if s >= e:
                continue
            starts.append(s)
            lens.append(e - s)
            kv.append(self.seq_lens[i] - (self.query_start[i + 1] - e))
            tables.append(self.block_tables[i])
        pad = (capacity or len(starts)) - len(starts)
        if pad < 0:
            raise ValueError(f"{len(starts)} {kind} sequences exceed the capacity {capacity}")
        width = max(map(len, tables), default=1)
        table = torch.tensor([t + [0] * (width - len(t)) for t in tables] + [[0] * width] * pad,
                             dtype=torch.int32).reshape(len(starts) + pad, width)

        def col(x):
            return torch.tensor(x + [0] * pad, dtype=torch.int32)
        meta = (col(starts), col(lens), col(kv), table)
        return AttentionMeta(*(t.pin_memory() for t in meta) if pin else meta)
