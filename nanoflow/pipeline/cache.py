"""Where profiles and tuned specs live: ~/.cache/nanoflow (or $NANOFLOW_CACHE_DIR), one JSON file per
(GPU, model shape, dtype, token budget), so that serve and bench find the spec `nanoflow tune` chose."""
from __future__ import annotations

import os
import re

import torch

from nanoflow.config import ModelConfig, preset
from nanoflow.pipeline.spec import PipelineSpec, load_spec, non_overlap

HAND = "llama-3-8b-h100-hand"


def gpu_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def cache_dir(*parts: str) -> str:
    root = os.environ.get("NANOFLOW_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "nanoflow")
    path = os.path.join(root, *parts)
    os.makedirs(path, exist_ok=True)
    return path


def shape_key(cfg: ModelConfig) -> str:
    """What a layer's cost depends on: not the layer count, vocabulary or rope (Llama-3-8B, Llama-3.1-8B
    and Mistral-7B share one shape)."""
    c = cfg
    key = f"h{c.hidden_size}-i{c.intermediate_size}-q{c.num_heads}-kv{c.num_kv_heads}-d{c.head_dim}"
    if c.is_moe:
        key += f"-e{c.num_experts}k{c.num_experts_per_tok}"
    if c.qkv_bias or c.o_bias or c.mlp_bias:
        key += f"-bias{int(c.qkv_bias)}{int(c.o_bias)}{int(c.mlp_bias)}"
    if c.qk_norm:
        key += "-qknorm"
    return key + (f"-w{c.sliding_window}" if c.sliding_window else "")


def dtype_name(dtype: torch.dtype | str) -> str:
    return str(dtype).removeprefix("torch.")


def cache_key(gpu_name: str, cfg: ModelConfig, dtype: torch.dtype | str, budget: int, tp_size: int = 1) -> str:
    """(cfg: one rank's shape; with tensor parallelism the degree too: a TP = 2 shard may have another model's shape,
    and its spec places all-reduces that model's layer lacks)"""
    gpu = re.sub(r"[^A-Za-z0-9.]+", "-", gpu_name).strip("-")
    return f"{gpu}--{shape_key(cfg)}--{dtype_name(dtype)}--{budget}" + (f"--tp{tp_size}" if tp_size > 1 else "")


def fits_hand_spec(cfg: ModelConfig) -> bool:
    """The shipped hand spec was made for Llama-3-8B's layer shape."""
    return shape_key(cfg) == shape_key(preset("llama-3-8b"))


def save_tuned(spec: PipelineSpec, key: str) -> str:
    path = os.path.join(cache_dir("tuned"), f"{key}.json")
    spec.save(path)
    return path


def find_tuned(gpu_name: str, cfg: ModelConfig, dtype: torch.dtype | str, budget: int,
               tp_size: int = 1) -> PipelineSpec | None:
    path = os.path.join(cache_dir("tuned"), f"{cache_key(gpu_name, cfg, dtype, budget, tp_size)}.json")
    return PipelineSpec.load(path) if os.path.exists(path) else None


def resolve_pipeline_spec(name: str, gpu_name: str, cfg: ModelConfig, dtype: torch.dtype | str,
                          budget: int, tp_size: int = 1) -> PipelineSpec:
    """'auto': the tuned spec of this GPU, shape, dtype and budget; else the hand spec for a
    Llama-3-8B-shaped model; else the non-overlap spec. 'non-overlap', a file or a shipped spec's name:
    that spec."""
    if name == "non-overlap":
        return non_overlap(budget, moe=cfg.is_moe)
    if name != "auto":
        return load_spec(name)
    tuned = find_tuned(gpu_name, cfg, dtype, budget, tp_size)
    if tuned is not None:
        return tuned
    return load_spec(HAND) if fits_hand_spec(cfg) else non_overlap(budget, moe=cfg.is_moe)
