"""The embedded default model (SmolLM2-135M-Instruct, Q4_1 GGUF)."""
import os
import subprocess
import sys

import pytest
import torch

from nanoflow import LLM, SamplingParams


def test_answers_a_factual_prompt(default_llm):
    out = default_llm.generate("The capital of France is", SamplingParams(temperature=0, max_tokens=8),
                               use_tqdm=False)[0]
    assert "Paris" in out.outputs[0].text


def test_chat_template(default_llm):
    out = default_llm.chat([{"role": "user", "content": "What is the capital of France?"}],
                           SamplingParams(temperature=0, max_tokens=20), use_tqdm=False)[0]
    assert "Paris" in out.outputs[0].text and out.outputs[0].finish_reason == "stop"


def test_tokenizer_matches_transformers_gguf_tokenizer(default_llm, default_model_path):
    transformers = pytest.importorskip("transformers")
    import os
    hf = transformers.AutoTokenizer.from_pretrained(os.path.dirname(default_model_path),
                                                    gguf_file=os.path.basename(default_model_path))
    texts = ["The capital of France is", "  multiple   spaces\n\nand newlines\t", "числа 12345 and ünïcödé 🎉",
             "<|im_start|>user\nhi<|im_end|>", "it's don't we'll I'M"]
    for t in texts:
        assert default_llm.tokenizer.encode(t, add_special_tokens=False) == hf.encode(t, add_special_tokens=False)


def test_weights_match_transformers_gguf_loader(default_llm, default_model_path):
    """transformers dequantizes the same GGUF independently: the logits must agree (in float32, on the CPU)."""
    transformers = pytest.importorskip("transformers")
    import os
    if default_llm.engine.device.type != "cpu":
        default_llm = LLM(device="cpu")
    hf = transformers.AutoModelForCausalLM.from_pretrained(os.path.dirname(default_model_path),
                                                           gguf_file=os.path.basename(default_model_path),
                                                           dtype=torch.float32).eval()
    ids = default_llm.tokenizer.encode("The capital of France is")
    out = default_llm.generate([ids], SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=0),
                               use_tqdm=False)[0]
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0].log_softmax(-1)
    for pos in range(1, len(ids)):
        assert out.prompt_logprobs[pos][ids[pos]].logprob == pytest.approx(ref[pos - 1, ids[pos]].item(), abs=1e-3)


def test_stop_string_cuts_exactly(default_llm):
    p = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    full = default_llm.generate("The capital of France is", p, use_tqdm=False)[0].outputs[0].text
    stop = full[7:12]  # a stop string that starts mid-token and may span tokens
    cut = default_llm.generate("The capital of France is", SamplingParams(temperature=0, max_tokens=24, stop=stop,
                                                                          ignore_eos=True), use_tqdm=False)[0]
    o = cut.outputs[0]
    assert o.text == full[: full.index(stop)] and o.finish_reason == "stop" and o.stop_reason == stop
    kept = default_llm.generate("The capital of France is", SamplingParams(
        temperature=0, max_tokens=24, stop=[stop], include_stop_str_in_output=True, ignore_eos=True),
        use_tqdm=False)[0].outputs[0]
    assert kept.text == full[: full.index(stop) + len(stop)]


def test_a_stop_tokens_text_shows_only_with_include_stop_str_in_output(default_llm):
    """As vLLM's: the token that ends a sequence (a stop token id, EOS) stays in token_ids, its text only with
    include_stop_str_in_output. Greedy: ' Paris' (7042) '.' (30) ..."""
    prompt = "The capital of France is"
    for include, text in ((False, " Paris"), (True, " Paris.")):
        c = default_llm.generate(prompt, SamplingParams(temperature=0, max_tokens=8, stop_token_ids=[30],
                                                        include_stop_str_in_output=include), use_tqdm=False)[0]
        c = c.outputs[0]
        assert (c.text, c.token_ids, c.finish_reason, c.stop_reason) == (text, [7042, 30], "stop", 30)
    for include in (False, True):
        c = default_llm.chat([{"role": "user", "content": "What is the capital of France?"}],
                             SamplingParams(temperature=0, max_tokens=40, skip_special_tokens=False,
                                            include_stop_str_in_output=include), use_tqdm=False)[0].outputs[0]
        assert c.finish_reason == "stop" and c.stop_reason is None  # EOS, <|im_end|>
        assert c.text.endswith("<|im_end|>") == include and "Paris" in c.text


@pytest.mark.parametrize("min_tokens, stop, text, reason", [
    (1, " Paris", " Paris.\n\nThe answer is:", "length"),  # ' Paris' is the first token's text
    (2, ".", " Paris.\n\nThe answer is:", "length"),  # '.' is the second's
    (1, ".", " Paris", "stop"),
    (1, " Paris.", "", "stop")])  # (a match may begin in that text, as long as it reaches past it)
