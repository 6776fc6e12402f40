"""The whole iteration (embedding and every layer) as CUDA graphs, one per bucket of token counts.

A batch of T tokens runs in the graph of the smallest bucket >= T. Buckets: 8, 16, 32, 64, 128, then
every 64 tokens up to the token budget, so padding costs at most 63 rows once batches are large.
Padding rows take token 0 at position 0, write their KV to a spare slot that no sequence owns, and
belong to no sequence, so attention ignores them; a mixture of experts routes them to no expert
(ForwardBatch.live_rows: the real row count, on the device). Inputs and attention metadata live in static
buffers that each iteration overwrites before the replay; the logits (a handful of rows, a
dynamic count) are computed after the replay, outside the graph.

With capture=False the same static-buffer path runs eagerly: that is how the CPU tests cover the
bucketing and padding logic.
"""
from __future__ import annotations

import bisect

import torch

from nanoflow.models.batch import AttentionMeta, ForwardBatch
from nanoflow.models.llama import Workspace


def buckets(max_tokens: int) -> list[int]:
    sizes = [s for s in (8, 16, 32, 64) if s < max_tokens] + list(range(128, max_tokens, 64))
    return sorted(set(sizes + [max_tokens]))


def _meta(capacity: int, width: int, device) -> AttentionMeta:
    def z(*shape):
        return torch.zeros(*shape, dtype=torch.int32, device=device)
    return AttentionMeta(z(capacity), z(capacity), z(capacity), z(capacity, width))


def _view(meta: AttentionMeta, n: int) -> AttentionMeta:
    return AttentionMeta(meta.q_start[:n], meta.q_len[:n], meta.seq_lens[:n], meta.block_tables[:n])


class _StaticMetas(dict):
    """A bucket's attention metadata, keyed (kind, a, b) like ForwardBatch.attn: a key the forward asks for
    the first time (during warm-up, before capture) gets a static buffer. Buckets share the buffers: the
    k-th range of a kind in every bucket is a view of one buffer sized for the largest."""

    def __init__(self, shared: dict, capacity: int, width: int, device):
        super().__init__()
        self.shared, self.capacity, self.width, self.device = shared, capacity, width, device

    def __missing__(self, key):
        kind, a, b = key
        ordinal = sum(k[0] == kind for k in self)
        buf = self.shared.setdefault((kind, ordinal), _meta(self.capacity, self.width, self.device))
        self[key] = meta = _view(buf, min(b - a, self.capacity))
        meta.q_len.zero_()  # no sequences until the first load: the warm-up run reads it
        meta.seq_lens.zero_()
        return meta


class GraphRunner:
    def __init__(self, forward, ws: Workspace, max_tokens: int, max_seqs: int, max_blocks_per_seq: int,
                 pad_slot: int, capture: bool = True):
        self.forward = forward  # (batch, ws) -> None: the layers, plain or nano-batched
        self.ws = ws
        self.sizes = buckets(max_tokens)
        self.max_seqs = max_seqs
        self.pad_slot = pad_slot
        self.capture = capture
        dev = ws.residual.device
        self.input_ids = torch.zeros(max_tokens, dtype=torch.long, device=dev)
        self.positions = torch.zeros(max_tokens, dtype=torch.long, device=dev)
        self.slots = torch.full((max_tokens,), pad_slot, dtype=torch.long, device=dev)
        self.live = torch.zeros(1, dtype=torch.int32, device=dev)  # the batch's real rows: the experts skip the rest
        self.max_blocks_per_seq = max_blocks_per_seq
        self.metas: dict = {}  # (kind, ordinal) -> AttentionMeta buffers shared by the buckets
        self.batches: dict[int, ForwardBatch] = {}
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.warm: set[int] = set()

    def bucket(self, num_tokens: int) -> int:
        return self.sizes[bisect.bisect_left(self.sizes, num_tokens)]

    def static_batch(self, size: int) -> ForwardBatch:
        if size not in self.batches:
            b = ForwardBatch(self.input_ids[:size], self.positions[:size], self.slots[:size], [0, size], [], [],
                             0, self.input_ids[:0], live_rows=self.live)
            b.attn = _StaticMetas(self.metas, min(self.sizes[-1], self.max_seqs), self.max_blocks_per_seq,
                                  self.input_ids.device)
            self.batches[size] = b
        return self.batches[size]

    def _warm_up(self, size: int) -> None:
        """Run the bucket once with every row padding: compiles kernels and makes the static buffers of
        every attention range the forward asks for (which `load` then fills)."""
        self.slots[:size].fill_(self.pad_slot)
        self.live.zero_()
        self.forward(self.static_batch(size), self.ws.rows(size))
        self.warm.add(size)

    @torch.inference_mode()
    def capture_all(self, sizes: list[int] | None = None) -> None:
        """Warm up and capture every bucket (or the given ones), largest first, in one memory pool."""
        pool = torch.cuda.graph_pool_handle()
        for size in sorted(sizes or self.sizes, reverse=True):
            batch = self.static_batch(size)
            ws = self.ws.rows(size)
            self._warm_up(size)
            torch.cuda.synchronize()
            for meta in batch.attn.values():
                meta.derived.clear()  # what kernels derive from the metadata is recomputed inside the graph
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.forward(batch, ws)
            self.graphs[size] = graph
            for meta in batch.attn.values():
                # the kernels' scratch (decode attention's split outputs: ~1 GiB per bucket at a 32 k context) goes
                # back to the pool, for the next bucket's capture: replays never overlap, and nothing outlives one
                meta.derived.clear()
        torch.cuda.synchronize()

    @torch.inference_mode()  # the static buffers made during warm-up are inference tensors
    def load(self, batch: ForwardBatch, feed: tuple[torch.Tensor, torch.Tensor] | None = None) -> int:
        """Copy the batch into the static buffers of its bucket; returns the bucket size.

        feed: (rows, tokens) on the device, input tokens that the previous iteration sampled."""
        n = batch.num_tokens
        size = self.bucket(n)
        if size not in self.warm:
            self._warm_up(size)
        self.input_ids[:n].copy_(batch.input_ids, non_blocking=True)
        if feed is not None:
            self.input_ids[feed[0]] = feed[1]
        self.positions[:n].copy_(batch.positions, non_blocking=True)
        self.slots[:n].copy_(batch.slot_mapping, non_blocking=True)
        self.slots[n:size].fill_(self.pad_slot)
        self.live.fill_(n)
        pin = self.input_ids.is_cuda
        for (kind, a, b), meta in self.static_batch(size).attn.items():  # rows past n are padding
            meta.copy_(batch.build_attention(kind, min(a, n), min(b, n), pin=pin))
        return size

    def run(self, batch: ForwardBatch, feed: tuple[torch.Tensor, torch.Tensor] | None = None) -> Workspace:
        """Load the batch and replay its bucket's graph; returns the workspace rows."""
        size = self.load(batch, feed)
        static = self.static_batch(size)
        ws = self.ws.rows(size)
        if self.capture:
            self.graphs[size].replay()
        else:
            for meta in static.attn.values():
                meta.derived.clear()
            self.forward(static, ws)
        return ws
