"""The `nanoflow` command: generate, serve, bench (throughput, schedule, serve, plot), tune."""
from __future__ import annotations

import argparse
import errno
import json
import os
import re
import sys
import traceback
from fractions import Fraction

from nanoflow.config import MAX_NUM_SEQS, MODES, PRESETS, REASONING_PARSERS, SCHEDULE_POLICIES
from nanoflow.distributed.parallel_state import group_abandoned
from nanoflow.distributed.worker import shutdown_all
from nanoflow.entrypoints import vllm_args
from nanoflow.entrypoints.tool_calls import PARSERS
from nanoflow.tokenizer import CONTENT_FORMATS


def _json(text: str, ok, what: str):
    """A flag's JSON value, of the kind ok() checks (what: its name and an example)."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not JSON ({e}); {what}") from None
    if not ok(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not {what}")
    return value


def _json_list(text: str) -> list[str]:
    """A flag's JSON list of strings (as vLLM's --allowed-origins takes it)."""
    return _json(text, lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v),
                 'a JSON list of strings, e.g. \'["*"]\'')


def _json_object(text: str) -> dict:
    """A flag's JSON object (as vLLM's --override-generation-config takes it)."""
    return _json(text, lambda v: isinstance(v, dict), 'a JSON object, e.g. \'{"temperature": 0.6}\'')


def _bytes(text: str) -> int:
    """A size in bytes, with vLLM's suffixes, as _count's (8G is 2**33, 8g 8 * 10**9, 1T 2**40)."""
    return _count(text, "a size in bytes (e.g. 8G, 8589934592)")


def _tokens(text: str) -> int | None:
    """A token count, as _count's; auto (or -1): the model's."""
    return None if text in ("auto", "-1") else _count(text, "a token count (e.g. 4096, 32k, 1.5k, 32K, auto)")


def _count(text: str, what: str) -> int:
    """As vLLM's human-readable integers: k (1,000), K (1,024), m (10**6), M (2**20), g (10**9), G (2**30), t (10**12)
    or T (2**40), a decimal before a decimal unit (1.5k)."""
    units = {"": 1, "k": 1000, "K": 1024, "m": 10**6, "M": 2**20, "g": 10**9, "G": 2**30, "t": 10**12, "T": 2**40}
    m = re.fullmatch(r"(\d+(\.\d+)?)([kKmMgGtT]?)", text)
    count = Fraction(m[1]) * units[m[3]] if m else None
    # (a decimal before a decimal unit only, giving a whole count)
    if m is None or m[2] and not m[3].islower() or count.denominator != 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not {what}")
    return int(count)


class _Parser(argparse.ArgumentParser):
    """No abbreviated flags (--disable-log would be taken as --disable-log-stats); subcommands' parsers too. As
    vLLM's, a flag may be spelled with underscores (--max_num_seqs)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, allow_abbrev=False, **kwargs)

    def parse_args(self, args=None, namespace=None):
        words = _dashed(sys.argv[1:] if args is None else args)
        if words[:1] == ["serve"]:  # (launch files' spellings; generate's prompt may be the word "true")
            words = _valued_switches(words, _switches(self))
        return super().parse_args(words, namespace)


