"""CUDA-event clocks: the GPU's idle time between iterations, and one iteration's time per op."""
from __future__ import annotations

from collections import defaultdict

import torch


def _event() -> torch.cuda.Event:
    e = torch.cuda.Event(enable_timing=True)
    e.record()
    return e


class IterationClock:
    """An event where each iteration's GPU work starts and ends. A gap between one iteration's end and
    the next one's start on the GPU is time the GPU sat waiting for the CPU."""

    def __init__(self):
        self.marks: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        self._start: torch.cuda.Event | None = None

    def start(self) -> None:
        self._start = _event()

    def end(self) -> None:
        self.marks.append((self._start, _event()))

    def summary(self) -> dict:
        if not self.marks:
            return {}
        torch.cuda.synchronize()
        busy = sum(s.elapsed_time(e) for s, e in self.marks)
        gaps = sorted(e.elapsed_time(s2) for (_, e), (s2, _) in zip(self.marks, self.marks[1:]))
        idle = sum(gaps)
        pct = (lambda q: gaps[min(int(q * len(gaps)), len(gaps) - 1)]) if gaps else (lambda q: 0.0)
        return {"iterations": len(self.marks), "gpu_busy_ms": busy, "gpu_idle_ms": idle,
                "gpu_idle_share": idle / (busy + idle) if busy + idle else 0.0,
                "gpu_idle_gap_ms_p50": pct(0.5), "gpu_idle_gap_ms_p99": pct(0.99),
                "gpu_idle_gap_ms_max": gaps[-1] if gaps else 0.0}


class OpTimer:
    """Events between the ops of one forward; times summed per op name over the layers."""

    def __init__(self):
        self.events: list[tuple[str, torch.cuda.Event]] = []
        self.tokens = 0  # the timed iteration's batch size

    def __call__(self, name: str) -> None:
        self.events.append((name, _event()))

    def summary(self) -> dict[str, float]:
        torch.cuda.synchronize()
        ms: dict[str, float] = defaultdict(float)
        for (name, a), (_, b) in zip(self.events, self.events[1:]):
            ms[name] += a.elapsed_time(b)
        return dict(ms)
