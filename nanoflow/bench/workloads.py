"""Benchmark workloads: constant lengths, or the request-length traces NanoFlow evaluates on.

The traces (traces/*.csv, from the NanoFlow repository, Apache-2.0; see traces/README.md) give
prompt and output lengths per request. As NanoFlow does, requests with a prompt over 3072 or an
output over 1024 tokens are dropped. Prompts are random token ids: with dummy weights the content
does not matter, only the lengths do.
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
    lengths: list[tuple[int, int]]  # (prompt tokens, output tokens) per request

    def prompts(self, vocab_size: int, seed: int = 0) -> list[list[int]]:
        rng = random.Random(seed)
        return [[rng.randrange(vocab_size) for _ in range(p)] for p, _ in self.lengths]

    @property
    def total_tokens(self) -> int:
        return sum(p + o for p, o in self.lengths)


def load_trace(name: str) -> list[tuple[int, int]]:
    if name not in TRACES:
        raise ValueError(f"unknown trace {name!r}; traces: {', '.join(TRACES)}")
    with resources.files("nanoflow.bench").joinpath("traces", f"{name}.csv").open() as f:
        rows = [(int(r["ContextTokens"]), int(r["GeneratedTokens"])) for r in csv.DictReader(f)]
    return [(p, o) for p, o in rows if 0 < p <= MAX_PROMPT and 0 < o <= MAX_OUTPUT]


def parse(spec: str, num_requests: int | None = None, seed: int = 0) -> Workload:
    """'const:IN:OUT[:N]' or 'trace:NAME[:N]'; N (else num_requests) requests, traces sampled without
    replacement (default: 1000 const requests, the whole trace)."""
    kind, _, rest = spec.partition(":")
    parts = rest.split(":")
    if len(parts) == {"const": 3, "trace": 2}.get(kind):
        try:
            num_requests = int(parts.pop())
        except ValueError:
            raise ValueError(f"bad workload {spec!r}: the request count must be an integer") from None
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
        if num_requests is not None and num_requests < len(rows):
            rows = random.Random(seed).sample(rows, num_requests)
        return Workload(spec, rows)
    raise ValueError(f"bad workload {spec!r}: expected const:IN:OUT[:N] or trace:{'|'.join(TRACES)}[:N]")
