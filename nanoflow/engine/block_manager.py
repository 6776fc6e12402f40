"""Paged KV cache bookkeeping: fixed-size blocks shared by reference count, one block table per sequence, the
prefix cache and its host tier.

Prefix cache: once its KV is computed, a full block of a sequence is named by a chained hash, the hash of
(its parent block's hash, its tokens), so that equal hashes mean equal whole prefixes. A sequence being
admitted takes the cached blocks of its longest cached prefix (reference count + 1) and its prefill starts
after them. Only full blocks are named, and a full block is never written again, so sharing needs no
copy-on-write. A named block whose count drops to 0 stays cached, evictable, least recently used first,
until its memory is needed; blocks with nothing worth keeping sit in the free list and go first.

Host tier (KV offload): when a named block's count drops to 0 (its sequence finished or was preempted), its
KV is also copied to a slot of a host pool (a save), keyed by the same hash, least recently used first. A
prefix that continues in the host tier gets fresh blocks whose KV is copied back (a load) before the
iteration that reads it. The copies are only recorded here (`saves`, `loads`); the scheduler hands them to
the runner with the next iteration, saves before loads (a load may read a slot saved in the same batch).
"""
from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict, deque
from dataclasses import dataclass, fields

from nanoflow.engine.sequence import Sequence


