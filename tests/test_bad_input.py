"""Bad input raises a clear error naming the problem, and the engine stays usable."""
import json
import os
import re
import shutil

import numpy as np
import pytest

from nanoflow import LLM, SamplingParams


def test_missing_model_path():
    with pytest.raises(FileNotFoundError, match="model not found"):
        LLM("/no/such/model")


def test_the_largest_seed_runs(llama_dir):
    """seed's range is torch's, and the samplers' generators seeded from it stay in it (seed + 1 overflowed)."""
    llm = LLM(llama_dir, seed=2**64 - 1)
    assert len(llm.generate([[1, 2, 3]], SamplingParams(max_tokens=2, ignore_eos=True))[0].outputs[0].token_ids) == 2
    # None is 0 (vLLM V1 has no unseeded engine: scripts pass seed=args.seed, None by default), numpy's ints taken
    from nanoflow.config import EngineConfig
    assert [EngineConfig(seed=s).seed for s in (None, np.int64(3))] == [0, 3]
    assert type(EngineConfig(seed=np.int64(3)).seed) is int


def test_a_model_file_is_read_by_its_content(tmp_path, default_model_path):
    """A GGUF file is one by its magic, whatever its name (as vLLM's check_gguf_file); another file is named as
    what it is ("model not found" was said of files that exist)."""
    from nanoflow.models.loader import resolve
    (tmp_path / "model.bin").symlink_to(default_model_path)
    assert resolve(str(tmp_path / "model.bin")).kind == "gguf"
    (tmp_path / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    with pytest.raises(ValueError, match="is a file but not a GGUF file: pass a GGUF file, an HF model directory"):
        LLM(str(tmp_path / "model.safetensors"))


def test_directory_without_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        LLM(str(tmp_path))


def _copy(src, dst, **config_changes):
    shutil.copytree(src, dst)
    with open(os.path.join(dst, "config.json")) as f:
        cfg = json.load(f)
    cfg.update(config_changes)
    for k, v in config_changes.items():
        if v is None:
            del cfg[k]
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(cfg, f)


def test_malformed_config(tmp_path, llama_dir):
    bad = tmp_path / "m"
    shutil.copytree(llama_dir, bad)
    (bad / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="malformed model config"):
        LLM(str(bad))
    _copy(llama_dir, tmp_path / "m2", hidden_size=None)
    with pytest.raises(ValueError, match="missing field 'hidden_size'"):
        LLM(str(tmp_path / "m2"))


def test_unsupported_architecture(tmp_path, llama_dir):
    _copy(llama_dir, tmp_path / "m", architectures=["GPT2LMHeadModel"], model_type="gpt2")
    with pytest.raises(ValueError, match="unsupported architecture.*GPT2LMHeadModel"):
        LLM(str(tmp_path / "m"))
    _copy(llama_dir, tmp_path / "one", architectures="LlamaForCausalLM")  # one name, not in a list
    assert LLM(str(tmp_path / "one")).engine.model_config.architecture == "llama"


@pytest.mark.parametrize("changes, message", [
    (dict(hidden_act="gelu"), "unsupported hidden_act 'gelu'"),
    (dict(rope_parameters={"rope_type": "linear", "rope_theta": 1e4}), "rope scaling 'linear' lacks factor"),
    (dict(rope_parameters={"rope_type": "llama3", "factor": 8.0, "rope_theta": 1e4}),
     "rope scaling 'llama3' lacks high_freq_factor, low_freq_factor"),
    (dict(rope_parameters={"rope_type": "yarn", "rope_theta": 1e4}), "rope scaling 'yarn' lacks factor"),
    # (a TypeError deep in the model's build, or a string's // before)
    (dict(hidden_size="64"), "model config: hidden_size must be a positive integer, got '64'"),
    (dict(num_attention_heads=0), "model config: num_attention_heads must be a positive integer, got 0"),
    (dict(num_hidden_layers=2.0), "model config: num_hidden_layers must be a positive integer, got 2.0"),
    (dict(num_key_value_heads=True), "model config: num_key_value_heads must be a positive integer, got True"),
])
def test_config_the_model_cannot_follow(tmp_path, llama_dir, changes, message):
    """Refused by name, as transformers refuses them: gelu ran as silu (other outputs than transformers'); a rope
    scaling without its parameters failed with a KeyError deep in the rope tables."""
    _copy(llama_dir, tmp_path / "m", **changes)
    with pytest.raises(ValueError, match=re.escape(message)):
        LLM(str(tmp_path / "m"))


def test_corrupt_weights_files(tmp_path, llama_dir):
    """A truncated safetensors file, and a GGUF without the metadata a config needs, are named."""
    import gguf
    bad = tmp_path / "m"
    shutil.copytree(llama_dir, bad)
    for f in bad.glob("*.safetensors"):
        f.write_bytes(f.read_bytes()[:100])
    with pytest.raises(ValueError, match="cannot read safetensors file"):
        LLM(str(bad))
    w = gguf.GGUFWriter(str(tmp_path / "nohead.gguf"), "llama")
    w.add_embedding_length(64)
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((8, 64), "float32"))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ValueError, match="lacks the metadata llama.attention.head_count"):
        LLM(str(tmp_path / "nohead.gguf"))
    # a tensor type the gguf package cannot dequantize (its NotImplementedError came through the CLI as a traceback)
    from nanoflow.models.gguf_file import gguf_tensors, open_gguf
    w = gguf.GGUFWriter(str(tmp_path / "f64.gguf"), "llama")
    w.add_tensor("token_embd.weight", np.zeros((8, 64), "float64"))
    for step in (w.write_header_to_file, w.write_kv_data_to_file, w.write_tensors_to_file, w.close):
        step()
    with pytest.raises(ValueError, match="GGUF tensor 'token_embd.weight' is of type F64, which the gguf package "
                                         "cannot dequantize"):
        list(gguf_tensors(open_gguf(str(tmp_path / "f64.gguf"))))


