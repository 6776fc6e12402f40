"""Beam search (nanoflow.beam_search, LLM.beam_search): against HF transformers' beam search on a small random
model, on a scripted tree of logprobs (ends, length penalty, ignore_eos), at the context's end, and bad params."""
import math

import pytest
import torch

from conftest import make_hf_model
from nanoflow import LLM, BeamSearchParams
from nanoflow.beam_search import beam_search
from nanoflow.outputs import CompletionOutput, Logprob, RequestOutput

PROMPTS = [[5, 17, 923, 4410, 88], [1000, 2000, 3000, 7, 7, 7, 301]]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("beam"))
    return path, make_hf_model(path, "llama", None, seed=3)


def test_matches_hf_beam_search(tiny):
    """Without an end-of-sequence token (ignore_eos; HF's eos_token_id unset) every beam runs max_tokens, and the
    beams and their order are HF's num_beams search; each beam's cum_logprob is the sum of its tokens' logprobs
    under HF's forward."""
    path, model = tiny
    width, n = 3, 6
    outs = LLM(path, device="cpu").beam_search(PROMPTS, BeamSearchParams(width, n, ignore_eos=True))
    for prompt, out in zip(PROMPTS, outs):
        hf = model.generate(torch.tensor([prompt]), num_beams=width, num_return_sequences=width, do_sample=False,
                            max_new_tokens=n, eos_token_id=None, pad_token_id=0, early_stopping=True,
                            attention_mask=torch.ones(1, len(prompt), dtype=torch.long))
        assert [s.tokens for s in out.sequences] == hf.tolist()
        for s in out.sequences:
            assert s.finish_reason == "length" and len(s.logprobs) == n
            with torch.no_grad():
                logp = model(torch.tensor([s.tokens])).logits[0, :-1].log_softmax(-1)
            expect = logp[torch.arange(len(prompt) - 1, len(s.tokens) - 1), torch.tensor(s.tokens[len(prompt):])]
            assert s.cum_logprob == pytest.approx(expect.sum().item(), abs=1e-3)


EOS = 9
# prefix (after the prompt [0]) -> its next tokens' logprobs; any other prefix gets DEFAULT
TREE = {(): {EOS: -0.1, 1: -0.5, 2: -0.7, 3: -3.0},
        (1,): {4: -0.2, 5: -1.5, EOS: -2.0, 6: -2.5},
        (2,): {EOS: -0.05, 4: -0.3, 6: -0.6, 7: -0.9}}
DEFAULT = {8: -1.0, 4: -1.1, 6: -1.2, EOS: -1.3}


def scripted(prompts, params):
    outs = []
    for p in prompts:
        lps = TREE.get(tuple(p["prompt_token_ids"][1:]), DEFAULT)
        ranked = {t: Logprob(lp, r + 1) for r, (t, lp) in enumerate(sorted(lps.items(), key=lambda x: -x[1]))}
        assert params.logprobs == 4 and params.max_tokens == 1
        outs.append(RequestOutput("r", None, p["prompt_token_ids"], [CompletionOutput(0, "", [], logprobs=[ranked])]))
    return outs


def run(**kw):
    params = BeamSearchParams(2, kw.pop("max_tokens", 3), **kw)
    out, = beam_search(scripted, [[0]], params, {EOS}, 100, decode=lambda ids: ",".join(map(str, ids)))
    return [(s.tokens, round(s.cum_logprob, 6), s.finish_reason, s.text) for s in out.sequences]


def test_ends_and_length_penalty_on_a_scripted_tree():
    """Width 2 over TREE (the prompt [0] counts in a beam's length). Step 1: [EOS] ends (score -0.1 / 1); [1] and
    [2] go on. Step 2: [1, 4] (-0.7 / 3) and [2, 4] (-1.0 / 3) go on; [2, EOS] ends (-0.75 / 2), as does [1, EOS].
    Step 3, the last: [1, 4] grows by DEFAULT's 8 and 4 (-1.7 / 4, -1.8 / 4). Best of all: the two ends."""
    assert run() == [([0, EOS], -0.1, "stop", ""), ([0, 2, EOS], -0.75, "stop", "2")]
    # (vLLM's fields: a temperature does not change the raw logprobs' ranking; the final EOS's text kept on request)
    assert run(temperature=0.7, include_stop_str_in_output=True) == [([0, EOS], -0.1, "stop", "9"),
                                                                     ([0, 2, EOS], -0.75, "stop", "2,9")]
    # divided by length ** 3, the longest win: -1.7 / 64 and -1.8 / 64 against -0.1 / 1 and -0.75 / 8
    assert run(length_penalty=3.0) == [([0, 1, 4, 8], -1.7, "length", "1,4,8"),
                                       ([0, 1, 4, 4], -1.8, "length", "1,4,4")]
    # penalties whose power of the length overflows a float order the same way, by length first
    assert run(length_penalty=1000.0) == run(length_penalty=3.0)
    assert run(length_penalty=-1000.0) == run()


