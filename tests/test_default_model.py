"""The embedded default model (SmolLM2-135M-Instruct, Q4_1 GGUF)."""
import subprocess
import sys

import pytest
import torch

from nanoflow import SamplingParams


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
    """transformers dequantizes the same GGUF independently: the logits must agree."""
    transformers = pytest.importorskip("transformers")
    import os
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
