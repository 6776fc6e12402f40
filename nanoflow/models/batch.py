"""The per-iteration batch: every piece of metadata the model's ops need, in one object.

Token rows are ordered decode tokens first (one per decode sequence), then prefill chunks.
Any op can run on a sub-range [a, b) of the rows: `span(a, b)` clips the sequences to it, which is
what the nano-batched pipeline cuts along.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(slots=True)
class AttentionSpan:
    """The sequences whose query rows fall in [start, end), clipped to it."""
    start: int
    end: int
    query_start: list[int]  # local offsets into rows [start, end), len S + 1
    seq_lens: list[int]  # KV length visible to the last query of each clipped sequence
    block_tables: torch.Tensor  # [S, max_blocks]

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens)


@dataclass(slots=True)
class ForwardBatch:
    input_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    slot_mapping: torch.Tensor  # [T]
    query_start: list[int]  # [S + 1] row offsets of each sequence
    seq_lens: list[int]  # [S] KV length after this step
    block_tables: torch.Tensor  # [S, max_blocks] int32
    num_decode: int  # the first num_decode sequences are decode (one row each)
    logits_rows: torch.Tensor  # rows whose hidden state goes through the lm_head
    _spans: dict = field(default_factory=dict)

    @property
    def num_tokens(self) -> int:
        return self.query_start[-1]

    def span(self, a: int, b: int) -> AttentionSpan:
        key = (a, b)
        if key not in self._spans:
            qs, lens, rows = [0], [], []
            for i, seq_len in enumerate(self.seq_lens):
                s, e = max(self.query_start[i], a), min(self.query_start[i + 1], b)
                if s >= e:
                    continue
                rows.append(i)
                lens.append(seq_len - (self.query_start[i + 1] - e))
                qs.append(qs[-1] + e - s)
            index = torch.tensor(rows, dtype=torch.long, device=self.block_tables.device)
            self._spans[key] = AttentionSpan(a, b, qs, lens, self.block_tables.index_select(0, index))
        return self._spans[key]