def test_an_aborted_step_ends_its_beams():
    """A step's output aborted (the server's shutdown: no token, no logprobs) ends that beam as "abort", with the
    tokens it had; the search then has nothing live."""
    def aborting(prompts, params):
        outs = scripted(prompts, params)
        if len(prompts[0]["prompt_token_ids"]) > 1:  # the second step
            for o in outs:
                o.outputs = [CompletionOutput(0, "", [], finish_reason="abort")]
        return outs
    out, = beam_search(aborting, [[0]], BeamSearchParams(2, 5), {EOS}, 100, decode=lambda ids: ",".join(map(str, ids)))
    assert [(s.tokens, s.finish_reason, s.text) for s in out.sequences] == [([0, EOS], "stop", ""),
                                                                             ([0, 1], "abort", "1")]


def test_ignore_eos_keeps_the_end_token_as_a_token():
    """ignore_eos: [EOS] is a live beam like any other (step 1: -0.1 / 2, the best), grown by DEFAULT in step 2
    ([EOS, 8]: -1.1 / 3), where [1, 4] (-0.7 / 3) passes it; nothing finishes by "stop", and the text keeps it."""
    assert run(ignore_eos=True, max_tokens=2) == [([0, 1, 4], -0.7, "length", "1,4"),
                                                  ([0, EOS, 8], -1.1, "length", f"{EOS},8")]


def test_beams_end_at_the_context_length(tiny):
    """A beam that fills the context ends there ("length"), short of max_tokens: each prompt's at its own count."""
    path, _ = tiny
    outs = LLM(path, device="cpu", max_model_len=16).beam_search(PROMPTS, BeamSearchParams(2, 50, ignore_eos=True))
    for out in outs:
        assert [len(s.tokens) for s in out.sequences] == [16, 16]
        assert all(s.finish_reason == "length" and s.text is None for s in out.sequences)  # (no tokenizer: no text)


@pytest.mark.parametrize("kw, name", [(dict(beam_width=0, max_tokens=4), "beam_width"),
                                      (dict(beam_width=11, max_tokens=4), "beam_width"),
                                      (dict(beam_width=True, max_tokens=4), "beam_width"),
                                      (dict(beam_width=2, max_tokens=0), "max_tokens"),
                                      (dict(beam_width=2, max_tokens=4, length_penalty=math.nan), "length_penalty"),
                                      (dict(beam_width=2, max_tokens=4, ignore_eos="yes"), "ignore_eos")])
def test_bad_params_name_the_parameter(kw, name):
    with pytest.raises(ValueError, match=f"invalid beam search parameter {name}="):
        BeamSearchParams(**kw)


def test_the_servers_beam_search_takes_include_stop_str_in_output():
    """use_beam_search passes the request's include_stop_str_in_output on, as vLLM's server does."""
    from nanoflow.entrypoints import openai_protocol as api
    for given in (None, True):
        req = api.CompletionRequest(model="m", prompt="x", n=2, use_beam_search=True, include_stop_str_in_output=given)
        assert req.beam_search_params(4, False).include_stop_str_in_output is bool(given)


def test_a_server_shutting_down_between_steps_ends_the_search_aborted(tiny):
    """The shutdown's drain refuses new requests: a beam search between two steps ends with its beams aborted (a
    200, as the plain requests the drain aborts), not a search that runs on until the server is killed; a new
    request is a 503."""
    from fastapi.testclient import TestClient

    from nanoflow.entrypoints.async_engine import AsyncEngine
    from nanoflow.entrypoints.metrics import Metrics
    from nanoflow.entrypoints.server import build_app
    client = AsyncEngine(LLM(tiny[0], device="cpu").engine, Metrics(), 16)
    submit, steps = client.submit, []

    async def draining_before_the_third(*args, **kw):  # (the grace period ends between the second and third steps)
        steps.append(len(args[0]))
        if len(steps) == 3:
            client.drain()
        return await submit(*args, **kw)
    client.submit = draining_before_the_third
    body = {"prompt": PROMPTS[0], "n": 2, "use_beam_search": True, "max_tokens": 8, "ignore_eos": True}
    with TestClient(build_app(client, "m")) as http:
        r = http.post("/v1/completions", json=body)
        assert r.status_code == 200, r.text
        assert len(steps) == 3 and [c["finish_reason"] for c in r.json()["choices"]] == ["abort", "abort"]
        r = http.post("/v1/completions", json=body)
        assert r.status_code == 503 and "shutting down" in r.json()["error"]["message"]
