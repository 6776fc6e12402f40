"""The plain model equals HF transformers on the same weights (fp32, on the CPU even where a GPU is: the GPU's
bf16 models are held to the CPU's in test_gpu.py)."""
import argparse
import json

import pytest
import torch

from nanoflow import LLM, SamplingParams

PROMPTS = [[5, 17, 923, 4410, 88, 2011, 7, 301, 12, 9, 40, 41, 42, 43, 44, 45, 46],
           [1000, 2000, 3000],
           [77] * 30,
           list(range(100, 125))]


def hf_greedy(model, prompt, n):
    out = model.generate(torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                         attention_mask=torch.ones(1, len(prompt), dtype=torch.long))
    return out[0, len(prompt):].tolist()


def test_greedy_generation_matches_hf(hf_model):
    path, model = hf_model
    llm = LLM(path, device="cpu")
    outs = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True), use_tqdm=False)
    for prompt, out in zip(PROMPTS, outs):
        assert out.outputs[0].token_ids == hf_greedy(model, prompt, 12)


def test_logprobs_match_hf(hf_model):
    """Prompt logprobs cover every position's full distribution; tolerance 1e-4 (fp32)."""
    path, model = hf_model
    llm = LLM(path, device="cpu")
    prompt = PROMPTS[0] + PROMPTS[3]
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=5, logprobs=3),
                       use_tqdm=False)[0]
    with torch.no_grad():
        ref = model(torch.tensor([prompt])).logits[0].float().log_softmax(-1)
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(prompt)
    for pos in range(1, len(prompt)):
        entry = out.prompt_logprobs[pos]
        target = prompt[pos]
        assert entry[target].logprob == pytest.approx(ref[pos - 1, target].item(), abs=1e-4)
        # the rank among HF's logprobs, up to ties within 1e-5: a fused GEMM (Qwen2-MoE's shared gate|up) rounds
        # differently from HF's two, and a tail of 49k tokens has near-ties
        above = [int((ref[pos - 1] > ref[pos - 1, target] + d).sum()) + 1 for d in (1e-5, -1e-5)]
        assert above[0] <= entry[target].rank <= above[1]
        top = ref[pos - 1].topk(5)
        for r, (tid, lp) in enumerate(zip(top.indices.tolist(), top.values.tolist())):
            assert entry[tid].logprob == pytest.approx(lp, abs=1e-4)
    sampled = out.outputs[0].logprobs[0]
    token = out.outputs[0].token_ids[0]
    assert token == int(ref[-1].argmax()) and sampled[token].rank == 1 and len(sampled) == 3


def test_sharded_safetensors(tmp_path, tokenizer_dir):
    from conftest import make_hf_model
    model = make_hf_model(str(tmp_path), "llama", tokenizer_dir, seed=3, max_shard_size="2MB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    out = LLM(str(tmp_path), device="cpu").generate(
        [PROMPTS[1]], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True), use_tqdm=False)
    assert out[0].outputs[0].token_ids == hf_greedy(model, PROMPTS[1], 8)


def test_pytorch_bin_checkpoints(tmp_path, tokenizer_dir):
    """pytorch_model*.bin files, where there are no safetensors (as vLLM loads them): the same model, read with
    torch.load's weights_only; a directory with neither says what it looked for, a corrupt file is named."""
    from conftest import make_hf_model
    model = make_hf_model(str(tmp_path / "m"), "qwen2", tokenizer_dir, seed=4)
    (tmp_path / "m" / "model.safetensors").unlink()
    state = model.state_dict()
    names = sorted(state)
    torch.save({n: state[n] for n in names[:5]}, tmp_path / "m" / "pytorch_model-00001-of-00002.bin",
               _use_new_zipfile_serialization=False)  # (torch's legacy format, which cannot be mapped)
    torch.save({n: state[n] for n in names[5:]}, tmp_path / "m" / "pytorch_model-00002-of-00002.bin")
    out = LLM(str(tmp_path / "m"), device="cpu").generate(
        [PROMPTS[0]], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True), use_tqdm=False)
    assert out[0].outputs[0].token_ids == hf_greedy(model, PROMPTS[0], 8)
    (tmp_path / "m" / "pytorch_model-00002-of-00002.bin").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="cannot read PyTorch weights file .*pytorch_model-00002-of-00002.bin"):
        LLM(str(tmp_path / "m"), device="cpu")
    for f in (tmp_path / "m").glob("*.bin"):
        f.unlink()
    with pytest.raises(FileNotFoundError, match="no weights in .*: no \\*.safetensors nor pytorch_model\\*.bin"):
        LLM(str(tmp_path / "m"), device="cpu")