def _switches(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """Every flag that takes no value, in this parser and its subcommands'."""
    found = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                found |= _switches(sub)
        elif action.nargs == 0 and not isinstance(action, argparse._HelpAction):
            found |= {s: action for s in action.option_strings}
    return found


def _valued_switches(words: list[str], switches: dict[str, argparse.Action]) -> list[str]:
    """vLLM's older spelling of a switch with a value, `--enforce-eager True` or `--enable-chunked-prefill=False`, as
    the switch or its absence (--no-x where it has one): the value became the MODEL argument, or an unknown one."""
    out, i, end = [], 0, words.index("--") if "--" in words else len(words)
    while i < end:
        flag, eq, value = words[i].partition("=")
        if not eq and i + 1 < end:
            value = words[i + 1]
        action = switches.get(flag)
        if action is None or value.lower() not in ("true", "false") or flag.startswith("--no-"):
            out.append(words[i])
            i += 1
            continue
        negated = f"--no-{flag[2:]}"
        if value.lower() == "true":
            out.append(flag)
        elif negated in action.option_strings:
            out.append(negated)
        i += 1 if eq else 2
    return out + words[end:]


def _dashed(words: list[str]) -> list[str]:
    """Flags' underscores as dashes, up to a "--" (after it every word is an argument, e.g. a prompt)."""
    end = words.index("--") if "--" in words else len(words)
    return [_dashed_flag(w) for w in words[:end]] + list(words[end:])


def _dashed_flag(word: str) -> str:
    flag, eq, value = word.partition("=")
    return flag.replace("_", "-") + eq + value if word.startswith("--") else word


def add_engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="HF directory, .gguf file or shape preset (default: SmolLM2-135M)")
    p.add_argument("--tokenizer", default=None, help="HF directory with tokenizer.json (default: the model's)")
    p.add_argument("--revision", default=None,
                   help="a hub id's branch, tag or commit in the local cache (default: main)")
    p.add_argument("--tokenizer-revision", default=None, help="--tokenizer's, as --revision")
    p.add_argument("--hf-overrides", type=_json_object, default=None,
                   help="a JSON object of config.json fields set over the model's, as vLLM's, e.g. "
                        "'{\"rope_scaling\": {\"rope_type\": \"yarn\", \"factor\": 4.0, "
                        "\"original_max_position_embeddings\": 32768}}'")
    p.add_argument("--rope-scaling", type=_json_object, default=None,
                   help="vLLM's older flag: config.json's rope_scaling, as --hf-overrides sets it")
    p.add_argument("--rope-theta", type=float, default=None,
                   help="vLLM's older flag: config.json's rope_theta, as --hf-overrides sets it")
    p.add_argument("--load-format", default="auto", choices=["auto", "dummy", "safetensors", "gguf"])
    p.add_argument("--generation-config", default="auto",
                   help="default sampling parameters of requests that leave them unset: auto, the model's "
                        "generation_config.json; nanoflow (or vllm), nanoflow's own; or a directory holding one")
    p.add_argument("--override-generation-config", type=_json_object, default=None,
                   help="a JSON object of generation-config fields set over the chosen one's (temperature, top_p, "
                        "top_k, min_p, repetition_penalty, max_new_tokens), as vLLM's")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--max-model-len", type=_tokens, default=None,
                   help="tokens; as vLLM's, 32k is 32,000, 32K 32,768, 1.5k 1,500; auto: the model's (the default)")
    p.add_argument("--max-num-batched-tokens", type=int, default=None, help="dense token budget per iteration")
    p.add_argument("--max-num-seqs", type=int, default=MAX_NUM_SEQS)
    p.add_argument("--block-size", type=int, default=None, help="tokens a KV block (default: 16; 32 with an fp8 cache)")
    p.add_argument("--num-kv-blocks", "--num-gpu-blocks-override", type=int, default=None)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    p.add_argument("--kv-cache-gb", type=float, default=None,
                   help="the KV cache's size in GiB (ignores --gpu-memory-utilization); default: on a GPU what "
                        "--gpu-memory-utilization leaves, on the CPU 1")
    p.add_argument("--kv-cache-memory-bytes", type=_bytes, default=None,
                   help="vLLM's: the KV cache's size in bytes (8G, 8589934592), as --kv-cache-gb")
    p.add_argument("--kv-cache-dtype", choices=["auto", "fp8", "fp8_e4m3"], default="auto",
                   help="auto: the model's dtype; fp8 (fp8_e4m3): float8 e4m3, unscaled (half the bytes: twice the "
                        "KV tokens)")
    p.add_argument("--admission", choices=["kv", "predicted"], default="kv")
    p.add_argument("--schedule-policy", "--scheduling-policy", choices=SCHEDULE_POLICIES, default="fcfs",
                   help="the waiting request admitted next: fcfs, in arrival order; lof, the longest output "
                        "(max_tokens) first (offline batches: the run does not end on a few long decodes); slack, "
                        "arrival order but for outputs that would outlast the work in hand, which go first; priority, "
                        "by each request's priority (lowest value first; the lowest-priority running sequence is "
                        "preempted)")
    p.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs")
    p.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=None,
                   help="schedule iteration i + 1 while the GPU runs i (default: on for CUDA)")
    p.add_argument("--mode", choices=MODES, default="non-overlap",
                   help="nanobatch-only: the pipeline spec's nano-batches on one stream; pipeline: on its "
                        "SM-partitioned execution units (GPU)")
    p.add_argument("--pipeline-spec", default="auto",
                   help="a spec file, a shipped spec's name, or auto: the one `nanoflow tune` saved for this GPU, "
                        "model shape, dtype and budget (else the hand spec for Llama-3-8B shapes, else non-overlap)")
    p.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True,
                   help="share full KV blocks by prefix hash; a cached prefix is not computed again")
    p.add_argument("--kv-offload-gb", type=float, default=0.0,
                   help="host memory (GiB, pinned) for the KV of cached blocks that leave the GPU; 0: off")
    p.add_argument("--tensor-parallel-size", "-tp", type=int, default=1,
                   help="split the model over N ranks (one process each; GPUs on CUDA)")
    p.add_argument("--num-layers", type=int, default=None,
                   help="only the model's first N decoder layers: to benchmark a large shape on fewer GPUs")
    p.add_argument("--seed", type=int, default=0)
    vllm_args.add_args(p, vllm_args.ENGINE)
    p.add_argument("--reasoning-parser", choices=REASONING_PARSERS, default=None,
                   help="a thinking model's format: a request's grammar holds only what follows its reasoning (up to "
                        "</think>), which the server sends apart: deepseek_r1 (the output may start inside the "
                        "reasoning), qwen3 (reasoning only when the output opens with <think>)")