@pytest.mark.parametrize("index, message", [
    ("{not json", "model.safetensors.index.json: Expecting property name"),
    ('{"metadata": {}}', "model.safetensors.index.json has no weight_map"),
    ('{"weight_map": []}', "model.safetensors.index.json has no weight_map"),
    (None, "model.safetensors.index.json names model-00002-of-00002.safetensors, which is not in"),
])
def test_bad_sharded_checkpoint_index(tmp_path, index, message):
    """A JSONDecodeError, KeyError or AttributeError (a traceback from the CLI) before; a missing shard was found
    only after the shards before it had loaded."""
    from conftest import make_hf_model
    make_hf_model(str(tmp_path), "llama", None, max_shard_size="20MB")
    if index is None:
        os.remove(tmp_path / "model-00002-of-00002.safetensors")
    else:
        (tmp_path / "model.safetensors.index.json").write_text(index)
    with pytest.raises(ValueError, match=re.escape(message)):
        LLM(str(tmp_path))


def test_quantized_checkpoints_are_refused(tmp_path, llama_dir):
    """A quantized checkpoint failed on its first scale tensor as an "unexpected weight" (or, for one whose weights
    are integers, loaded them cast to floats: garbage)."""
    import torch
    from safetensors.torch import load_file, save_file
    _copy(llama_dir, tmp_path / "q", quantization_config={"quant_method": "fp8", "activation_scheme": "dynamic"})
    with pytest.raises(ValueError, match="quantized checkpoints are not supported .quant_method 'fp8'"):
        LLM(str(tmp_path / "q"))
    _copy(llama_dir, tmp_path / "i")
    file = str(tmp_path / "i" / "model.safetensors")
    weights = load_file(file)
    weights["model.norm.weight"] = weights["model.norm.weight"].to(torch.int8)
    save_file(weights, file, metadata={"format": "pt"})
    with pytest.raises(ValueError, match="weight 'model.norm.weight' has dtype I8, not a float type"):
        LLM(str(tmp_path / "i"))


def test_load_format_that_contradicts_the_model(llama_dir):
    """It was ignored: the directory loaded as safetensors whatever load_format said."""
    with pytest.raises(ValueError, match="load_format 'gguf' does not match"):
        LLM(llama_dir, load_format="gguf")


def test_weights_that_do_not_fit_the_config(tmp_path, llama_dir):
    _copy(llama_dir, tmp_path / "m", intermediate_size=96)
    with pytest.raises(ValueError, match=r"weight .model.layers.0.mlp.*has shape"):
        LLM(str(tmp_path / "m"))


def test_missing_weights_are_named_as_the_checkpoint_names_them(tmp_path, llama_dir):
    """(They were named by nanoflow's fused parameters: layers.1.qkv.k for model.layers.1.self_attn.k_proj.weight.)"""
    from safetensors.torch import load_file, save_file
    shutil.copytree(llama_dir, tmp_path / "m")
    file = next((tmp_path / "m").glob("*.safetensors"))
    state = load_file(file)
    for name in ("model.layers.1.self_attn.k_proj.weight", "model.norm.weight", "model.layers.0.mlp.up_proj.weight"):
        del state[name]
    save_file(state, file)
    with pytest.raises(ValueError, match=r"checkpoint is missing weights: model.layers.0.mlp.up_proj.weight, "
                                         r"model.layers.1.self_attn.k_proj.weight, model.norm.weight$"):
        LLM(str(tmp_path / "m"))