@pytest.mark.parametrize("max_window_layers", [0, 1, 2])
def test_qwen2_windows_only_the_layers_from_max_window_layers(tmp_path, max_window_layers):
    """Qwen2 windows layers >= max_window_layers (transformers >= 5 writes them as layer_types); the others attend to
    the whole context. A prompt longer than the window tells them apart."""
    from conftest import make_hf_model
    model = make_hf_model(str(tmp_path), "qwen2", None, seed=4, use_sliding_window=True, sliding_window=6,
                          max_window_layers=max_window_layers)
    llm = LLM(str(tmp_path), device="cpu")
    c = llm.engine.model_config
    assert (c.sliding_window, c.full_attention_layers) == ((None, ()) if max_window_layers == 2 else
                                                            (6, tuple(range(max_window_layers))))
    prompt = PROMPTS[2] + PROMPTS[0]
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=0), use_tqdm=False)[0]
    with torch.no_grad():
        ref = model(torch.tensor([prompt])).logits[0].log_softmax(-1)
    for pos in range(1, len(prompt)):
        assert out.prompt_logprobs[pos][prompt[pos]].logprob == pytest.approx(ref[pos - 1, prompt[pos]].item(),
                                                                                abs=1e-4)


@pytest.mark.parametrize("arch", ["qwen2", "qwen2_moe", "qwen3", "qwen3_moe"])
@pytest.mark.parametrize("max_window_layers", [0, 2, 3, 5])
def test_windowed_layers_follow_transformers_without_layer_types(arch, max_window_layers):
    """A config without layer_types (older files) windows the layers transformers would (its rule differs between
    Qwen2 and Qwen2-MoE; Qwen3-MoE's config has no layer_types: transformers windows all its layers)."""
    import transformers
    from conftest import ARCH_CONFIGS
    from nanoflow.config import ModelConfig
    kw = {k: v for k, v in ARCH_CONFIGS[arch].items() if k != "model_type"}
    hf = transformers.AutoConfig.for_model(arch, vocab_size=64, hidden_size=32, intermediate_size=64,
                                           num_hidden_layers=5, num_attention_heads=4, num_key_value_heads=2,
                                           use_sliding_window=True, sliding_window=8,
                                           max_window_layers=max_window_layers, **kw)
    cfg = hf.to_dict()
    types = cfg.pop("layer_types", None)
    if types is None:  # (Qwen3-MoE's config has none: its attention modules tell which layers window)
        layers = transformers.AutoModelForCausalLM.from_config(hf).model.layers
        windowed = [i for i, layer in enumerate(layers) if layer.self_attn.sliding_window]
    else:
        windowed = [i for i, t in enumerate(types) if t == "sliding_attention"]
    c = ModelConfig.from_hf(cfg | {"architectures": [hf.architectures[0]] if hf.architectures else []} |
                            {"model_type": arch})
    assert [i for i in range(5) if c.window(i) is not None] == windowed


