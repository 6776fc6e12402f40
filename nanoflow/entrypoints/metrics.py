"""Prometheus metrics of the server (GET /metrics), in a registry of its own so that several servers
can live in one process (tests). With several API-server processes, each renders the sum of all of theirs.

Those vLLM has are named as vLLM's (`vllm:` prefix, a `model_name` label: the first served name), so that its
dashboards and autoscalers read them; nanoflow's own (the host tier, the HTTP statuses) keep a `nanoflow_` prefix."""
from __future__ import annotations

import dataclasses
import logging
import urllib.request
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from nanoflow.engine.block_manager import CacheStats
from nanoflow.engine.llm_engine import LLMEngine
from nanoflow.outputs import RequestOutput
from nanoflow.sampling_params import SamplingParams

TOKEN_BUCKETS = tuple(m * 10**e for e in range(7) for m in (1, 2, 5))  # 1, 2, 5, 10, ... 5,000,000 (vLLM's 1-2-5)
LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 20.0,
                   40.0, 80.0, 160.0)


@dataclass(slots=True)
class EngineStats:
    """An engine's state after an iteration: what its gauges show, and its counters since it started (its prefix
    cache's, preemptions, tokens). Taken on the engine thread; a replica sends it to the data-parallel router, which
    adds them up."""
    running: int = 0  # requests with a sequence in the running batch
    waiting: int = 0  # unfinished requests not in it
    kv_usage: float = 0.0  # share of the KV cache blocks in use
    cache: CacheStats = field(default_factory=CacheStats)
    preemptions: int = 0
    prompt_tokens: int = 0  # LLMEngine's num_prompt_tokens: a request's prompt once its first token came
    generation_tokens: int = 0  # tokens sampled

    @classmethod
    def of(cls, engine: LLMEngine) -> EngineStats:
        sched = engine.scheduler
        running = len({s.request.request_id for s in sched.running})
        return cls(running, len(engine.requests) - running, 1 - sched.blocks.num_free / sched.blocks.num_blocks,
                   dataclasses.replace(sched.blocks.stats), sched.num_preemptions, engine.num_prompt_tokens,
                   engine.num_generation_tokens)

    @classmethod
    def total(cls, parts: list[EngineStats]) -> EngineStats:
        """Of several engines: counts and counters add up, the KV use is their mean."""
        return cls(sum(p.running for p in parts), sum(p.waiting for p in parts),
                   sum(p.kv_usage for p in parts) / max(len(parts), 1), sum((p.cache for p in parts), CacheStats()),
                   *(sum(getattr(p, name) for p in parts) for name in COUNTERS))

    def restarted_since(self, last: EngineStats) -> bool:
        """Whether these are a new life's (a counter fell below the last report's: the engine started again)."""
        return any(getattr(self.cache, f.name) < getattr(last.cache, f.name) for f in dataclasses.fields(CacheStats)) \
            or any(getattr(self, name) < getattr(last, name) for name in COUNTERS)

    def counted_with(self, other: EngineStats) -> EngineStats:
        """These gauges, with the counters of both (a lost replica's past life: the totals never decrease)."""
        return dataclasses.replace(self, cache=self.cache + other.cache,
                                   **{name: getattr(self, name) + getattr(other, name) for name in COUNTERS})


COUNTERS = ("preemptions", "prompt_tokens", "generation_tokens")  # EngineStats' own, beside the cache's