def test_unknown_preset_and_format(capsys):
    from nanoflow.entrypoints.cli import main
    with pytest.raises(ValueError, match="unknown load_format"):
        LLM("llama-3-8b", load_format="pickle")
    with pytest.raises(FileNotFoundError, match="preset"):
        LLM("llama-9-8b")
    # a preset is a shape: its weights are random only when asked for, and refused before any work (tune's profile)
    for load_format in ("auto", "safetensors"):
        with pytest.raises(ValueError, match="'llama-3-8b' is a shape preset, with no weights: pass load_format="):
            LLM("llama-3-8b", load_format=load_format)
    assert main(["tune", "--model", "mixtral-8x7b"]) == 2
    assert "shape preset, with no weights" in capsys.readouterr().err


@pytest.mark.parametrize("kw, name", [
    (dict(temperature=-1), "temperature"), (dict(top_p=0), "top_p"), (dict(top_p=1.5), "top_p"),
    (dict(top_k=-2), "top_k"), (dict(min_p=2), "min_p"), (dict(max_tokens=0), "max_tokens"),
    (dict(n=0), "n"), (dict(repetition_penalty=0), "repetition_penalty"),
    (dict(presence_penalty=3), "presence_penalty"), (dict(frequency_penalty=-3), "frequency_penalty"),
    (dict(logprobs=100), "logprobs"), (dict(stop=[""]), "stop"), (dict(seed="x"), "seed"),
    (dict(min_tokens=5, max_tokens=2), "min_tokens"), (dict(stop_token_ids=[-1]), "stop_token_ids"),
    (dict(stop=5), "stop"), (dict(stop_token_ids=5), "stop_token_ids"),
    (dict(temperature=float("inf")), "temperature"), (dict(repetition_penalty=float("inf")), "repetition_penalty"),
    (dict(top_p=float("nan")), "top_p"), (dict(stop_token_ids=[True]), "stop_token_ids"),
    (dict(logit_bias={"5": 1.0}), "logit_bias"), (dict(logit_bias={5: float("nan")}), "logit_bias"),
    (dict(logit_bias=[5]), "logit_bias"), (dict(allowed_token_ids=[]), "allowed_token_ids"),
    (dict(allowed_token_ids=[-1]), "allowed_token_ids"), (dict(bad_words=["ok", " "]), "bad_words"),
    (dict(bad_words="x"), "bad_words"),
    # True is no count (but logprobs=True is 1, as vLLM's: test_vllm_spellings_of_sampling_params)
    (dict(n=True), "n"), (dict(n=2, temperature=0), "n"), (dict(n=3, temperature=0.0), "n"),
    (dict(top_k=True), "top_k"), (dict(max_tokens=True), "max_tokens"), (dict(min_tokens=True), "min_tokens"),
    (dict(seed=False), "seed"), (dict(skip_special_tokens=None), "skip_special_tokens"),
    (dict(skip_special_tokens=0), "skip_special_tokens"), (dict(ignore_eos="yes"), "ignore_eos"),
    (dict(include_stop_str_in_output=1), "include_stop_str_in_output"),
])
def test_invalid_sampling_params(kw, name):
    with pytest.raises(ValueError, match=f"invalid sampling parameter {name}="):
        SamplingParams(**kw)


def test_numpy_scalars_are_numbers():
    """(as vLLM takes them: a sweep's seeds from rng.integers, its temperatures from np.linspace), as Python's own"""
    p = SamplingParams(temperature=np.float32(0.5), top_p=np.float16(0.5), max_tokens=np.int64(3), seed=np.int32(7),
                       n=np.int8(2), stop_token_ids=[np.int64(5)])
    assert (p.temperature, p.top_p, p.max_tokens, p.seed, p.n) == (0.5, 0.5, 3, 7, 2)
    assert [type(v) for v in (p.temperature, p.top_p, p.max_tokens, p.seed, p.n)] == [float, float, int, int, int]
    with pytest.raises(ValueError, match="max_tokens=3.0: must be an integer"):
        SamplingParams(max_tokens=np.float32(3))
    with pytest.raises(ValueError, match="n=np.True_: must be an integer"):  # (numpy's bool is no count either)
        SamplingParams(n=np.bool_(True))


