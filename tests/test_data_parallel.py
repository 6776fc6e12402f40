"""Data-parallel serving on Ray. The router's pieces alone (output deltas, the choice of replica); then end to
end: this test starts a local Ray cluster, a `nanoflow serve --data-parallel-size 2` subprocess joins it with two
replicas of the default model. Requests spread over both, greedy outputs equal a single engine's, /metrics adds
the replicas up, `bench serve` runs against the router, and a replica killed mid-run (Ray restarts it) loses no
request that had not started streaming while the front end keeps serving."""
import asyncio
import json
import time

import httpx
import pytest

from nanoflow import SamplingParams
from nanoflow.entrypoints.cli import main
from nanoflow.entrypoints.metrics import EngineStats, Metrics
from nanoflow.outputs import CompletionOutput, Logprob, RequestOutput
from conftest import metrics, start_server, stop_server

ray = pytest.importorskip("ray")
from nanoflow.distributed.replica import ReplicaInfo, diff, patch  # noqa: E402  (after ray)
from nanoflow.entrypoints.dp_router import AFFINITY_SLACK, Router  # noqa: E402

PROMPTS = ["The capital of France is", "Hello, my name is", "The best way to learn is", "Once upon a time",
           "Water boils at", "The largest planet is"]


# -- the pieces ----------------------------------------------------------------------------------------
def test_deltas_rebuild_the_cumulative_outputs():
    """A request's outputs, n = 2, with logprobs (which the engine extends in place) and a held-back text."""
    lp = [{7: Logprob(-0.1, 1, "a")}, {8: Logprob(-0.2, 1, "b")}, {9: Logprob(-0.3, 2, "c")}]
    steps = [([""], [[7]], None), (["ab"], [[7, 8]], None), (["abc"], [[7, 8, 9]], "length")]
    sent = rebuilt = None
    for texts, ids, reason in steps:
        outs = [CompletionOutput(i, texts[0], ids[0], -0.6, lp[:len(ids[0])], reason) for i in range(2)]
        done = reason is not None  # (the engine's timestamps go with the last delta)
        out = RequestOutput("s-0", "p", [1, 2], outs, [None, {2: Logprob(-1.0, 1)}], done,
                            {"arrival_time": 1.0} if done else {}, num_cached_tokens=32)
        rebuilt = patch(rebuilt, diff(out, sent), [1, 2])
        sent = [(len(c.text), len(c.token_ids)) for c in outs]
        for c, r in zip(outs, rebuilt.outputs):
            assert (r.index, r.text, r.token_ids, r.logprobs, r.finish_reason) == (
                c.index, c.text, c.token_ids, lp[:len(c.token_ids)], c.finish_reason)
        assert (rebuilt.prompt, rebuilt.prompt_token_ids, rebuilt.prompt_logprobs, rebuilt.finished,
                rebuilt.num_cached_tokens, rebuilt.metrics) == (out.prompt, out.prompt_token_ids, out.prompt_logprobs,
                                                                 out.finished, 32, out.metrics)


def test_an_abort_that_overtakes_its_add_drops_the_submission(llama_dir):
    """Ray runs an async actor's calls out of order: the router's abort of a submission it cancelled may reach the
    replica before the add (an add whose arguments wait in the object store). The replica remembers it, and the
    add then submits nothing (the requests ran to their end, for nobody); an abort of nothing stays harmless."""
    from nanoflow.distributed.replica import Replica
    replica = Replica(llama_dir, dict(device="cpu"), 64)

    async def run():
        await replica.abort("s1")
        await replica.add(0, "s1", [[1, 2, 3]], SamplingParams(max_tokens=50, ignore_eos=True))
        assert not replica.engine.engine.has_unfinished_requests() and not replica.early_aborts
        assert "s1" not in replica.aborts and 0 not in replica.outboxes  # (no answer: the router forgot it)
        await replica.add(0, "s2", [[1, 2, 3]], SamplingParams(max_tokens=2))
        assert (await replica.outboxes[0].get()) == ("s2", None)  # accepted
    asyncio.run(run())
    replica.engine.stop()


