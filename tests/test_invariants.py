"""Invariants of request handling under memory pressure, over random prompt sets (fixed seeds): greedy and seeded
outputs do not depend on the cache size, preemption, prefix caching, the host tier, chunking or batching; n > 1,
stops and aborts lose or duplicate nothing; every block is given back."""
import random

import pytest
from test_prefix_cache import check, host_gb

from nanoflow import LLM, SamplingParams

TINY = dict(num_kv_blocks=10, block_size=4)  # 40 tokens: a few prompts fit, not once they grow
STOPS = list(range(3, 28000, 7))  # stop ids: ~8 % of the vocabulary, that the random model hits now and then
STEM = [random.Random(7).randrange(3, 40000) for _ in range(24)]  # a shared prefix of six 4-token blocks


def random_prompts(rng, count, longest=24):
    """Mixed lengths (1 to longest), some sharing a prefix of STEM, some duplicated."""
    prompts = []
    for _ in range(count):
        n = rng.randrange(1, longest + 1)
        if prompts and rng.random() < 0.15:
            prompts.append(list(rng.choice(prompts)))
        elif rng.random() < 0.4:
            prompts.append(STEM[:n])
        else:
            prompts.append([rng.randrange(3, 40000) for _ in range(n)])
    return prompts


def results(outs):
    return [[(c.token_ids, c.finish_reason) for c in o.outputs] for o in outs]


def assert_drained(llm):
    """Nothing running or waiting, and every block back (free, or cached and evictable)."""
    sched = llm.engine.scheduler
    check(sched.blocks)
    assert sched.blocks.num_free == sched.blocks.num_blocks and not any(sched.blocks.ref)
    assert not sched.has_work and not sched.resuming and not llm.engine.requests
    assert sched.waiting_tokens == sched.waiting_held2 == 0


@pytest.fixture(scope="module")
def ample(llama_dir):
    """The reference: a cache far larger than any batch, no prefix caching."""
    return LLM(llama_dir, enable_prefix_caching=False)


@pytest.fixture(scope="module")
def greedy_cases(ample):
    """20 random batches (greedy, ignore_eos) and their reference results."""
    rng = random.Random(0)
    cases = []
    for _ in range(20):
        prompts = random_prompts(rng, rng.randrange(2, 7))
        params = [SamplingParams(temperature=0, max_tokens=rng.randrange(1, 12), ignore_eos=True) for _ in prompts]
        cases.append((prompts, params, results(ample.generate(prompts, params, use_tqdm=False))))
    return cases


@pytest.mark.parametrize("kw", [
    dict(TINY, enable_prefix_caching=False),
    TINY,
    dict(TINY, kv_offload_gb=host_gb(12)),
    dict(TINY, max_num_batched_tokens=3),
    dict(TINY, max_num_seqs=1),
    dict(TINY, max_num_seqs=2, async_scheduling=True),
    dict(TINY, async_scheduling=True, cuda_graph=True, kv_offload_gb=host_gb(12), max_num_batched_tokens=5),
    dict(TINY, schedule_policy="slack", async_scheduling=True),
    dict(enable_prefix_caching=True, max_num_seqs=64),
], ids=["preempt", "prefix-cache", "host-tier", "chunked", "one-seq", "two-seqs-async", "async-graph-host",
        "slack-async", "ample-cached"])
def test_greedy_outputs_do_not_depend_on_memory_pressure(llama_dir, greedy_cases, kw):
    llm = LLM(llama_dir, **kw)
    for prompts, params, reference in greedy_cases:
        assert results(llm.generate(prompts, params, use_tqdm=False)) == reference
        assert_drained(llm)
    if kw.get("num_kv_blocks") and kw.get("max_num_seqs") != 1:
        assert llm.engine.scheduler.num_preemptions > 0
    if kw.get("kv_offload_gb"):
        assert llm.engine.scheduler.blocks.stats.host_hits > 0


@pytest.mark.parametrize("kw", [dict(TINY), dict(TINY, async_scheduling=True, max_num_batched_tokens=4)],
                         ids=["sync", "async"])