@pytest.mark.parametrize("rope", [
    {"rope_type": "linear", "factor": 4.0},
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0},
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 256},
    {"rope_type": "yarn", "factor": 8.0, "beta_fast": 16, "beta_slow": 2, "truncate": False},
    {"rope_type": "yarn", "factor": 40.0, "mscale": 1.0, "mscale_all_dim": 0.707},
    {"rope_type": "yarn", "factor": 2.0, "attention_factor": 1.3},
])
def test_rope_frequencies_and_scale_as_transformers(rope):
    """Each rope scaling's frequencies and cos/sin scale equal transformers' (YaRN's attention factor included), for
    the config as from_hf reads it; the context is vLLM's (YaRN's: its original length times its factor)."""
    pytest.importorskip("transformers")
    from transformers import AutoConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    from nanoflow.config import ModelConfig
    from nanoflow.layers.rotary import attention_factor, cos_sin_table, inv_frequencies
    shape = dict(vocab_size=64, hidden_size=256, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                 max_position_embeddings=2048, rope_theta=1e6)
    hf = AutoConfig.for_model("qwen2", **shape, rope_scaling=dict(rope))
    freqs, scale = ROPE_INIT_FUNCTIONS[rope["rope_type"]](hf, "cpu")
    c = ModelConfig.from_hf(shape | {"model_type": "qwen2", "rope_scaling": dict(rope)})
    torch.testing.assert_close(inv_frequencies(c), freqs, rtol=1e-6, atol=0)
    assert attention_factor(c) == pytest.approx(scale, rel=1e-9)
    table = cos_sin_table(c, 8, torch.device("cpu"))
    assert table[0, 0] == pytest.approx(scale) and table[3, 0] ** 2 + table[3, 64] ** 2 == pytest.approx(scale ** 2)
    yarn = rope.get("original_max_position_embeddings", 2048) * rope["factor"]
    assert c.context_length == {"linear": 8192, "llama3": 2048, "yarn": yarn}[rope["rope_type"]]


def test_hf_overrides_set_config_fields(tmp_path):
    """hf_overrides (vLLM's): YaRN set over a config without it gives the model saved with it (and another output than
    without it), its context included; a rope dict replaces the file's under either name, its rope_theta kept; a
    GGUF file or a preset is refused (they have no config.json), as is an override that is no dict."""
    from conftest import ARCH_CONFIGS, make_hf_model
    from nanoflow.config import ModelConfig
    from nanoflow.entrypoints.cli import add_engine_args, engine_kwargs
    yarn = ARCH_CONFIGS["qwen3"]["rope_scaling"]
    make_hf_model(str(tmp_path / "plain"), "qwen3", None, seed=3, rope_scaling=None, max_position_embeddings=128)
    make_hf_model(str(tmp_path / "yarn"), "qwen3", None, seed=3, max_position_embeddings=128)
    prompts, params = [list(range(5, 90)), [7, 8, 9]], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)

    def run(path, **kw):
        llm = LLM(str(tmp_path / path), **kw)
        return llm.engine.max_model_len, [o.outputs[0].token_ids for o in llm.generate(prompts, params,
                                                                                         use_tqdm=False)]
    (plain_len, plain), (yarn_len, want) = run("plain"), run("yarn")
    assert (plain_len, yarn_len) == (128, 512) and plain != want
    assert run("plain", hf_overrides={"rope_scaling": yarn}) == (512, want)
    assert run("plain", hf_overrides={"rope_parameters": yarn | {"rope_theta": 1e6}}) == (512, want)
    # (rope_parameters in the file, rope_scaling in the override: the override's, with the file's rope_theta)
    cfg = tmp_path / "yarn" / "config.json"
    written = json.loads(cfg.read_text())
    assert "rope_parameters" in written and written["rope_parameters"]["rope_theta"] == 1e6
    c = ModelConfig.from_file(str(cfg), {"rope_scaling": {"rope_type": "linear", "factor": 2.0}})
    assert (c.rope_scaling, c.rope_theta, c.context_length) == ({"rope_type": "linear", "factor": 2.0}, 1e6, 256)
    assert ModelConfig.from_file(str(cfg), {"rope_scaling": {"rope_type": "default"}}).rope_scaling is None
    # (a rope_theta over the one in the file's rope_parameters: it was ignored)
    theta = ModelConfig.from_file(str(cfg), {"rope_theta": 5e6})
    assert (theta.rope_theta, theta.rope_scaling["rope_type"]) == (5e6, "yarn")
    with pytest.raises(ValueError, match="hf_overrides sets fields of an HF model directory's config.json; "
                                         "'llama-3-8b' is a preset"):
        LLM("llama-3-8b", load_format="dummy", hf_overrides={"rope_theta": 1.0})
    with pytest.raises(TypeError, match="hf_overrides must be a dict of config.json fields, not str"):
        LLM(str(tmp_path / "plain"), hf_overrides="rope_theta=1")
    p = argparse.ArgumentParser()
    add_engine_args(p)
    assert engine_kwargs(p.parse_args(["--hf-overrides", json.dumps({"rope_scaling": yarn})]))["hf_overrides"] == \
        {"rope_scaling": yarn}
    with pytest.raises(SystemExit):
        p.parse_args(["--hf-overrides", "[1]"])


