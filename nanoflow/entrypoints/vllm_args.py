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
    arg: type | str = str  # its command-line value: a type, "switch" (a flag) or "bool" (--x / --no-x)


ENGINE = {  # LLM() and the CLI's engine flags
    "trust_remote_code": AsIs((), "only the built-in architectures load: a checkpoint's own code never runs",
                              "switch"),
    "quantization": AsIs((None,), "it loads unquantized checkpoints"),
    "download_dir": AsIs((None,), "it downloads nothing"),
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
                                                "memory or NCCL)", "switch"),
    "compilation_config": AsIs((None,), "it compiles the fusions it measured to win"),
}
LLM_ONLY = {"disable_log_stats": AsIs((True,), "an offline run logs no stats")}
SERVER = {  # `serve`
    "response_role": AsIs(("assistant",), "a response's role is the assistant's"),
    "disable_log_requests": AsIs((), "requests are not logged", "switch"),
    "disable_uvicorn_access_log": AsIs((), "uvicorn's access log is off", "switch"),
}


def add_args(p, table: dict[str, AsIs]) -> None:
    """The table's arguments as flags (unset: None), e.g. --trust-remote-code, --swap-space N."""
    for name, rule in table.items():
        flag, help_ = "--" + name.replace("_", "-"), f"vLLM's; {rule.why}"
        if rule.arg == "switch":
            p.add_argument(flag, action="store_const", const=True, default=None, help=help_)
        elif rule.arg == "bool":
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_)
        else:
            p.add_argument(flag, type=rule.arg, default=None, help=help_)


def take_args(a: argparse.Namespace, table: dict[str, AsIs]) -> None:
    """Refuses a flag of the table (those the command has) given at a value it does not take ("None" spells None on
    the command line, as in launch files: --quantization None)."""
    take({name: None if v == "None" else v for name in table if (v := getattr(a, name, None)) is not None}, table)


def take(given: dict, table: dict[str, AsIs]) -> dict:
    """Pops the table's arguments from given, refusing a value the table does not take; returns the rest."""
    rest = dict(given)
    for name, rule in table.items():
        if name in rest and (value := rest.pop(name)) not in rule.values and rule.values:
            raise ValueError(f"{name}={value!r}: nanoflow takes only {' or '.join(map(repr, rule.values))} "
                             f"({rule.why})")
    return rest
