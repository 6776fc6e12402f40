"""The OpenAI-compatible server end to end: a real `nanoflow serve` (a subprocess on a loopback port, the
default model) driven by the official openai client; bad input; disconnects; overload; schemathesis over
its OpenAPI schema; `bench serve` against it; and SIGTERM (on a small model of its own)."""
import asyncio
import json
import random
import re
import shutil
import signal
import ssl
import subprocess
import time

import httpx
import openai
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings

import nanoflow
from nanoflow import BeamSearchParams, SamplingParams
from conftest import metrics, start_server, stop_server
from nanoflow.entrypoints.cli import main

API_KEY = "test-key"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
MAX_WAITING = 8
MAX_MODEL_LEN = 1024
PROMPT = "The capital of France is"
ABORTED = 'vllm:request_success_total{finished_reason="abort"}'


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    proc, url = start_server(["--api-key", API_KEY, "--max-waiting-requests", str(MAX_WAITING), "--max-model-len",
                              str(MAX_MODEL_LEN), "--kv-cache-gb", "0.5"], tmp_path_factory.mktemp("server") / "log")
    yield url
    assert stop_server(proc) == 0


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key=API_KEY, max_retries=0)


@pytest.fixture(scope="module")
def model(client):
    return client.models.list().data[0].id


def wait_until_idle(url: str, timeout: float = 10) -> dict[str, float]:
    """The engine has nothing running and every KV block is free."""
    deadline = time.monotonic() + timeout
    while True:
        m = metrics(url)
        if m["vllm:num_requests_running"] == m["vllm:kv_cache_usage_perc"] == 0:
            return m
        assert time.monotonic() < deadline, m
        time.sleep(0.05)


# -- the openai client -----------------------------------------------------------------------------
def test_models_and_health(server, client, model):
    assert httpx.get(f"{server}/health").status_code == 200  # no key needed outside /v1
    card = client.models.list().data[0]
    assert card.id == model and card.model_extra["max_model_len"] == MAX_MODEL_LEN
    assert client.models.retrieve(model) == card
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.models.retrieve("no-such/model")
    # an empty model name is the served model, as vLLM's (some clients send "")
    r = httpx.post(f"{server}/v1/completions", json={"model": "", "prompt": PROMPT, "max_tokens": 1}, headers=AUTH)
    assert r.status_code == 200, r.text


def test_logit_bias_and_allowed_token_ids(server, default_llm):
    """OpenAI's logit_bias (token ids as the keys; a bias past [-100, 100] is clamped, as vLLM's) and vLLM's
    allowed_token_ids, on both endpoints."""
    tk = default_llm.tokenizer
    t = tk.encode(" Paris", add_special_tokens=False)[0]
    body = {"prompt": PROMPT, "max_tokens": 3, "temperature": 0, "logit_bias": {str(t): 1000}}
    r = httpx.post(f"{server}/v1/completions", json=body, headers=AUTH)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == tk.decode([t] * 3)
    r = httpx.post(f"{server}/v1/completions", json=body | {"bad_words": ["Paris"]}, headers=AUTH)  # (vLLM's)
    assert r.status_code == 200 and "Paris" not in r.json()["choices"][0]["text"], r.text
    r = httpx.post(f"{server}/v1/completions", content=json.dumps(body | {"bad_words": ["\ud800"]}),  # (escaped)
                   headers=AUTH | {"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "bad_words" and "Unicode" in r.text, r.text
    allowed = [t, tk.encode(" London", add_special_tokens=False)[0]]
    body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "seed": 1, "allowed_token_ids": allowed,
            "logprobs": True}
    r = httpx.post(f"{server}/v1/chat/completions", json=body, headers=AUTH)
    assert r.status_code == 200, r.text
    drawn = [e["token"] for e in r.json()["choices"][0]["logprobs"]["content"]]
    assert len(drawn) == 4 and set(drawn) <= {tk.decode([i]) for i in allowed}


def test_structured_outputs(server, client, model):
    """OpenAI's response_format (a JSON schema; any JSON object) through the official client, and vLLM's
    structured_outputs on completions."""
    schema = {"type": "string", "enum": ["red", "green", "blue"]}
    r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "A colour?"}], max_tokens=8,
                                       response_format={"type": "json_schema",
                                                        "json_schema": {"name": "colour", "schema": schema}})
    assert json.loads(r.choices[0].message.content) in schema["enum"]
    r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "JSON?"}], max_tokens=4,
                                       response_format={"type": "json_object"})
    assert r.choices[0].message.content.startswith("{")
    r = httpx.post(f"{server}/v1/completions", headers=AUTH, json={
        "prompt": PROMPT, "max_tokens": 5, "n": 2, "structured_outputs": {"choice": ["Paris", "Lyon"]}})
    assert r.status_code == 200, r.text
    assert {c["text"] for c in r.json()["choices"]} <= {"Paris", "Lyon"}
    # vLLM's older fields, which clients still send (they were ignored: the output was not held to them)
    r = httpx.post(f"{server}/v1/completions", headers=AUTH, json={
        "prompt": PROMPT, "max_tokens": 5, "guided_regex": "[0-9]{2}"})
    assert r.status_code == 200 and re.fullmatch("[0-9]{2}", r.json()["choices"][0]["text"]), r.text


def test_structured_output_logprobs(server):
    """A grammar's logprobs are of the logits it masks (vLLM's): the tokens it bans have -inf, which JSON cannot
    hold; they are sent as -9999.0, as vLLM's (they were sent as null)."""
    bodies = [("completions", {"prompt": PROMPT, "logprobs": 3}),
              ("chat/completions", {"messages": USER, "logprobs": True, "top_logprobs": 3})]
    for (route, body), stream in [(b, s) for b in bodies for s in (False, True)]:
        body = body | {"max_tokens": 8, "temperature": 0, "structured_outputs": {"choice": ["Paris"]}, "stream": stream}
        r = httpx.post(f"{server}/v1/{route}", json=body, headers=AUTH)
        assert r.status_code == 200, r.text
        text = r.text.replace("data: [DONE]", "")
        found = [json.loads(x) for x in text.split("data: ")[1:]] if stream else [r.json()]
        tops = [v for f in found for c in f["choices"] if c["logprobs"] for v in (  # (a choice's role chunk: none)
            [lp for top in c["logprobs"]["top_logprobs"] for lp in top.values()] if route == "completions" else
            [t["logprob"] for e in c["logprobs"]["content"] for t in e["top_logprobs"]])]
        assert -9999.0 in tops and all(isinstance(v, float) and v >= -9999.0 for v in tops), (route, stream, tops)