class Metrics:
    def __init__(self, model_name: str = ""):
        r = self.registry = CollectorRegistry()
        name, self.labels = ["model_name"], {"model_name": model_name}

        def model(metric, *args, **kw):  # vLLM's: one series of this model's
            return metric(*args, name, registry=r, **kw).labels(model_name)
        self.responses = Counter("nanoflow_http_responses", "Responses to /v1 requests by status code", ["status"],
                                 registry=r)
        finished = Counter("vllm:request_success", "Engine requests finished, by finish reason",
                           name + ["finished_reason"], registry=r)
        self.finished = lambda reason: finished.labels(model_name, reason)
        self.running = model(Gauge, "vllm:num_requests_running", "Requests with a sequence in the running batch")
        self.waiting = model(Gauge, "vllm:num_requests_waiting", "Unfinished requests not in the running batch")
        self.kv_usage = model(Gauge, "vllm:kv_cache_usage_perc", "Share of the KV cache blocks in use (0 to 1)")
        # (as vLLM's: counted as the engine goes, a prompt once its first token came, each token once sampled)
        self.prompt_tokens = model(Counter, "vllm:prompt_tokens", "Prompt tokens of requests that began generating")
        self.generation_tokens = model(Counter, "vllm:generation_tokens", "Generated tokens")
        self.ttft = model(Histogram, "vllm:time_to_first_token_seconds", "Arrival to first token",
                          buckets=LATENCY_BUCKETS)
        self.tpot = model(Histogram, "vllm:request_time_per_output_token_seconds",
                          "Mean time between output tokens of a request", buckets=LATENCY_BUCKETS)
        self.itl = model(Histogram, "vllm:inter_token_latency_seconds",
                         "Time between output tokens (a response's k new tokens: its interval over k, k times)",
                         buckets=LATENCY_BUCKETS)
        self.e2e = model(Histogram, "vllm:e2e_request_latency_seconds", "Arrival to last token",
                         buckets=LATENCY_BUCKETS)
        # the engine's phases of a finished request, on its own clock (as vLLM's: queued, then scheduled)
        self.phases = {key: model(Histogram, f"vllm:request_{key}_time_seconds", doc, buckets=LATENCY_BUCKETS)
                       for key, doc in (("queue", "Arrival at the engine to first scheduled"),
                                        ("prefill", "First scheduled to first token"),
                                        ("decode", "First token to last token"),
                                        ("inference", "First scheduled to last token"))}
        self.request_prompt = model(Histogram, "vllm:request_prompt_tokens", "Prompt tokens of a finished request",
                                    buckets=TOKEN_BUCKETS)
        self.request_generated = model(Histogram, "vllm:request_generation_tokens",
                                       "Generated tokens of a finished request (its n sequences')",
                                       buckets=TOKEN_BUCKETS)
        self.request_longest = model(Histogram, "vllm:request_max_num_generation_tokens",
                                     "Generated tokens of a finished request's longest sequence", buckets=TOKEN_BUCKETS)
        self.params_n = model(Histogram, "vllm:request_params_n", "A request's n", buckets=(1, 2, 5, 10, 20))
        self.params_max_tokens = model(Histogram, "vllm:request_params_max_tokens",
                                       "A request's max_tokens (unset: the context's room)", buckets=TOKEN_BUCKETS)
        self.preemptions = model(Counter, "vllm:num_preemptions", "Sequences preempted (to be recomputed)")
        # the prefix cache's counters, as cumulated by the block manager (on_stats adds what is new)
        self.cache = dict(
            queries=model(Counter, "vllm:prefix_cache_queries", "Prompt tokens looked up in the prefix cache"),
            hits=model(Counter, "vllm:prefix_cache_hits", "Prompt tokens found in the prefix cache on the GPU"),
            host_hits=Counter("nanoflow_prefix_cache_host_hits", "Prompt tokens found in the host tier (KV offload), "
                              "loaded", registry=r),
            saved=Counter("nanoflow_kv_offload_saved_blocks", "KV blocks copied to the host tier", registry=r))
        self.seen = EngineStats()  # the last on_stats' (its counters: what the metrics' counters hold of them)
        self.peers: list[str] = []  # the other API-server processes' own metrics (URLs): render() adds them up
        Gauge("nanoflow_api_servers", "API-server processes whose metrics these are", registry=r).set(1)

    def on_stats(self, stats: EngineStats) -> None:
        """The engine's state after an iteration: the gauges set, each counter raised by what is new (the
        engine's counters never decrease)."""
        self.running.set(stats.running)
        self.waiting.set(stats.waiting)
        self.kv_usage.set(stats.kv_usage)
        for name, counter in self.cache.items():
            counter.inc(getattr(stats.cache, name) - getattr(self.seen.cache, name))
        for name in COUNTERS:
            getattr(self, name).inc(getattr(stats, name) - getattr(self.seen, name))
        self.seen = stats

    def on_accepted(self, prompts: list[list[int]], params: SamplingParams, max_model_len: int) -> None:
        """The engine took a request per prompt."""
        for prompt in prompts:
            self.params_n.observe(params.n)
            self.params_max_tokens.observe(max_model_len - len(prompt) if params.max_tokens is None
                                           else params.max_tokens)

    def on_finished(self, last: RequestOutput | None, arrival: float, first_token: float | None,
                    now: float) -> None:
        """A request ended; last: its latest output (None if it had none), whose metrics carry the engine's times.
        arrival, first_token and now are this process's clock."""
        outs = last.outputs if last is not None else []
        reason = next((c.finish_reason for c in outs if c.finish_reason not in (None, "abort")), "abort")
        num_tokens = sum(len(c.token_ids) for c in outs)
        longest = max((len(c.token_ids) for c in outs), default=0)  # (the longest sequence's TPOT is the request's)
        self.finished(reason).inc()
        self.request_prompt.observe(len(last.prompt_token_ids or []) if last is not None else 0)
        self.request_generated.observe(num_tokens)
        self.request_longest.observe(longest)
        if reason == "abort":  # cut short: its latency says nothing about the server
            return
        self.e2e.observe(now - arrival)
        if first_token is not None and longest > 1:
            self.tpot.observe((now - first_token) / (longest - 1))
        t = last.metrics
        if None not in (t.get("arrival_time"), t.get("first_scheduled_time"), t.get("first_token_time")):
            for key, start, end in (("queue", "arrival_time", "first_scheduled_time"),
                                    ("prefill", "first_scheduled_time", "first_token_time"),
                                    ("decode", "first_token_time", "last_token_time"),
                                    ("inference", "first_scheduled_time", "last_token_time")):
                self.phases[key].observe(t[end] - t[start])

    def on_tokens(self, new: int, seconds: float) -> None:
        """A response brought `new` tokens (of its longest sequence) `seconds` after the previous one's."""
        for _ in range(new):
            self.itl.observe(seconds / new)

    def stats_line(self, since: dict[str, float], seconds: float) -> str | None:
        """vLLM's periodic log line: prompt and generation throughput since the last line (since: the counters
        then, updated here), the requests running and waiting, the KV cache in use, and the prefix cache's hit
        rate over the interval's lookups. None when nothing ran and nothing waits."""
        def value(name: str, labels=self.labels) -> float:
            return self.registry.get_sample_value(name, labels) or 0.0
        now = dict(prompt_tokens=value("vllm:prompt_tokens_total"),
                   generation_tokens=value("vllm:generation_tokens_total"),
                   prefix_cache_queries=value("vllm:prefix_cache_queries_total"),
                   prefix_cache_hits=value("vllm:prefix_cache_hits_total"),
                   prefix_cache_host_hits=value("nanoflow_prefix_cache_host_hits_total", {}))
        delta = {n: now[n] - since.get(n, 0.0) for n in now}
        since.update(now)
        running, waiting = value("vllm:num_requests_running"), value("vllm:num_requests_waiting")
        if not (delta["prompt_tokens"] or delta["generation_tokens"] or running or waiting):
            return None
        queries = delta["prefix_cache_queries"]
        hits = delta["prefix_cache_hits"] + delta["prefix_cache_host_hits"]
        return (f"Avg prompt throughput: {delta['prompt_tokens'] / seconds:.1f} tokens/s, Avg generation throughput: "
                f"{delta['generation_tokens'] / seconds:.1f} tokens/s, Running: {running:.0f} reqs, Waiting: "
                f"{waiting:.0f} reqs, KV cache usage: {100 * value('vllm:kv_cache_usage_perc'):.1f}%, Prefix cache hit "
                f"rate: {100 * hits / queries if queries else 0:.1f}%")

    def render(self) -> bytes:
        own = generate_latest(self.registry)
        if not self.peers:
            return own
        texts = [own.decode()]
        for url in self.peers:
            try:
                with urllib.request.urlopen(url, timeout=5) as r:
                    texts.append(r.read().decode())
            except OSError as e:  # a process that is gone: the others' sum
                logging.getLogger("nanoflow.server").warning("metrics of %s: %s", url, e)
        return add_up(texts)


def add_up(texts: list[str]) -> bytes:
    """Prometheus text expositions as one: each sample (name and labels) summed over them, `_created` (a start
    time) the earliest."""
    families: dict[str, Metric] = {}
    values: dict[tuple, float] = {}  # (family, sample name, labels) -> value, in first-seen order
    for text in texts:
        for fam in text_string_to_metric_families(text):
            families.setdefault(fam.name, Metric(fam.name, fam.documentation, fam.type, fam.unit))
            for s in fam.samples:
                key = (fam.name, s.name, tuple(s.labels.items()))
                if key not in values:
                    values[key] = s.value
                else:
                    values[key] = min(values[key], s.value) if s.name.endswith("_created") else values[key] + s.value
    for (fam, name, labels), value in values.items():
        families[fam].add_sample(name, dict(labels), value)
    registry = CollectorRegistry()
    registry.register(_Collected(list(families.values())))
    return generate_latest(registry)


@dataclass(slots=True, eq=False)  # (a registry keys its collectors by identity)
class _Collected:
    families: list[Metric]

    def collect(self) -> list[Metric]:
        return self.families