def test_config_fields_read_as_transformers_reads_them():
    """Llama ignores a sliding_window in its config (transformers' LlamaAttention has none: it was applied, and the
    outputs differed from transformers'); llama3 rope without original_max_position_embeddings takes
    max_position_embeddings, as transformers does (a KeyError); hidden_act swish is silu."""
    from nanoflow.config import ModelConfig
    base = dict(architectures=["LlamaForCausalLM"], vocab_size=64, hidden_size=32, intermediate_size=64,
                num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=1024)
    assert ModelConfig.from_hf(base | {"sliding_window": 4}).sliding_window is None
    mistral = base | {"sliding_window": 4, "architectures": ["MistralForCausalLM"]}
    assert ModelConfig.from_hf(mistral).sliding_window == 4
    rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0}
    c = ModelConfig.from_hf(base | {"rope_scaling": rope})
    assert c.rope_scaling["original_max_position_embeddings"] == 1024 and "original_max_position_embeddings" not in rope
    assert ModelConfig.from_hf(base | {"hidden_act": "swish"}).hidden_size == 32


@pytest.mark.parametrize("arch", ["llama", "mistral", "mixtral", "qwen2", "qwen3", "qwen2_moe", "qwen3_moe"])
def test_fields_a_config_leaves_out_take_transformers_defaults(arch):
    """A config with its shape alone: the other fields as transformers' config class of that architecture gives
    them (they were one default for all: Mixtral's rope_theta 1e4 and eps 1e-6, Mistral without its window, Qwen3
    without its head_dim of 128, Mixtral's experts 0)."""
    transformers = pytest.importorskip("transformers")
    from nanoflow.config import ModelConfig
    shape = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2)
    ours, hf = ModelConfig.from_hf(shape | {"model_type": arch}), transformers.AutoConfig.for_model(arch, **shape)
    experts = getattr(hf, "num_local_experts", None) or getattr(hf, "num_experts", None) or 0
    assert (ours.max_position_embeddings, ours.rms_norm_eps, ours.rope_theta, ours.num_experts,
            ours.num_experts_per_tok) == (hf.max_position_embeddings, hf.rms_norm_eps,
                                          hf.rope_parameters["rope_theta"], experts,
                                          getattr(hf, "num_experts_per_tok", 0) if experts else 0)
    assert ours.head_dim == (getattr(hf, "head_dim", None) or 8)
    assert ours.sliding_window == (hf.sliding_window if arch == "mistral" else None)
    if arch.endswith("moe"):
        assert ours.intermediate_size == hf.moe_intermediate_size
        assert ours.shared_expert_intermediate_size == getattr(hf, "shared_expert_intermediate_size", 0)
