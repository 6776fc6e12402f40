"""NanoFlow's dense batch: each iteration takes one token from every running decode sequence and
fills the rest of a fixed token budget with chunked prefill.

Admission takes the waiting sequences in order (first-come first-served; with schedule_policy="lof" the
longest max_tokens first; with "slack" in arrival order but for those whose max_tokens outlast the work in
hand, which go first, longest first), gated by KV blocks (the whole prompt must fit) or,
with admission="predicted", by the predicted peak KV use of everything running (NanoFlow's policy,
which avoids preemption: the peak of sequences that end at different times, not the sum of their
peaks). When a decode sequence needs a block and none is free, the newest running sequence is
preempted, waits ahead of every new one, and is later recomputed.

With prefix caching, an admitted sequence starts its prefill after its longest cached prefix (see
block_manager.py), and the KV copies of the host tier ride on the SchedulerOutput for the runner to issue.
"""
from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import dataclass, field

from nanoflow.config import EngineConfig
from nanoflow.engine.block_manager import BlockManager
from nanoflow.engine.sequence import Request, Sequence, Status


@dataclass(slots=True)
class Chunk:
    """Tokens [start, start + length) of a sequence, computed this iteration."""
    seq: Sequence
    start: int
    length: int

    samples: bool = False  # reaches the end of the sequence, so the next token is sampled


@dataclass(slots=True)
class SchedulerOutput:
    chunks: list[Chunk] = field(default_factory=list)  # decode chunks first, then prefill chunks
    num_decode: int = 0
    preempted: list[Sequence] = field(default_factory=list)
    # host tier copies to issue before the iteration runs: (GPU block, host slot); saves first
    kv_saves: list[tuple[int, int]] = field(default_factory=list)
    kv_loads: list[tuple[int, int]] = field(default_factory=list)
    kv_fence: bool = False  # the iteration reuses a block whose save may still be reading it: wait for the copies

    @property
    def num_tokens(self) -> int:
        return sum(c.length for c in self.chunks)

    @property
    def empty(self) -> bool:
        return not self.chunks


ENDING_LAG = 2  # iterations a sequence may hold its blocks after its last one (1 with asynchronous scheduling; 1 spare)


def _held2(tokens: int, outputs: int) -> int:
    """Twice the token-iterations a sequence of `tokens` tokens holds while it makes `outputs` more (one an
    iteration: it holds tokens + outputs / 2 on average)."""
    return outputs * (2 * tokens + outputs)


