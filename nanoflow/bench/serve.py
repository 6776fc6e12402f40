"""`nanoflow bench serve`: online latency and throughput of a running OpenAI-compatible server.

The workload's requests (const:IN:OUT, a trace or multi-round conversations: prompts of random token ids of the
given lengths, outputs forced to their lengths with ignore_eos) arrive as a Poisson process at the request rate
and are streamed, which times the first token and the gaps between tokens. Metric names follow `vllm bench
serve`; the normalized latency (end-to-end latency / output tokens) is the one the NanoFlow paper reports.

A multi-round workload's conversations arrive at the rate; each sends its next turn (the previous prompt and
answer, then a new message) once the previous one has finished. The answer's token ids are read from its
logprobs, which a server without a tokenizer (dummy weights) names `token_id:N`; otherwise random ids of the
answer's length stand in for it, and only the previous prompt can come from the server's prefix cache.
"""
from __future__ import annotations

import asyncio
import datetime
import json
import math
import random
import resource
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field

import aiohttp
import numpy as np

from nanoflow.bench.plots import check_outputs
from nanoflow.bench.workloads import Workload, parse


@dataclass(slots=True)
class RequestResult:
    prompt_len: int
    output_len: int = 0
    ttft: float | None = None  # seconds
    # gaps between streamed chunks, as vLLM's benchmark counts them: one token a chunk unless the server
    # coalesces them (serve --stream-interval N: up to N a chunk), where TPOT is the per-token figure
    itl: list[float] = field(default_factory=list)
    e2e: float = 0.0
    error: str | None = None
    token_ids: list[int] | None = None  # the answer's, when asked for and the server names them


async def _request(session: aiohttp.ClientSession, url: str, payload: dict, prompt_len: int) -> RequestResult:
    r = RequestResult(prompt_len, token_ids=[] if "logprobs" in payload else None)
    start = last = time.perf_counter()
    chunks = 0
    try:
        async with session.post(url, json=payload) as resp:
            if resp.status != 200:
                r.error = f"HTTP {resp.status}: {(await resp.read())[:300].decode(errors='replace')}"
                return r
            async for line in resp.content:  # one SSE line at a time
                if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    r.error = chunk["error"].get("message", str(chunk["error"]))
                    return r
                now = time.perf_counter()
                if chunk.get("usage"):
                    r.output_len = chunk["usage"]["completion_tokens"]
                if chunk.get("choices"):
                    if r.token_ids is not None:
                        _read_ids(r, chunk["choices"][0].get("logprobs"))
                    if r.ttft is None:
                        r.ttft = now - start
                    else:
                        r.itl.append(now - last)
                    last = now
                    chunks += 1
        r.e2e = time.perf_counter() - start
        r.output_len = r.output_len or chunks  # a server that does not report usage: one token a chunk
    except (aiohttp.ClientError, ValueError, KeyError) as e:  # a failed request, not a failed run
        r.error = f"{type(e).__name__}: {e}"
    return r


def _read_ids(r: RequestResult, logprobs: dict | None) -> None:
    """Append a chunk's token ids to r.token_ids, or give up on them (None) if a token is not named by id."""
    for tok in (logprobs or {}).get("tokens", []):
        if not tok.startswith("token_id:"):
            r.token_ids = None
            return
        r.token_ids.append(int(tok[9:]))


