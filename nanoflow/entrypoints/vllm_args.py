"""vLLM's arguments (of `LLM()` and `vllm serve`) that nanoflow takes at the values that ask for what it does
anyway, so that scripts and launch files port as they are; any other value is refused, naming the argument and why.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class AsIs:
    values: tuple  # the values taken; () any
    why: str
    arg: type | str = str  # its command-line value: a type, "switch" (a flag), "bool" (--x / --no-x) or "list"


ENGINE = {  # LLM() and the CLI's engine flags
    "trust_remote_code": AsIs((), "only the built-in architectures load: a checkpoint's own code never runs",
                              "switch"),
    "quantization": AsIs((None, "gguf"), "it loads unquantized checkpoints, and GGUF files (gguf) dequantized"),
    "download_dir": AsIs((None,), "it downloads nothing: a hub id is read from the local cache, so set $HF_HUB_CACHE "
                                  "(or $HF_HOME) to the directory instead"),
    "tokenizer_mode": AsIs(("auto",), "the tokenizers library's tokenizer"),
    "enable_chunked_prefill": AsIs((True,), "prefills are always chunked", "bool"),
    "max_num_partial_prefills": AsIs((1,), "an iteration cuts at most one prefill", int),
    "pipeline_parallel_size": AsIs((1,), "tensor parallelism only", int),
    "distributed_executor_backend": AsIs((None, "mp", "uni"), "the tensor-parallel ranks are processes of this host"),
    "max_logprobs": AsIs((20,), "up to 20 logprobs a token", int),
    "swap_space": AsIs((), "preemption recomputes, as vLLM's V1 does: no swap space is used", float),
    "hf_token": AsIs((None,), "it downloads nothing"),
    "cpu_offload_gb": AsIs((0,), "the weights stay on the GPU", float),
    "task": AsIs(("auto", "generate"), "it generates text"),
    "runner": AsIs(("auto", "generate"), "it generates text"),
    "skip_tokenizer_init": AsIs((False,), "the model's tokenizer loads with it (a model without one takes token "
                                          "ids)", "switch"),
    "disable_custom_all_reduce": AsIs((False,), "tensor parallelism's all-reduce is picked by size (symmetric "
                                                "memory or NCCL); NANOFLOW_ALL_REDUCE=nccl asks for NCCL's alone",
                                      "switch"),
    "compilation_config": AsIs((None,), "it compiles the fusions it measured to win: drop the option"),
    "preemption_mode": AsIs(("recompute",), "a preempted sequence's prefill is recomputed"),
    "num_scheduler_steps": AsIs((1,), "one scheduling step an iteration (the next is scheduled while the GPU runs)",
                                int),
    "model_impl": AsIs(("auto", "vllm"), "its own model code runs (no transformers backend)"),
    "enable_lora": AsIs((False,), "LoRA adapters are not supported", "switch"),
    "lora_modules": AsIs((None,), "LoRA adapters are not supported"),
    "max_lora_rank": AsIs((), "no LoRA adapter loads: it changes nothing", int),
    "max_loras": AsIs((), "no LoRA adapter loads: it changes nothing", int),
    "limit_mm_per_prompt": AsIs((None,), "its models take text only (no multimodal inputs)"),
    "speculative_config": AsIs((None,), "there is no speculative decoding"),
    "kv_transfer_config": AsIs((None,), "there is no disaggregated prefill (KV transfer)"),
    "enable_expert_parallel": AsIs((False,), "tensor parallelism splits every expert", "switch"),
    "disable_sliding_window": AsIs((False,), "a sliding window applies where the model's config puts it", "switch"),
    "max_seq_len_to_capture": AsIs((), "CUDA graphs are captured for every token bucket up to the budget", int),
    "cuda_graph_sizes": AsIs((), "CUDA graphs are captured for the engine's token buckets", "list"),
    "max_parallel_loading_workers": AsIs((), "the weights load in one process a rank", int),
    "guided_decoding_backend": AsIs(("xgrammar", "auto"), "xgrammar compiles every grammar"),
    "long_prefill_token_threshold": AsIs((0,), "a prefill takes what the token budget leaves", int),
    "otlp_traces_endpoint": AsIs((None,), "there is no OpenTelemetry tracing"),
}
LLM_ONLY = {"disable_log_stats": AsIs((True,), "an offline run logs no stats"),
            "data_parallel_size": AsIs((1,), "offline, one engine (the server's --data-parallel-size runs replicas)"),
            "enable_sleep_mode": AsIs((False,), "there is no sleep mode")}
SERVER = {  # `serve`
    "response_role": AsIs(("assistant",), "a response's role is the assistant's"),
    "disable_log_requests": AsIs((), "requests are not logged", "switch"),
    "disable_uvicorn_access_log": AsIs((), "uvicorn's access log is off", "switch"),
    "enable_log_requests": AsIs((False,), "requests are not logged", "bool"),
    "disable_frontend_multiprocessing": AsIs((), "the API server runs beside the engine in one process", "switch"),
    "middleware": AsIs((None,), "it adds no ASGI middleware of the user's"),
}


SHORT = {"pipeline_parallel_size": "-pp"}  # (vLLM's short flags)
RENAMED = {"scheduling_policy": "schedule_policy", "num_gpu_blocks_override": "num_kv_blocks"}  # vLLM's: ours
ROPE = ("rope_scaling", "rope_theta")  # (vLLM's older flags: config.json's fields, as hf_overrides now sets them)


def translate(given: dict) -> dict:
    """vLLM's names and units of options nanoflow has, as nanoflow's: scheduling_policy, num_gpu_blocks_override,
    kv_cache_memory_bytes (kv_cache_gb in GiB), rope_scaling / rope_theta (into hf_overrides)."""
    out = dict(given)
    for old, new in RENAMED.items():
        if old in out:
            if out.get(new) is not None:
                raise ValueError(f"give {new} or its vLLM name {old}, not both")
            out[new] = out.pop(old)
    if (size := out.pop("kv_cache_memory_bytes", None)) is not None:
        if out.get("kv_cache_gb") is not None:
            raise ValueError("give kv_cache_gb or kv_cache_memory_bytes (vLLM's, in bytes), not both")
        if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
            raise ValueError(f"kv_cache_memory_bytes must be a positive integer, got {size!r}")
        out["kv_cache_gb"] = size / 2**30
    # (as vLLM's: over hf_overrides' own; an empty --rope-scaling asks for nothing)
    if rope := {k: v for k in ROPE if (v := out.pop(k, None)) not in (None, {})}:
        out["hf_overrides"] = (out.get("hf_overrides") or {}) | rope
    return out


def add_args(p, table: dict[str, AsIs]) -> None:
    """The table's arguments as flags (unset: None), e.g. --trust-remote-code, --swap-space N."""
    for name, rule in table.items():
        flag, help_ = "--" + name.replace("_", "-"), f"vLLM's; {rule.why}"
        flag = (flag, SHORT[name]) if name in SHORT else (flag,)
        if rule.arg == "switch":
            p.add_argument(*flag, action="store_const", const=True, default=None, help=help_)
        elif rule.arg == "bool":
            p.add_argument(*flag, action=argparse.BooleanOptionalAction, default=None, help=help_)
        elif rule.arg == "list":
            p.add_argument(*flag, nargs="+", default=None, help=help_)
        else:
            p.add_argument(*flag, type=rule.arg, default=None, help=help_)


def take_args(a: argparse.Namespace, table: dict[str, AsIs]) -> None:
    """Refuses a flag of the table (those the command has) given at a value it does not take ("None" spells None on
    the command line, as in launch files: --quantization None)."""
    take({name: None if v == "None" else v for name in table if (v := getattr(a, name, None)) is not None}, table)


def take(given: dict, table: dict[str, AsIs]) -> dict:
    """Pops the table's arguments from given, refusing a value the table does not take (None, vLLM's "the default",
    asks for nothing); returns the rest."""
    rest = dict(given)
    for name, rule in table.items():
        if name in rest and (value := rest.pop(name)) is not None and value not in rule.values and rule.values:
            raise ValueError(f"{name}={value!r}: nanoflow takes only {' or '.join(map(repr, rule.values))} "
                             f"({rule.why})")
    return rest
