"""Rotary position embedding tables (default, linear, llama3 and YaRN frequency scaling)."""
from __future__ import annotations

import math

import torch

from nanoflow.config import ModelConfig


def inv_frequencies(cfg: ModelConfig) -> torch.Tensor:
    dim = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    scaling = cfg.rope_scaling or {}
    kind = scaling.get("rope_type", "default")
    if kind == "linear":
        return inv_freq / scaling["factor"]
    if kind == "llama3":
        factor = scaling["factor"]
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_len = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
        return torch.where(medium, smoothed, scaled)
    if kind == "yarn":
        # (YaRN: high frequencies kept, low ones interpolated by the factor, a linear ramp between the dimensions
        # that turn beta_fast and beta_slow times over the original context)
        def dim_of(turns):
            return dim * math.log(scaling["original_max_position_embeddings"] / (turns * 2 * math.pi)) / \
                (2 * math.log(cfg.rope_theta))
        low, high = dim_of(scaling.get("beta_fast") or 32), dim_of(scaling.get("beta_slow") or 1)
        if scaling.get("truncate", True):
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, dim - 1)
        ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / max(high - low, 1e-3)).clamp(0, 1)
        return inv_freq / scaling["factor"] * ramp + inv_freq * (1 - ramp)
    return inv_freq


def attention_factor(cfg: ModelConfig) -> float:
    """What YaRN scales cos and sin by (1 for the other kinds): its attention_factor, or one from the factor."""
    scaling = cfg.rope_scaling or {}
    if scaling.get("rope_type") != "yarn":
        return 1.0
    if scaling.get("attention_factor") is not None:
        return float(scaling["attention_factor"])

    def mscale(m=1.0):
        return 1.0 if scaling["factor"] <= 1 else 0.1 * m * math.log(scaling["factor"]) + 1.0
    if scaling.get("mscale") and scaling.get("mscale_all_dim"):
        return mscale(scaling["mscale"]) / mscale(scaling["mscale_all_dim"])
    return mscale()


def cos_sin_table(cfg: ModelConfig, max_positions: int, device: torch.device) -> torch.Tensor:
    """[max_positions, head_dim] float32: cos of each frequency, then sin."""
    freqs = torch.arange(max_positions, dtype=torch.float32)[:, None] * inv_frequencies(cfg)[None, :]
    return (torch.cat((freqs.cos(), freqs.sin()), dim=-1) * attention_factor(cfg)).to(device)