async def run(url: str, model: str, workload: Workload, rate: float, max_concurrency: int | None = None,
              api_key: str | None = None, vocab_size: int = 32000, temperature: float = 1.0, seed: int = 0,
              stream: int = 0) -> dict:
    """Send the workload's conversations at `rate` per second (Poisson; inf: all at once); returns the summary.
    stream: which draw of prompts (see Workload.prompts); the arrival gaps are the seed's alone."""
    convs = workload.conversations(vocab_size, seed, stream)
    multiround = any(len(turns) > 1 for turns in convs)
    gaps, stand_ins = random.Random(seed), random.Random(seed + 1)
    limit = asyncio.Semaphore(max_concurrency) if max_concurrency else None
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}

    async def one(prompt: list[int], out_len: int) -> RequestResult:
        payload = {"model": model, "prompt": prompt, "max_tokens": out_len, "ignore_eos": True,
                   "temperature": temperature, "stream": True, "stream_options": {"include_usage": True}}
        if multiround:  # the answer's ids, for the next turn's prompt
            payload["logprobs"] = 0
        if limit is None:
            r = await _request(session, url, payload, len(prompt))
        else:
            async with limit:
                r = await _request(session, url, payload, len(prompt))
        if multiround and (r.token_ids is None or len(r.token_ids) != r.output_len):
            r.token_ids = [stand_ins.randrange(vocab_size) for _ in range(r.output_len)]
        return r

    async def converse(turns: list[tuple[list[int], int]]) -> list[RequestResult]:
        results, context = [], []
        for message, out_len in turns:
            r = await one(context + message, out_len)
            results.append(r)
            if r.error is not None or not multiround:
                break
            context = context + message + r.token_ids
        return results

    # aiohttp, not httpx: its C parser costs the client a third of the CPU per streamed chunk (measured), and a
    # client near one core would bound the throughput it measures. limit=0: no cap on connections.
    async with aiohttp.ClientSession(headers=headers, timeout=aiohttp.ClientTimeout(total=None),
                                     connector=aiohttp.TCPConnector(limit=0), read_bufsize=2**20) as session:
        start, cpu = time.perf_counter(), time.process_time()
        tasks = []
        for i, turns in enumerate(convs):
            if i and math.isfinite(rate):  # (a gap between arrivals: none after the last, which would idle the run)
                await asyncio.sleep(gaps.expovariate(rate))
            tasks.append(asyncio.create_task(converse(turns)))
        results = [r for rs in await asyncio.gather(*tasks) for r in rs]
        duration, cpu = time.perf_counter() - start, time.process_time() - cpu
    return summarize(results, duration) | {"client_cpu_s": cpu}


def _stats(name: str, seconds: list[float]) -> dict:
    ms = np.array(seconds) * 1000
    if not len(ms):
        return {f"{s}_{name}_ms": None for s in ("mean", "median", "p99")}
    return {f"mean_{name}_ms": float(ms.mean()), f"median_{name}_ms": float(np.median(ms)),
            f"p99_{name}_ms": float(np.percentile(ms, 99))}


def summarize(results: list[RequestResult], duration: float) -> dict:
    ok = [r for r in results if r.error is None]
    prompt_tokens, output_tokens = sum(r.prompt_len for r in ok), sum(r.output_len for r in ok)
    s = {"num_requests": len(results), "completed": len(ok), "failed": len(results) - len(ok), "duration_s": duration,
         "total_input_tokens": prompt_tokens, "total_output_tokens": output_tokens,
         "request_throughput": len(ok) / duration, "output_throughput": output_tokens / duration,
         "total_token_throughput": (prompt_tokens + output_tokens) / duration}
    s |= _stats("ttft", [r.ttft for r in ok if r.ttft is not None])
    s |= _stats("tpot", [(r.e2e - r.ttft) / (r.output_len - 1) for r in ok if r.output_len > 1 and r.ttft])
    s |= _stats("itl", [x for r in ok for x in r.itl])
    s |= _stats("e2e", [r.e2e for r in ok])
    s |= _stats("normalized_latency", [r.e2e / r.output_len for r in ok if r.output_len])  # ms per output token
    s["errors"] = sorted({r.error for r in results if r.error})[:5]
    return s


def print_result(r: dict) -> None:
    rows = [("request rate", f"{r['request_rate']} req/s"), ("completed / failed", f"{r['completed']} / {r['failed']}"),
            ("duration", f"{r['duration_s']:.2f} s"), ("request throughput", f"{r['request_throughput']:.2f} req/s"),
            ("output tok/s", f"{r['output_throughput']:.1f}"), ("total tok/s", f"{r['total_token_throughput']:.1f}"),
            # a client near one core (100%) bounds the throughput it can measure
            ("client CPU", f"{r['client_cpu_s']:.2f} s ({100 * r['client_cpu_s'] / r['duration_s']:.0f}% of a core)")]
    for name, label in (("ttft", "TTFT"), ("tpot", "TPOT"), ("itl", "ITL"), ("e2e", "E2E latency"),
                        ("normalized_latency", "normalized latency (/token)")):
        if r[f"mean_{name}_ms"] is not None:
            values = " / ".join(f"{r[f'{s}_{name}_ms']:.1f}" for s in ("mean", "median", "p99"))
            rows.append((f"{label} mean / median / p99", f"{values} ms"))
    rows += [("error", e) for e in r["errors"]]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")