def test_seeded_samples_alone_equal_batched_and_preempted(llama_dir, ample, kw):
    """vLLM's per-request seed: a seeded request's tokens (each of its n) are the same alone in an ample cache and
    batched with others (seeded or not) in a cache so small that they are preempted and recomputed."""
    rng = random.Random(1)
    llm = LLM(llama_dir, **kw)
    for _ in range(6):
        prompts = random_prompts(rng, 5)
        params = [SamplingParams(temperature=1.0, seed=rng.randrange(1000), n=rng.choice([1, 2, 3]),
                                 top_p=rng.choice([1.0, 0.9]), max_tokens=rng.randrange(1, 12), ignore_eos=True)
                  for _ in prompts]
        params[0] = SamplingParams(temperature=1.0, max_tokens=8, ignore_eos=True)  # unseeded company
        batched = results(llm.generate(prompts, params, use_tqdm=False))
        assert_drained(llm)
        for prompt, p, got in list(zip(prompts, params, batched))[1:]:
            assert got == results(ample.generate([prompt], p, use_tqdm=False))[0]
    assert llm.engine.scheduler.num_preemptions > 0


def check_completion(out, params, room, stops):
    """n completions, each of a length within [1, max_tokens], ending on 'length' exactly at its maximum or on
    'stop' at its first stop token past min_tokens."""
    assert out.finished and [c.index for c in out.outputs] == list(range(params.n))
    most = min(params.max_tokens or room, room)
    for c in out.outputs:
        t = c.token_ids
        assert 1 <= len(t) <= most and not any(x in stops for x in t[:-1])
        assert not any(x in stops for x in t[:params.min_tokens])
        if c.finish_reason == "length":
            assert len(t) == most and (t[-1] not in stops or len(t) <= params.min_tokens)
        else:
            assert c.finish_reason == "stop" and t[-1] in stops and len(t) > params.min_tokens


@pytest.mark.parametrize("async_", [False, True])
def test_n_and_shared_prefixes_under_preemption(llama_dir, async_):
    """n > 1 over prompts sharing long prefixes, prefix caching on, a cache small enough to preempt: every request
    finishes once, with the right lengths and finish reasons, the bookkeeping holds after every step, and every
    block is back at the end."""
    rng = random.Random(2)
    llm = LLM(llama_dir, num_kv_blocks=12, block_size=4, max_num_batched_tokens=10, async_scheduling=async_)
    eng = llm.engine
    cache = 48
    for case in range(8):
        prompts = random_prompts(rng, rng.randrange(2, 6))
        def draw():  # (greedy takes n = 1 only: the n samples of a greedy draw are sampled at temperature 1)
            t, seed, n = rng.choice([0, 1.0]), rng.randrange(99), rng.choice([1, 2, 3, 4])
            return SamplingParams(temperature=t if n == 1 else 1.0, seed=seed, n=n,
                                  max_tokens=rng.choice([None, rng.randrange(1, 12)]), min_tokens=rng.randrange(0, 2),
                                  stop_token_ids=STOPS if rng.random() < 0.5 else None, ignore_eos=rng.random() < 0.5)
        params = [draw() for _ in prompts]
        for i, (p, sp) in enumerate(zip(prompts, params)):
            eng.add_request(f"{case}-{i}", p, sp)
        finished = {}
        while eng.has_unfinished_requests():
            for out in eng.step():
                if out.finished:
                    assert out.request_id not in finished
                    finished[out.request_id] = out
            check(eng.scheduler.blocks, eng.scheduler.running)
        assert sorted(finished) == sorted(f"{case}-{i}" for i in range(len(prompts)))
        for i, (p, sp) in enumerate(zip(prompts, params)):
            stops = set(sp.stop_token_ids or ()) | (set() if sp.ignore_eos else eng.eos_token_ids)
            check_completion(finished[f"{case}-{i}"], sp, cache - len(p), stops)
        assert_drained(llm)
    assert eng.scheduler.num_preemptions > 0 and eng.scheduler.blocks.stats.hits > 0


@pytest.mark.parametrize("kw", [dict(TINY), dict(TINY, async_scheduling=True, kv_offload_gb=host_gb(12)),
                                dict(TINY, async_scheduling=True, max_num_batched_tokens=3)],
                         ids=["sync", "async-host-tier", "async-chunked"])