def test_a_replicas_counters_count_once_through_a_lost_connection_and_a_restart():
    """A replica lost to its connection, whose actor lives on, reports the same life's counters again: they were
    retired at the loss and counted a second time. Only a new life (its counters start again) retires the last."""
    from types import SimpleNamespace

    from ray.exceptions import RayActorError

    from nanoflow.entrypoints.dp_router import _Replica
    router = Router.__new__(Router)
    router.front, router.routes, router.metrics, router.retired = 0, {}, Metrics("x"), EngineStats()
    router.in_rotation = SimpleNamespace(labels=lambda *_: SimpleNamespace(set=lambda _: None))
    router.replicas = [_Replica(i, None, None) for i in range(2)]

    def report(i: int, tokens: int) -> None:
        router.replicas[i].up = True
        router._take(router.replicas[i], EngineStats(running=1, generation_tokens=tokens))
        router._update_stats()

    def sample(name: str) -> float:
        return router.metrics.registry.get_sample_value(name, {"model_name": "x"})
    report(0, 10)
    report(1, 5)
    router._lost(router.replicas[0], RayActorError())
    assert (sample("vllm:generation_tokens_total"), sample("vllm:num_requests_running")) == (15, 1)
    report(0, 12)  # the same life again: 2 tokens more
    assert sample("vllm:generation_tokens_total") == 17
    router._lost(router.replicas[0], RayActorError())
    report(0, 3)  # a new life (Ray restarted it): its 3 tokens beside the last life's 12
    assert sample("vllm:generation_tokens_total") == 20
    assert EngineStats(generation_tokens=3).restarted_since(EngineStats(generation_tokens=12))


def test_routing_by_load_with_bounded_prefix_affinity():
    info = ReplicaInfo(None, 4096, "m", {}, kv_tokens=1000, block_size=4, prefix_caching=True)
    router = Router([(None, info), (None, info)], Metrics(), 8)
    a, b = router.replicas
    shared = router.affinity.keys([1, 2, 3, 4, 5, 6, 7, 8, 9])
    assert len(shared) == 2 and router.affinity.keys([1, 2, 3]) == []  # full blocks only
    a.committed = 100
    assert router._pick(shared) is b  # no owner yet: the least loaded
    router.affinity.record(shared[:1], 0)
    assert router._pick(shared) is a  # the owner of the longest known prefix, a little more loaded
    router.affinity.record(shared, 1)
    b.stats = EngineStats(kv_usage=0.2)
    assert router._pick(shared) is b and router._pick(router.affinity.keys([9] * 8)) is a
    b.committed = int((AFFINITY_SLACK + 0.1) * 1000)  # too much more loaded than a: load wins
    assert router._pick(shared) is a
    b.up = False
    assert router._pick(shared) is a and router._pick([]) is a


# -- end to end ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cluster():
    """A local Ray cluster with a CPU for each replica; this process is a driver too (it kills a replica)."""
    context = ray.init(num_cpus=4, include_dashboard=False, object_store_memory=100 * 2**20)  # (2 servers' replicas)
    yield context.address_info["gcs_address"]
    ray.shutdown()


@pytest.fixture(scope="module")
def server(cluster, tmp_path_factory):
    # two sequences at a time per replica: later requests wait, so a replica killed mid-run has some queued
    proc, url = start_server(["--data-parallel-size", "2", "--ray-address", cluster, "--max-model-len", "512",
                              "--kv-cache-gb", "0.25", "--max-num-seqs", "2"], tmp_path_factory.mktemp("dp") / "log")
    yield url
    assert stop_server(proc) == 0


def routed(m: dict[str, float], replica: int) -> float:
    return m.get(f'nanoflow_router_requests_total{{replica="{replica}"}}', 0)


async def _complete(url: str, prompts: list[str], **body) -> list[httpx.Response]:
    async with httpx.AsyncClient(base_url=url, timeout=120) as c:
        return await asyncio.gather(*(c.post("/v1/completions", json={"prompt": p, **body}) for p in prompts))