def test_bad_prompts_leave_the_engine_usable(llama_dir):
    llm = LLM(llama_dir, max_model_len=64)
    ok = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    with pytest.raises(ValueError, match="prompt has 64 tokens.*max_model_len = 64"):
        llm.generate([[5] * 64], ok)
    with pytest.raises(ValueError, match="empty"):
        llm.generate([""], ok)
    with pytest.raises(ValueError, match="token id 999999 is out of range"):
        llm.generate([[1, 999999]], ok)
    for name, bad in (("logit_bias", {999999: 1.0}), ("allowed_token_ids", [5, 999999])):
        with pytest.raises(ValueError, match=f"invalid sampling parameter {name}=.*token ids must be < "):
            llm.generate([[1, 2]], SamplingParams(**{name: bad}))
    with pytest.raises(TypeError, match="prompt must be"):
        llm.generate([3.5], ok)
    with pytest.raises(TypeError, match="prompts must be a string, a list of token ids, a dict .* got NoneType"):
        llm.generate(None, ok)
    with pytest.raises(TypeError, match="'prompt_token_ids' must be a list of token ids, got int"):
        llm.generate({"prompt_token_ids": 5}, ok)
    for bad, shown in (([True, 5], "True (bool)"), ([1.0, 5], "1.0 (float)")):
        with pytest.raises(ValueError, match=re.escape(f"token ids must be integers, got {shown}")):
            llm.generate([bad], ok)
    # a bad prompt in a list rejects the whole call and leaves nothing behind
    with pytest.raises(ValueError):
        llm.generate([[1, 2, 3], [5] * 100], ok)
    assert not llm.engine.has_unfinished_requests()
    assert llm.engine.scheduler.blocks.num_free == llm.engine.scheduler.blocks.num_blocks
    out = llm.generate([[1, 2, 3]], ok, use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 4


def test_prompt_larger_than_kv_cache(llama_dir):
    llm = LLM(llama_dir, num_kv_blocks=2, block_size=4)
    with pytest.raises(ValueError, match="more than the KV cache holds"):
        llm.generate([[5] * 20], SamplingParams())


def test_max_model_len_beyond_the_model(llama_dir):
    with pytest.raises(ValueError, match="exceeds the model's context length"):
        LLM(llama_dir, max_model_len=10**6)


def test_a_kv_cache_smaller_than_the_context_bounds_the_output():
    """A sequence can grow only to the whole KV cache: past it, it preempted itself forever (the engine hung)."""
    from nanoflow.config import EngineConfig
    from nanoflow.engine.scheduler import Scheduler
    sched = Scheduler(EngineConfig(block_size=16), 2, 64, 8192)  # 32 tokens of cache
    assert sched.check_prompt(20) == 12 == sched.check_prompt(20, 12)
    with pytest.raises(ValueError, match="max_tokens=13 need more than the whole KV cache holds"):
        sched.check_prompt(20, 13)


def test_an_output_larger_than_the_kv_cache(llama_dir, caplog):
    """max_tokens that the whole cache cannot hold is refused (it was cut silently); without max_tokens the output
    ends at the cache, as at the context length; the engine warns of such a cache at its start."""
    with caplog.at_level("WARNING"):
        llm = LLM(llama_dir, num_kv_blocks=2, block_size=16)
    assert "the KV cache holds 32 tokens, fewer than max_model_len" in caplog.text
    with pytest.raises(ValueError, match=r"the prompt \(20 tokens\) and max_tokens=14 need more than the whole KV "
                                         r"cache holds \(32 tokens\)"):
        llm.generate([[5] * 20], SamplingParams(max_tokens=14, ignore_eos=True), use_tqdm=False)
    for max_tokens in (12, None):
        out = llm.generate([[5] * 20], SamplingParams(max_tokens=max_tokens, ignore_eos=True),
                           use_tqdm=False)[0].outputs[0]
        assert len(out.token_ids) == 12 and out.finish_reason == "length"


def test_a_predicted_output_len_past_the_cache_is_admitted(llama_dir):
    """NanoFlow's admission by a fixed predicted output length: a prediction longer than the request may generate
    (here, than the whole cache) once kept it waiting forever."""
    llm = LLM(llama_dir, num_kv_blocks=2, block_size=16, admission="predicted", predicted_output_len=64)
    out = llm.generate([[5] * 20], SamplingParams(max_tokens=5, ignore_eos=True), use_tqdm=False)[0].outputs[0]
    assert len(out.token_ids) == 5


@pytest.mark.parametrize("kw, name", [
    (dict(max_model_len=0), "max_model_len"), (dict(max_model_len=-5), "max_model_len"),
    (dict(num_kv_blocks=0), "num_kv_blocks"), (dict(num_kv_blocks=-4), "num_kv_blocks"),
    (dict(kv_cache_gb=-1), "kv_cache_gb"), (dict(predicted_output_len=-5), "predicted_output_len"),
    (dict(seed="x"), "seed"), (dict(num_layers=0), "num_layers"), (dict(num_layers=1.0), "num_layers"),
    (dict(num_layers=True), "num_layers"), (dict(max_model_len=True), "max_model_len"),
    # (non-finite sizes reached the allocator: a traceback; the two counts were named together, without the value)
    (dict(kv_cache_gb=float("inf")), "kv_cache_gb must be a number > 0, got inf"),
    (dict(kv_offload_gb=float("nan")), "kv_offload_gb must be a number >= 0, got nan"),
    (dict(block_size=0), "block_size must be a positive integer, got 0"),
    (dict(max_num_seqs=-1), "max_num_seqs must be a positive integer, got -1"),
])
def test_bad_engine_config(kw, name):
    """Refused by name before anything loads (0 was taken as unset; negatives failed deep inside)."""
    from nanoflow.config import EngineConfig
    with pytest.raises(ValueError, match=name):
        EngineConfig(**kw)


@pytest.mark.parametrize("device, message", [("bogus", "not a device"), ("mps", "cpu or cuda")])
def test_bad_device(device, message):
    from nanoflow.config import resolve_device
    with pytest.raises(ValueError, match=message):
        resolve_device(device)


def test_bench_output_in_a_missing_directory_is_refused_before_the_run(capsys):
    from nanoflow.entrypoints.cli import main
    assert main(["bench", "throughput", "--model", "/no/such/model", "--output", "/no/such/dir/r.json"]) != 0
    assert "its directory does not exist" in capsys.readouterr().err


def test_bench_help(capsys):
    from nanoflow.entrypoints.cli import main
    with pytest.raises(SystemExit) as e:
        main(["bench", "--help"])
    assert e.value.code == 0 and "throughput" in capsys.readouterr().out


def test_vllm_constructor_options(llama_dir):
    """An unknown option names itself and the options there are; enforce_eager is vLLM's cuda_graph=False;
    trust_remote_code is accepted (no checkpoint code ever runs); dtype 'float' is float32."""
    with pytest.raises(TypeError, match="unknown engine option 'swap_spaces'; the options are tokenizer, "):
        LLM(llama_dir, swap_spaces=4)
    llm = LLM(llama_dir, enforce_eager=True, trust_remote_code=True)
    assert llm.engine.config.cuda_graph is False and LLM(llama_dir).engine.config.cuda_graph is None
    assert str(LLM(llama_dir, dtype="float").engine.dtype) == "torch.float32"  # (vLLM's name for it)
    # vLLM's options at the values scripts pass, asking for what nanoflow does anyway (each was an unknown option)
    LLM(llama_dir, hf_token=None, cpu_offload_gb=0, task="generate", runner="auto", skip_tokenizer_init=False,
        disable_custom_all_reduce=False, compilation_config=None)
    for option, value in (("cpu_offload_gb", 4), ("task", "embed"), ("skip_tokenizer_init", True)):
        with pytest.raises(ValueError, match=f"{option}={value!r}: nanoflow takes only"):
            LLM(llama_dir, **{option: value})


def test_a_pipeline_spec_without_its_mode_is_warned_of(llama_dir, caplog):
    LLM(llama_dir, pipeline_spec="/no/such/spec.json")
    assert "pipeline_spec '/no/such/spec.json' is not used" in caplog.text


@pytest.mark.parametrize("spec, message", [
    ("{}", "malformed pipeline spec"),
    (None, "has the ops"),  # a Mixtral's spec for a dense model
])
def test_a_bad_pipeline_spec_is_named_before_the_weights_load(tmp_path, llama_dir, monkeypatch, spec, message):
    """It was resolved by the runner, after the weights had loaded (minutes for a large model)."""
    from nanoflow.engine import llm_engine
    from nanoflow.pipeline.spec import non_overlap
    path = tmp_path / "spec.json"
    if spec is None:
        non_overlap(64, moe=True).save(str(path))
    else:
        path.write_text(spec)

    def no_load(*args, **kwargs):
        raise AssertionError("the weights load before the spec is checked")
    monkeypatch.setattr(llm_engine, "build_model", no_load)
    with pytest.raises(ValueError, match=message):
        LLM(llama_dir, mode="pipeline", pipeline_spec=str(path))


def test_a_pipeline_spec_is_a_path_or_a_name(llama_dir, tmp_path):
    """A pathlib.Path works as its string does (it was a TypeError inside the error message); another type is named
    (None was a stat error; an int read a spec from that file descriptor, 0: stdin)."""
    import pathlib
    from nanoflow.pipeline.spec import non_overlap
    path = tmp_path / "spec.json"
    non_overlap(512).save(str(path))
    want = LLM(llama_dir, mode="nanobatch-only", pipeline_spec=str(path)).generate([[5, 6, 7]], SamplingParams(
        temperature=0, max_tokens=3), use_tqdm=False)[0].outputs[0].token_ids
    got = LLM(llama_dir, mode="nanobatch-only", pipeline_spec=pathlib.Path(path)).generate([[5, 6, 7]], SamplingParams(
        temperature=0, max_tokens=3), use_tqdm=False)[0].outputs[0].token_ids
    assert got == want and len(got) == 3
    for bad in (None, 0, non_overlap(512)):
        with pytest.raises(ValueError, match="pipeline_spec must be 'auto', a spec file's path or a shipped spec's "
                                             f"name, got {type(bad).__name__}"):
            LLM(llama_dir, mode="nanobatch-only", pipeline_spec=bad)


def test_bad_engine_options(llama_dir):
    with pytest.raises(ValueError, match="admission"):
        LLM(llama_dir, admission="magic")
    with pytest.raises(ValueError, match="schedule_policy.*'sjf'"):
        LLM(llama_dir, schedule_policy="sjf")
    with pytest.raises(ValueError, match="dtype"):
        LLM(llama_dir, dtype="int3")


@pytest.mark.parametrize("flag, value, message", [
    ("--stream-interval", "0", "--stream-interval must be >= 1"),
    ("--max-waiting-requests", "0", "--max-waiting-requests must be >= 1"),
    ("--port", "99999", "--port must be >= 0 and <= 65535")])
def test_bad_serve_flags_are_refused_before_the_model_loads(capsys, flag, value, message):
    from nanoflow.entrypoints.cli import main
    assert main(["serve", "--model", "/no/such/model", flag, value]) != 0
    assert message in capsys.readouterr().err


def test_a_port_in_use_is_refused_before_the_model_loads(capsys):
    import socket
    from nanoflow.entrypoints.cli import main
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["serve", "--model", "/no/such/model", "--port", str(port)]) == 2
    assert f"cannot listen on 127.0.0.1:{port}: Address already in use" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["bench", "serve", "--request-rate", "0"], "--request-rate: request rates must be > 0 or inf, got 0.0"),
    (["bench", "serve", "--request-rate", "nan"], "request rates must be > 0"),
    (["bench", "serve", "--sweep", "1,-2"], "--sweep: request rates must be > 0 or inf, got -2.0"),
    (["bench", "serve", "--sweep", "1,2", "--request-rate", "2"], "--request-rate and --sweep: give one"),
    (["bench", "serve", "--max-concurrency", "0"], "--max-concurrency must be >= 1"),
    (["bench", "serve", "--vocab-size", "0"], "--vocab-size must be >= 1"),
    (["bench", "serve", "--output", "/no/such/dir/r.json"], "--output /no/such/dir/r.json: its directory"),
    (["bench", "serve", "--plot", "p.txt"], "--plot p.txt: not a format matplotlib writes"),
    (["bench", "serve", "--workload", "trace:sharegpt:1:2"], "expected trace:NAME"),
    (["bench", "serve", "--workload", "multiround:splitwise:10:100000"],
     "10 conversations of 100000 turns need 1000000 rows; the trace has"),
    (["bench", "serve", "--url", "http://127.0.0.1:9"], "cannot reach the server at http://127.0.0.1:9"),
    (["bench", "schedule", "--workload", "const:8:4:2", "--num-kv-blocks", "8", "--output", "/no/such/s.json"],
     "--output /no/such/s.json: its directory does not exist"),
    (["bench", "throughput", "--warmup-requests", "-1", "--model", "/no/such/model"], "--warmup-requests must be"),
    (["bench", "throughput", "--model", "qwen3-8b", "--load-format", "dummy", "--workload", "const:8:4:2",
      "--baseline", "hf"], "--baseline hf builds llama, mistral, qwen2 models, not 'qwen3'"),
    (["tune", "--context", "-5"], "--context must be >= 1, not -5"),
    (["tune", "--max-num-batched-tokens", "0"], "--max-num-batched-tokens must be >= 1"),
    (["tune", "--top", "0"], "--top must be >= 1"),
    (["tune", "--max-nano-batches", "0"], "--max-nano-batches must be >= 1"),
    (["tune", "--context", "100000"], "--context 100000 leaves no room in the model's context length"),
    (["tune", "--output", "/no/such/dir/spec.json"], "--output /no/such/dir/spec.json: its directory"),
    (["tune", "--save-candidates", "/dev/null"], "--save-candidates /dev/null: a file, not a folder"),
    # a directory, or a path that cannot be written: refused before the run, which it would otherwise lose
    (["bench", "schedule", "--workload", "const:8:4:2", "--num-kv-blocks", "8", "--output", "/"],
     "--output /: a directory, not a file"),
    (["bench", "schedule", "--workload", "const:8:4:2", "--num-kv-blocks", "8", "--plot", "/"],
     "--plot /: a directory, not a file"),
    (["bench", "plot", "r.json", "-o", "/"], "-o /: a directory, not a file"),
    (["tune", "--output", "/proc/self"], "--output /proc/self: a directory, not a file"),
    # tune's engine options as the engine refuses them, before the search (-tp 2: the default model's 9 heads)
    (["tune", "-tp", "0"], "--tensor-parallel-size must be >= 1, not 0"),
    (["tune", "-tp", "2"], "tensor_parallel_size 2 must divide the model's num_attention_heads (9)"),
    (["tune", "--device", "mps"], "device 'mps': nanoflow runs on cpu or cuda"),
    # the generation config's max_new_tokens checked as a request's max_tokens (0 was ignored: no bound at all)
    (["generate", "Hi", "--override-generation-config", '{"max_new_tokens": 0}'],
     "the generation config's default max_new_tokens=0: must be an integer >= 1"),
    (["generate", "Hi", "--override-generation-config", '{"max_new_tokens": "abc"}'], "max_new_tokens='abc'"),
    (["generate", "Hi", "--override-generation-config", '{"temperature": "hot"}'], "(from --override-generation-"
                                                                                     "config)"),
    (["generate", "Hi", "--seed", "99999999999999999999"], "seed must be an integer in [-2**63, 2**64)"),
    # sizes past the memory: the option that sizes them, not the allocator's traceback
    (["generate", "Hi", "--num-kv-blocks", "1000000000"], "lower num_kv_blocks or kv_cache_gb"),
    (["generate", "Hi", "--device", "cpu", "--max-num-batched-tokens", "100000000"],
     "lower max_num_batched_tokens"),
    # bench schedule's own numbers (a negative cache blamed the prompt; huge ones were tracebacks)
    (["bench", "schedule", "--workload", "const:8:4:2", "--num-kv-blocks", "-5"],
     "--num-kv-blocks must be an integer in [1, 2,147,483,648], not -5"),
    (["bench", "schedule", "--workload", "const:8:4:2", "--num-kv-blocks", "99999999999999999999"],
     "--num-kv-blocks must be an integer in"),
    (["bench", "schedule", "--workload", "const:8:4:2", "--num-kv-blocks", "8", "--max-model-len", "auto"],
     "--max-model-len auto takes the model's context length, and bench schedule replays no model"),
    (["bench", "schedule", "--workload", "const:8:2:99999999999", "--num-kv-blocks", "8"],
     "at most 10,000,000 requests"),
    (["generate", "Hi", "--kv-cache-gb", "inf"], "kv_cache_gb must be a number > 0, got inf"),
    (["generate", "Hi", "--chat-template", "x"], "--chat-template is for --chat"),
    (["serve", "--served-model-name", "foo", "/"], "--served-model-name '/' looks like the model: "
                                                    "--served-model-name takes several values")])