def latency_vs_rate(report: dict, out: str) -> None:
    """Normalized latency (mean, p99) against the achieved request throughput, each point labelled with the
    offered rate (inf included)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    results = sorted((r for r in report["results"] if r["completed"]), key=lambda r: r["request_throughput"])
    x = [r["request_throughput"] for r in results]
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for stat, style in (("mean", "o-"), ("p99", "s--")):
        ax.plot(x, [r[f"{stat}_normalized_latency_ms"] for r in results], style, label=stat)
    for r, xi in zip(results, x):
        ax.annotate(f"{r['request_rate']}/s", (xi, r["p99_normalized_latency_ms"]), fontsize=7,
                    textcoords="offset points", xytext=(3, 3))
    ax.set_xlabel("request throughput (req/s); labels: offered rate")
    ax.set_ylabel("normalized latency (ms / output token)")
    ax.set_title(f"nanoflow serve, {report['model']}, {report['workload']}", fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def main(args) -> int:
    try:  # one socket per request in flight: lift the soft limit on open files (often 1024) to the hard one
        resource.setrlimit(resource.RLIMIT_NOFILE, (resource.getrlimit(resource.RLIMIT_NOFILE)[1],) * 2)
    except (ValueError, OSError):
        pass
    rates = args.sweep or [args.request_rate]
    if bad := [r for r in rates if not r > 0]:  # (nan too)
        raise ValueError(f"{'--sweep' if args.sweep else '--request-rate'}: request rates must be > 0 or inf, got "
                         f"{bad[0]}")
    if args.sweep and args.request_rate != float("inf"):
        raise ValueError("--request-rate and --sweep: give one (a sweep runs each of its rates)")
    for flag, value in (("--max-concurrency", args.max_concurrency), ("--vocab-size", args.vocab_size)):
        if value is not None and value < 1:
            raise ValueError(f"{flag} must be >= 1, not {value}")
    check_outputs({"--output": args.output}, {"--plot": args.plot})
    parse(args.workload, args.num_requests, args.seed)  # (a bad workload named before the server is asked)
    url = args.url.rstrip("/").removesuffix("/v1")
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    if args.model is None:
        try:
            with urllib.request.urlopen(urllib.request.Request(f"{url}/v1/models", headers=headers),
                                        timeout=30) as resp:
                args.model = json.load(resp)["data"][0]["id"]
        except urllib.error.HTTPError as e:
            hint = " (pass --api-key, or set NANOFLOW_API_KEY)" if e.code == 401 else ""
            raise ValueError(f"{url}/v1/models answered {e.code} {e.reason}{hint}") from None
        except (urllib.error.URLError, OSError) as e:
            raise ValueError(f"cannot reach the server at {url}: {getattr(e, 'reason', e)}") from None
    report = {"command": getattr(args, "command_line", None), "date": datetime.date.today().isoformat(), "url": url,
              "model": args.model, "workload": args.workload, "max_concurrency": args.max_concurrency, "results": []}
    for k, rate in enumerate(rates):  # (each rate its own prompts: no cache hits)
        workload = parse(args.workload, args.num_requests, args.seed)
        r = asyncio.run(run(f"{url}/v1/completions", args.model, workload, rate, args.max_concurrency, args.api_key,
                            args.vocab_size, args.temperature, args.seed, stream=k))
        r = {"request_rate": rate if math.isfinite(rate) else "inf", **r}  # JSON has no inf
        print_result(r)
        report["results"].append(r)
    if args.output:
        with open(args.output, "w") as f:
            json.dump(report, f, indent=1)
    if args.plot:
        latency_vs_rate(report, args.plot)
    return 0 if any(r["completed"] for r in report["results"]) else 1