def test_tokenize_and_detokenize(server, default_llm):
    """As vLLM's: the ids the completion or chat endpoint would send for the same input, and back."""
    tk = default_llm.tokenizer
    r = httpx.post(f"{server}/tokenize", json={"prompt": PROMPT, "return_token_strs": True}).json()
    assert r["tokens"] == tk.encode(PROMPT) and r["count"] == len(r["tokens"]) and r["max_model_len"] == MAX_MODEL_LEN
    assert "".join(r["token_strs"]).replace("Ġ", " ") == PROMPT  # the vocabulary's pieces (byte-level BPE)
    plain = httpx.post(f"{server}/tokenize", json={"prompt": PROMPT, "add_special_tokens": False}).json()
    assert plain["tokens"] == tk.encode(PROMPT, add_special_tokens=False) and plain["token_strs"] is None
    messages = [{"role": "user", "content": "Hi"}]
    chat = httpx.post(f"{server}/tokenize", json={"messages": messages}).json()
    assert chat["tokens"] == tk.encode(tk.render_chat(messages, True), add_special_tokens=False)
    usage = httpx.post(f"{server}/v1/chat/completions", json={"messages": messages, "max_tokens": 1},
                       headers=AUTH).json()["usage"]
    assert usage["prompt_tokens"] == chat["count"]
    back = httpx.post(f"{server}/detokenize", json={"tokens": chat["tokens"]}).json()["prompt"]
    assert back == tk.render_chat(messages, True)
    for body, names, param in [({}, "exactly one of prompt and messages", "prompt"),
                               ({"prompt": "x", "messages": messages}, "exactly one of prompt and messages",
                                "messages"),
                               ({"prompt": "x", "model": "other"}, "other", "model")]:
        r = httpx.post(f"{server}/tokenize", json=body)
        error = r.json()["error"]
        assert r.status_code in (400, 404) and names in error["message"] and error["param"] == param, r.text
        assert "JSON object" not in error["message"]
    r = httpx.post(f"{server}/tokenize", json=[1])
    assert r.status_code == 400 and "the body must be a JSON object" in r.text
    r = httpx.post(f"{server}/detokenize", json={"tokens": [1, 10**6]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "tokens" and "1000000" in r.text


def test_completion_and_chat_match_the_offline_api(client, model, default_llm):
    greedy = SamplingParams(temperature=0, max_tokens=8)
    out = client.completions.create(model=model, prompt=PROMPT, max_tokens=8, temperature=0)
    c = out.choices[0]
    assert c.text == default_llm.generate([PROMPT], greedy, use_tqdm=False)[0].outputs[0].text
    assert c.finish_reason == "length" and out.usage.completion_tokens == 8 and out.object == "text_completion"
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    chat = client.chat.completions.create(model=model, messages=messages, max_tokens=8, temperature=0)
    assert chat.choices[0].message.role == "assistant"
    assert chat.choices[0].message.content == default_llm.chat(messages, greedy, use_tqdm=False)[0].outputs[0].text
    assert chat.usage.completion_tokens == 8 and chat.usage.prompt_tokens > 8
    assert chat.usage.prompt_tokens_details is None  # (only with --enable-prompt-tokens-details, as vLLM's)
    # several prompts in one call (choices in prompt order), as text or token ids
    batch = client.completions.create(model=model, prompt=[PROMPT, "Hello"], max_tokens=8, temperature=0)
    assert [ch.index for ch in batch.choices] == [0, 1] and batch.choices[0].text == c.text
    ids = default_llm.tokenizer.encode(PROMPT)
    assert client.completions.create(model=model, prompt=ids, max_tokens=8, temperature=0).choices[0].text == c.text


def test_beam_search_matches_the_offline_api(client, model, default_llm):
    """use_beam_search (vLLM's): n beams, the choices best first as LLM.beam_search gives them, on both endpoints,
    streamed (each choice whole) and not; logprobs of the beams' tokens."""
    def texts(seqs, prompt_ids):  # (the offline texts are all the tokens', the prompt's too, as vLLM's)
        return [default_llm.tokenizer.decode(s.tokens[len(prompt_ids):], skip_special_tokens=True) for s in seqs]
    want = default_llm.beam_search([PROMPT], BeamSearchParams(3, 8))[0].sequences
    want_texts = texts(want, default_llm.tokenizer.encode(PROMPT))
    assert [s.text for s in want] == [default_llm.tokenizer.decode(s.tokens) for s in want]
    out = client.completions.create(model=model, prompt=PROMPT, max_tokens=8, n=3, logprobs=1,
                                    extra_body={"use_beam_search": True})
    assert [(c.index, c.text, c.finish_reason) for c in out.choices] == [
        (j, t, s.finish_reason) for j, (s, t) in enumerate(zip(want, want_texts))]
    for c, s in zip(out.choices, want):
        assert sum(c.logprobs.token_logprobs) == pytest.approx(s.cum_logprob, abs=1e-4)
    assert out.usage.completion_tokens == sum(len(s.tokens) for s in want) - 3 * len(default_llm.tokenizer.encode(
        PROMPT))
    one = client.completions.create(model=model, prompt=PROMPT, max_tokens=2, n=1, logprobs=5, extra_body={
        "use_beam_search": True, "repetition_penalty": 1.0, "min_tokens": 0, "echo": False, "stop": []})  # no-ops
    assert [len(top) for top in one.choices[0].logprobs.top_logprobs] == [5, 5]  # (more than the 2 candidates)
    chunks = list(client.completions.create(model=model, prompt=PROMPT, max_tokens=8, n=3, stream=True,
                                            extra_body={"use_beam_search": True}))
    assert sorted((ch.choices[0].index, ch.choices[0].text) for ch in chunks) == list(enumerate(want_texts))
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = default_llm.chat_prompt(messages)["prompt_token_ids"]
    want = default_llm.beam_search([prompt], BeamSearchParams(2, 6, length_penalty=0.5))[0].sequences
    chat = client.chat.completions.create(model=model, messages=messages, max_tokens=6, n=2,
                                          extra_body={"use_beam_search": True, "length_penalty": 0.5})
    assert [c.message.content for c in chat.choices] == texts(want, prompt)


def test_streaming(client, model):
    full = client.completions.create(model=model, prompt=PROMPT, max_tokens=8, temperature=0).choices[0].text
    chunks = list(client.completions.create(model=model, prompt=PROMPT, max_tokens=8, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == full
    assert chunks[-2].choices[0].finish_reason == "length"
    assert not chunks[-1].choices and chunks[-1].usage.completion_tokens == 8
    messages = [{"role": "user", "content": "Say hello."}]
    full = client.chat.completions.create(model=model, messages=messages, max_tokens=8, temperature=0)
    chunks = list(client.chat.completions.create(model=model, messages=messages, max_tokens=8, temperature=0,
                                                 stream=True))
    deltas = [ch.choices[0].delta for ch in chunks]
    assert deltas[0].role == "assistant" and all(d.role is None for d in deltas[1:])
    assert "".join(d.content for d in deltas) == full.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == "length" and chunks[-1].usage is None


def test_n_and_seed(client, model):
    kw = dict(model=model, prompt="Once upon a time", max_tokens=6, n=2, temperature=1.0, seed=5)
    a, b = client.completions.create(**kw), client.completions.create(**kw)
    assert [c.index for c in a.choices] == [0, 1] and a.usage.completion_tokens == 12
    assert [c.text for c in a.choices] == [c.text for c in b.choices]  # seeded: reproducible
    chunks = list(client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hi"}], n=2,
                                                 max_tokens=4, seed=1, stream=True))
    assert {c.index for ch in chunks for c in ch.choices} == {0, 1}
    assert all(len(ch.choices) == 1 for ch in chunks)  # one choice a chunk, as OpenAI's
    chunks = list(client.completions.create(**kw, stream=True))
    assert all(len(ch.choices) == 1 for ch in chunks) and {ch.choices[0].index for ch in chunks} == {0, 1}


def test_echo(client, model, default_llm):
    """The prompt before the completion, its tokens' logprobs before the completion's (the first null); with
    max_tokens 0, the prompt alone, as lm-eval's loglikelihood asks of vLLM."""
    plain = client.completions.create(model=model, prompt=PROMPT, max_tokens=3, temperature=0, logprobs=1)
    echo = client.completions.create(model=model, prompt=PROMPT, max_tokens=3, temperature=0, logprobs=1, echo=True)
    n = len(default_llm.tokenizer.encode(PROMPT))
    c, lp = echo.choices[0], echo.choices[0].logprobs
    assert c.text == PROMPT + plain.choices[0].text and len(lp.tokens) == n + 3 == echo.usage.total_tokens
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None and lp.text_offset[0] == 0
    assert lp.tokens[n:] == plain.choices[0].logprobs.tokens and lp.token_logprobs[n:] == pytest.approx(
        plain.choices[0].logprobs.token_logprobs, abs=1e-4)
    assert all(len(top) in (1, 2) and top[t] == v for t, v, top in zip(lp.tokens[1:], lp.token_logprobs[1:],
                                                                      lp.top_logprobs[1:]))
    alone = client.completions.create(model=model, prompt=[PROMPT, "Hi there"], max_tokens=0, logprobs=0, echo=True)
    assert [ch.text for ch in alone.choices] == [PROMPT, "Hi there"] and alone.usage.completion_tokens == 0
    assert alone.choices[0].logprobs.token_logprobs[1:] == pytest.approx(lp.token_logprobs[1:n], abs=1e-4)
    streamed = client.completions.create(model=model, prompt=PROMPT, max_tokens=3, temperature=0, echo=True,
                                         stream=True)
    assert "".join(ch.choices[0].text for ch in streamed) == c.text
    ids = default_llm.tokenizer.encode(PROMPT)
    by_ids = client.completions.create(model=model, prompt=ids, max_tokens=0, echo=True)
    assert by_ids.choices[0].text == default_llm.tokenizer.decode(ids, skip_special_tokens=False)
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.completions.create(model=model, prompt=PROMPT, max_tokens=0)


def test_chat_echo_starts_each_choice_with_the_prefill(client, model):
    """vLLM's chat echo: where the last message is the assistant's (a prefill the model continues), each choice's
    content starts with it, streamed as a delta of its own after the role; otherwise it adds nothing (it was
    ignored, with a warning). With continuous usage stats, that delta carries the usage too, as every chunk's."""
    prefill = [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": [
        {"type": "text", "text": "Hi"}, {"type": "text", "text": "there"}]}]
    kw = dict(model=model, messages=prefill, max_tokens=4, temperature=0.8, seed=5, n=2,
              extra_body={"continue_final_message": True, "add_generation_prompt": False})
    plain = client.chat.completions.create(**kw)
    echoed = client.chat.completions.create(**kw | {"extra_body": kw["extra_body"] | {"echo": True}})
    assert [c.message.content for c in echoed.choices] == ["Hi\nthere" + c.message.content for c in plain.choices]
    assert echoed.usage == plain.usage
    chunks = list(client.chat.completions.create(**kw | {"stream": True, "extra_body": kw["extra_body"] | {
        "echo": True}, "stream_options": {"include_usage": True, "continuous_usage_stats": True}}))
    assert all(ch.usage is not None for ch in chunks)
    for i, choice in enumerate(echoed.choices):
        deltas = [ch.choices[0].delta for ch in chunks if ch.choices and ch.choices[0].index == i]
        assert deltas[0].role == "assistant" and deltas[1].content == "Hi\nthere"
        assert "".join(d.content or "" for d in deltas) == choice.message.content
    asked = client.chat.completions.create(model=model, messages=prefill[:1], max_tokens=4, temperature=0,
                                           extra_body={"echo": True})
    assert asked.choices[0].message.content == client.chat.completions.create(
        model=model, messages=prefill[:1], max_tokens=4, temperature=0).choices[0].message.content


def test_replayed_refusals_and_top_logprobs_0(server, client, model):
    """As vLLM's: an assistant's refusal part in the history is its text to the template (a 400 before), and
    top_logprobs 0 without logprobs asks for nothing (a 400 before)."""
    messages = [{"role": "user", "content": "Hi"},
                {"role": "assistant", "content": [{"type": "refusal", "refusal": "I can't help with that."}]},
                {"role": "user", "content": "Why?"}]
    ids = httpx.post(f"{server}/tokenize", json={"model": model, "messages": messages}, headers=AUTH).json()["tokens"]
    as_text = [m | {"content": "I can't help with that."} if m["role"] == "assistant" else m for m in messages]
    assert ids == httpx.post(f"{server}/tokenize", json={"model": model, "messages": as_text},
                             headers=AUTH).json()["tokens"]
    r = client.chat.completions.create(model=model, messages=messages, max_tokens=2, top_logprobs=0)
    assert r.choices[0].logprobs is None and r.usage.prompt_tokens == len(ids)


def test_vllm_compatible_extras(server, client, model, default_llm):
    """Unknown fields ignored (as vLLM: OpenAI's newer fields, a response's message sent back with its null extras),
    continuous usage, chat's prompt_logprobs on the response, continue_final_message, /version, the model card."""
    reply = client.chat.completions.create(model=model, messages=USER, max_tokens=3, temperature=0)
    again = client.chat.completions.create(
        model=model, max_tokens=3, store=False, metadata={"k": "v"},
        messages=[*USER, reply.choices[0].message.model_dump(), {"role": "user", "content": "And?"}],
        extra_body={"prompt_logprobs": 0})
    assert again.usage.completion_tokens == 3 and len(again.model_extra["prompt_logprobs"]) == again.usage.prompt_tokens
    assert "prompt_logprobs" not in again.choices[0].model_extra
    chunks = list(client.completions.create(model=model, prompt=PROMPT, max_tokens=4, temperature=0, stream=True,
                                            stream_options={"include_usage": True, "continuous_usage_stats": True}))
    assert [ch.usage.completion_tokens for ch in chunks] == list(range(1, 5)) + [4]
    every = {"include_usage": True, "continuous_usage_stats": True}
    chunks = list(client.chat.completions.create(model=model, messages=USER, max_tokens=3, n=2, seed=1, stream=True,
                                                 stream_options=every))
    for j in (0, 1):  # each choice's own count (its role chunk's 0), the prompt's own tokens (as vLLM's); the last
        assert [ch.usage.completion_tokens for ch in chunks[:-1] if ch.choices[0].index == j] == [0, 1, 2, 3]
    assert chunks[-1].usage.completion_tokens == 6 and chunks[0].usage.prompt_tokens == chunks[-1].usage.prompt_tokens
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "The capital of France is"}]
    body = dict(model=model, messages=messages, max_tokens=3, temperature=0)
    cont = client.chat.completions.create(**body, extra_body={"add_generation_prompt": False,
                                                              "continue_final_message": True})
    assert cont.choices[0].message.content.startswith(" Paris")
    with pytest.raises(openai.BadRequestError, match="continue_final_message and add_generation_prompt") as e:
        client.chat.completions.create(**body, extra_body={"continue_final_message": True})
    assert e.value.param == "continue_final_message"
    cont2 = client.chat.completions.create(**body, extra_body={"continue_final_message": True, "chat_template_kwargs": {
        "add_generation_prompt": False}})  # (the template's variables may set it, as vLLM's)
    assert cont2.choices[0].message.content == cont.choices[0].message.content
    assert httpx.get(f"{server}/version").json() == {"version": nanoflow.__version__}
    card = client.models.list().data[0]
    assert card.model_extra["root"].endswith(".gguf") and card.model_extra["parent"] is None
    # truncate_prompt_tokens: the prompt's last k tokens (usage counts them; an echo shows them)
    long = "The capital of France is Paris. " * 100 + PROMPT
    cut = client.completions.create(model=model, prompt=long, max_tokens=4, temperature=0, echo=True,
                                    extra_body={"truncate_prompt_tokens": 5})
    tk = default_llm.tokenizer
    assert cut.usage.prompt_tokens == 5 and cut.choices[0].text.startswith(tk.decode(tk.encode(long)[-5:]))
    chat = client.chat.completions.create(model=model, messages=[{"role": "user", "content": long}], max_tokens=2,
                                          extra_body={"truncate_prompt_tokens": 7})
    assert chat.usage.prompt_tokens == 7