@dataclass(slots=True)
class CacheStats:
    queries: int = 0  # prompt tokens looked up at admission
    hits: int = 0  # ... found on the GPU
    host_hits: int = 0  # ... found in the host tier (loaded)
    evicted: int = 0  # cached GPU blocks reused for other KV
    saved: int = 0  # blocks copied to the host tier
    loaded: int = 0  # blocks copied back from it
    host_evicted: int = 0  # host slots overwritten

    @property
    def hit_rate(self) -> float:
        return (self.hits + self.host_hits) / self.queries if self.queries else 0.0

    def __add__(self, other: CacheStats) -> CacheStats:  # of several block managers (data-parallel replicas)
        return CacheStats(*(getattr(self, f.name) + getattr(other, f.name) for f in fields(self)))


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, caching: bool = False, num_host_blocks: int = 0):
        if num_host_blocks and not caching:
            raise ValueError("KV offload keys host blocks by prefix hash: it needs prefix caching on")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.caching = caching
        self.num_host_blocks = num_host_blocks
        self.ref = [0] * num_blocks
        self.hash_of: list[bytes | None] = [None] * num_blocks
        self.cached: dict[bytes, int] = {}  # hash -> GPU block
        self.evictable: OrderedDict[int, None] = OrderedDict()  # cached blocks with count 0, oldest first
        self.free_blocks: deque[int] = deque(range(num_blocks))  # count 0 and nothing cached
        self.host: OrderedDict[bytes, int] = OrderedDict()  # hash -> host slot, oldest first
        self.host_free: deque[int] = deque(range(num_host_blocks))
        self.saves: list[tuple[int, int]] = []  # (block, slot) copies the next iteration issues
        self.loads: list[tuple[int, int]] = []
        # A save reads its block on the copy stream, after the iterations issued before it; a block reused
        # while its save may still be in flight makes the next iteration wait for the copies (the fence).
        self.unfenced: set[int] = set()  # blocks with a save pending or in flight
        self.fence = False
        self.stats = CacheStats()

    @property
    def num_free(self) -> int:
        """Blocks that an allocation can take: free, or cached and evictable."""
        return len(self.free_blocks) + len(self.evictable)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def needed(self, seq: Sequence, num_tokens: int) -> int:
        """Blocks still to allocate for seq to hold num_tokens tokens."""
        return max(self.blocks_for(num_tokens) - len(seq.block_table), 0)

    def can_allocate(self, seq: Sequence, num_tokens: int) -> bool:
        return self.needed(seq, num_tokens) <= self.num_free

    def allocate(self, seq: Sequence, num_tokens: int) -> None:
        n = self.needed(seq, num_tokens)
        if n > self.num_free:
            raise RuntimeError(f"out of KV blocks: need {n}, {self.num_free} free")
        seq.block_table.extend(self._take() for _ in range(n))

    def admit(self, seq: Sequence, use_cache: bool) -> bool:
        """Blocks for a waiting sequence's tokens, the leading ones from the prefix cache (and its host tier);
        False, taking nothing, if they and its first generated token's do not fit."""
        hits = self._match(seq) if use_cache and self.caching else []
        on_gpu = [self.cached[h] for h in hits if h in self.cached]
        if self.blocks_for(seq.num_tokens + 1) - len(on_gpu) > self.num_free - sum(self.ref[b] == 0 for b in on_gpu):
            return False
        for b in on_gpu:  # held first, so that taking blocks for the host hits cannot evict them
            self.evictable.pop(b, None)
            self.ref[b] += 1
        for h in hits:
            b = self.cached.get(h)
            if b is None:  # in the host tier: a fresh block, filled before the iteration runs
                b = self._take()
                self.hash_of[b], self.cached[h] = h, b
                self.host.move_to_end(h)
                self.loads.append((b, self.host[h]))
                self.stats.loaded += 1
            seq.block_table.append(b)
        bs = self.block_size
        seq.num_computed = len(hits) * bs
        seq.num_cached_blocks = len(hits)
        if use_cache and self.caching:
            self.stats.queries += seq.num_tokens
            self.stats.hits += len(on_gpu) * bs
            self.stats.host_hits += (len(hits) - len(on_gpu)) * bs
        self.allocate(seq, seq.num_tokens)
        return True

    def cache_computed(self, seq: Sequence) -> None:
        """Name the sequence's blocks that became full of computed KV (called once their iteration is issued,
        so any reader comes later on the stream)."""
        n = min(seq.num_computed, seq.num_tokens) // self.block_size
        if not self.caching or n <= seq.num_cached_blocks:
            return
        hashes = self._hashes(seq, n)
        for k in range(seq.num_cached_blocks, n):
            b, h = seq.block_table[k], hashes[k]
            if self.hash_of[b] is None and h not in self.cached:  # else computed twice at once: keep the first
                self.hash_of[b], self.cached[h] = h, b
        seq.num_cached_blocks = n

    def free(self, seq: Sequence) -> None:
        self.cache_computed(seq)
        for b in reversed(seq.block_table):  # the tail first: it is evicted before the prefix it extends
            self.ref[b] -= 1
            if self.ref[b]:
                continue
            h = self.hash_of[b]
            if h is None:
                self.free_blocks.append(b)
            else:
                self.evictable[b] = None
                self._save(b, h)
        seq.block_table = []
        seq.num_computed = seq.num_cached_blocks = 0

    def reset_cache(self) -> bool:
        """Forget every cached prefix, on the GPU and in the host tier (as vLLM's reset_prefix_cache); only while
        no sequence holds a block (else False, and nothing changes). A save still in flight writes a slot that no
        hash names any more."""
        if any(self.ref):
            return False
        self.free_blocks.extend(self.evictable)
        self.evictable.clear()
        self.cached.clear()
        self.hash_of = [None] * self.num_blocks
        self.host_free.extend(self.host.values())
        self.host.clear()
        return True

    def take_copies(self) -> tuple[list[tuple[int, int]], list[tuple[int, int]], bool]:
        """The saves, loads and fence that the next iteration issues before it runs."""
        copies = self.saves, self.loads, self.fence
        if self.loads or self.fence:  # the iteration waits for the copy stream, so for every save so far
            self.unfenced.clear()
        self.saves, self.loads, self.fence = [], [], False
        return copies

    def slot(self, seq: Sequence, position: int) -> int:
        return seq.block_table[position // self.block_size] * self.block_size + position % self.block_size

    # -- internals -------------------------------------------------------------------------------
    def _take(self) -> int:
        if self.free_blocks:
            b = self.free_blocks.popleft()
        else:
            b, _ = self.evictable.popitem(last=False)
            del self.cached[self.hash_of[b]]
            self.hash_of[b] = None
            self.stats.evicted += 1
            self.fence |= b in self.unfenced
        self.ref[b] = 1
        return b

    def _save(self, block: int, h: bytes) -> None:
        if not self.num_host_blocks:
            return
        if h in self.host:
            self.host.move_to_end(h)
            return
        if self.host_free:
            slot = self.host_free.popleft()
        else:
            _, slot = self.host.popitem(last=False)
            self.stats.host_evicted += 1
        self.host[h] = slot
        self.saves.append((block, slot))
        self.unfenced.add(block)
        self.stats.saved += 1

    def _match(self, seq: Sequence) -> list[bytes]:
        """Hashes of the sequence's longest cached prefix of full blocks, on the GPU or the host; the last
        token is always left out, so that its logits get computed."""
        hashes = self._hashes(seq, (seq.num_tokens - 1) // self.block_size)
        hits = []
        for h in hashes:
            if h not in self.cached and h not in self.host:
                break
            hits.append(h)
        return hits

    def _hashes(self, seq: Sequence, n: int) -> list[bytes]:
        """The chained hashes of the sequence's first n full blocks (kept on it: tokens are only appended)."""
        hs, bs = seq.block_hashes, self.block_size
        while len(hs) < n:
            k = len(hs)
            tokens = array("q", seq.token_ids[k * bs: (k + 1) * bs]).tobytes()
            hs.append(hashlib.blake2b((hs[-1] if hs else b"") + tokens, digest_size=16).digest())
        return hs[:n]
