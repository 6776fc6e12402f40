"""Benchmark workloads: constant lengths, or the request-length traces NanoFlow evaluates on.

The traces (traces/*.csv, from the NanoFlow repository, Apache-2.0; see traces/README.md) give
prompt and output lengths per request. As NanoFlow does, requests with a prompt over 3072 or an
output over 1024 tokens are dropped. Prompts are random token ids: with dummy weights the content
does not matter, only the lengths do.

Multi-round ('multiround:lmsys[:N[:ROUNDS]]'): N conversations of ROUNDS turns, each turn a trace row (the new
user message's length, the answer's); turn k + 1's prompt is turn k's prompt, its answer and the new message,
so a prefix cache can serve all but the new message. A conversation ends early where a prompt would pass
MAX_PROMPT.
"""
from __future__ import annotations

import csv
import random
from dataclasses import dataclass
from importlib import resources

TRACES = ("splitwise", "lmsys", "sharegpt")
MAX_PROMPT, MAX_OUTPUT = 3072, 1024


@dataclass(slots=True)
class Workload:
    name: str
    lengths: list[tuple[int, int]]  # (prompt tokens, output tokens) per request; multi-round: per turn, the new
                                    # message's tokens (not the whole prompt's), conversation after conversation
    rounds: list[int] | None = None  # multi-round: each conversation's number of turns

    def prompts(self, vocab_size: int, seed: int = 0, stream: int = 0) -> list[list[int]]:
        """Random token ids. Each stream is its own draw: the runs of one bench (its workloads, its request rates)
        take streams 0, 1, ..., so that no run's prompts start with an earlier run's, which the prefix cache holds."""
        rng = random.Random(f"{seed}:{stream}" if stream else seed)
        return [[rng.randrange(vocab_size) for _ in range(p)] for p, _ in self.lengths]

    def conversations(self, vocab_size: int, seed: int = 0, stream: int = 0) -> list[list[tuple[list[int], int]]]:
        """Each conversation's turns as (new message's token ids, answer tokens); one turn each unless
        multi-round. A turn's prompt is the previous turn's prompt and answer, then the new message."""
        turns = iter(zip(self.prompts(vocab_size, seed, stream), (o for _, o in self.lengths)))
        return [[next(turns) for _ in range(k)] for k in self.rounds or [1] * len(self.lengths)]

    @property
    def total_tokens(self) -> int:
        return sum(p + o for p, o in self.lengths)

    @property
    def longest_prompt(self) -> int:
        """The longest prompt a request has (a multi-round turn's: the conversation so far and its message)."""
        most, first = 0, 0
        for k in self.rounds or [1] * len(self.lengths):
            context = 0
            for p, o in self.lengths[first:first + k]:
                most = max(most, context + p)
                context += p + o
            first += k
        return most


def load_trace(name: str) -> list[tuple[int, int]]:
    if name not in TRACES:
        raise ValueError(f"unknown trace {name!r}; traces: {', '.join(TRACES)}")
    with resources.files("nanoflow.bench").joinpath("traces", f"{name}.csv").open() as f:
        rows = [(int(r["ContextTokens"]), int(r["GeneratedTokens"])) for r in csv.DictReader(f)]
    return [(p, o) for p, o in rows if 0 < p <= MAX_PROMPT and 0 < o <= MAX_OUTPUT]


def multiround(name: str, spec: str, conversations: int, rounds: int, seed: int) -> Workload:
    rows = load_trace(name)
    if conversations * rounds > len(rows):  # (rows are drawn without replacement, as trace:NAME:N's)
        raise ValueError(f"bad workload {spec!r}: {conversations} conversations of {rounds} turns need "
                         f"{conversations * rounds} rows; the trace has {len(rows)}")
    picked = random.Random(seed).sample(rows, conversations * rounds)
    lengths, counts = [], []
    for c in range(len(picked) // rounds):
        context = 0  # the prompt so far, answers included
        turns = 0
        for m, o in picked[c * rounds: (c + 1) * rounds]:
            if context + m > MAX_PROMPT:
                break
            lengths.append((m, o))
            context += m + o
            turns += 1
        counts.append(turns)
    return Workload(spec, lengths, counts)


MAX_REQUESTS = 10**7  # a workload's requests, conversations or rounds (more would not fit a host's memory)


def parse(spec: str, num_requests: int | None = None, seed: int = 0) -> Workload:
    """'const:IN:OUT[:N]', 'trace:NAME[:N]' or 'multiround:NAME[:N[:ROUNDS]]'; N (else num_requests) requests,
    or conversations of ROUNDS turns (default 4), traces sampled without replacement (default: 1000 const
    requests, the whole trace, 250 conversations)."""
    if num_requests is not None and num_requests <= 0:
        raise ValueError(f"--num-requests must be >= 1, not {num_requests}")
    kind, _, rest = spec.partition(":")
    parts = rest.split(":")
    if kind == "trace" and len(parts) > 2:
        raise ValueError(f"bad workload {spec!r}: expected trace:NAME[:N]")
    try:
        counts = [int(x) for x in parts[1:]] if kind == "multiround" else []  # N, ROUNDS
        if min(counts, default=1) <= 0:
            raise ValueError
        if len(parts) == {"const": 3, "trace": 2}.get(kind):
            num_requests = int(parts.pop())
        if num_requests is not None and num_requests <= 0:  # (from the spec or --num-requests)
            raise ValueError
    except ValueError:
        raise ValueError(f"bad workload {spec!r}: counts must be positive integers") from None
    if max([num_requests or 0, *counts]) > MAX_REQUESTS:
        raise ValueError(f"bad workload {spec!r}: at most {MAX_REQUESTS:,} requests (a run holds them all)")
    if kind == "multiround" and len(counts) <= 2:
        return multiround(parts[0], spec, counts[0] if counts else num_requests or 250,
                          counts[1] if len(counts) > 1 else 4, seed)
    if kind == "const":
        try:
            p, o = (int(x) for x in parts)
        except ValueError:
            raise ValueError(f"bad workload {spec!r}: expected const:IN:OUT[:N]") from None
        if p <= 0 or o <= 0:
            raise ValueError(f"bad workload {spec!r}: lengths must be positive")
        return Workload(spec, [(p, o)] * (num_requests or 1000))
    if kind == "trace":
        rows = load_trace(parts[0])
        if num_requests is not None and num_requests > len(rows):
            raise ValueError(f"bad workload {spec!r}: the trace has {len(rows)} requests, fewer than {num_requests}")
        if num_requests is not None and num_requests < len(rows):
            rows = random.Random(seed).sample(rows, num_requests)
        return Workload(spec, rows)
    raise ValueError(f"bad workload {spec!r}: expected const:IN:OUT[:N], trace:{'|'.join(TRACES)}[:N] or "
                     f"multiround:TRACE[:N[:ROUNDS]]")
