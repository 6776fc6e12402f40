"""CUDA-event clocks: the GPU's idle time between iterations and each iteration's phases, and one iteration's GPU
time per op."""
from __future__ import annotations

import torch


def _event() -> torch.cuda.Event:
    e = torch.cuda.Event(enable_timing=True)
    e.record()
    return e


class IterationClock:
    """Events where each iteration's GPU work starts, where each of its phases ends (the forward, the logits, the
    sampling), and where it ends. A gap between one iteration's end and the next one's start on the GPU is time
    the GPU sat waiting for the CPU. `stage` tags the iterations launched while it is set (the bench's fill, steady
    state and drain): the summary gives each stage's GPU time per token, and averages the phases over the steady
    iterations if any."""

    PHASES = ("forward", "logits", "sampling")

    def __init__(self):
        self.marks: list[tuple[str, int, list[torch.cuda.Event]]] = []  # (stage, tokens, [start, phase ends])
        self.stage = "steady"
        self._open: list[torch.cuda.Event] = []
        self._tokens = 0

    def start(self, tokens: int) -> None:
        self._open, self._tokens = [_event()], tokens

    def mark(self) -> None:
        """The current phase ends here (called after the forward and after the logits)."""
        self._open.append(_event())

    def end(self) -> None:
        self._open.append(_event())
        self.marks.append((self.stage, self._tokens, self._open))

    def summary(self) -> dict:
        if not self.marks:
            return {}
        torch.cuda.synchronize()
        busy = sum(ev[0].elapsed_time(ev[-1]) for _, _, ev in self.marks)
        gaps = sorted(a[-1].elapsed_time(b[0]) for (_, _, a), (_, _, b) in zip(self.marks, self.marks[1:]))
        idle = sum(gaps)
        pct = (lambda q: gaps[min(int(q * len(gaps)), len(gaps) - 1)]) if gaps else (lambda q: 0.0)
        stages: dict[str, dict] = {}
        for stage, tokens, ev in self.marks:
            row = stages.setdefault(stage, {"iterations": 0, "tokens": 0, "gpu_ms": 0.0})
            row["iterations"] += 1
            row["tokens"] += tokens
            row["gpu_ms"] += ev[0].elapsed_time(ev[-1])
        for row in stages.values():
            row["tokens_per_gpu_second"] = row["tokens"] / row["gpu_ms"] * 1e3 if row["gpu_ms"] else 0.0
        # the phases' mean GPU time, over the steady iterations if any (iterations with all their marks)
        whole = [(stage, ev) for stage, _, ev in self.marks if len(ev) == len(self.PHASES) + 1]
        phased = [ev for stage, ev in whole if stage == "steady"] or [ev for _, ev in whole]
        phases = {name: sum(ev[i].elapsed_time(ev[i + 1]) for ev in phased) / len(phased)
                  for i, name in enumerate(self.PHASES)} if phased else {}
        return {"iterations": len(self.marks), "gpu_busy_ms": busy, "gpu_idle_ms": idle,
                "gpu_idle_share": idle / (busy + idle) if busy + idle else 0.0,
                "gpu_idle_gap_ms_p50": pct(0.5), "gpu_idle_gap_ms_p99": pct(0.99),
                "gpu_idle_gap_ms_max": gaps[-1] if gaps else 0.0,
                "phase_ms": phases, "phase_iterations": len(phased), "stages": stages}


def op_times(runner, batch, reps: int = 20) -> dict[str, float]:
    """GPU milliseconds of each op over all layers for this batch, each op captured in a CUDA graph of
    its own and replayed, so that no CPU launch overhead is counted (an eager run would show it)."""
    graphs, model = runner.graphs, runner.model
    size = graphs.load(batch)
    static = graphs.static_batch(size)
    ws = graphs.ws.rows(size)
    saved = {key: dict(meta.derived) for key, meta in static.attn.items()}
    times = {}
    with torch.inference_mode():
        for name in ("embed",) + model.ops:
            def run(name=name):
                if name == "embed":
                    model.embed_tokens(ws, static, 0, size)
                for l in range(model.cfg.num_layers) if name != "embed" else ():
                    getattr(model, name)(l, ws, static, 0, size)
            for meta in static.attn.values():
                meta.derived.clear()  # derived metadata is computed inside this op's graph
            run()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                run()
            graph.replay()
            start = _event()
            for _ in range(reps):
                graph.replay()
            end = _event()
            end.synchronize()
            times[name] = start.elapsed_time(end) / reps
    for key, meta in static.attn.items():
        meta.derived.clear()
        meta.derived.update(saved[key])
    return times