def test_the_first_min_tokens_text_holds_no_stop_string(default_llm, min_tokens, stop, text, reason):
    """As vLLM's (since its PR 22014): a stop string must reach past the first min_tokens tokens' text."""
    c = default_llm.generate("The capital of France is", SamplingParams(temperature=0, max_tokens=8, stop=stop,
                                                                         min_tokens=min_tokens), use_tqdm=False)[0]
    assert (c.outputs[0].text, c.outputs[0].finish_reason) == (text, reason)


def test_the_sampled_token_comes_first_in_its_logprobs(default_llm):
    """As vLLM's: each position's dict starts with the sampled token, then the top-k."""
    c = default_llm.generate("The capital of France is", SamplingParams(temperature=1.5, seed=3, max_tokens=8,
                                                                         logprobs=2), use_tqdm=False)[0].outputs[0]
    assert [next(iter(lp)) for lp in c.logprobs] == c.token_ids
    assert any(lp[t].rank > 2 and len(lp) == 3 for t, lp in zip(c.token_ids, c.logprobs))  # (one outside the top 2)


def test_chat_options_as_vllms(default_llm):
    """continue_final_message, chat_template_kwargs, OpenAI's content parts and a null content, a tuple of params."""
    greedy = SamplingParams(temperature=0, max_tokens=5)
    msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "The capital of France is"}]
    r = default_llm.chat(msgs, greedy, use_tqdm=False, add_generation_prompt=False, continue_final_message=True)[0]
    assert default_llm.tokenizer.decode(r.prompt_token_ids).endswith("assistant\nThe capital of France is")
    assert r.outputs[0].text.startswith(" Paris")
    with pytest.raises(ValueError, match="continue_final_message and add_generation_prompt"):
        default_llm.chat(msgs, greedy, continue_final_message=True)
    template = "{{ messages[0].content }}{% if flag %} [FLAG]{% endif %}"
    ids = default_llm.chat_prompt(msgs, chat_template=template, chat_template_kwargs={"flag": True})
    assert default_llm.tokenizer.decode(ids["prompt_token_ids"]) == "Hi [FLAG]"
    with pytest.raises(TypeError):  # (a misspelled option is an error, not a template variable)
        default_llm.chat(msgs, greedy, add_generation_promt=False)
    parts = [{"role": "user", "content": [{"type": "text", "text": "H"}, {"type": "text", "text": "i"}]}]
    assert default_llm.chat_prompt(parts) == default_llm.chat_prompt([{"role": "user", "content": "H\ni"}])
    # chat_template_kwargs may set the options too (vLLM merges them over its own)
    assert default_llm.chat_prompt(msgs[:1], chat_template_kwargs={"add_generation_prompt": False}) == \
        default_llm.chat_prompt(msgs[:1], add_generation_prompt=False)
    with pytest.raises(ValueError, match="content parts must be text parts"):
        default_llm.chat_prompt([{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}])
    assert default_llm.chat_prompt([{"role": "user", "content": None}]) == \
        default_llm.chat_prompt([{"role": "user", "content": ""}])
    outs = default_llm.generate(["a", "b"], (greedy, SamplingParams(temperature=0, max_tokens=2)), use_tqdm=False)
    assert [len(o.outputs[0].token_ids) for o in outs] == [5, 2]


def test_params_set_after_construction_count_and_prompts_as_vllms(default_llm):
    """A field set after construction counts (the engine takes a validated copy: a bad value is refused); a chat's
    output names its rendered prompt; numpy integers are token ids; a prompt dict's unknown keys are an error."""
    import numpy as np
    p = SamplingParams(temperature=0, max_tokens=8)
    p.stop = [","]
    c = default_llm.generate("Once upon a time", p, use_tqdm=False)[0].outputs[0]
    assert (c.text, c.stop_reason) == ("", ",")  # (greedy: ', the city of ...')
    p.logprobs = 100
    with pytest.raises(ValueError, match="logprobs=100"):
        default_llm.generate("x", p, use_tqdm=False)
    out = default_llm.chat([{"role": "user", "content": "Hi"}], SamplingParams(max_tokens=2), use_tqdm=False)[0]
    assert out.prompt.endswith("<|im_start|>assistant\n") and "Hi" in out.prompt
    assert default_llm.tokenizer.encode(out.prompt, add_special_tokens=False) == out.prompt_token_ids
    ids = default_llm.generate([np.int64(5), np.int64(6)], SamplingParams(max_tokens=2), use_tqdm=False)[0]
    assert ids.prompt_token_ids == [5, 6] and type(ids.prompt_token_ids[0]) is int
    with pytest.raises(ValueError, match="not \\['multi_modal_data'\\]"):
        default_llm.generate({"prompt": "x", "multi_modal_data": {}}, use_tqdm=False)
    assert default_llm.get_tokenizer() is default_llm.tokenizer