def test_requests_spread_and_outputs_equal_one_engine(server, default_llm):
    before = metrics(server)
    responses = asyncio.run(_complete(server, PROMPTS, max_tokens=8, temperature=0))
    texts = [r.json()["choices"][0]["text"] for r in responses]
    greedy = SamplingParams(temperature=0, max_tokens=8)
    expected = default_llm.generate(PROMPTS, greedy, use_tqdm=False)
    assert texts == [o.outputs[0].text for o in expected]
    after = metrics(server)
    assert all(routed(after, i) > routed(before, i) for i in (0, 1)), after
    phase = "vllm:request_prefill_time_seconds_count"  # (the replicas' timestamps reach the router's metrics)
    assert after[phase] - before.get(phase, 0) == len(PROMPTS)
    with httpx.stream("POST", f"{server}/v1/completions", timeout=60,
                      json={"prompt": PROMPTS[0], "max_tokens": 8, "temperature": 0, "stream": True}) as r:
        chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    assert "".join(c["choices"][0]["text"] for c in chunks) == texts[0]
    # chat (templated by the router, with the replicas' tokenizer) and logprobs (sent as deltas) pass through
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    chat = httpx.post(f"{server}/v1/chat/completions", timeout=60,
                      json={"messages": messages, "max_tokens": 8, "temperature": 0}).json()
    expected = default_llm.chat(messages, greedy, use_tqdm=False)[0].outputs[0].text
    assert chat["choices"][0]["message"]["content"] == expected
    c = httpx.post(f"{server}/v1/completions", timeout=60,
                   json={"prompt": PROMPTS[0], "max_tokens": 8, "temperature": 0, "logprobs": 2}).json()["choices"][0]
    assert c["text"] == texts[0] and "".join(c["logprobs"]["tokens"]) == c["text"]
    assert all(len(top) == 2 for top in c["logprobs"]["top_logprobs"]) and len(c["logprobs"]["tokens"]) == 8


def test_metrics_add_the_replicas_up(server):
    before = metrics(server)
    asyncio.run(_complete(server, PROMPTS, max_tokens=2))
    deadline = time.monotonic() + 10
    while (m := metrics(server))["vllm:num_requests_running"] or m["vllm:kv_cache_usage_perc"]:
        assert time.monotonic() < deadline, m
        time.sleep(0.1)
    # every prompt token was looked up in one replica's prefix cache: the replicas' counters, added up
    delta = {k: m[k] - before[k] for k in ("vllm:prompt_tokens_total", "vllm:prefix_cache_queries_total")}
    assert delta["vllm:prompt_tokens_total"] == delta["vllm:prefix_cache_queries_total"] > 0, delta
    assert m['nanoflow_replica_up{replica="0"}'] == m['nanoflow_replica_up{replica="1"}'] == 1
    assert m['vllm:request_success_total{finished_reason="length"}'] >= len(PROMPTS)


def test_bench_serve_against_the_router(server, tmp_path):
    out = tmp_path / "r.json"
    assert main(["bench", "serve", "--url", server, "--workload", "const:16:4", "--num-requests", "4",
                 "--output", str(out)]) == 0
    r = json.loads(out.read_text())["results"][0]
    assert r["completed"] == 4 and r["total_output_tokens"] == 16


async def _stream(c: httpx.AsyncClient, prompt: str, started: asyncio.Event) -> tuple[int, dict | None, str | None]:
    """(text chunks, the error event if one came, the last finish_reason)."""
    body = {"prompt": prompt, "max_tokens": 24, "ignore_eos": True, "temperature": 0, "stream": True}
    n, reason = 0, None
    async with c.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200
        async for line in r.aiter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                return n, chunk["error"], reason
            n += 1
            reason = chunk["choices"][0]["finish_reason"]
            started.set()
    return n, None, reason