def test_bench_and_tune_refuse_bad_flags_before_any_work(capsys, argv, message):
    """Each a one-line error naming the flag, before a model loads, a replay runs or a server is asked (a bad path
    found after the run lost it; a rate of 0 divided by zero; an unreachable server printed a traceback)."""
    from nanoflow.entrypoints.cli import main
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_malformed_tokenizer_and_report_files_are_named(tmp_path, llama_dir, capsys):
    """A tokenizer.json or tokenizer_config.json that does not parse, and a `bench plot` report without the fields
    it draws: a one-line error naming the file (they were tracebacks)."""
    from nanoflow.entrypoints.cli import main
    (tmp_path / "tokenizer.json").write_text("{garbage")
    with pytest.raises(ValueError, match=f"malformed tokenizer {tmp_path}/tokenizer.json: "):
        LLM(llama_dir, tokenizer=str(tmp_path))
    shutil.copy(os.path.join(llama_dir, "tokenizer.json"), tmp_path / "tokenizer.json")
    (tmp_path / "tokenizer_config.json").write_text("{")
    with pytest.raises(ValueError, match=f"{tmp_path}/tokenizer_config.json is not JSON"):
        LLM(llama_dir, tokenizer=str(tmp_path))
    report = tmp_path / "min.json"
    report.write_text(json.dumps({"results": [{"tokens_per_second": 1.0}]}))
    assert main(["bench", "plot", str(report), "-o", str(tmp_path / "b.png")]) == 2
    assert "is not a whole `bench throughput` report: it has no dtype, optimal_tokens_per_second" in \
        capsys.readouterr().err
    # the fields it draws of the types it draws (a string drew a bar of 0; a null or a number failed in matplotlib
    # or a format, naming nothing), and a file that is not text
    whole = {"dtype": "bfloat16", "optimal_tokens_per_second": 10.0,
             "results": [{"workload": "w", "tokens_per_second": 1.0, "percent_of_optimal": 10.0}]}
    for change, message in (({"tokens_per_second": "fast"}, "tokens_per_second is 'fast', not a number"),
                            ({"percent_of_optimal": None}, "percent_of_optimal is None, not a number"),
                            ({"workload": 5}, "workload is 5, not a string")):
        report.write_text(json.dumps(whole | {"results": [whole["results"][0] | change]}))
        assert main(["bench", "plot", str(report), "-o", str(tmp_path / "b.png")]) == 2
        assert f"{report}: {message}" in capsys.readouterr().err
    report.write_bytes(b"\xff\xfe{")
    assert main(["bench", "plot", str(report), "-o", str(tmp_path / "b.png")]) == 2
    assert f"{report}: not JSON" in capsys.readouterr().err
    report.write_text(json.dumps(whole))
    assert main(["bench", "plot", str(report), "-o", str(tmp_path / "b.png")]) == 0