def engine_kwargs(a: argparse.Namespace) -> dict:
    return dict(tokenizer=a.tokenizer, revision=a.revision, tokenizer_revision=a.tokenizer_revision,
                hf_overrides=a.hf_overrides,
                load_format=a.load_format, generation_config=a.generation_config,
                override_generation_config=a.override_generation_config,
                dtype=a.dtype, device=a.device,
                max_model_len=a.max_model_len, max_num_batched_tokens=a.max_num_batched_tokens,
                max_num_seqs=a.max_num_seqs, block_size=a.block_size, num_kv_blocks=a.num_kv_blocks,
                gpu_memory_utilization=a.gpu_memory_utilization, kv_cache_gb=a.kv_cache_gb,
                kv_cache_dtype=a.kv_cache_dtype, admission=a.admission, schedule_policy=a.schedule_policy,
                seed=a.seed, cuda_graph=False if a.enforce_eager else None,
                async_scheduling=a.async_scheduling, mode=a.mode, pipeline_spec=a.pipeline_spec,
                enable_prefix_caching=a.enable_prefix_caching, kv_offload_gb=a.kv_offload_gb,
                tensor_parallel_size=a.tensor_parallel_size, num_layers=a.num_layers,
                reasoning_parser=a.reasoning_parser)


def generate(a: argparse.Namespace) -> int:
    from nanoflow import LLM, SamplingParams
    from nanoflow.tokenizer import read_chat_template
    if a.chat_template is not None and not a.chat:
        raise ValueError("--chat-template is for --chat")
    template = read_chat_template(a.chat_template)  # (before the model loads)
    llm = LLM(a.model, **engine_kwargs(a))
    # each flag given, else the model's generation config (its max_new_tokens a bound, as the engine takes it for
    # max_tokens None), else greedy and 64 tokens
    given = {k: v for k, v in dict(max_tokens=a.max_tokens, temperature=a.temperature, top_p=a.top_p, top_k=a.top_k,
                                   min_p=a.min_p, repetition_penalty=a.repetition_penalty).items() if v is not None}
    model = dict(llm.engine.sampling_defaults)
    if "max_tokens" in model:
        model["max_tokens"] = None
    params = SamplingParams(**dict(max_tokens=64, temperature=0.0) | model | given, seed=a.sample_seed,
                            stop=a.stop or None, ignore_eos=a.ignore_eos)
    prompt = llm.chat_prompt([{"role": "user", "content": a.prompt}], chat_template=template) if a.chat else a.prompt
    shown = 0
    for i, out in enumerate(llm.stream(prompt, params)):
        if i == 0 and not a.chat:  # (once the prompt is accepted: a refused one prints only the error)
            sys.stdout.write(a.prompt)
        text = out.outputs[0].text
        sys.stdout.write(text[shown:])
        sys.stdout.flush()
        shown = len(text)
    sys.stdout.write("\n")
    return 0


