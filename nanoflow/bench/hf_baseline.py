"""The HF transformers baseline: the same workload through its continuous batching (`generate_batch`).

The HF model is built first with HF's own random init; nanoflow then loads those very weights (through
the same name mapping as a safetensors checkpoint), so both engines run identical weights."""
from __future__ import annotations

import time

import torch

from nanoflow.config import ModelConfig

HF_CLASSES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}


def hf_config(cfg: ModelConfig):
    import transformers
    kw = dict(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
              num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
              num_key_value_heads=cfg.num_kv_heads, head_dim=cfg.head_dim, rms_norm_eps=cfg.rms_norm_eps,
              max_position_embeddings=cfg.max_position_embeddings, tie_word_embeddings=cfg.tie_word_embeddings,
              rope_theta=cfg.rope_theta, rope_scaling=cfg.rope_scaling, bos_token_id=cfg.bos_token_id,
              eos_token_id=cfg.eos_token_ids or None)
    if cfg.architecture == "llama":
        kw.update(attention_bias=cfg.o_bias, mlp_bias=cfg.mlp_bias)
    if cfg.architecture == "mistral":
        kw.update(sliding_window=cfg.sliding_window)
    return transformers.AutoConfig.for_model(cfg.architecture, **kw)


def build(cfg: ModelConfig, dtype: torch.dtype, device: torch.device, seed: int = 0):
    import transformers
    torch.manual_seed(seed)
    cls = getattr(transformers, HF_CLASSES[cfg.architecture])
    with torch.device(device):
        model = cls._from_config(hf_config(cfg), dtype=dtype)
    return model.eval()


def run(model, prompts: list[list[int]], max_new_tokens: int, temperature: float) -> dict:
    """Generate with HF continuous batching, EOS disabled (as nanoflow's ignore_eos)."""
    from transformers import GenerationConfig
    sampling = dict(do_sample=True, temperature=temperature, top_p=1.0, top_k=0) if temperature > 0 else {}
    gen = GenerationConfig(max_new_tokens=max_new_tokens, eos_token_id=None, pad_token_id=0,
                           **(sampling or {"do_sample": False}))
    model.generate_batch(prompts[:2], generation_config=gen)  # warm-up (graphs, kernels)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t = time.perf_counter()
    results = model.generate_batch(prompts, generation_config=gen, progress_bar=True)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - t
    out_tokens = sum(len(r.generated_tokens) for r in results.values())
    in_tokens = sum(map(len, prompts))
    return {"elapsed_s": elapsed, "requests": len(results), "prompt_tokens": in_tokens, "output_tokens": out_tokens,
            "total_tok_s": (in_tokens + out_tokens) / elapsed, "output_tok_s": out_tokens / elapsed}