class Scheduler:
    def __init__(self, config: EngineConfig, num_blocks: int, max_num_batched_tokens: int, max_model_len: int,
                 num_host_blocks: int = 0):
        self.config = config
        self.budget = max_num_batched_tokens
        self.max_model_len = max_model_len
        self.blocks = BlockManager(num_blocks, config.block_size, config.enable_prefix_caching, num_host_blocks)
        self.waiting: deque[Sequence] = deque()
        self.resuming: set[Sequence] = set()  # preempted, waiting at the head of the queue
        # schedule_policy "lof" / "slack": the cuts (see _cut) for which the waiting queue's order still holds;
        # empty when sequences were added since it was last ordered
        self.order_holds = (math.inf, -math.inf)
        # the waiting queue's tokens (prompt + max_tokens) and twice the tokens its sequences would hold over their
        # decodes (max_tokens * (2 prompt + max_tokens)): slack's cut, kept as the queue changes, not summed each time
        self.waiting_tokens = self.waiting_held2 = 0
        self.running: list[Sequence] = []  # in admission order: the last is preempted first
        self.num_preemptions = 0
        self.num_prefill_tokens = 0  # prompt (and recomputed) tokens computed (the prefix cache cuts them)
        self.num_scheduled_tokens = 0  # every token computed, prefill and decode
        self.peak_running = 0  # the most sequences running in one iteration (as scheduled: before any ends)

    def check_prompt(self, num_tokens: int, max_tokens: int | None = None) -> int:
        """The room a prompt of num_tokens leaves for output tokens: to the context length, or to the whole KV cache
        where that is smaller (a sequence longer than the cache would preempt itself forever). ValueError if the
        context length leaves none, if the prompt and its first output need more than the whole KV cache, or if
        max_tokens does where the context would allow it (a cut there would be silent)."""
        if num_tokens >= self.max_model_len:
            raise ValueError(f"the prompt has {num_tokens} tokens, which leaves no room in the context length "
                             f"(max_model_len = {self.max_model_len})")
        cache = self.blocks.num_blocks * self.blocks.block_size
        if num_tokens + 1 > cache:
            raise ValueError(f"the prompt has {num_tokens} tokens: with its first output token, more than the KV "
                             f"cache holds ({cache} tokens)")
        room = min(self.max_model_len, cache) - num_tokens
        if max_tokens is not None and min(max_tokens, self.max_model_len - num_tokens) > room:
            raise ValueError(f"the prompt ({num_tokens} tokens) and max_tokens={max_tokens} need more than the whole "
                             f"KV cache holds ({cache} tokens): lower max_tokens, or give the cache more room")
        return room

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)
        self._count_waiting(seq, 1)
        self.order_holds = (math.inf, -math.inf)

    def add_request(self, req: Request) -> None:
        """Its sequences (n of them) join the waiting queue."""
        for seq in req.seqs:
            self.add(seq)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def finish(self, seq: Sequence) -> None:
        seq.status = Status.FINISHED
        self.resuming.discard(seq)
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
            self._count_waiting(seq, -1)
        self.blocks.free(seq)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.budget
        # 1. one token for every running decode sequence, oldest first
        for seq in [s for s in self.running if s.num_pending == 1 and not self._reaches_length(s)]:
            if budget == 0:
                break
            if seq.status is not Status.RUNNING:  # preempted by an older sequence in this loop
                continue
            if not self._make_room(seq, seq.num_computed + 1, out):
                continue
            out.chunks.append(Chunk(seq, seq.num_computed, 1, True))
            budget -= 1
        out.num_decode = len(out.chunks)
        # 2. continue prefills in flight (their blocks were allocated at admission)
        for seq in self.running:
            if budget == 0:
                break
            if seq.num_pending > 1:
                n = min(seq.num_pending, budget)
                out.chunks.append(Chunk(seq, seq.num_computed, n, n == seq.num_pending))
                budget -= n
        # 3. admit waiting sequences in order while the budget and the KV cache allow
        policy = self.config.schedule_policy
        if policy != "fcfs" and self.waiting:  # (the cut sums the running: only when needed)
            cut = self._cut() if policy != "priority" else 0
            if not self.order_holds[0] < cut <= self.order_holds[1]:
                self._order_waiting(cut)
        predicted = None  # admission="predicted": the running sequences' peak, computed once one is tried
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[0]
            if seq.num_inflight:  # a preempted one waits for its last token
                break
            if self.config.admission == "predicted":
                predicted = (self._predicted_blocks() if predicted is None else predicted) + self._predicted_peak(seq)
                if predicted > self.blocks.num_blocks:
                    break
            if not self._admit(seq):
                break
            self.waiting.popleft()
            self._count_waiting(seq, -1)
            self.resuming.discard(seq)
            seq.status = Status.RUNNING
            self.running.append(seq)
            n = min(seq.num_pending, budget)
            out.chunks.append(Chunk(seq, seq.num_computed, n, n == seq.num_pending))
            budget -= n
        if out.chunks:
            out.kv_saves, out.kv_loads, out.kv_fence = self.blocks.take_copies()
        self.peak_running = max(self.peak_running, len(self.running))
        return out

    def update(self, out: SchedulerOutput) -> None:
        """Once the iteration is launched: its tokens count as computed, its samples as in flight."""
        for c in out.chunks:
            c.seq.num_computed = c.start + c.length
            c.seq.num_inflight += c.samples
            self.blocks.cache_computed(c.seq)
        self.num_prefill_tokens += sum(c.length for c in out.chunks[out.num_decode:])
        self.num_scheduled_tokens += out.num_tokens

    # -- policies --------------------------------------------------------------------------------
    def _cut(self) -> float:
        """The shortest max_tokens that goes ahead of arrival order. "lof": 0, so all of them, longest first.
        "slack": the fewest iterations the work in hand can take, bound by the budget (the waiting queue's tokens)
        or by the KV cache (what the waiting and the running sequences will hold: a sequence holds its tokens and
        about half the outputs it has still to make, for as many iterations as those outputs). One admitted later
        than that with a longer output would still decode after the rest has finished, stretching the run's end
        over a few sequences, so those start first. The rest keep arrival order, where their ends stay staggered:
        lof bunches the ends of equal lengths, and the cache then fills with long decodes that admit no prefill.
        (A running sequence's decodes take an iteration each whatever the budget, so only the cache counts them;
        counted against the budget too, they cost a 2,048-token budget 2 % more iterations on splitwise.)"""
        if self.config.schedule_policy == "lof":
            return 0.0
        cache = self.blocks.num_blocks * self.blocks.block_size
        # the running sequences summed here: at most max_num_seqs of them, and schedule walks them anyway
        held2 = self.waiting_held2 + sum(_held2(s.num_tokens, s.max_tokens - s.num_output_tokens)
                                         for s in self.running)
        return max(self.waiting_tokens / self.budget, held2 / (2 * cache))

    def _count_waiting(self, seq: Sequence, sign: int) -> None:
        m, p = seq.max_tokens, seq.num_prompt_tokens
        self.waiting_tokens += sign * (p + m)
        self.waiting_held2 += sign * _held2(p, m)

    def _order_waiting(self, cut: float) -> None:
        """The preempted first (in their order), then those with max_tokens >= cut, longest first (max_tokens,
        which the engine bounds by the context's room), then the rest; ties, and the rest, in arrival order (a
        request's n sequences among them). Records the cuts between which this order holds, so that it is sorted
        again only after additions or once the cut passes a sequence's max_tokens. With "priority": the preempted
        first, then by priority and arrival; it holds until the next addition."""
        if self.config.schedule_policy == "priority":
            self.waiting = deque(sorted(self.waiting, key=lambda s: (0, 0, 0) if s in self.resuming else
                                        (1, s.request.priority, s.seq_id)))
            self.order_holds = (-math.inf, math.inf)
            return
        self.waiting = deque(sorted(self.waiting, key=lambda s: (0, 0, 0) if s in self.resuming else
                                    (1, -s.max_tokens, s.seq_id) if s.max_tokens >= cut else (2, 0, s.seq_id)))
        lengths = [s.max_tokens for s in self.waiting if s not in self.resuming]
        self.order_holds = (max((m for m in lengths if m < cut), default=-math.inf),
                            min((m for m in lengths if m >= cut), default=math.inf))

    def _reaches_length(self, seq: Sequence) -> bool:
        """Its in-flight token is its last: it finishes on 'length' when that token lands."""
        return seq.num_inflight > 0 and (seq.num_generated >= seq.max_tokens
                                         or seq.num_tokens + seq.num_inflight >= self.max_model_len)

    def _admit(self, seq: Sequence) -> bool:
        """Give seq its blocks if it may run: room for its tokens and first generated token, less a cached prefix."""
        # prompt logprobs need every prompt row's logits: no reuse (as in vLLM)
        use_cache = seq.request.params.prompt_logprobs is None
        if use_cache and self._sibling_prefilling(seq):
            return False
        if not self.blocks.admit(seq, use_cache):
            return False
        if seq.request.num_cached_tokens is None:  # (as vLLM's: at the first admission, not a preempted one's)
            seq.request.num_cached_tokens, seq.request.scheduled_time = seq.num_computed, time.monotonic()
        return True

    def _sibling_prefilling(self, seq: Sequence) -> bool:
        """n > 1: the first sequence's prompt is still being computed; the others wait for it so that they share
        its full blocks through the cache and compute only the last, partial one."""
        first = seq.request.seqs[0]
        return (self.blocks.caching and first is not seq and first.status is Status.RUNNING
                and first.num_computed < first.num_prompt_tokens
                and first.num_prompt_tokens > self.blocks.block_size)

    def _predicted_len(self, seq: Sequence) -> int:
        out_len = self.config.predicted_output_len or seq.max_tokens or 0
        if seq.max_tokens is not None:  # (a prediction past what it may generate could outgrow the whole cache)
            out_len = min(out_len, seq.max_tokens)
        return max(seq.num_prompt_tokens + out_len, seq.num_tokens)

    def _predicted_peak(self, seq: Sequence) -> int:
        return self.blocks.blocks_for(self._predicted_len(seq))

    def _predicted_blocks(self) -> int:
        """The most KV blocks the running sequences will hold at once if each ends at its predicted length.

        A prefill counts at its peak throughout. Sequences in decode each grow a token an iteration, in step (every
        one gets its token while max_num_seqs <= the budget), and free their blocks when they end, so when their
        ends are staggered the total peaks below the sum of their peaks: ~1,280 rather than 1,536 tokens a request
        in a 1024/512 steady state. Just before the sequences with `left` tokens to go end (ENDING_LAG iterations
        after their last token: the asynchronous engine reads it back one iteration late), those still holding
        blocks are the ones with at least `left` to go, each grown by left + ENDING_LAG - 1 tokens at most."""
        fixed, decoding = 0, []
        in_step = self.config.max_num_seqs <= self.budget
        for s in self.running:
            if s.num_pending > 1 or not in_step:
                fixed += self._predicted_peak(s)  # (a decode that may miss an iteration would end late)
            else:
                now = s.num_tokens + s.num_inflight
                decoding.append((self._predicted_len(s) - now, self.blocks.blocks_for(now), self._predicted_peak(s)))
        decoding.sort(key=lambda d: -d[0])
        most = held = peaks = 0
        for alive, (left, blocks, peak) in enumerate(decoding, 1):
            held += blocks
            peaks += peak
            grown = self.blocks.blocks_for(left + ENDING_LAG - 1)  # (ceil(a + b) <= ceil(a) + ceil(b), per sequence)
            most = max(most, min(held + alive * grown, peaks))
        return fixed + most

    def _make_room(self, seq: Sequence, num_tokens: int, out: SchedulerOutput) -> bool:
        """Allocate blocks for seq, preempting the newest running sequences (with "priority": the lowest-priority ones)
        if needed."""
        while not self.blocks.can_allocate(seq, num_tokens):
            victim = (max(self.running, key=lambda s: (s.request.priority, s.seq_id))
                      if self.config.schedule_policy == "priority" else self.running[-1])
            self._preempt(victim, out)
            if victim is seq:
                return False
        self.blocks.allocate(seq, num_tokens)
        return True

    def _preempt(self, seq: Sequence, out: SchedulerOutput) -> None:
        self.running.remove(seq)
        self.blocks.free(seq)  # recomputed from scratch on readmission
        seq.status = Status.WAITING
        self.waiting.appendleft(seq)
        self._count_waiting(seq, 1)
        self.resuming.add(seq)
        out.preempted.append(seq)
        out.chunks = [c for c in out.chunks if c.seq is not seq]
        self.num_preemptions += 1