def test_aborts_leave_the_others_unchanged(llama_dir, ample, kw):
    """Requests arriving and aborted at random steps (waiting, prefilling, decoding, preempted): the others'
    outputs (greedy, or n = 2 seeded samples) equal a run without the aborted ones, each request ends once, and every
    block comes back."""
    rng = random.Random(3)
    eng = LLM(llama_dir, **kw).engine
    for case in range(10):
        prompts = random_prompts(rng, rng.randrange(3, 7))
        params = [SamplingParams(temperature=0 if n == 1 else 0.8, seed=7, n=n, max_tokens=rng.randrange(1, 12),
                                 ignore_eos=True) for n in (rng.choice([1, 1, 2]) for _ in prompts)]
        ids = [f"{case}-{i}" for i in range(len(prompts))]
        abort_at = {rid: rng.randrange(12) for rid in rng.sample(ids, rng.randrange(1, len(ids)))}
        arrivals = list(zip(ids, prompts, params))
        finished, step = {}, 0
        while arrivals or eng.has_unfinished_requests():
            while arrivals and rng.random() < 0.5:
                eng.add_request(*arrivals.pop(0))
            for rid in [r for r, s in abort_at.items() if s <= step and r in eng.requests]:
                out = eng.abort_request(rid)
                assert out.finished and {c.finish_reason for c in out.outputs} <= {"abort", "length"}
                finished[rid] = None
            for out in eng.step():
                if out.finished:
                    assert out.request_id not in finished
                    finished[out.request_id] = results([out])[0]
            check(eng.scheduler.blocks, eng.scheduler.running)
            step += 1
        assert sorted(finished) == sorted(ids)
        kept = [i for i, rid in enumerate(ids) if finished[rid] is not None]  # (some ended before their abort)
        reference = results(ample.generate([prompts[i] for i in kept], [params[i] for i in kept], use_tqdm=False))
        assert [finished[ids[i]] for i in kept] == reference
        assert not eng.scheduler.has_work and eng.scheduler.blocks.num_free == eng.scheduler.blocks.num_blocks


@pytest.mark.parametrize("kw", [dict(), dict(num_kv_blocks=8, block_size=4),
                                dict(num_kv_blocks=8, block_size=4, async_scheduling=True, max_num_batched_tokens=3),
                                dict(num_kv_blocks=6, block_size=4, kv_offload_gb=host_gb(8), async_scheduling=True)],
                         ids=["ample", "cache-is-context", "async-chunked", "cache-under-context"])
def test_lengths_at_the_edges(llama_dir, ample, kw):
    """Prompts that with max_tokens exactly fill the context (or the whole cache where that is smaller), prompts of
    one token, max_tokens=1 and max_tokens=None: no crash, the exact lengths, 'length', the ample cache's tokens."""
    llm = LLM(llama_dir, max_model_len=32, **kw)
    limit = min(32, llm.engine.scheduler.blocks.num_blocks * 4) if kw else 32
    prompts = [[7] * n for n in (1, 2, limit - 1, limit - 12, 16, 15)] + [STEM[:n] for n in (1, limit - 1, 8)]
    params = ([SamplingParams(temperature=0, max_tokens=limit - len(p), ignore_eos=True) for p in prompts]
              + [SamplingParams(temperature=0, max_tokens=1, ignore_eos=True) for _ in prompts]
              + [SamplingParams(temperature=0.8, seed=i, max_tokens=None, ignore_eos=True, n=2)
                 for i, _ in enumerate(prompts)])
    lengths = [sp.max_tokens or limit - len(p) for p, sp in zip(prompts * 3, params)]
    outs = results(llm.generate(prompts * 3, params, use_tqdm=False))
    assert_drained(llm)
    # greedy or seeded: the ample engine's first tokens, stopped at the same length
    reference = ample.generate(prompts * 3, [SamplingParams(temperature=sp.temperature, seed=sp.seed, max_tokens=n,
                                                            ignore_eos=True, n=sp.n)
                                             for n, sp in zip(lengths, params)], use_tqdm=False)
    assert outs == results(reference)