def test_stop(client, model):
    full = client.completions.create(model=model, prompt=PROMPT, max_tokens=16, temperature=0).choices[0].text
    stop = full[4:7]
    out = client.completions.create(model=model, prompt=PROMPT, max_tokens=16, temperature=0, stop=[stop])
    c = out.choices[0]
    assert c.text == full[:full.index(stop)] and c.finish_reason == "stop" and c.model_extra["stop_reason"] == stop
    for stop in ("z" * 12, full[1:15]):  # longer than the first tokens' text; one never occurs, one spans tokens
        whole = client.completions.create(model=model, prompt=PROMPT, max_tokens=16, temperature=0, stop=stop)
        chunks = client.completions.create(model=model, prompt=PROMPT, max_tokens=16, temperature=0, stop=stop,
                                           stream=True)
        assert "".join(ch.choices[0].text for ch in chunks) == whole.choices[0].text


def test_logprobs(client, model):
    out = client.completions.create(model=model, prompt=PROMPT, max_tokens=4, temperature=0, logprobs=2,
                                    extra_body={"prompt_logprobs": 1})
    c = out.choices[0]
    lp = c.logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 4
    assert "".join(lp.tokens) == c.text
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(4)]
    for tok, value, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert len(top) == 2 and value <= 0 and top[tok] == value == max(top.values())  # greedy: the top token
    prompt_lp = c.model_extra["prompt_logprobs"]
    assert len(prompt_lp) == out.usage.prompt_tokens and prompt_lp[0] is None and all(prompt_lp[1:])
    chat = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hi"}], max_tokens=4,
                                          temperature=0, logprobs=True, top_logprobs=2)
    content = chat.choices[0].logprobs.content
    assert len(content) == 4 and "".join(t.token for t in content) == chat.choices[0].message.content
    for t in content:
        assert len(t.top_logprobs) == 2 and t.top_logprobs[0].token == t.token and bytes(t.bytes) == t.token.encode()
    sampled = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hi"}], max_tokens=8,
                                             temperature=2.0, seed=3, logprobs=True, top_logprobs=2)
    content = sampled.choices[0].logprobs.content
    for t in content:  # the top 2 in order, whatever was sampled
        top = t.top_logprobs
        assert len(top) == 2 and top[0].logprob >= top[1].logprob
        assert t.token in (top[0].token, top[1].token) or t.logprob <= top[1].logprob
    assert any(t.token not in (t.top_logprobs[0].token, t.top_logprobs[1].token) for t in content)  # (tested)


