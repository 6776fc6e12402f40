"""Request and sequence state. A request with n > 1 has n sequences sharing its prompt."""
from __future__ import annotations

import itertools
import time
from enum import Enum

import torch

from nanoflow.outputs import PositionLogprobs
from nanoflow.sampling_params import SamplingParams

_seq_ids = itertools.count()


class Status(Enum):
    WAITING = 1
    RUNNING = 2
    FINISHED = 3


class Request:
    __slots__ = ("request_id", "prompt", "prompt_token_ids", "params", "seqs", "arrival_time",
                 "prompt_logprobs", "prompt_logprobs_planned", "scheduled_time", "first_token_time", "last_token_time",
                 "bad_words_ids",
                 "num_cached_tokens", "priority")

    def __init__(self, request_id: str, prompt: str | None, prompt_token_ids: list[int], params: SamplingParams,
                 priority: int = 0):
        self.request_id = request_id
        self.priority = priority  # (schedule_policy "priority": lower first)
        self.prompt = prompt
        self.prompt_token_ids = prompt_token_ids
        self.params = params
        self.arrival_time = time.monotonic()
        # (the engine's clock, time.monotonic(): when it was first admitted (the scheduler's), its first and latest
        # tokens)
        self.scheduled_time: float | None = None
        self.first_token_time: float | None = None
        self.last_token_time: float | None = None
        self.prompt_logprobs: list[PositionLogprobs | None] | None = (
            [None] if params.prompt_logprobs is not None else None)
        # positions whose prompt logprobs an iteration computes (ahead of prompt_logprobs, which fills in one
        # iteration late under asynchronous scheduling)
        self.prompt_logprobs_planned = 1
        self.bad_words_ids: list[list[int]] = []  # each bad word's tokens (the engine tokenizes them)
        self.num_cached_tokens: int | None = None  # its prompt's tokens the prefix cache held at its first admission
        self.seqs = [Sequence(self, i) for i in range(params.n)]

    @property
    def finished(self) -> bool:
        return all(s.status is Status.FINISHED for s in self.seqs)


class Sequence:
    __slots__ = ("seq_id", "request", "index", "token_ids", "num_prompt_tokens", "num_computed", "block_table",
                 "status", "finish_reason", "stop_reason", "logprobs", "cumulative_logprob", "output_text",
                 "prefix_offset", "read_offset", "generator", "max_tokens", "num_inflight", "block_hashes",
                 "num_cached_blocks", "grammar", "reasoning", "opening")

    def __init__(self, request: Request, index: int):
        params = request.params
        self.seq_id = next(_seq_ids)
        self.request = request
        self.index = index
        self.token_ids = list(request.prompt_token_ids)
        self.num_prompt_tokens = len(self.token_ids)
        self.num_computed = 0  # tokens whose KV is in the cache
        self.num_inflight = 0  # sampled on the GPU, not yet appended (asynchronous scheduling)
        self.block_table: list[int] = []
        self.block_hashes: list[bytes] = []  # chained hashes of its full blocks, as far as computed (prefix cache)
        self.num_cached_blocks = 0  # leading blocks of block_table named in the prefix cache
        self.status = Status.WAITING
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None
        self.logprobs: list[PositionLogprobs] | None = [] if params.logprobs is not None else None
        self.cumulative_logprob = 0.0
        self.output_text = ""
        # incremental detokenization window (see detokenizer.py; its first call picks where it starts)
        self.prefix_offset = self.read_offset = self.num_prompt_tokens
        self.max_tokens = params.max_tokens
        # A seeded request draws from its own generator (made on the device by the sampler), so its
        # samples do not depend on what else is in the batch.
        self.generator: torch.Generator | None = None
        self.grammar = None  # structured outputs: the xgrammar matcher its tokens advance (structured_output.py)
        self.reasoning = False  # its grammar waits for the end of its reasoning (the engine's reasoning_parser)
        # qwen3's first output token: the reasoning's opening tag (this token id), which the mask also allows, or
        # the grammar's first token (then no reasoning: its output is all content)
        self.opening: int | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_pending(self) -> int:
        """Tokens to compute, counting one still in flight."""
        return len(self.token_ids) + self.num_inflight - self.num_computed

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def num_generated(self) -> int:
        """Output tokens including those in flight."""
        return self.num_output_tokens + self.num_inflight

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def needs_last_token(self) -> bool:
        """Its next sample's mask depends on its last token (a grammar, bad words of several tokens): the host must
        have it."""
        words = self.request.bad_words_ids  # (in the engine's loop: no generator for the common empty list)
        return self.grammar is not None or bool(words) and any(len(w) > 1 for w in words)

    def banned_words(self) -> list[int]:
        """The last token of each bad word whose other tokens end the output (vLLM's rule)."""
        out = self.output_token_ids
        return [w[-1] for w in self.request.bad_words_ids
                if len(w) - 1 <= len(out) and (len(w) == 1 or out[len(out) - len(w) + 1:] == w[:-1])]

    @property
    def params(self) -> SamplingParams:
        return self.request.params