def test_tune_refuses_an_fp8_kv_cache(capsys):
    from nanoflow.entrypoints.cli import main
    assert main(["tune", "--kv-cache-dtype", "fp8"]) == 2
    assert "--kv-cache-dtype fp8" in capsys.readouterr().err


def test_a_tokenizer_beyond_the_models_vocabulary_is_refused_by_id(tmp_path, tokenizer_dir):
    """Text whose ids the model has no rows for (a tokenizer of another model): the token-id prompts' error, not an
    IndexError inside the step that fails the whole batch."""
    from conftest import make_hf_model
    make_hf_model(str(tmp_path), "llama", tokenizer_dir, vocab_size=64)
    llm = LLM(str(tmp_path))
    with pytest.raises(ValueError, match=r"prompt token id \d+ is out of range \[0, 64\)"):
        llm.generate("The capital of France is", SamplingParams(max_tokens=2))
    assert not llm.engine.has_unfinished_requests()


def test_rope_scaling_the_context_must_follow(tmp_path):
    """Linear rope scaling stretches the context by its factor (as vLLM derives max_model_len); a GGUF file's yarn is
    read as config.json's (its original context times its factor), and llama.cpp's YaRN knobs that transformers
    lacks are refused by name (they would be ignored)."""
    import numpy as np
    from conftest import make_hf_model
    from nanoflow.models.gguf_file import config_from_gguf, open_gguf
    make_hf_model(str(tmp_path / "linear"), "llama", None, max_position_embeddings=64,
                  rope_scaling={"rope_type": "linear", "factor": 4.0})
    llm = LLM(str(tmp_path / "linear"))
    assert llm.engine.max_model_len == 256
    assert len(llm.generate([list(range(1, 200))], SamplingParams(max_tokens=2), use_tqdm=False)[0]
               .outputs[0].token_ids) == 2
    gguf = pytest.importorskip("gguf")

    def yarn_file(name, **knobs):
        w = gguf.GGUFWriter(str(tmp_path / name), "llama")
        for add, v in ((w.add_block_count, 1), (w.add_embedding_length, 8), (w.add_head_count, 2),
                       (w.add_feed_forward_length, 16), (w.add_context_length, 64)):
            add(v)
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(4.0)
        w.add_rope_scaling_orig_ctx_len(32)
        for key, v in knobs.items():
            w.add_float32(f"llama.rope.scaling.{key}", v)
        w.add_tensor("token_embd.weight", np.zeros((37, 8), np.float32))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        return config_from_gguf(open_gguf(str(tmp_path / name)))
    c = yarn_file("yarn.gguf", yarn_beta_fast=16.0)
    assert (c.rope_scaling["factor"], c.rope_scaling["original_max_position_embeddings"],
            c.rope_scaling["beta_fast"], c.context_length) == (4.0, 32, 16.0, 128)
    with pytest.raises(ValueError, match="unsupported YaRN parameters in the GGUF file: yarn_ext_factor"):
        yarn_file("knob.gguf", yarn_ext_factor=0.5)


def test_text_without_a_tokenizer_says_how_to_give_one(tmp_path):
    from conftest import make_hf_model
    make_hf_model(str(tmp_path), "llama", None)
    llm = LLM(str(tmp_path))
    with pytest.raises(ValueError, match="no tokenizer: pass token ids, or a tokenizer .*--tokenizer PATH"):
        llm.generate("hi")
    assert len(llm.generate([[1, 2]], SamplingParams(max_tokens=2), use_tqdm=False)[0].outputs[0].token_ids) == 2
    # stop strings need the text, as bad_words and grammars do: refused, not ignored; stop token ids need none
    with pytest.raises(ValueError, match="stop strings need the model's tokenizer"):
        llm.generate([[1, 2]], SamplingParams(max_tokens=2, stop=["a"]))
    assert llm.generate([[1, 2]], SamplingParams(max_tokens=2, stop_token_ids=[7]), use_tqdm=False)[0].finished