# -- bad input -------------------------------------------------------------------------------------
USER = [{"role": "user", "content": "Hi"}]
BAD = [  # (route, body, status, what the error names)
    ("completions", '{"prompt": "x", ', 400, "malformed JSON"),
    ("completions", [1, 2], 400, "JSON object"),
    ("completions", {"prompt": "x", "temperature": "hot"}, 400, "temperature"),
    ("completions", {"prompt": "x", "max_tokens": "5"}, 400, "max_tokens"),
    ("completions", {"prompt": 5}, 400, "must be a string, a list of strings, a list of token ids"),
    ("completions", {"prompt": "x", "max_tokens": MAX_MODEL_LEN}, 400, "max_tokens"),
    # (the field the client sent: it was named max_tokens)
    ("chat/completions", {"messages": USER, "max_completion_tokens": MAX_MODEL_LEN}, 400, "max_completion_tokens"),
    ("chat/completions", {"messages": USER, "max_completion_tokens": MAX_MODEL_LEN, "use_beam_search": True}, 400,
     "max_completion_tokens"),
    ("completions", {"prompt": "x", "stream_options": {"include_usage": True}}, 400, "stream_options"),
    ("completions", {"prompt": "x", "echo": "yes"}, 400, "echo"),
    ("completions", {"prompt": "x", "stream": "yes"}, 400, "stream"),
    ("completions", {"prompt": "x", "best_of": 2}, 400, "best_of"),
    ("completions", {"prompt": "x", "top_p": 1.5}, 400, "top_p"),
    ("completions", {"prompt": "x", "n": 0}, 400, "n"),
    ("completions", {"prompt": "x", "n": 1000}, 400, "n"),
    ("completions", {"prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ("completions", {"prompt": "x", "logprobs": 50}, 400, "logprobs"),
    ("completions", {"prompt": "x", "presence_penalty": 5}, 400, "presence_penalty"),
    ("completions", {"prompt": "x", "seed": 2**70}, 400, "seed"),
    ("completions", {"prompt": "x", "min_tokens": 1, "stop_token_ids": [10**6]}, 400, "stop_token_ids"),
    ("completions", {"prompt": "x", "stop": [""]}, 400, "stop"),
    ("completions", {"prompt": [5] * (MAX_MODEL_LEN + 10)}, 400, "max_model_len"),
    ("completions", {"prompt": [1, 10**6]}, 400, "out of range"),
    ("completions", {"prompt": ""}, 400, "empty"),
    ("completions", {"prompt": []}, 400, "empty"),
    ("completions", {"prompt": "x", "model": "no-such-model"}, 404, "no-such-model"),
    ("chat/completions", {"messages": []}, 400, "messages"),
    ("chat/completions", {}, 400, "messages"),
    ("chat/completions", {"messages": [{"role": "", "content": "hi"}]}, 400, "role"),
    ("chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}]},
     400, "messages"),
    ("chat/completions", {"messages": USER, "top_logprobs": 2}, 400, "top_logprobs"),
    ("chat/completions", {"messages": USER, "logprobs": True, "top_logprobs": 21}, 400, "top_logprobs"),
    ("chat/completions", {"messages": USER, "tools": [{"type": "function", "function": {"name": "f"}}]}, 400,
     "--enable-auto-tool-choice"),  # (tool_choice "auto", the default with tools, needs the server's parser)
    ("chat/completions", {"messages": USER, "tool_choice": "required"}, 400, "tool_choice"),
    ("completions", {"prompt": "x", "truncate_prompt_tokens": 0}, 400, "truncate_prompt_tokens"),
    ("completions", {"prompt": "x", "priority": 1}, 400, "priority"),  # (this server's policy is fcfs)
    ("chat/completions", {"messages": USER, "truncate_prompt_tokens": MAX_MODEL_LEN + 1}, 400,
     "truncate_prompt_tokens"),
    # text with a lone surrogate (JSON's escapes allow one): not valid Unicode (it was a 500 from the tokenizer)
    ("completions", '{"prompt": "a\\ud800"}', 400, "prompt"),
    ("chat/completions", '{"messages": [{"role": "user", "content": "a\\ud800"}]}', 400, "messages"),
    ("chat/completions", {"messages": USER, "response_format": {"type": "xml"}}, 400, "response_format"),
    ("chat/completions", {"messages": USER, "response_format": {"type": "json_schema"}}, 400, "json_schema"),
    ("completions", {"prompt": "x", "structured_outputs": {"regex": "[0-9"}}, 400, "structured_outputs"),
    # (a schema xgrammar refuses, sent as OpenAI's response_format: named so, not as the structured_outputs it became)
    ("chat/completions", {"messages": USER, "response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "nope"}}}}, 400, "response_format"),
    ("completions", {"prompt": "x", "structured_outputs": {"regx": "a"}}, 400, "structured_outputs"),
    ("completions", {"prompt": "x", "guided_regex": "[0-9"}, 400, "guided_regex"),
    ("completions", {"prompt": "x", "guided_choice": ["a"], "structured_outputs": {"regex": "a"}}, 400,
     "guided_choice"),
    ("completions", {"prompt": "x", "structured_outputs": {"regex": "a"}, "response_format": {"type": "json_object"}},
     400, "structured_outputs"),
    ("completions", {"prompt": "x", "logit_bias": {"x": 10}}, 400, "logit_bias"),
    ("completions", {"prompt": "x", "logit_bias": {"99999999": 10}}, 400, "logit_bias"),
    ("chat/completions", {"messages": USER, "allowed_token_ids": []}, 400, "allowed_token_ids"),
    ("chat/completions", {"messages": USER, "temperature": -1}, 400, "temperature"),
    ("chat/completions", {"messages": USER, "model": "gpt-4o"}, 404, "gpt-4o"),
    ("completions", {"prompt": "x", "use_beam_search": True, "stop": ["."]}, 400, "stop"),
    ("completions", {"prompt": "x", "use_beam_search": True, "echo": True}, 400, "echo"),
    ("completions", {"prompt": "x", "use_beam_search": True, "n": 11}, 400, "n"),
    ("completions", {"prompt": ["a", "b"], "use_beam_search": True, "n": MAX_WAITING // 2 + 1}, 400, "n"),
    ("completions", {"prompt": "x", "use_beam_search": True, "prompt_logprobs": 0}, 400, "prompt_logprobs"),
    ("completions", {"prompt": "x", "use_beam_search": True, "max_tokens": MAX_MODEL_LEN}, 400, "max_tokens"),
    ("chat/completions", {"messages": USER, "use_beam_search": True, "response_format": {"type": "json_object"}},
     400, "response_format"),
    ("chat/completions", {"messages": USER, "use_beam_search": True, "length_penalty": "x"}, 400, "length_penalty"),
]


@pytest.mark.parametrize("route, body, status, names", BAD, ids=[f"{r}-{i}" for i, (r, *_) in enumerate(BAD)])
def test_bad_input_is_a_4xx_naming_the_problem(server, route, body, status, names):
    content = body if isinstance(body, str) else json.dumps(body)
    r = httpx.post(f"{server}/v1/{route}", content=content, headers=AUTH | {"Content-Type": "application/json"})
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert names in error["message"] or names == error["param"], error
    assert error["type"] and set(error) == {"message", "type", "param", "code"}
    assert httpx.get(f"{server}/health").status_code == 200


def test_null_means_the_default(server):
    """Fields OpenAI allows to be null are taken as their defaults, as OpenAI clients send them; so are the fields
    this server does not implement, at null or at a value that asks for nothing."""
    bodies = [("completions", {"prompt": "Hi", "max_tokens": 2, "stream": None, "echo": None, "best_of": 1,
                                "suffix": None, "logit_bias": None, "stream_options": None}),
              ("chat/completions", {"messages": USER, "max_tokens": 2, "stream": None, "logprobs": None,
                                    "tools": None, "tool_choice": None, "response_format": None,
                                    "parallel_tool_calls": None, "logit_bias": None}),
              # values that ask for nothing, as some clients send them
              ("chat/completions", {"messages": USER, "max_tokens": 2, "tools": [], "tool_choice": "none",
                                    "response_format": {"type": "text"}, "logit_bias": {}, "functions": [],
                                    "function_call": "auto", "parallel_tool_calls": False})]
    for route, body in bodies:
        r = httpx.post(f"{server}/v1/{route}", json=body, headers=AUTH)
        assert r.status_code == 200, r.text


def test_api_key(server, client, model):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY}):
        r = httpx.post(f"{server}/v1/completions", json={"prompt": "x"}, headers=headers)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server}/v1", api_key="wrong", max_retries=0).models.list()
    assert client.completions.create(model=model, prompt="x", max_tokens=2).usage.completion_tokens == 2


def test_cors_by_default_lets_any_origin_in_without_a_key_for_the_preflight(server):
    """As vLLM's default (--allowed-origins '["*"]'): a browser's preflight needs no API key, and the answers carry
    the CORS headers, a 401 too (so that the page can read why)."""
    preflight = {"Origin": "https://ui.example", "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization,content-type"}
    r = httpx.options(f"{server}/v1/chat/completions", headers=preflight)
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "*", r.text
    r = httpx.get(f"{server}/v1/models", headers={"Origin": "https://ui.example"})
    assert r.status_code == 401 and r.headers["access-control-allow-origin"] == "*"


def test_stats_line():
    """vLLM's periodic log line, from the metrics: throughput since the last line, requests, KV use, the prefix
    cache's hits over the interval's lookups; nothing when nothing ran or waits."""
    from nanoflow.entrypoints.metrics import Metrics
    m, since = Metrics(), {}
    assert m.stats_line(since, 10.0) is None
    m.prompt_tokens.inc(100)
    m.generation_tokens.inc(50)
    m.cache["queries"].inc(40)
    m.cache["hits"].inc(10)
    m.running.set(2)
    m.kv_usage.set(0.125)
    assert m.stats_line(since, 10.0) == ("Avg prompt throughput: 10.0 tokens/s, Avg generation throughput: 5.0 "
                                         "tokens/s, Running: 2 reqs, Waiting: 0 reqs, KV cache usage: 12.5%, Prefix "
                                         "cache hit rate: 25.0%")
    m.running.set(0)
    assert m.stats_line(since, 10.0) is None  # (the counters' totals are not counted again)
    m.generation_tokens.inc(8)
    assert m.stats_line(since, 2.0).startswith("Avg prompt throughput: 0.0 tokens/s, Avg generation throughput: 4.0")


def test_server_logs_stats_unless_disabled(llama_dir, tmp_path, monkeypatch, capsys):
    """Every $NANOFLOW_LOG_STATS_INTERVAL seconds (10 by default) while requests ran, a stats line in the log;
    none with --disable-log-stats; a bad interval is refused before the model loads."""
    monkeypatch.setenv("NANOFLOW_LOG_STATS_INTERVAL", "0.2")
    for flags, expect in (([], True), (["--disable-log-stats"], False)):
        log = tmp_path / f"log{len(flags)}"
        proc, url = start_server([llama_dir, *flags], log)
        try:
            body = {"prompt": [1, 2, 3], "max_tokens": 4, "ignore_eos": True}
            assert httpx.post(f"{url}/v1/completions", json=body).status_code == 200
            time.sleep(1.0)
        finally:
            assert stop_server(proc) == 0
        assert ("nanoflow.server: Avg prompt throughput:" in open(log).read()) == expect, open(log).read()[-2000:]
    monkeypatch.setenv("NANOFLOW_LOG_STATS_INTERVAL", "often")
    assert main(["serve", llama_dir, "--port", "0"]) != 0
    assert "NANOFLOW_LOG_STATS_INTERVAL='often': must be a number of seconds > 0" in capsys.readouterr().err


def test_root_path_origins_and_log_level(llama_dir, tmp_path):
    """--root-path (a proxy's prefix: the docs name it, and the API key still guards /v1 under it, where uvicorn
    puts the prefix in the request's path), --allowed-origins (others' preflights refused), --uvicorn-log-level."""
    proc, url = start_server([llama_dir, "--api-key", API_KEY, "--root-path", "/nf", "--uvicorn-log-level",
                              "warning", "--allowed-origins", '["https://ui.example"]'], tmp_path / "log")
    try:
        assert httpx.get(f"{url}/openapi.json").json()["servers"] == [{"url": "/nf"}]
        assert httpx.get(f"{url}/v1/models").status_code == 401
        assert httpx.get(f"{url}/v1/models", headers=AUTH).status_code == 200
        assert httpx.get(f"{url}/nf/v1/models", headers=AUTH).status_code == 404  # the proxy strips the prefix
        ask = {"Access-Control-Request-Method": "POST"}
        r = httpx.options(f"{url}/v1/completions", headers=ask | {"Origin": "https://ui.example"})
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "https://ui.example"
        r = httpx.options(f"{url}/v1/completions", headers=ask | {"Origin": "https://other.example"})
        assert r.status_code == 400 and "access-control-allow-origin" not in r.headers
    finally:
        assert stop_server(proc) == 0
    assert "Uvicorn running" not in open(tmp_path / "log").read()  # an info line, below "warning"


@pytest.mark.skipif(shutil.which("openssl") is None, reason="makes its certificate with the openssl command")
def test_tls_and_no_fastapi_docs(llama_dir, tmp_path, capsys):
    """vLLM's --ssl-keyfile / --ssl-certfile (HTTPS only) and --disable-fastapi-docs (no /docs, /redoc,
    /openapi.json); a TLS setting that cannot serve is refused before the model loads, naming the flag."""
    key, cert = str(tmp_path / "key.pem"), str(tmp_path / "cert.pem")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", cert, "-days",
                    "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True)
    proc, url = start_server([llama_dir, "--ssl-keyfile", key, "--ssl-certfile", cert, "--disable-fastapi-docs"],
                             tmp_path / "log")
    try:
        assert url.startswith("https://")
        with httpx.Client(verify=ssl.create_default_context(cafile=cert)) as client:  # (its own CA: itself)
            r = client.post(f"{url}/v1/completions", json={"prompt": [1, 2, 3], "max_tokens": 2, "ignore_eos": True})
            assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2
            assert {client.get(f"{url}{path}").status_code for path in ("/docs", "/redoc", "/openapi.json")} == {404}
        with pytest.raises(httpx.HTTPError):  # plain HTTP on the TLS port
            httpx.get(url.replace("https://", "http://") + "/health")
    finally:
        assert stop_server(proc) == 0
    for flags, message in ((["--ssl-certfile", str(tmp_path / "none.pem")], "--ssl-certfile / --ssl-keyfile: "),
                           (["--ssl-ca-certs", cert], "--ssl-ca-certs needs --ssl-certfile"),
                           (["--ssl-keyfile", key], "--ssl-keyfile needs --ssl-certfile"),
                           (["--ssl-certfile", key, "--ssl-keyfile", key], "--ssl-certfile / --ssl-keyfile: "),
                           (["--ssl-certfile", cert, "--ssl-keyfile", key, "--ssl-cert-reqs", "2"],
                            "--ssl-cert-reqs 1 or 2 needs --ssl-ca-certs"),
                           (["--ssl-certfile", cert, "--ssl-keyfile", key, "--ssl-cert-reqs", "3"],
                            "--ssl-cert-reqs must be 0")):
        assert main(["serve", "/no/such/model", *flags]) == 2 and message in capsys.readouterr().err


def test_serve_config_file(llama_dir, tmp_path, monkeypatch, capsys):
    """vLLM's `serve --config FILE`: a YAML mapping of serve's long flags (dashes or underscores) to values, the
    command line's flags winning over it (the positional MODEL too); a key that is no flag, or a bad value, refused
    naming the file and the key. A real server from a file: its port, served names and switches."""
    import nanoflow.entrypoints.server as server_module
    config = tmp_path / "serve.yaml"
    config.write_text(f"model: {llama_dir}\nmax_num_seqs: 7\nenable-prefix-caching: false\nserved-model-name: [a, b]\n"
                      f"override-generation-config: {{temperature: 0.5}}\nmax-model-len: 2k\ntrust-remote-code: true\n"
                      f"disable-fastapi-docs: true\n")
    seen = []
    monkeypatch.setattr(server_module, "serve", lambda a: seen.append(a) or 0)
    assert main(["serve", "--config", str(config), "--max-num-seqs", "9"]) == 0
    a = seen[-1]
    assert (a.model, a.max_num_seqs, a.enable_prefix_caching, a.served_model_name, a.override_generation_config,
            a.max_model_len, a.trust_remote_code, a.disable_fastapi_docs) == (
        llama_dir, 9, False, ["a", "b"], {"temperature": 0.5}, 2000, True, True)
    assert main(["serve", "other-model", "--config", str(config)]) == 0 and seen[-1].model == "other-model"
    assert main(["serve", "--config", str(config), "--enable-prefix-caching"]) == 0 and seen[-1].enable_prefix_caching
    for body, message in (("nosuch: 1", "'nosuch' is not a flag of `nanoflow serve`"),
                          ("port: abc", "'port': 'abc' is not a valid value"),
                          ("kv-cache-dtype: fp9", "'kv-cache-dtype' must be one of auto, fp8, fp8_e4m3, not 'fp9'"),
                          ("enforce-eager: 3", "'enforce-eager' is a switch: true or false, not 3"),
                          ("port:", "'port' has no value"), ("- port", "must map flags to values"),
                          ("port: [", "is not YAML"), ("quantization: awq", "quantization='awq': nanoflow takes only"),
                          ("no-enable-prefix-caching: true", "write 'enable-prefix-caching' as true or false")):
        config.write_text(body)
        assert main(["serve", "--config", str(config)]) == 2
        assert message in capsys.readouterr().err
    assert main(["serve", "--config", str(tmp_path / "none.yaml")]) == 2
    assert "none.yaml: No such file or directory" in capsys.readouterr().err
    monkeypatch.undo()
    config.write_text(f"model: {llama_dir}\nserved_model_name: [tiny]\nmax-model-len: 64\n")
    proc, url = start_server(["--config", str(config)], tmp_path / "log")
    try:
        assert [m["id"] for m in httpx.get(f"{url}/v1/models").json()["data"]] == ["tiny"]
        assert httpx.get(f"{url}/v1/models").json()["data"][0]["max_model_len"] == 64
    finally:
        assert stop_server(proc) == 0


@pytest.mark.parametrize("value, names", [("*", "not JSON"), ('{"a": 1}', "not a JSON list of strings"),
                                          ("[1]", "not a JSON list of strings")])
def test_cors_flags_take_a_json_list_of_strings(value, names, capsys):
    with pytest.raises(SystemExit) as e:
        main(["serve", "--allowed-origins", value])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "--allowed-origins" in err and names in err


# -- resources -------------------------------------------------------------------------------------
def test_disconnect_aborts_and_frees_the_kv_cache(server):
    aborted = wait_until_idle(server).get(ABORTED, 0)
    body = {"prompt": "Tell me a long story.", "max_tokens": 900, "ignore_eos": True}
    with httpx.Client(base_url=server, headers=AUTH, timeout=60) as c:
        with c.stream("POST", "/v1/completions", json=body | {"stream": True}) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            assert sum(line.startswith("data: ") for line, _ in zip(lines, range(6))) >= 3
            m = metrics(server)
            assert m["vllm:num_requests_running"] == 1 and m["vllm:kv_cache_usage_perc"] > 0
    assert wait_until_idle(server)[ABORTED] == aborted + 1
    # a non-streaming request whose client gives up waiting
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server}/v1/completions", json=body, headers=AUTH, timeout=httpx.Timeout(60, read=1.0))
    assert wait_until_idle(server)[ABORTED] == aborted + 2


def test_overload_is_503_and_every_accepted_request_completes(server):
    rng = random.Random(0)
    bodies = [{"prompt": [rng.randrange(100, 30000) for _ in range(200)], "max_tokens": 4, "ignore_eos": True}
              for _ in range(40)]

    async def send_all():
        async with httpx.AsyncClient(base_url=server, headers=AUTH, timeout=120) as c:
            return await asyncio.gather(*(c.post("/v1/completions", json=b) for b in bodies))

    responses = asyncio.run(send_all())
    ok = [r for r in responses if r.status_code == 200]
    busy = [r for r in responses if r.status_code == 503]
    assert len(ok) + len(busy) == len(bodies) and len(ok) >= MAX_WAITING and busy
    assert all(r.json()["usage"]["completion_tokens"] == 4 and r.json()["choices"][0]["finish_reason"] == "length"
               for r in ok)
    assert all(int(r.headers["retry-after"]) > 0 and r.json()["error"]["type"] == "server_overloaded" for r in busy)
    m = wait_until_idle(server)
    assert m["vllm:num_requests_waiting"] == 0 and m['nanoflow_http_responses_total{status="503"}'] >= len(busy)


def test_token_counters_rise_as_the_engine_goes(server):
    """vllm:generation_tokens_total counts each token once sampled, and vllm:prompt_tokens_total a prompt once its
    first token came, as vLLM's: they counted a request's at its end (generation) or at its arrival (prompt), so the
    stats line read 0 tokens/s of generation through long requests."""
    before = wait_until_idle(server)
    prompt = [random.Random(1).randrange(100, 30000) for _ in range(12)]
    body = {"prompt": prompt, "max_tokens": 400, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{server}/v1/completions", headers=AUTH, json=body, timeout=60) as r:
        seen = 0
        for line in r.iter_lines():
            seen += line.startswith("data: {")
            if seen == 6:
                break
        during = metrics(server)
    after = wait_until_idle(server)
    delta = lambda m, name: m[f"vllm:{name}_total"] - before[f"vllm:{name}_total"]  # noqa: E731
    assert delta(during, "prompt_tokens") == len(prompt) == delta(after, "prompt_tokens")
    assert 6 <= delta(during, "generation_tokens") < 400 and delta(after, "generation_tokens") >= 6


def test_metrics(server):
    m = metrics(server)
    assert m["vllm:prompt_tokens_total"] > 0 and m["vllm:generation_tokens_total"] > 0
    assert m['vllm:request_success_total{finished_reason="length"}'] > 0
    assert m['nanoflow_http_responses_total{status="200"}'] > 0 and m['nanoflow_http_responses_total{status="400"}'] > 0
    for h in ("time_to_first_token_seconds", "request_time_per_output_token_seconds", "e2e_request_latency_seconds",
              "inter_token_latency_seconds", "request_prefill_time_seconds", "request_decode_time_seconds",
              "request_inference_time_seconds"):
        assert m[f"vllm:{h}_count"] > 0 and m[f"vllm:{h}_sum"] > 0, h
    assert m["vllm:request_queue_time_seconds_count"] == m["vllm:request_inference_time_seconds_count"]
    assert m["vllm:request_max_num_generation_tokens_count"] == m["vllm:request_generation_tokens_count"]
    assert m["vllm:request_params_n_count"] >= m["vllm:request_generation_tokens_count"] > 0
    # vLLM's names and its model_name label (the served name), so that its dashboards read them
    for h in ("request_prompt_tokens", "request_generation_tokens"):  # (sizes of finished requests)
        assert m[f"vllm:{h}_count"] > 0 and m[f"vllm:{h}_sum"] >= m[f"vllm:{h}_count"]
    assert m["vllm:num_preemptions_total"] >= 0
    from nanoflow.entrypoints.metrics import EngineStats, Metrics
    counted = Metrics("x")
    for preempted in (3, 5, 5):  # (the engine's running count: the counter adds what is new)
        counted.on_stats(EngineStats(preemptions=preempted))
    assert counted.registry.get_sample_value("vllm:num_preemptions_total", {"model_name": "x"}) == 5
    # a request's phases from the engine's clock; its inter-token latencies from the responses' arrivals
    from nanoflow.outputs import CompletionOutput, RequestOutput
    out = RequestOutput("r", None, [1, 2], [CompletionOutput(0, "", [5, 6, 7], finish_reason="length"),
                                            CompletionOutput(1, "", [5], finish_reason="stop")], finished=True,
                        metrics=dict(arrival_time=10.0, first_scheduled_time=10.5, first_token_time=11.25,
                                     last_token_time=13.0))
    counted.on_finished(out, arrival=0.0, first_token=1.0, now=2.0)
    counted.on_tokens(4, 0.2)
    sample = lambda name: counted.registry.get_sample_value(name, {"model_name": "x"})  # noqa: E731
    assert [sample(f"vllm:request_{k}_time_seconds_sum") for k in ("queue", "prefill", "decode", "inference")] == [
        0.5, 0.75, 1.75, 2.5]
    assert sample("vllm:request_max_num_generation_tokens_sum") == 3
    assert sample("vllm:request_generation_tokens_sum") == 4 and sample("vllm:e2e_request_latency_seconds_sum") == 2
    assert sample("vllm:request_time_per_output_token_seconds_sum") == 0.5  # (the longest: 3 tokens in 1 s)
    from nanoflow import SamplingParams
    counted.on_accepted([[1, 2, 3], [4]], SamplingParams(n=2, max_tokens=None), max_model_len=10)
    assert (sample("vllm:request_params_n_sum"), sample("vllm:request_params_max_tokens_sum")) == (4, 7 + 9)
    assert sample("vllm:prompt_tokens_total") == sample("vllm:generation_tokens_total") == 0  # (the engine's count)
    for prompted, generated in ((3, 0), (3, 2), (10, 9)):
        counted.on_stats(EngineStats(preemptions=5, prompt_tokens=prompted, generation_tokens=generated))
    assert (sample("vllm:prompt_tokens_total"), sample("vllm:generation_tokens_total")) == (10, 9)
    assert sample("vllm:inter_token_latency_seconds_count") == 4
    assert sample("vllm:inter_token_latency_seconds_sum") == pytest.approx(0.2)
    name = httpx.get(f"{server}/v1/models", headers=AUTH).json()["data"][0]["id"]
    text = httpx.get(f"{server}/metrics").text
    assert f'vllm:num_requests_running{{model_name="{name}"}}' in text, text[:2000]


# -- fuzzing the OpenAPI schema --------------------------------------------------------------------
def _bounded(path: str, body) -> None:
    """Keep generated requests cheap: a few tokens and samples each (other values stay as generated)."""
    if isinstance(body, dict):
        max_tokens = {"/v1/chat/completions": "max_completion_tokens", "/v1/responses": "max_output_tokens"}.get(
            path, "max_tokens")
        for key, cap in ((max_tokens, 4), ("n", 2)):
            if body.get(key) is None or (isinstance(body[key], int | float) and body[key] > cap):
                body[key] = cap


def test_schemathesis_finds_no_server_error(server):
    schema = schemathesis.openapi.from_url(f"{server}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/v1/completions", "/v1/chat/completions", "/v1/models"}
    for op in operations:
        modes = [schemathesis.GenerationMode.POSITIVE] + ([schemathesis.GenerationMode.NEGATIVE]
                                                           if op.method.upper() == "POST" else [])
        for mode in modes:
            @settings(max_examples=30 if op.method.upper() == "POST" else 2, deadline=None, database=None,
                      phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
            @given(case=op.as_strategy(generation_mode=mode))
            def check(case):
                _bounded(case.path, case.body)
                r = case.call(base_url=server, headers=AUTH, timeout=60)
                assert r.status_code < 500, f"{case.method} {case.path} {case.body!r}: {r.status_code} {r.text}"

            check()
    assert httpx.get(f"{server}/health").status_code == 200


# -- bench serve -----------------------------------------------------------------------------------
def test_bench_serve(server, tmp_path, capsys):
    out, png = tmp_path / "r.json", tmp_path / "latency.png"
    args = ["bench", "serve", "--url", server, "--api-key", API_KEY, "--workload", "const:16:4"]
    assert main(args + ["--num-requests", "4", "--max-concurrency", "2", "--output", str(out)]) == 0
    r = json.loads(out.read_text())["results"][0]
    assert r["request_rate"] == "inf" and r["completed"] == 4 and r["failed"] == 0
    assert r["total_input_tokens"] == 64 and r["total_output_tokens"] == 16
    assert r["output_throughput"] == pytest.approx(16 / r["duration_s"])
    for name in ("ttft", "tpot", "itl", "e2e", "normalized_latency"):
        for stat in ("mean", "median", "p99"):
            assert r[f"{stat}_{name}_ms"] > 0
    assert r["mean_normalized_latency_ms"] == pytest.approx(r["mean_e2e_ms"] / 4)
    assert "normalized latency" in capsys.readouterr().out
    hits = metrics(server)["vllm:prefix_cache_hits_total"]
    assert main(args + ["--num-requests", "3", "--sweep", "20,inf", "--output", str(out), "--plot", str(png)]) == 0
    assert [r["request_rate"] for r in json.loads(out.read_text())["results"]] == [20.0, "inf"]
    assert metrics(server)["vllm:prefix_cache_hits_total"] == hits  # each rate's own prompts: no cached prefix
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # no arrival gap after the last request: one request at 0.05/s (the seed's first gap 37 s) ends with its reply
    assert main(args + ["--num-requests", "1", "--request-rate", "0.05", "--output", str(out)]) == 0
    r = json.loads(out.read_text())["results"][0]
    assert r["completed"] == 1 and r["duration_s"] < 2 * r["mean_e2e_ms"] / 1000 + 1


# -- shutdown --------------------------------------------------------------------------------------
def test_sigterm_finishes_requests_in_flight_aborts_the_rest_and_exits_0(llama_dir, tmp_path):
    # The grace must let 10 tokens finish and not 500: this model makes ~380 tokens/s on one CPU core (500 took
    # 1.3 s, within the 1.5 s this test once allowed, and the long request ended by its length)
    proc, url = start_server([llama_dir, "--graceful-shutdown-timeout", "0.4"], tmp_path / "log")

    async def run() -> tuple[list, list]:
        async with httpx.AsyncClient(base_url=url, timeout=60) as c:
            started = [asyncio.Event(), asyncio.Event()]

            async def stream(i: int, max_tokens: int) -> list:
                body = {"prompt": [1, 2, 3], "max_tokens": max_tokens, "ignore_eos": True, "stream": True,
                        "stream_options": {"include_usage": True}}
                events = []
                async with c.stream("POST", "/v1/completions", json=body) as r:
                    async for line in r.aiter_lines():
                        if line.startswith("data: "):
                            events.append(line[6:])
                            started[i].set()
                return events

            short, long = asyncio.create_task(stream(0, 10)), asyncio.create_task(stream(1, 500))
            await asyncio.gather(*(e.wait() for e in started))
            proc.send_signal(signal.SIGTERM)
            return await short, await long

    try:
        short, long = asyncio.run(run())
        with pytest.raises(httpx.ConnectError):  # no longer accepting
            httpx.get(f"{url}/health")
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    for events, reason, tokens in ((short, "length", 10), (long, "abort", None)):
        assert events[-1] == "[DONE]"
        chunks = [json.loads(e) for e in events[:-1]]
        assert [c for c in chunks if c["choices"]][-1]["choices"][0]["finish_reason"] == reason
        # tokens by the usage chunk: a reader that fell behind gets several tokens in one event
        assert tokens is None or chunks[-1]["usage"]["completion_tokens"] == tokens


def test_prompts_are_tokenized_off_the_event_loop(default_llm):
    """A prompt's tokenizing (and chat template) runs on a thread, as vLLM's: a 10 MB prompt took 3.4 s on the event
    loop, and every other stream stalled that long. (And a bad logit_bias key's message shows the key: pydantic's
    template does not take {key!r}, which it printed as such.)"""
    from fastapi.testclient import TestClient
    from test_reasoning import Scripted

    from nanoflow.entrypoints.server import build_app
    tok, seen = default_llm.tokenizer, []

    class Recording:
        def __getattr__(self, name):
            return getattr(tok, name)

        def encode(self, *args, **kwargs):
            try:
                asyncio.get_running_loop()
                seen.append("event loop")
            except RuntimeError:
                seen.append("thread")
            return tok.encode(*args, **kwargs)
    messages = [{"role": "user", "content": "Hi"}]
    with TestClient(build_app(Scripted(Recording(), "Hello"), "m")) as c:
        for path, body in (("/tokenize", {"prompt": "Hi"}), ("/tokenize", {"messages": messages}),
                           ("/v1/completions", {"prompt": ["Hi", "there"], "max_tokens": 2}),
                           ("/v1/chat/completions", {"messages": messages}),
                           ("/v1/messages/count_tokens", {"model": "m", "messages": messages})):
            assert c.post(path, json=body).status_code == 200, path
        r = c.post("/v1/completions", json={"prompt": "Hi", "logit_bias": {"-3": 5}})
        assert r.status_code == 400 and "keys must be token ids, got '-3'" in r.json()["error"]["message"]
    assert seen == ["thread"] * 6


def test_default_chat_template_kwargs(default_llm, monkeypatch):
    """vLLM's --default-chat-template-kwargs: the template's variables for every request (a Qwen3 server's
    {"enable_thinking": false}), a request's own chat_template_kwargs over them."""
    from fastapi.testclient import TestClient
    from test_reasoning import Scripted

    from nanoflow.entrypoints import cli, server
    template = "{{ greeting | default('none') }}:{% for m in messages %}{{ m.content }}{% endfor %}"
    app = server.build_app(Scripted(default_llm.tokenizer, "x"), "m", chat_template=template,
                           chat_template_kwargs={"greeting": "hello"})
    messages = [{"role": "user", "content": "Hi"}]
    with TestClient(app) as c:
        def rendered(body):
            tokens = c.post("/tokenize", json={"messages": messages} | body).json()["tokens"]
            return default_llm.tokenizer.decode(tokens)
        assert rendered({}) == "hello:Hi"
        assert rendered({"chat_template_kwargs": {"greeting": "bye"}}) == "bye:Hi"
    seen = []
    monkeypatch.setattr(cli, "_serve", lambda a: seen.append(a) or 0)
    assert cli.main(["serve", "--default-chat-template-kwargs", '{"enable_thinking": false}']) == 0
    assert seen[0].default_chat_template_kwargs == {"enable_thinking": False}


def test_a_second_signal_quits_without_a_crash(tmp_path):
    """SIGTERM then SIGINT with a request running: uvicorn force-quits past the app's shutdown, and the engine thread,
    still stepping, met the interpreter's exit: the process died by SIGABRT ("terminate called without an active
    exception"; 2 of 2 runs). The engine is now stopped after uvicorn returns, whichever way. (The default model: a
    step of the tiny one is too short to be inside when the process exits.)"""
    proc, url = start_server(["--graceful-shutdown-timeout", "30"], tmp_path / "log")
    try:
        with httpx.stream("POST", f"{url}/v1/completions", timeout=60, json={
                "prompt": "Once upon a time", "max_tokens": 2000, "ignore_eos": True, "stream": True}) as r:
            lines = r.iter_lines()
            next(lines)  # (the request runs)
            proc.send_signal(signal.SIGTERM)
            time.sleep(0.5)
            proc.send_signal(signal.SIGINT)
            with pytest.raises(httpx.HTTPError):  # (a forced quit cuts the stream)
                for _ in lines:
                    pass
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "terminate called" not in (tmp_path / "log").read_text()


def test_stream_coalesces_a_backlog():
    """A reader that fell behind gets one event per request for what waited (outputs are cumulative), in order,
    and every request's end."""
    from types import SimpleNamespace

    from nanoflow.entrypoints.async_engine import RequestStream, _Sink
    from nanoflow.entrypoints.metrics import Metrics
    from nanoflow.outputs import CompletionOutput, RequestOutput

    def out(rid, n, done=False):
        c = CompletionOutput(0, "x" * n, list(range(n)), finish_reason="length" if done else None)
        return RequestOutput(rid, None, [1], [c], finished=done)

    async def read():
        owner = SimpleNamespace(metrics=Metrics(), num_waiting=2, _abort=lambda rid: None)
        sink = _Sink(asyncio.get_running_loop())
        for item in (out("r-0", 1), out("r-0", 2), out("r-1", 1), out("r-0", 3, True), out("r-1", 2, True)):
            sink.queue.put_nowait(item)
        return [(i, len(o.outputs[0].token_ids), o.finished) async for i, o in RequestStream(owner, "r", 2, sink)]
    assert asyncio.run(read()) == [(0, 2, False), (1, 1, False), (0, 3, True), (1, 2, True)]


@pytest.mark.parametrize("interval, due", [(1, [1, 2, 3, 4, 5, 6, 7, 8]), (3, [1, 4, 7, 8]), (10, [1, 8])])
def test_stream_interval(interval, due):
    """--stream-interval N: a request's output goes out on its first token, then once per N new tokens, and at its
    end; the other requests' outputs are not held back by it. Below 1 is refused, naming the option."""
    from types import SimpleNamespace

    from nanoflow.entrypoints.async_engine import AsyncEngine
    from nanoflow.entrypoints.metrics import Metrics
    from nanoflow.outputs import CompletionOutput, RequestOutput

    def out(rid, n, done=False, choices=1):
        return RequestOutput(rid, None, [1], [CompletionOutput(i, "x" * n, list(range(n))) for i in range(choices)],
                             finished=done)
    engine = SimpleNamespace(tokenizer=None, max_model_len=64, source=SimpleNamespace(path="m"), sampling_defaults={},
                             eos_token_ids=set(), workers=None)
    eng = AsyncEngine(engine, Metrics(), 8, interval)
    for choices in (1, 3):  # N new tokens of each choice (n > 1 once counted them all together)
        eng._sinks.update({"a": "sink-a", "b": "sink-b"})
        sent = [n for n in range(1, 9) if eng._due(out("a", n, n == 8, choices)) == "sink-a"]
        assert sent == due and "a" not in eng._sinks and "a" not in eng._sent
    assert eng._due(out("b", 1)) == "sink-b"  # its own count
    with pytest.raises(ValueError, match="--stream-interval must be >= 1"):
        AsyncEngine(engine, Metrics(), 8, 0)


def test_a_refused_submission_takes_back_only_what_it_added():
    """All or none: a submission refused part-way aborts the requests it added, and only those (an id already in use
    is another request's, which runs on)."""
    from types import SimpleNamespace

    from nanoflow.entrypoints.async_engine import ACCEPTED, AsyncEngine, Submission
    from nanoflow.entrypoints.metrics import Metrics

    class Engine(SimpleNamespace):
        def add_request(self, rid, prompt, params, priority=0):
            if rid in self.requests:
                raise ValueError(f"request id {rid!r} is already in use")
            if not prompt:
                raise ValueError("the prompt is empty")
            self.requests.add(rid)

        def abort_request(self, rid):
            self.requests.discard(rid)
    engine = Engine(tokenizer=None, max_model_len=64, source=SimpleNamespace(path="m"), sampling_defaults={},
                    eos_token_ids=set(), requests={"a-1"}, workers=None)
    eng, got = AsyncEngine(engine, Metrics(), 8, 1), []
    sink = SimpleNamespace(put=got.append)
    for ids, prompts in ((["a-0", "a-1", "a-2"], [[1], [2], [3]]), (["b-0", "b-1"], [[1], []])):
        eng._handle(Submission(ids, prompts, SamplingParams(), sink))
        assert isinstance(got.pop(), ValueError) and engine.requests == {"a-1"} and not eng._sinks
    eng._handle(Submission(["c-0"], [[1]], SamplingParams(), sink))
    assert got == [ACCEPTED] and engine.requests == {"a-1", "c-0"} and eng._sinks == {"c-0": sink}


def test_the_models_defaults_fill_what_a_request_leaves_unset():
    """The generation config's defaults (vLLM's --generation-config auto) apply to fields a request does not set;
    its max_tokens bounds the request's (16 for a completion that sets none, as OpenAI's), as vLLM's get_max_tokens;
    a request without one (null, a chat's unset) is cut by the server to the context left (test below)."""
    from nanoflow.entrypoints import openai_protocol as api
    defaults = {"temperature": 0.25, "top_k": 5, "max_tokens": 7}
    p = api.CompletionRequest(prompt="x").sampling_params(defaults)
    assert (p.temperature, p.top_k, p.max_tokens) == (0.25, 5, 7)
    p = api.CompletionRequest(prompt="x", temperature=1.0, max_tokens=None).sampling_params(defaults)
    assert (p.temperature, p.top_k, p.max_tokens) == (1.0, 5, None)
    assert api.CompletionRequest(prompt="x").sampling_params({}).max_tokens == 16  # (OpenAI's default)
    assert api.CompletionRequest(prompt="x").sampling_params({"max_tokens": 100}).max_tokens == 16
    assert api.CompletionRequest(prompt="x", max_tokens=50).sampling_params(defaults).max_tokens == 7
    with pytest.raises(ValueError, match="min_tokens=9: must be <= max_tokens, which the model's generation config"):
        api.CompletionRequest(prompt="x", max_tokens=50, min_tokens=9).sampling_params(defaults)
    # echo with logprobs asks for the prompt's, unless prompt_logprobs is given (as vLLM's)
    assert api.CompletionRequest(prompt="x", echo=True, logprobs=3).sampling_params({}).prompt_logprobs == 3
    assert api.CompletionRequest(prompt="x", echo=True, logprobs=3, prompt_logprobs=0).sampling_params(
        {}).prompt_logprobs == 0
    chat = dict(messages=[{"role": "user", "content": "x"}])
    assert api.ChatCompletionRequest(**chat).sampling_params(defaults).max_tokens is None
    assert api.ChatCompletionRequest(**chat, max_completion_tokens=3).sampling_params(defaults).max_tokens == 3
    assert api.ChatCompletionRequest(**chat, top_k=0).sampling_params(defaults).top_k == 0


def test_a_default_max_tokens_past_the_context_is_cut_to_it(llama_dir, tmp_path):
    """A generation config's max_new_tokens beyond the context left bounds requests without max_tokens at the
    context; it does not refuse them."""
    import shutil
    shutil.copytree(llama_dir, tmp_path / "m")
    (tmp_path / "m" / "generation_config.json").write_text('{"max_new_tokens": 4096, "temperature": 0.0}')
    proc, url = start_server(["--model", str(tmp_path / "m"), "--max-model-len", "48"], tmp_path / "log")
    body = {"messages": [{"role": "user", "content": "hi"}], "ignore_eos": True}
    r = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["total_tokens"] == 48 and r.json()["choices"][0]["finish_reason"] == "length"
    r = httpx.post(f"{url}/v1/completions", json={"prompt": "hi", "ignore_eos": True}, timeout=60)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 16  # (OpenAI's default)
    r = httpx.post(f"{url}/v1/chat/completions", json=body | {"min_tokens": 100}, timeout=60)  # (it was a 500)
    assert r.status_code == 400 and "min_tokens=100" in r.json()["error"]["message"], r.text
    assert stop_server(proc) == 0


def test_several_served_model_names(default_llm, monkeypatch):
    """As vLLM's --served-model-name a b: /v1/models lists both, a request may name either and its response names
    the one it gave (the first when it gives none); another name is a 404 naming them."""
    from fastapi.testclient import TestClient
    from test_reasoning import Scripted

    from nanoflow.entrypoints.server import build_app
    app = build_app(Scripted(default_llm.tokenizer, "Paris."), ["a", "b"])
    with TestClient(app) as client:
        assert [m["id"] for m in client.get("/v1/models").json()["data"]] == ["a", "b"]
        assert client.get("/v1/models/b").json()["id"] == "b"
        body = {"messages": [{"role": "user", "content": "Hi"}]}
        for given, named in ((None, "a"), ("a", "a"), ("b", "b")):
            r = client.post("/v1/chat/completions", json=body | ({"model": given} if given else {}))
            assert r.status_code == 200 and r.json()["model"] == named, r.text
            r = client.post("/v1/completions",
                            json={"prompt": "Hi", "stream": True} | ({"model": given} if given else {}))
            assert {json.loads(e)["model"] for e in r.text.split("data: ")[1:-1]} == {named}
        r = client.post("/v1/chat/completions", json=body | {"model": "c"})
        assert r.status_code == 404 and "this server serves 'a' or 'b'" in r.json()["error"]["message"]
    from nanoflow.entrypoints import cli
    seen = []
    monkeypatch.setattr(cli, "_serve", lambda a: seen.append(a) or 0)
    assert main(["serve", "--served-model-name", "a", "b"]) == 0
    assert (seen[0].served_model_name, seen[0].model_arg) == (["a", "b"], None)  # (b was taken as the MODEL)


def test_api_keys_request_ids_and_ping(default_llm, tmp_path, monkeypatch, capsys):
    """As vLLM's: several --api-key values (any one opens /v1), the Bearer scheme in any case, $VLLM_API_KEY when no
    key is given; a response's id from the request's X-Request-Id header, else its body's request_id; with
    --enable-request-id-headers each response carries X-Request-Id (the request's, else a new one); /health and
    SageMaker's /ping (GET and POST) answer 200 with no body."""
    from fastapi.testclient import TestClient
    from test_reasoning import Scripted

    from nanoflow.entrypoints.server import build_app
    app = build_app(Scripted(default_llm.tokenizer, "Paris."), "m", api_key=["k1", "k2"], request_id_headers=True)
    body = {"messages": [{"role": "user", "content": "Hi"}]}
    with TestClient(app) as client:
        for auth, status in (("Bearer k1", 200), ("Bearer k2", 200), ("bearer k2", 200), ("Bearer k3", 401),
                             ("k1", 401), ("Basic k1", 401), ("Bearer", 401)):
            assert client.get("/v1/models", headers={"Authorization": auth}).status_code == status, auth
        auth = {"Authorization": "Bearer k1"}
        r = client.post("/v1/chat/completions", json=body, headers=auth | {"X-Request-Id": "mine-1"})
        assert r.json()["id"] == "chatcmpl-mine-1" and r.headers["x-request-id"] == "mine-1"
        r = client.post("/v1/completions", json={"prompt": "Hi", "request_id": "body-2"}, headers=auth)
        assert r.json()["id"] == "cmpl-body-2" and len(r.headers["x-request-id"]) == 32  # (a new one)
        r = client.post("/v1/completions", json={"prompt": "Hi", "request_id": "body-3", "stream": True},
                        headers=auth | {"X-Request-Id": "head-3"})
        assert {json.loads(e)["id"] for e in r.text.split("data: ")[1:-1]} == {"cmpl-head-3"}
        for method, path in (("GET", "/health"), ("GET", "/ping"), ("POST", "/ping")):
            r = client.request(method, path)
            assert (r.status_code, r.content) == (200, b""), path
        # SageMaker's /invocations (outside /v1, as vLLM's): by its body, a chat completion or a completion
        r = client.post("/invocations", json=body)
        assert r.json()["object"] == "chat.completion" and r.json()["choices"][0]["message"]["content"] == "Paris."
        assert client.post("/invocations", json={"prompt": "Hi"}).json()["object"] == "text_completion"
        r = client.post("/invocations", json={"prompt": "Hi", "stream": True})
        assert "".join(json.loads(e)["choices"][0]["text"] for e in r.text.split("data: ")[1:-1]) == "Paris."
        r = client.post("/invocations", json={"input": "Hi"})
        assert r.status_code == 400 and "holds messages (a chat completion) or prompt" in r.json()["error"]["message"]
        r = client.post("/invocations", json={"prompt": "Hi", "max_tokens": "many"})
        assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"
        assert client.post("/invocations", content=b"{", headers={"content-type": "application/json"}).status_code \
            == 400
    with TestClient(build_app(Scripted(default_llm.tokenizer, "Paris."), "m")) as client:
        r = client.post("/v1/completions", json={"prompt": "Hi"})
        assert r.json()["id"].startswith("cmpl-") and "x-request-id" not in r.headers
        assert client.get("/load").json() == {"server_load": 0}  # (not tracked)
    # vLLM's --enable-server-load-tracking: /load tells the POST /v1 requests whose responses have not ended
    import threading
    with TestClient(build_app(Scripted(default_llm.tokenizer, "Paris. " * 60, cut=1), "m",
                              load_tracking=True)) as client:
        streaming = threading.Thread(target=client.post, args=("/v1/completions",),
                                     kwargs={"json": {"prompt": "Hi", "stream": True}})
        streaming.start()
        seen = set()
        while streaming.is_alive():
            seen.add(client.get("/load").json()["server_load"])
        streaming.join()
        assert 1 in seen and client.get("/load").json() == {"server_load": 0}
    # an empty key (an unset variable) would open /v1 to a bare "Bearer"; a MODEL after --api-key is taken for a
    # key (it takes several, as vLLM's): both refused before the model loads
    for argv, message in ((["serve", "--api-key", "k", ""], "--api-key: an empty key"),
                          (["serve", "--api-key", "k", default_llm.engine.source.path], "looks like the model")):
        assert main(argv) == 2 and message in capsys.readouterr().err
    monkeypatch.delenv("NANOFLOW_API_KEY", raising=False)
    monkeypatch.setenv("VLLM_API_KEY", "from-env")
    proc, url = start_server(["--max-model-len", "64"], tmp_path / "log")
    try:
        assert httpx.get(f"{url}/v1/models").status_code == 401
        assert httpx.get(f"{url}/v1/models", headers={"Authorization": "Bearer from-env"}).status_code == 200
    finally:
        assert stop_server(proc) == 0


def test_return_tokens_as_token_ids(server, tmp_path):
    """vLLM's return_tokens_as_token_ids (a request's, else --return-tokens-as-token-ids): logprobs name each token
    and its alternatives "token_id:ID", in completions (also an echoed prompt's) and chat."""
    ids = re.compile(r"token_id:\d+")
    body = {"prompt": PROMPT, "max_tokens": 3, "logprobs": 2, "echo": True, "return_tokens_as_token_ids": True}
    lp = httpx.post(f"{server}/v1/completions", json=body, headers=AUTH).json()["choices"][0]["logprobs"]
    assert all(map(ids.fullmatch, lp["tokens"])) and all(ids.fullmatch(t) for top in lp["top_logprobs"][1:]
                                                          for t in top)
    plain = httpx.post(f"{server}/v1/completions", json=body | {"return_tokens_as_token_ids": False},
                       headers=AUTH).json()["choices"][0]["logprobs"]["tokens"]
    assert "".join(plain).startswith(PROMPT) and not any(map(ids.fullmatch, plain))
    chat = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3, "logprobs": True, "top_logprobs": 2,
            "return_tokens_as_token_ids": True}
    content = httpx.post(f"{server}/v1/chat/completions", json=chat, headers=AUTH).json()["choices"][0]["logprobs"][
        "content"]
    assert len(content) == 3 and all(ids.fullmatch(c["token"]) and c["bytes"] == list(c["token"].encode()) and
                                     all(ids.fullmatch(t["token"]) for t in c["top_logprobs"]) for c in content)
    proc, url = start_server(["--max-model-len", "64", "--return-tokens-as-token-ids"], tmp_path / "log")
    try:
        body = {"prompt": [1, 2, 3], "max_tokens": 2, "logprobs": 0}
        assert all(map(ids.fullmatch, httpx.post(f"{url}/v1/completions", json=body).json()["choices"][0][
            "logprobs"]["tokens"]))
        tokens = httpx.post(f"{url}/v1/completions", json=body | {"return_tokens_as_token_ids": False}).json()[
            "choices"][0]["logprobs"]["tokens"]
        assert not any(map(ids.fullmatch, tokens))
    finally:
        assert stop_server(proc) == 0