def _bench_throughput(a: argparse.Namespace) -> int:
    from nanoflow.bench.throughput import main
    return main(a)


def _bench_schedule(a: argparse.Namespace) -> int:
    from nanoflow.bench.replay import main
    return main(a)


def _bench_plot(a: argparse.Namespace) -> int:
    from nanoflow.bench.plots import check_outputs, throughput_bars
    check_outputs({}, {"-o": a.output})
    throughput_bars(a.reports, a.output)
    return 0


def _serve(a: argparse.Namespace) -> int:
    from nanoflow.entrypoints.server import serve
    if a.model_arg is not None and a.model is not None and a.model_arg != a.model:
        raise ValueError(f"two models given: {a.model_arg!r} and --model {a.model!r}")
    a.model = a.model or a.model_arg or getattr(a, "config_model", None)
    # --api-key takes several keys (as vLLM's), so a MODEL after it is taken for one: refuse rather than serve the
    # default model behind a key that is a path
    for flag, values in (("--api-key", a.api_key), ("--served-model-name", a.served_model_name)):
        if a.model is None and (taken := [v for v in values or [] if os.path.exists(v) or v in PRESETS]):
            raise ValueError(f"{flag} {taken[0]!r} looks like the model: {flag} takes several values, so give MODEL "
                             f"before it (nanoflow serve MODEL {flag} ...) or as --model")
    return serve(a)


def _bench_serve(a: argparse.Namespace) -> int:
    from nanoflow.bench.serve import main
    return main(a)


