"""Reading GGUF files (llama.cpp's format) with the `gguf` package: metadata, config, dequantized tensors."""
from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from nanoflow.config import ModelConfig

GGUF_ARCHS = {"llama": "llama", "qwen2": "qwen2", "qwen2moe": "qwen2_moe", "qwen3": "qwen3", "qwen3moe": "qwen3_moe"}
YARN_KNOBS = ("attn_factor", "yarn_log_multiplier", "yarn_ext_factor", "yarn_attn_factor")


def open_gguf(path: str):
    import gguf
    try:
        return gguf.GGUFReader(path)
    except Exception as e:  # the reader raises bare ValueErrors/asserts on bad files
        raise ValueError(f"cannot read GGUF file {path}: {e}") from None


def field(reader, key: str):
    f = reader.fields.get(key)
    return None if f is None else f.contents()


def config_from_gguf(reader) -> ModelConfig:
    arch = field(reader, "general.architecture")
    if arch not in GGUF_ARCHS:
        raise ValueError(f"unsupported GGUF architecture {arch!r}; supported: {sorted(GGUF_ARCHS)}")

    def g(key, default=None):
        v = field(reader, f"{arch}.{key}")
        return default if v is None else v

    missing = [f"{arch}.{k}" for k in ("attention.head_count", "embedding_length", "block_count") if g(k) is None]
    if missing:
        raise ValueError(f"the GGUF file lacks the metadata {', '.join(missing)}")
    names = {t.name for t in reader.tensors}
    heads, hidden = g("attention.head_count"), g("embedding_length")
    rope, scaling = None, g("rope.scaling.type", "none")
    if scaling == "linear":
        rope = {"rope_type": "linear", "factor": g("rope.scaling.factor")}
    elif scaling == "yarn":
        # (llama.cpp's attention-factor and extrapolation knobs have no transformers counterpart: refused by name)
        if knobs := [k for k in YARN_KNOBS if g(f"rope.scaling.{k}") is not None]:
            raise ValueError(f"unsupported YaRN parameters in the GGUF file: {', '.join(knobs)}")
        rope = {"rope_type": "yarn", "factor": g("rope.scaling.factor"),
                "original_max_position_embeddings": g("rope.scaling.original_context_length", g("context_length")),
                "beta_fast": g("rope.scaling.yarn_beta_fast"), "beta_slow": g("rope.scaling.yarn_beta_slow")}
    elif scaling != "none":  # (plain rope would be wrong past the original length)
        raise ValueError(f"unsupported rope scaling type {scaling!r} in the GGUF file (supported: none, linear, yarn)")
    eos = field(reader, "tokenizer.ggml.eos_token_id")
    tokens = field(reader, "tokenizer.ggml.tokens")
    experts = g("expert_count", 0)
    qwen_moe = arch in ("qwen2moe", "qwen3moe")
    return ModelConfig(
        # llama.cpp files Mixtral as "llama"
        architecture="mixtral" if experts and arch == "llama" else GGUF_ARCHS[arch],
        vocab_size=g("vocab_size") or (len(tokens) if tokens is not None else _embedding_rows(reader)),
        hidden_size=hidden,
        intermediate_size=g("expert_feed_forward_length") if qwen_moe else g("feed_forward_length"),
        num_layers=g("block_count"),
        num_heads=heads,
        num_kv_heads=g("attention.head_count_kv", heads),
        head_dim=g("attention.key_length", hidden // heads),
        rms_norm_eps=g("attention.layer_norm_rms_epsilon", 1e-5),
        rope_theta=g("rope.freq_base", 10000.0),
        rope_scaling=rope,
        max_position_embeddings=g("context_length", 4096),
        tie_word_embeddings="output.weight" not in names,
        qkv_bias="blk.0.attn_q.bias" in names,
        sliding_window=g("attention.sliding_window"),
        bos_token_id=field(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_ids=[] if eos is None else [eos],
        num_experts=experts,
        num_experts_per_tok=g("expert_used_count", 0),
        # (llama.cpp's qwen2moe does not renormalize, its qwen3moe does)
        norm_topk_prob=g("expert_weights_norm", arch != "qwen2moe"),
        shared_expert_intermediate_size=g("expert_shared_feed_forward_length", 0),
        qk_norm="blk.0.attn_q_norm.weight" in names,
    )


def unpermute_rope_rows(w: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Undo llama.cpp's conversion, which interleaves each head's two rotary halves."""
    return w.reshape(num_heads, w.shape[0] // num_heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _embedding_rows(reader) -> int:
    """The vocabulary of a file without a tokenizer or a vocab_size: the embedding's rows (its last GGML dim)."""
    embd = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
    if embd is None:
        raise ValueError("the GGUF file has no vocabulary size: no vocab_size, tokenizer or token_embd.weight")
    return int(embd.shape[-1])


def gguf_tensors(reader) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, float32 tensor in PyTorch's [out, in] layout), dequantizing quantized types."""
    from gguf import GGMLQuantizationType, quants
    for t in reader.tensors:
        if t.tensor_type in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
            data = np.array(t.data, dtype=np.float32)
        else:
            try:
                data = quants.dequantize(t.data, t.tensor_type)
            except NotImplementedError:
                raise ValueError(f"GGUF tensor {t.name!r} is of type {t.tensor_type.name}, which the gguf package "
                                 f"cannot dequantize (it reads F32, F16, BF16 and the Q, K and IQ quants)") from None
        yield t.name, torch.from_numpy(data.reshape(tuple(reversed([int(x) for x in t.shape]))))
