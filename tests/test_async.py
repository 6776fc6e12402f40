"""The asynchronous engine loop against a scripted executor: ordering, late EOS, no lost tokens."""
from nanoflow import LLM, SamplingParams
from nanoflow.executor.model_runner import ModelOutput

EOS = 2


class ScriptedRunner:
    """Samples token 1000 * request + k for a request's k-th output, EOS at its scripted length."""

    def __init__(self, stop_at: dict[str, int]):
        self.stop_at = stop_at
        self.log = []
        self.launches = 0

    def launch(self, out):
        self.launches += 1
        n = self.launches
        self.log.append(("launch", n))
        tokens = []
        for c in out.chunks:
            if c.samples:
                rid, k = c.seq.request.request_id, c.seq.num_generated
                tokens.append(EOS if k == self.stop_at[rid] else 1000 * int(rid) + k)
        return n, tokens

    def collect(self, launch):
        n, tokens = launch
        self.log.append(("collect", n))
        return ModelOutput(tokens, None)


def test_scripted_async_loop(llama_dir):
    llm = LLM(llama_dir, async_scheduling=True, max_num_batched_tokens=16)
    eng = llm.engine
    stop_at = {"1": 3, "2": 0, "3": 7, "4": 5}
    eng.runner = runner = ScriptedRunner(stop_at)
    for rid in stop_at:
        eng.add_request(rid, [5, 6, 7, 8, 9] * int(rid), SamplingParams(max_tokens=20))
    finals = {}
    while eng.has_unfinished_requests():
        for o in eng.step():
            if o.finished:
                finals[o.request_id] = o.outputs[0]
    # results of launch i are read only after launch i + 1 is on its way
    for i in range(1, runner.launches):
        assert runner.log.index(("launch", i + 1)) < runner.log.index(("collect", i))
    for rid, k in stop_at.items():
        out = finals[rid]
        assert out.token_ids == [1000 * int(rid) + j for j in range(k)] + [EOS]
        assert out.finish_reason == "stop"
    assert eng.scheduler.blocks.num_free == eng.scheduler.blocks.num_blocks
    assert not eng.scheduler.running and not eng.scheduler.waiting


def test_async_chunked_prefill_keeps_every_prompt_logprob(llama_dir):
    """A prompt prefilled over several iterations gets all its prompt logprobs under asynchronous scheduling
    (the next chunk is prepared before the previous one's logprobs are read back), equal to the synchronous
    loop's; so does a prompt recomputed after a preemption."""
    prompts = [list(range(100, 131)), [77] * 37, [5, 6, 7]]
    p = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, prompt_logprobs=1)
    runs = [LLM(llama_dir, max_num_batched_tokens=16, async_scheduling=a).generate(prompts, p, use_tqdm=False)
            for a in (False, True)]
    short = [[1000, 2000, 3000], [31337, 2, 3], [9, 8, 7, 6, 5], [400, 401], [12, 13, 14, 15]]
    p_short = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, prompt_logprobs=1)
    alone = [LLM(llama_dir).generate([q], p_short, use_tqdm=False)[0] for q in short]
    llm = LLM(llama_dir, num_kv_blocks=10, block_size=4, async_scheduling=True)  # preempts, as in test_engine
    crowded = llm.generate(short, p_short, use_tqdm=False)
    assert llm.engine.scheduler.num_preemptions > 0
    for sync, asyn in [*zip(*runs), *zip(alone, crowded)]:
        assert len(asyn.prompt_logprobs) == len(sync.prompt_logprobs) == len(sync.prompt_token_ids)
        for x, y in zip(asyn.prompt_logprobs[1:], sync.prompt_logprobs[1:]):
            assert x.keys() == y.keys() and all(abs(x[t].logprob - y[t].logprob) < 1e-4 for t in x)