def _rates(text: str) -> list[float]:
    try:
        return [float(r) for r in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a list of request rates (e.g. 1,2,4,inf)") from None


def _config_defaults(serve: argparse.ArgumentParser, argv: list[str]) -> None:
    """vLLM's `serve --config FILE`: a YAML mapping of serve's long flags (dashes or underscores, without the
    leading --) to values, taken as the flags' defaults, so that the command line's win; `model` is MODEL's."""
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--config")
    path = pre.parse_known_args(argv)[0].config
    if path is None:
        return
    import yaml
    try:
        with open(path) as f:
            given = yaml.safe_load(f)
    except OSError as e:
        raise ValueError(f"--config {path}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise ValueError(f"--config {path} is not YAML: {e}") from None
    if not isinstance(given, dict):
        raise ValueError(f"--config {path} must map flags to values (e.g. `port: 8000`), not hold "
                         f"{type(given).__name__}")
    defaults = {}
    for key, value in given.items():
        flag = "--" + str(key).replace("_", "-")
        action = serve._option_string_actions.get(flag)
        if action is None or flag in ("--config", "--help"):
            raise ValueError(f"--config {path}: {key!r} is not a flag of `nanoflow serve` (see nanoflow serve --help)")
        if flag.startswith("--no-"):  # (its value would read backwards: `no-x: true` is x off)
            raise ValueError(f"--config {path}: {key!r}: write {flag[5:]!r} as true or false")
        if action.nargs == 0:  # a switch: true or false
            if not isinstance(value, bool):
                raise ValueError(f"--config {path}: {key!r} is a switch: true or false, not {value!r}")
            on = action.const if not isinstance(action, argparse.BooleanOptionalAction) else True
            defaults[action.dest] = on if value else (False if on is True else action.default)
        elif value is None:
            raise ValueError(f"--config {path}: {key!r} has no value")
        else:
            many = action.nargs in ("+", "*")
            texts = [json.dumps(v) if isinstance(v, (list, dict)) else str(v)
                     for v in (value if many and isinstance(value, list) else [value])]
            taken = [_config_value(path, key, action, t) for t in texts]
            defaults[action.dest] = taken if many else taken[0]
    if "model" in defaults:  # (the positional MODEL of the command line wins over it too)
        defaults["config_model"], defaults["model"] = defaults["model"], None
    serve.set_defaults(**defaults)


def _config_value(path: str, key, action: argparse.Action, text: str):
    """A --config value as the flag's type and choices take it from the command line."""
    try:
        value = action.type(text) if action.type else text
    except (ValueError, TypeError, argparse.ArgumentTypeError) as e:
        raise ValueError(f"--config {path}: {key!r}: {text!r} is not a valid value"
                         f"{f' ({e})' if isinstance(e, argparse.ArgumentTypeError) else ''}") from None
    if action.choices is not None and value not in action.choices:
        raise ValueError(f"--config {path}: {key!r} must be one of {', '.join(map(str, action.choices))}, "
                         f"not {value!r}")
    return value


# errors of writing the output (a closed pipe, a full disk or quota): a line, not a traceback
WRITE_ERRNOS = (errno.EPIPE, errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("nanoflow")
    except PackageNotFoundError:  # (run from a source tree that was not installed)
        return "(not installed)"


def _reader_gone(stream) -> bool:
    """Whether the pipe a stream writes to has lost its reader (poll's POLLERR on the writing end)."""
    import select
    try:
        poll = select.poll()
        poll.register(stream.fileno(), select.POLLOUT)
        return any(events & select.POLLERR for _, events in poll.poll(0))
    except (AttributeError, OSError, ValueError):  # (no file descriptor, or no poll here)
        return False


def main(argv: list[str] | None = None) -> int:
    parser = _Parser(prog="nanoflow", description=__doc__)
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="generate text for one prompt, streamed to the terminal")
    g.add_argument("prompt")
    add_engine_args(g)
    # (unset: the model's generation config, else greedy and 64 tokens)
    g.add_argument("--max-tokens", type=int, help="default: the generation config's max_new_tokens, else 64")
    g.add_argument("--temperature", type=float, help="default: the generation config's, else 0 (greedy)")
    g.add_argument("--top-p", type=float)
    g.add_argument("--top-k", type=int)
    g.add_argument("--min-p", type=float)
    g.add_argument("--repetition-penalty", type=float)
    g.add_argument("--sample-seed", type=int, default=None, help="per-request sampling seed")
    g.add_argument("--stop", action="append", help="stop string (repeatable)")
    g.add_argument("--ignore-eos", action="store_true")
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    g.add_argument("--chat-template", default=None,
                   help="with --chat: a chat template (a file, or the template itself) in place of the model's")
    g.set_defaults(func=generate)

    s = sub.add_parser("serve", help="OpenAI-compatible HTTP server (/v1/completions, /v1/chat/completions)")
    s.add_argument("model_arg", nargs="?", metavar="MODEL", help="same as --model")
    add_engine_args(s)
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--api-key", nargs="+", default=None,
                   help="required as 'Authorization: Bearer KEY' on /v1 routes; several: any one of them (default: "
                        "$NANOFLOW_API_KEY, else vLLM's $VLLM_API_KEY)")
    s.add_argument("--served-model-name", nargs="+", default=None,
                   help="the model's name in the API, or several (a request may give any; its response names it; "
                        "default: MODEL)")
    s.add_argument("--allowed-origins", type=_json_list, default=["*"],
                   help="CORS: the origins a browser may call the API from, a JSON list (default: any, as vLLM's)")
    s.add_argument("--allowed-methods", type=_json_list, default=["*"], help="CORS: the methods, a JSON list")
    s.add_argument("--allowed-headers", type=_json_list, default=["*"], help="CORS: the request headers, a JSON list")
    s.add_argument("--allow-credentials", action="store_true", help="CORS: browsers may send credentials")
    s.add_argument("--root-path", default="",
                   help="the path prefix under which a proxy serves the API (for its docs' links: FastAPI's root_path)")
    s.add_argument("--disable-log-stats", action="store_true",
                   help="no stats line in the log every 10 s (throughput, requests, KV cache and prefix cache use)")
    s.add_argument("--uvicorn-log-level", default="info",
                   choices=["critical", "error", "warning", "info", "debug", "trace"])
    s.add_argument("--ssl-keyfile", default=None, help="TLS: the server's private key (PEM), with --ssl-certfile")
    s.add_argument("--ssl-certfile", default=None, help="TLS: the server's certificate (PEM): serve HTTPS")
    s.add_argument("--ssl-ca-certs", default=None, help="TLS: the CAs of the clients' certificates")
    s.add_argument("--ssl-cert-reqs", type=int, default=0,
                   help="TLS: whether a client certificate is asked for: 0 no, 1 optional, 2 required")
    s.add_argument("--return-tokens-as-token-ids", action="store_true",
                   help='logprobs name tokens "token_id:ID" (their text may not be valid alone, e.g. part of a '
                        'character); a request\'s return_tokens_as_token_ids overrides it')
    s.add_argument("--enable-request-id-headers", action="store_true",
                   help="each response carries an X-Request-Id header: the request's, else a new one")
    s.add_argument("--enable-server-load-tracking", action="store_true",
                   help="GET /load tells the POST /v1 requests in flight (for a load balancer)")
    s.add_argument("--disable-fastapi-docs", action="store_true",
                   help="no /docs, /redoc or /openapi.json (FastAPI's schema and its pages)")
    s.add_argument("--config", default=None,
                   help="a YAML file of these flags and their values (e.g. `port: 8000`, `max-num-seqs: 256`; "
                        "`model: PATH`): flags given on the command line win over it, as vLLM's")
    s.add_argument("--chat-template", default=None,
                   help="a chat template (a file, or the template itself) in place of the model's, e.g. one that "
                        "renders tools")
    s.add_argument("--default-chat-template-kwargs", type=_json_object, default=None,
                   help="the chat template's variables for every request, a request's chat_template_kwargs over "
                        "them, as vLLM's (e.g. '{\"enable_thinking\": false}')")
    s.add_argument("--chat-template-content-format", choices=CONTENT_FORMATS, default="auto",
                   help="a message's content as the template gets it (vLLM's): a string (OpenAI's text parts joined "
                        "by newlines), or openai's list of text parts; auto: the list for a template that loops over "
                        "a message's content, else the string")
    s.add_argument("--enable-auto-tool-choice", action="store_true",
                   help='tool_choice "auto" (the default with tools): the model calls tools as it sees fit, read back '
                        'from its text by --tool-call-parser')
    s.add_argument("--tool-call-parser", choices=PARSERS, default=None,
                   help="the model's format of tool calls: hermes (<tool_call>{...}</tool_call>: Hermes, Qwen2.5, "
                        "Qwen3), llama3_json (JSON objects: Llama 3.1 / 3.2), mistral ([TOOL_CALLS]...: Mistral), "
                        "pythonic ([f(a=1), ...]: Llama 3.2 / 4), qwen3_coder (<tool_call><function=...> XML: "
                        "Qwen3-Coder)")
    s.add_argument("--enable-prompt-tokens-details", action="store_true",
                   help="each response's usage tells prompt_tokens_details.cached_tokens: its prompt's tokens found in "
                        "the prefix cache")
    s.add_argument("--max-waiting-requests", type=int, default=1024,
                   help="requests without a first token beyond which new ones get 503")
    s.add_argument("--stream-interval", type=int, default=1,
                   help="a streamed request gets its first token at once, then its new tokens once per N (the "
                        "front end's CPU cost is per event: N > 1 trades smoothness for throughput, as SGLang's and "
                        "vLLM's option of that name)")
    s.add_argument("--graceful-shutdown-timeout", type=float, default=30.0,
                   help="seconds that requests in flight get to finish on SIGTERM before they are aborted")
    s.add_argument("--api-server-count", type=int, default=1,
                   help="with --data-parallel-size: K API-server processes (HTTP and routing, each with a router over "
                        "all the replicas) on the same port; one process streams ~8,000 tokens a second")
    s.add_argument("--data-parallel-size", "-dp", type=int, default=None,
                   help="serve N engine replicas (each with its own GPUs: one, or a tensor-parallel group) as Ray "
                        "actors behind one router; 1 is vLLM's default, the engine in-process, unless --ray-address "
                        "is given (--ray-address local: one replica on a new local Ray, a scaling baseline)")
    s.add_argument("--ray-address", default=None,
                   help="the Ray cluster for the replicas: HOST:PORT of its head, or auto: the one `ray start` "
                        "began on this machine (default: that one if there is one, else a new local one)")
    vllm_args.add_args(s, vllm_args.SERVER)
    s.set_defaults(func=_serve)

    bench = sub.add_parser("bench", help="benchmarks").add_subparsers(dest="bench", required=True)
    t = bench.add_parser("throughput", help="offline throughput and %% of the cost model's optimum")
    add_engine_args(t)
    t.add_argument("--workload", action="append",
                   help="const:IN:OUT[:N], trace:splitwise|lmsys|sharegpt[:N] or multiround:TRACE[:N[:ROUNDS]]; "
                        "repeat to run several through one engine (default const:512:128)")
    t.add_argument("--num-requests", type=int, default=None,
                   help="requests per workload without :N (default: 1000 const, or the whole trace)")
    t.add_argument("--baseline", choices=["none", "hf"], default="none",
                   help="hf: also run HF transformers' generate_batch on the same weights")
    t.add_argument("--temperature", type=float, default=1.0)
    t.add_argument("--warmup-requests", type=int, default=16)
    t.add_argument("--breakdown", action="store_true", help="time one iteration op by op (GPU)")
    t.add_argument("--timeline", help="draw one steady-state iteration's nano-ops per execution unit to this PNG "
                                      "(GPU; with each op's time alone at its SM share vs overlapped)")
    t.add_argument("--output", help="write the report as JSON")
    t.set_defaults(func=_bench_throughput)
    sc = bench.add_parser("schedule", help="the scheduler alone over a workload's lengths (no model, no GPU): "
                                            "iterations and tokens per iteration by token budget and policy")
    sc.add_argument("--workload", action="append", required=True,
                    help="const:IN:OUT[:N] or trace:splitwise|lmsys|sharegpt[:N] (not multiround: its turns wait on "
                         "answers)")
    sc.add_argument("--num-requests", type=int, default=None, help="as bench throughput's")
    sc.add_argument("--num-kv-blocks", type=int, required=True, help="the KV blocks (a GPU run prints its count)")
    sc.add_argument("--block-size", type=int, default=16, help="as the GPU run's (it prints its block size)")
    sc.add_argument("--max-num-batched-tokens", type=int, nargs="+", default=[2048], help="budgets to compare")
    sc.add_argument("--schedule-policy", choices=SCHEDULE_POLICIES, nargs="+", default=["fcfs"])
    sc.add_argument("--admission", choices=["kv", "predicted"], default="predicted",
                    help="default: predicted, as the GPU runs it is compared with (the engine's own default is kv)")
    sc.add_argument("--max-num-seqs", type=int, default=MAX_NUM_SEQS)
    sc.add_argument("--max-model-len", type=_tokens, default=32768, help="as the engine's (32k, 32K)")
    sc.add_argument("--seed", type=int, default=0, help="the trace's sample")
    sc.add_argument("--output", help="write the rows as JSON")
    sc.add_argument("--plot", help="draw the iterations per budget and policy (PNG)")
    sc.set_defaults(func=_bench_schedule)
    pl = bench.add_parser("plot", help="draw throughput reports (JSON of bench throughput) as a PNG bar chart")
    pl.add_argument("reports", nargs="+")
    pl.add_argument("-o", "--output", required=True)
    pl.set_defaults(func=_bench_plot)
    bs = bench.add_parser("serve", help="online latency and throughput of a running server (Poisson arrivals)")
    bs.add_argument("--url", default="http://127.0.0.1:8000")
    bs.add_argument("--model", default=None, help="the served model name (default: the server's first model)")
    bs.add_argument("--api-key", default=os.environ.get("NANOFLOW_API_KEY"))
    bs.add_argument("--workload", default="trace:splitwise",
                    help="const:IN:OUT[:N], trace:splitwise|lmsys|sharegpt[:N] or multiround:TRACE[:N[:ROUNDS]]")
    bs.add_argument("--num-requests", type=int, default=1000, help="requests per rate, unless the workload has :N")
    bs.add_argument("--request-rate", type=float, default=float("inf"), help="requests/s (Poisson); inf: all at once")
    bs.add_argument("--sweep", type=_rates, default=None, help="R1,R2,...: one run per request rate")
    bs.add_argument("--max-concurrency", type=int, default=None, help="requests in flight at most")
    bs.add_argument("--vocab-size", type=int, default=32000, help="prompts are random token ids below this")
    bs.add_argument("--temperature", type=float, default=1.0)
    bs.add_argument("--seed", type=int, default=0)
    bs.add_argument("--output", help="write the report as JSON")
    bs.add_argument("--plot", help="draw normalized latency vs achieved throughput, each point its offered rate (PNG)")
    bs.set_defaults(func=_bench_serve)
    from nanoflow.entrypoints import tune
    tune.add_parser(sub)
    words = _dashed(sys.argv[1:] if argv is None else argv)
    if words[:1] == ["serve"]:
        try:
            _config_defaults(s, words[1:])
        except ValueError as e:
            print(f"nanoflow: error: {e}", file=sys.stderr)
            return 2
    a = parser.parse_args(argv)
    if getattr(a, "bench", None) == "throughput" and not a.workload:
        a.workload = ["const:512:128"]
    a.command_line = "nanoflow " + " ".join(sys.argv[1:] if argv is None else argv)
    code = 1
    try:
        vllm_args.take_args(a, vllm_args.ENGINE | vllm_args.SERVER)
        names = ("kv_cache_memory_bytes", "kv_cache_gb", *vllm_args.ROPE, "hf_overrides")
        if given := {k: getattr(a, k) for k in names if hasattr(a, k)}:  # (vLLM's names, as every command's own)
            for k, v in vllm_args.translate(given).items():
                setattr(a, k, v)
        code = a.func(a)
    except (ValueError, TypeError, FileNotFoundError) as e:
        print(f"nanoflow: error: {e}", file=sys.stderr)
        code = 2
    except OSError as e:
        if e.errno not in WRITE_ERRNOS:  # (another cause: its traceback says where)
            raise
        quiet = isinstance(e, BrokenPipeError) and _reader_gone(sys.stdout)  # (| head: quietly, as a shell tool)
        if not quiet:
            print(f"nanoflow: error: {e}", file=sys.stderr)
        code = 141 if quiet else 1
        try:
            sys.stdout.flush()
        except OSError:  # stdout cannot take what it holds: nothing left for the flush at exit to fail on
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except KeyboardInterrupt:  # (Ctrl-C: a line, not the traceback of wherever it landed)
        print("nanoflow: interrupted", file=sys.stderr)
        code = 130
    finally:
        # A tensor-parallel engine the command left running stops here, not at exit: if NCCL's teardown hangs,
        # finalizing the interpreter would abort (SIGABRT) on its thread, so the process then ends by os._exit.
        shutdown_all()
        if group_abandoned():
            if sys.exc_info()[0] is not None:  # (an error on its way out: print it, since nothing else will)
                traceback.print_exc()
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code or 0)
    return code


if __name__ == "__main__":
    sys.exit(main())