def test_streaming_text_is_consistent(default_llm):
    """Streamed texts only grow, and never show a stop string that is then cut."""
    p = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    full = default_llm.generate("The capital of France is", p, use_tqdm=False)[0].outputs[0].text
    stop = full[10:16]
    texts = [o.outputs[0].text for o in default_llm.stream(
        "The capital of France is", SamplingParams(temperature=0, max_tokens=24, stop=stop, ignore_eos=True))]
    assert all(b.startswith(a) for a, b in zip(texts, texts[1:]))
    assert texts[-1] == full[: full.index(stop)]
    # stop strings longer than the text so far (one that never occurs, one that spans many tokens) hold it all back
    for stop in ("z" * 12, full[2:22]):
        texts = [o.outputs[0].text for o in default_llm.stream(
            "The capital of France is", SamplingParams(temperature=0, max_tokens=24, stop=stop, ignore_eos=True))]
        assert all(b.startswith(a) for a, b in zip(texts, texts[1:])), texts
        assert texts[-1] == full[: full.find(stop)] if stop in full else texts[-1] == full


def test_cli_generate_streams_text():
    r = subprocess.run([sys.executable, "-m", "nanoflow.entrypoints.cli", "generate", "The capital of France is",
                        "--max-tokens", "8"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("The capital of France is") and "Paris" in r.stdout


def test_cli_reports_bad_input():
    r = subprocess.run([sys.executable, "-m", "nanoflow.entrypoints.cli", "generate", "x", "--model", "/nonexistent"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "model not found" in r.stderr
    # a prompt the engine refuses prints only the error (the prompt was echoed first, the error on its line)
    r = subprocess.run([sys.executable, "-m", "nanoflow.entrypoints.cli", "generate", "The capital of France is",
                        "--max-model-len", "4"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and r.stdout == "" and "the prompt has" in r.stderr


def test_cli_ends_quietly_when_interrupted_or_its_reader_goes(tmp_path):
    """Ctrl-C: one line and 130 (a traceback of wherever it landed before); stdout's reader gone (| head): no
    output on stderr, 141, as a shell tool. Words after "--" are arguments as given (a prompt's underscores were
    taken for a flag's)."""
    import signal
    import time
    cmd = [sys.executable, "-m", "nanoflow.entrypoints.cli", "generate", "Once upon a time", "--max-tokens", "8000",
           "--ignore-eos", "--max-model-len", "8192"]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    p.stdout.read(40)  # (generating)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 130 and err.decode() == "nanoflow: interrupted\n", err.decode()[-2000:]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    p.stdout.read(40)
    p.stdout.close()
    time.sleep(0.5)
    assert p.wait(120) == 141 and p.stderr.read() == b""
    r = subprocess.run([*cmd[:4], "--max-tokens", "1", "--", "--snake_case"], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0 and r.stdout.startswith("--snake_case"), r.stderr
    if os.path.exists("/dev/full"):  # a stdout that cannot be written: one line and 1 (it was a traceback)
        with open("/dev/full", "w") as full:
            r = subprocess.run([*cmd[:5], "--max-tokens", "2"], stdout=full, stderr=subprocess.PIPE, text=True,
                               timeout=300)
        assert r.returncode == 1 and r.stderr == "nanoflow: error: [Errno 28] No space left on device\n", r.stderr


def test_an_os_error_that_is_not_the_outputs_keeps_its_traceback(monkeypatch):
    """(The one-line error is for writing the output: a full disk, a closed pipe; a worker's reset connection, say,
    needs the traceback that says where.)"""
    from nanoflow.entrypoints import cli

    def reset(a):
        raise ConnectionResetError(104, "Connection reset by peer")
    monkeypatch.setattr(cli, "generate", reset)
    with pytest.raises(ConnectionResetError):
        cli.main(["generate", "Hi"])


def test_generate_runs_without_the_server_extra():
    """`nanoflow generate` on a base install, without fastapi (the serve extra): it imported the server's module,
    a ModuleNotFoundError traceback."""
    code = ("import sys; sys.modules['fastapi'] = None; from nanoflow.entrypoints.cli import main; "
            "sys.exit(main(['generate', 'Hi', '--max-tokens', '2', '--chat', '--chat-template', "
            "'{% for m in messages %}{{ m.content }}{% endfor %}']))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
