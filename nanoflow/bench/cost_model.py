"""NanoFlow's cost model: optimal throughput = C / (2 P) tokens/s, C the dense GEMM rate measured on this device
(at the model's layer shapes, or a reference set's where those run faster), P the parameter count (with mixture of
experts, the active parameters: a token uses only its top-k experts). Throughput counts prompt + output tokens (the
ones computed: a prompt's prefix served by the cache costs no FLOPs)."""
from __future__ import annotations

import time

import torch

from nanoflow.config import ModelConfig, preset

REFERENCE = ("llama-3-8b", 2048)  # DESIGN's measure of C: Llama-3-8B's layer GEMMs at 2,048 rows


def layer_gemms(cfg: ModelConfig, tokens: int) -> dict[str, tuple[int, int, int]]:
    """(M, N, K) of each GEMM of a decoder layer for a batch of `tokens` rows."""
    h, i = cfg.hidden_size, cfg.intermediate_size
    return {"qkv": (tokens, cfg.q_size + 2 * cfg.kv_size, h), "o": (tokens, h, cfg.q_size),
            "gate_up": (tokens, 2 * i, h), "down": (tokens, h, i)}


def _time(fn, device: torch.device, reps: int) -> float:
    """Median seconds of fn() over reps runs, after a single untimed run. No longer warm-up: on an H100, sustained
    GEMMs hold the card at its power cap (700 W, 1.4-1.6 GHz against 1.98, nvidia-smi during #9's bench), and C
    measured after 0.3 s of them came out 20 % low (587-632 TFLOP/s against 759-770)."""
    fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def gemm_rate(cfg: ModelConfig, tokens: int, dtype: torch.dtype, device: torch.device, reps: int = 20) -> dict:
    """Measured FLOP/s of the layer's GEMMs at this token count (random inputs, never zeros)."""
    per_gemm, flops, secs = {}, 0.0, 0.0
    for name, (m, n, k) in layer_gemms(cfg, tokens).items():
        a = torch.randn(m, k, dtype=dtype, device=device)
        w = torch.randn(n, k, dtype=dtype, device=device)
        out = torch.empty(m, n, dtype=dtype, device=device)
        t = _time(lambda: torch.mm(a, w.t(), out=out), device, reps)
        per_gemm[name] = 2 * m * n * k / t
        flops += 2 * m * n * k
        secs += t
    return {"rate": flops / secs, "per_gemm": per_gemm, "tokens": tokens}


def device_rate(cfg: ModelConfig, tokens: int, dtype: torch.dtype, device: torch.device) -> dict:
    """C ("rate"): the higher of the model's own layer GEMMs' rate at its token budget ("model") and, on a GPU, the
    REFERENCE set's ("reference", else None). C is the device's rate: a narrow model's or a small budget's GEMMs run
    slower (506 TFLOP/s for Qwen3-30B-A3B's against 722 on the same H200), and a C that low would overstate every
    % of optimal."""
    model = gemm_rate(cfg, tokens, dtype, device)["rate"]
    reference = gemm_rate(preset(REFERENCE[0]), REFERENCE[1], dtype, device)["rate"] if device.type == "cuda" else None
    return {"rate": max(model, reference or 0.0), "model": model, "reference": reference}


def optimal_throughput(rate: float, cfg: ModelConfig) -> float:
    return rate / (2 * cfg.active_params())
