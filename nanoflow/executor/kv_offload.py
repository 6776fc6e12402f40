"""The host tier's copies (NanoFlow's KV offload): KV blocks between the paged cache and a host pool.

The pool holds one slot per block, each slot a block's KV of every layer, contiguous
([slots, layers, 2, block_size, kv_heads, head_dim]; pinned on CUDA), so that a block moves in one copy and
a run of consecutive slots in one. The scheduler decides which copies happen (block_manager.py); this
module only issues them, before the iteration they precede:

- on CUDA, on a stream of their own that first waits for the iterations already issued (a save reads KV
  they wrote; a load overwrites a block they may still read). Saves are then left to overlap with the
  compute; the iteration waits for the copy stream only when it loads (it reads the loaded KV) or reuses a
  block whose save may still be reading it (the fence). Slots are only ever touched by this stream, in
  order, so a slot saved and then loaded, or loaded and then overwritten, needs nothing more.
- on the CPU, plain copies in the same order.
"""
from __future__ import annotations

import contextlib

import torch

# Copies go through a device buffer of this many blocks at a time (64 MiB for Llama-3-8B in bf16): the KV cache
# leaves little device memory spare.
STAGE_BLOCKS = 32


def _runs(slots: list[int]):
    """(first index, first slot, length) of each run of consecutive slots."""
    start = 0
    for i in range(1, len(slots) + 1):
        if i == len(slots) or slots[i] != slots[i - 1] + 1:
            yield start, slots[start], i - start
            start = i


class KVOffload:
    def __init__(self, kv_cache: torch.Tensor, num_slots: int):
        # [layers, 2, blocks + 1, block_size, kv_heads, head_dim]; an fp8 cache as bytes: the copies move bits, and
        # gathers and index_copy_ of float8 are not on every device
        self.kv = kv_cache.view(torch.uint8) if kv_cache.dtype.itemsize == 1 else kv_cache
        layers, two, _, bs, heads, dim = kv_cache.shape
        self.cuda = kv_cache.device.type == "cuda"
        self.host = torch.empty(num_slots, layers, two, bs, heads, dim, dtype=self.kv.dtype, pin_memory=self.cuda)
        self.stream = torch.cuda.Stream(kv_cache.device) if self.cuda else None
        self.copied = torch.cuda.Event() if self.cuda else None  # the copy stream's last issued work

    def issue(self, saves: list[tuple[int, int]], loads: list[tuple[int, int]], fence: bool) -> None:
        """Enqueue the copies before the next iteration (on the current stream)."""
        if saves or loads:
            if self.cuda:
                self.stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(self.stream) if self.cuda else contextlib.nullcontext():
                for i in range(0, len(saves), STAGE_BLOCKS):
                    self._save(*zip(*saves[i: i + STAGE_BLOCKS]))
                for i in range(0, len(loads), STAGE_BLOCKS):
                    self._load(*zip(*loads[i: i + STAGE_BLOCKS]))
            if self.cuda:
                self.copied.record(self.stream)
        if self.cuda and (loads or fence):
            torch.cuda.current_stream().wait_event(self.copied)

    def _index(self, blocks) -> torch.Tensor:
        t = torch.tensor(blocks, dtype=torch.long)
        return t.pin_memory().to(self.kv.device, non_blocking=True) if self.cuda else t

    def _save(self, blocks, slots) -> None:
        # one gather of the blocks into slot layout on the device, then one device-to-host copy per run of slots
        staged = self.kv.movedim(2, 0)[self._index(blocks)]
        for i, slot, n in _runs(slots):
            self.host[slot: slot + n].copy_(staged[i: i + n], non_blocking=True)

    def _load(self, blocks, slots) -> None:
        # one host-to-device copy per run of slots (usually one: a request's blocks are saved together, so its
        # slots are consecutive unless the host tier was full), then a scatter into the pages
        staged = torch.empty((len(slots), *self.host.shape[1:]), dtype=self.kv.dtype, device=self.kv.device)
        for i, slot, n in _runs(slots):
            staged[i: i + n].copy_(self.host[slot: slot + n], non_blocking=True)
        self.kv.index_copy_(2, self._index(blocks), staged.movedim(0, 2))