def test_a_replica_killed_mid_run(server):
    before = metrics(server)
    [victim] = [a for a in ray.util.list_named_actors(all_namespaces=True) if a["name"] == "replica-0"]

    async def run():
        async with httpx.AsyncClient(base_url=server, timeout=120) as c:
            started = asyncio.Event()
            tasks = [asyncio.create_task(_stream(c, f"{p} (request {i})", started))
                     for i, p in enumerate(PROMPTS + PROMPTS[:4])]
            await started.wait()  # both replicas run two requests each, the other six wait
            ray.kill(ray.get_actor(victim["name"], namespace=victim["namespace"]), no_restart=False)
            return await asyncio.gather(*tasks)

    results = asyncio.run(run())
    for n, error, reason in results:
        if error is None:
            assert n == 24 and reason == "length"
        else:  # only a request that had streamed can fail, with a clear error
            assert n > 0 and error["type"] == "service_unavailable" and "replica 0" in error["message"], error
    m = metrics(server)
    assert m["nanoflow_router_retries_total"] > before["nanoflow_router_retries_total"]  # queued ones moved over
    # the front end keeps serving, and Ray brings the replica back into rotation
    assert all(r.status_code == 200 for r in asyncio.run(_complete(server, PROMPTS[:2], max_tokens=2)))
    deadline = time.monotonic() + 90
    while metrics(server)['nanoflow_replica_up{replica="0"}'] != 1:
        assert time.monotonic() < deadline, "replica 0 did not come back"
        time.sleep(0.5)
    seen = routed(metrics(server), 0)
    asyncio.run(_complete(server, PROMPTS, max_tokens=2))
    assert routed(metrics(server), 0) > seen


def test_api_servers_share_the_port_and_add_up_their_metrics(cluster, tmp_path, default_llm):
    """--api-server-count 2: two API-server processes on one port, each with its own router over the same two
    replicas; requests on connections of their own give one engine's outputs, /metrics from whichever process
    answers is the sum of both, and SIGTERM stops them all with exit 0."""
    proc, url = start_server(["--data-parallel-size", "2", "--api-server-count", "2", "--ray-address", cluster,
                              "--max-model-len", "512", "--kv-cache-gb", "0.25"], tmp_path / "log")
    try:
        prompts = PROMPTS * 2

        async def each_on_its_connection():
            async def one(p):
                async with httpx.AsyncClient(base_url=url, timeout=120) as c:
                    return (await c.post("/v1/completions", json={"prompt": p, "max_tokens": 8, "temperature": 0}))
            return await asyncio.gather(*(one(p) for p in prompts))
        texts = [r.json()["choices"][0]["text"] for r in asyncio.run(each_on_its_connection())]
        expected = default_llm.generate(prompts, SamplingParams(temperature=0, max_tokens=8), use_tqdm=False)
        assert texts == [o.outputs[0].text for o in expected]
        for _ in range(4):  # whichever process answers
            m = metrics(url)
            assert m["nanoflow_api_servers"] == 2 and routed(m, 0) + routed(m, 1) == len(prompts)
            assert m['vllm:request_success_total{finished_reason="length"}'] == len(prompts)
            assert m['nanoflow_replica_up{replica="0"}'] == m['nanoflow_replica_up{replica="1"}'] == 1
    finally:
        assert stop_server(proc) == 0


def test_a_replica_that_refuses_its_options_says_why(cluster):
    """(It printed Ray's actor traceback, 69 lines.)"""
    import subprocess
    import sys
    run = subprocess.run([sys.executable, "-m", "nanoflow.entrypoints.cli", "serve", "--data-parallel-size", "1",
                          "--ray-address", cluster, "--mode", "pipeline", "--port", "0"],
                         capture_output=True, text=True, timeout=180)
    assert run.returncode == 2 and "nanoflow: error: a replica could not start: ValueError: mode 'pipeline'" in \
        run.stderr, run.stderr[-2000:]


def test_bad_api_server_count(capsys):
    assert main(["serve", "--api-server-count", "2"]) != 0
    assert "--api-server-count" in capsys.readouterr().err
