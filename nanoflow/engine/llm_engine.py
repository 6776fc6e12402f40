"""The engine: requests in, one iteration per `step()`, outputs out.

step = schedule (scheduler) -> execute (runner) -> postprocess (tokens, text, stop checks).
"""
from __future__ import annotations

import logging
import numbers
import time
from concurrent.futures import FIRST_COMPLETED, Future, wait
from dataclasses import fields, replace

import torch

from nanoflow.config import EngineConfig, resolve_device, resolve_dtype
from nanoflow.distributed.parallel_state import SINGLE
from nanoflow.distributed.worker import WorkerArgs, Workers, check_size
from nanoflow.engine.detokenizer import detokenize, find_stop, visible_text
from nanoflow.engine.scheduler import Scheduler, SchedulerOutput
from nanoflow.engine.sequence import Request, Sequence, Status
from nanoflow.engine.structured_output import Grammars
from nanoflow.executor.model_runner import ModelOutput, ModelRunner, pipeline_spec
from nanoflow.layers.sampler import LogprobRows
from nanoflow.models.loader import build_model, check_load_format, local_path, read_generation_config, resolve
from nanoflow.outputs import CompletionOutput, Logprob, PositionLogprobs, RequestOutput
from nanoflow.reasoning import END as END_THINK
from nanoflow.reasoning import last_tag, reading, tag_ids
from nanoflow.sampling_params import SamplingParams, integer
from nanoflow.tokenizer import Tokenizer

Prompt = str | list[int] | dict
log = logging.getLogger(__name__)


class LLMEngine:
    def __init__(self, model: str | None = None, *, tokenizer: str | None = None, revision: str | None = None,
                 tokenizer_revision: str | None = None, hf_overrides: dict | None = None, load_format: str = "auto",
                 dtype: str | torch.dtype = "auto", device: str | None = None, generation_config: str = "auto",
                 override_generation_config: dict | None = None, **engine_args):
        if unknown := sorted(set(engine_args) - {f.name for f in fields(EngineConfig)}):
            raise TypeError(f"unknown engine option {unknown[0]!r}; the options are tokenizer, revision, "
                            f"tokenizer_revision, hf_overrides, load_format, dtype, device, generation_config, "
                            f"override_generation_config and "
                            f"{', '.join(f.name for f in fields(EngineConfig))}")
        self.config = EngineConfig(**engine_args)
        if self.config.mode == "non-overlap" and self.config.pipeline_spec != "auto":
            log.warning("pipeline_spec %r is not used: it shapes the modes nanobatch-only and pipeline, and the mode "
                        "is non-overlap", self.config.pipeline_spec)
        self.source = resolve(model, self.config.num_layers, revision, hf_overrides)
        check_load_format(self.source, load_format)
        cfg = self.source.config
        self.model_config = cfg
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device, cfg.torch_dtype)
        # (vLLM's: a tokenizer_revision without a tokenizer is the model's tokenizer at that revision)
        self.tokenizer = self._load_tokenizer(tokenizer or (model if tokenizer_revision else None),
                                              tokenizer_revision)
        eos, self.sampling_defaults = read_generation_config(self.source, generation_config, override_generation_config)
        try:
            self.default_params()
        except (ValueError, TypeError) as e:
            overridden = any(f"{k}=" in str(e) for k in override_generation_config or {})
            where = ("from --override-generation-config" if overridden else
                     "from the model's generation config; --generation-config nanoflow ignores it")
            raise ValueError(f"the generation config's default {e} ({where})") from None
        if self.sampling_defaults:  # (as vLLM says it)
            log.info("default sampling parameters from the model's generation config: %s (generation_config="
                     "'nanoflow', --generation-config nanoflow: nanoflow's defaults)", self.sampling_defaults)
        limit = cfg.context_length
        if self.config.max_model_len is not None and self.config.max_model_len > limit:
            raise ValueError(f"max_model_len {self.config.max_model_len} exceeds the model's context length {limit}")
        self.max_model_len = self.config.max_model_len or limit
        self.workers, tp = None, SINGLE
        tp_size = self.config.tensor_parallel_size
        shard = cfg.shard(tp_size)  # a bad size fails here, before any process starts
        if self.config.mode != "non-overlap":  # a bad spec too, before the weights load
            pipeline_spec(self.config, shard, self.device, self.dtype, tp_size)
        if tp_size > 1:
            check_size(tp_size, self.device.type)
            if self.device.type == "cuda":
                self.device = torch.device("cuda", 0)
            self.workers = Workers(tp_size, WorkerArgs(self.source.path, load_format, self.dtype, self.device.type,
                                                       self.config, self.max_model_len, hf_overrides))
            tp = self.workers.group
        self.eos_token_ids = set(cfg.eos_token_ids) | eos | (self.tokenizer.eos_token_ids if self.tokenizer else set())
        # as vLLM's: the tokenizer's EOS ends a sequence with no stop_reason; the others (the generation config's,
        # the model config's) are stop tokens, reported by id
        self.eos_token_id = self.tokenizer.eos_token_id if self.tokenizer else None
        try:
            model_ = build_model(self.source, load_format, self.dtype, self.device, self.max_model_len,
                                 self.config.seed, tp)
            self.runner = ModelRunner(model_, self.config, self.eos_token_ids, self.max_model_len)
        except BaseException:
            if self.workers is not None:  # they may be waiting in a collective of this rank's that never comes
                self.workers.shutdown(clean=False)
            raise
        self.scheduler = Scheduler(self.config, self.runner.num_blocks, self.runner.max_num_tokens,
                                   self.max_model_len, self.runner.num_host_blocks)
        if (cache := self.runner.num_blocks * self.runner.block_size) < self.max_model_len:
            log.warning("the KV cache holds %d tokens, fewer than max_model_len (%d): a sequence can grow only to "
                        "the cache, and a request whose max_tokens needs more is refused", cache, self.max_model_len)
        self.requests: dict[str, Request] = {}
        # counted as vLLM's metrics count them: a request's prompt when its first token comes, each token sampled
        self.num_prompt_tokens = self.num_generation_tokens = 0
        self.async_scheduling = (self.config.async_scheduling if self.config.async_scheduling is not None
                                 else self.device.type == "cuda")
        self.inflight = None  # (SchedulerOutput, launch) of the iteration whose results are not read yet
        self.grammars: Grammars | None = None  # made at the first request with structured outputs
        self.compiling: list[tuple[Future, Request]] = []  # requests whose grammars compile, outside the scheduler
        # the reasoning's tags as token ids: a grammar holds only what follows the reasoning (reasoning.py)
        self.think_ids = None
        if self.config.reasoning_parser is not None and self.tokenizer is not None:
            self.think_ids = tag_ids(self.tokenizer)

    def lost_workers(self, wait_s: float = 0.0) -> list[str]:
        """The tensor-parallel workers that have exited (given wait_s to finish exiting): the engine can run no
        iteration again."""
        return self.workers.lost(wait_s) if self.workers is not None else []

    def shutdown(self) -> None:
        """Stop the tensor-parallel workers (also done at exit) and the grammars' compile thread."""
        if self.workers is not None:
            self.workers.shutdown()
        if self.grammars is not None:
            self.grammars.pool.shutdown(cancel_futures=True)

    def _load_tokenizer(self, path: str | None, revision: str | None) -> Tokenizer | None:
        if path is not None:
            return Tokenizer.from_dir(local_path(path, revision))
        try:
            if self.source.kind == "gguf":
                return Tokenizer.from_gguf(self.source.gguf_reader)
            if self.source.kind == "hf":
                return Tokenizer.from_dir(self.source.path)
        except FileNotFoundError:
            return None  # token-id prompts only
        return None

    # -- requests --------------------------------------------------------------------------------
    def tokenize(self, prompt: Prompt) -> tuple[str | None, list[int]]:
        """(text or None, token ids). A dict holds 'prompt' (text), 'prompt_token_ids', or both (the ids are what
        runs; the text is the output's prompt, as a rendered chat's)."""
        if isinstance(prompt, dict):
            if extra := set(prompt) - {"prompt", "prompt_token_ids"}:
                raise ValueError(f"a prompt dict takes 'prompt' and / or 'prompt_token_ids', not {sorted(extra)} "
                                 f"(nanoflow serves text-only models)")
            if "prompt_token_ids" in prompt:
                text, ids = prompt.get("prompt"), prompt["prompt_token_ids"]
                if not isinstance(ids, (list, tuple)):
                    raise TypeError(f"a prompt dict's 'prompt_token_ids' must be a list of token ids, got "
                                    f"{type(ids).__name__}")
                return (text if isinstance(text, str) else None), self.tokenize(list(ids))[1]
            if "prompt" not in prompt:
                raise ValueError("a prompt dict needs 'prompt' or 'prompt_token_ids'")
            prompt = prompt["prompt"]
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("this model has no tokenizer: pass token ids, or a tokenizer (tokenizer=PATH; on the "
                                 "command line, --tokenizer PATH)")
            return prompt, self.tokenize(self.tokenizer.encode(prompt))[1]  # (its ids checked as given ones)
        if isinstance(prompt, (list, tuple)):
            if bad := [t for t in prompt if not integer(t)]:
                raise ValueError(f"a prompt's token ids must be integers, got {bad[0]!r} ({type(bad[0]).__name__})")
            if bad := [t for t in prompt if not 0 <= t < self.model_config.vocab_size]:
                raise ValueError(f"prompt token id {bad[0]} is out of range [0, {self.model_config.vocab_size})")
            return None, [int(t) for t in prompt]  # (numpy's integers too)
        raise TypeError(f"a prompt must be a string, a list of token ids or a dict, got {type(prompt).__name__}")

    def default_params(self) -> SamplingParams:
        """What a request without params gets: the model's generation-config defaults, else SamplingParams()'s.
        Its max_new_tokens is a bound (max_tokens None here: see add_request), as on vLLM's server."""
        defaults = dict(self.sampling_defaults)
        if (bound := defaults.pop("max_tokens", None)) is None:
            return SamplingParams(**defaults)
        if not integer(bound) or bound < 1:
            raise ValueError(f"max_new_tokens={bound!r}: must be an integer >= 1")
        return SamplingParams(**defaults, max_tokens=None)

    def add_request(self, request_id: str, prompt: Prompt, params: SamplingParams | None = None,
                    priority: int = 0) -> Request:
        """params None: default_params(). A max_tokens of None runs to the context (or the KV cache), or to the
        model's max_new_tokens where its generation config sets one. priority: with schedule_policy "priority",
        lower first (vLLM's); else it must be 0."""
        if isinstance(priority, bool) or not isinstance(priority, numbers.Integral):
            raise ValueError(f"invalid sampling parameter priority={priority!r}: must be an integer")
        if priority and self.config.schedule_policy != "priority":
            raise ValueError(f"invalid sampling parameter priority={priority}: needs schedule_policy 'priority' "
                             f"(this engine's is {self.config.schedule_policy!r})")
        params = self.default_params() if params is None else params
        if not isinstance(params, SamplingParams):
            raise TypeError(f"params must be SamplingParams, got {type(params).__name__}")
        # the request's own copy (its lists too), validated again: fields set after construction count
        params = replace(params, **{f: list(v) for f in ("stop", "stop_token_ids", "allowed_token_ids")
                                    if isinstance(v := getattr(params, f), (list, tuple))},
                         **({"logit_bias": dict(params.logit_bias)} if params.logit_bias else {}))
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        vocab = self.model_config.vocab_size
        for name in ("stop_token_ids", "logit_bias", "allowed_token_ids"):  # they index the logits
            if any(t >= vocab for t in getattr(params, name) or ()):
                raise ValueError(f"invalid sampling parameter {name}={getattr(params, name)!r}: token ids must be "
                                 f"< {vocab}")
        text, ids = self.tokenize(prompt)
        if not ids:
            raise ValueError("the prompt is empty")
        ids = truncate(ids, params.truncate_prompt_tokens, self.max_model_len)
        room = self.scheduler.check_prompt(len(ids), params.max_tokens)
        most = min(params.max_tokens or self.sampling_defaults.get("max_tokens") or room, room)
        if params.min_tokens > most:
            raise ValueError(f"invalid sampling parameter min_tokens={params.min_tokens}: the request can have at "
                             f"most {most} output tokens (the context, the KV cache or the model's max_new_tokens)")
        if params.stop_strings and self.tokenizer is None:
            raise ValueError("stop strings need the model's tokenizer (pass tokenizer=PATH; stop_token_ids need none)")
        bad_words = self._bad_words_ids(params.bad_words)
        grammar = self._compile(params)  # (last: a request refused after it would leave a compile running)
        req = Request(request_id, text, ids, params, priority)
        req.bad_words_ids = bad_words
        for seq in req.seqs:
            seq.max_tokens = most
        self.requests[request_id] = req
        if grammar is None:
            self.scheduler.add_request(req)
        else:
            self.compiling.append((grammar, req))
        return req

    def _compile(self, params: SamplingParams) -> Future | None:
        """The request's grammar compiling, if it asks for structured outputs (a bad one raises ValueError now)."""
        if params.structured_outputs is None:
            return None
        if self.tokenizer is None:
            raise ValueError("structured outputs need the model's tokenizer (pass tokenizer=PATH)")
        if self.grammars is None:
            self.grammars = Grammars(self.tokenizer, self.model_config.vocab_size, self.eos_token_ids)
        return self.grammars.compile(params.structured_outputs)

    def _schedule_compiled(self) -> list[RequestOutput]:
        """Requests whose grammars have compiled join the scheduler, a matcher for each sequence (those aborted
        meanwhile are gone). With nothing else to run, waits a little for one. Returns the outputs of requests whose
        compile failed (they end with finish_reason "abort")."""
        if not (self.scheduler.has_work or self.inflight):
            wait([f for f, _ in self.compiling], timeout=0.05, return_when=FIRST_COMPLETED)
        outputs, compiling = [], []
        for future, req in self.compiling:
            if not future.done():
                compiling.append((future, req))
            elif self.requests.get(req.request_id) is req:  # (not aborted meanwhile: its id may be a new one's now)
                tag = self.think_ids and last_tag(req.prompt_token_ids, *self.think_ids)
                thinks = self.think_ids is not None and tag != END_THINK
                # qwen3's output reasons only if it opens with <think>: its first token decides (Sequence.opening);
                # after a prompt that opened it, the output starts inside it (read as deepseek_r1's)
                opens = thinks and reading(self.config.reasoning_parser, tag) == "qwen3"
                try:
                    for seq in req.seqs:
                        seq.grammar = self.grammars.matcher(future.result())
                        seq.reasoning, seq.opening = (False, self.think_ids[0][0]) if opens else (thinks, None)
                except Exception:  # (it parsed, so this is xgrammar's failure, not the request's)
                    log.exception("request %s: its grammar did not compile", req.request_id)
                    outputs.append(self.abort_request(req.request_id))
                    continue
                self.scheduler.add_request(req)
        self.compiling = compiling
        return outputs

    def _bad_words_ids(self, words: list[str] | None) -> list[list[int]]:
        """Each word's tokens at the start of a text, and (where they differ, in as many tokens) after a space, as
        vLLM tokenizes them: a word is banned at the start and inside the text."""
        if not words:
            return []
        if self.tokenizer is None:
            raise ValueError("bad_words need the model's tokenizer (pass tokenizer=PATH)")
        ids = []
        for word in words:
            try:
                bare = self.tokenizer.encode(word.lstrip(), add_special_tokens=False)
                spaced = self.tokenizer.encode(" " + word.lstrip(), add_special_tokens=False)
            except ValueError as e:  # (text that is not valid Unicode)
                raise ValueError(f"invalid sampling parameter bad_words={word!r}: {e}") from None
            ids += [bare] + ([spaced] if spaced[0] != bare[0] and len(spaced) == len(bare) else [])
        return ids

    def reset_prefix_cache(self) -> bool:
        """Forget every cached prefix (GPU and host tier), as vLLM's: False, and nothing forgotten, while a
        request holds KV blocks."""
        return self.scheduler.blocks.reset_cache()

    def abort_request(self, request_id: str) -> RequestOutput | None:
        req = self.requests.pop(request_id, None)
        if req is None:
            return None
        for future, compiling in self.compiling:
            if compiling is req:  # (its grammar is not needed now; a compile under way runs to its end)
                future.cancel()
        self.compiling = [(f, r) for f, r in self.compiling if r is not req]
        for seq in req.seqs:
            if seq.status is not Status.FINISHED:
                seq.finish_reason = "abort"
                self.scheduler.finish(seq)
        return self._output(req)

    def has_unfinished_requests(self) -> bool:
        """Whether requests remain (as vLLM's). An in-flight iteration of finished sequences alone does not count:
        the next step reads it back and drops its tokens."""
        return bool(self.requests)

    # -- the iteration ---------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """One iteration. With asynchronous scheduling, iteration i + 1 is scheduled and launched before
        the results of iteration i are read back, so the GPU never waits for the CPU's bookkeeping;
        a sequence that hit EOS in i was already given a token in i + 1, which is dropped."""
        outputs = self._schedule_compiled() if self.compiling else []
        if self.inflight and any(c.seq.needs_last_token for c in self.inflight[0].chunks if c.samples):
            # a grammar's or bad words' next mask needs the token in flight: read that iteration back first
            previous, self.inflight = self.inflight, None
            outputs += self.postprocess(previous[0], self.runner.collect(previous[1]))
        out = self.scheduler.schedule()
        launch = None
        if not out.empty:
            launch = self.runner.launch(out)
            self.scheduler.update(out)
        if not self.async_scheduling:
            return outputs + (self.postprocess(out, self.runner.collect(launch)) if launch else [])
        previous, self.inflight = self.inflight, (out, launch) if launch else None
        return outputs + (self.postprocess(previous[0], self.runner.collect(previous[1])) if previous else [])

    def postprocess(self, out: SchedulerOutput, result: ModelOutput) -> list[RequestOutput]:
        touched: dict[str, Request] = {}
        for i, rows in result.prompt_logprobs.items():
            c = out.chunks[i]
            done = c.seq.request.prompt_logprobs  # entry p: the logprobs of prompt token p; rows continue it
            targets = c.seq.token_ids[len(done):]
            done += [self._position(rows, r, targets[r], c.seq.params.prompt_logprobs, c.seq.params.detokenize)
                     for r in range(len(rows.logprob))]
        sampled = [c for c in out.chunks if c.samples]
        now = time.monotonic()
        for j, (c, token) in enumerate(zip(sampled, result.token_ids)):
            seq = c.seq
            seq.num_inflight -= 1
            if seq.status is Status.FINISHED:  # stopped (or aborted) while this token was being computed
                continue
            req = seq.request
            touched[req.request_id] = req
            if req.first_token_time is None:
                self.num_prompt_tokens += len(req.prompt_token_ids)
            req.first_token_time, req.last_token_time = req.first_token_time or now, now
            seq.token_ids.append(token)
            self.num_generation_tokens += 1
            if seq.opening is not None:  # (qwen3's first token: the opening tag, or the grammar's first token)
                seq.reasoning, seq.opening = token == seq.opening, None
            if seq.reasoning:  # (its grammar starts after the reasoning's end tag, which the grammar never sees)
                end = self.think_ids[1]
                seq.reasoning = seq.token_ids[-len(end):] != end or seq.num_output_tokens < len(end)
            # (its mask allowed only these; past its EOS, with ignore_eos, the matcher has ended and takes none)
            elif seq.grammar is not None and not seq.grammar.is_terminated() and not seq.grammar.accept_token(token):
                log.warning("request %s: token %d does not follow its structured output's grammar", req.request_id,
                            token)
            if seq.logprobs is not None:
                seq.logprobs.append(self._position(result.logprobs, j, token, seq.params.logprobs,
                                                   seq.params.detokenize))
                seq.cumulative_logprob += result.logprobs.logprob[j]
            self._check_stop(seq, token)
        outputs = []
        for req in touched.values():
            outputs.append(self._output(req))
            if req.finished:
                self.requests.pop(req.request_id, None)
        return outputs

    def _check_stop(self, seq: Sequence, token: int) -> None:
        params, n = seq.params, seq.num_output_tokens
        reason = stop = None
        # (the sampler bans them before min_tokens unless nothing else was allowed, as at a grammar's end: they end it)
        if token in self.eos_token_ids and not params.ignore_eos:
            reason, stop = "stop", None if token == self.eos_token_id else token
        elif params.stop_token_ids and token in params.stop_token_ids:
            reason, stop = "stop", token
        # As vLLM's: a stop token's text is left out unless include_stop_str_in_output, and a stop string must
        # reach past the first min_tokens tokens' text (find_stop looks only at matches that reach the new text).
        if self.tokenizer and params.detokenize and (reason is None or params.include_stop_str_in_output):
            delta = detokenize(self.tokenizer, seq)
            if reason is None and n > params.min_tokens and (s := find_stop(seq, len(delta))) is not None:
                reason, stop = "stop", s
        if reason is None and (seq.num_output_tokens >= seq.max_tokens or seq.num_tokens >= self.max_model_len):
            reason = "length"
        if reason is not None:
            seq.finish_reason, seq.stop_reason = reason, stop
            self.scheduler.finish(seq)

    def _position(self, rows: LogprobRows, j: int, target: int, k: int, text: bool) -> PositionLogprobs:
        """Row j as {token id: Logprob}: its top-k tokens and the target token (text: with their decoded strings)."""
        decode = self.tokenizer.decode if self.tokenizer and text else (lambda _: None)
        top = list(zip(rows.top_ids[j][:k], rows.top_logprobs[j][:k]))
        # the target first, as vLLM's; one among the top k ranked by its place there (ties put it anywhere among them)
        rank = next((r + 1 for r, (t, _) in enumerate(top) if t == target), rows.rank[j])
        entry = {target: Logprob(rows.logprob[j], rank, decode(target))}
        entry |= {t: Logprob(v, r + 1, decode(t)) for r, (t, v) in enumerate(top) if t != target}
        return entry

    def _output(self, req: Request) -> RequestOutput:
        outs = []
        for seq in req.seqs:
            done = seq.status is Status.FINISHED
            outs.append(CompletionOutput(
                index=seq.index, text=visible_text(seq, done), token_ids=seq.output_token_ids,
                cumulative_logprob=seq.cumulative_logprob if seq.logprobs is not None else None,
                logprobs=None if seq.logprobs is None else list(seq.logprobs), finish_reason=seq.finish_reason,
                stop_reason=seq.stop_reason))
        metrics = {"arrival_time": req.arrival_time, "first_scheduled_time": req.scheduled_time,
                   "first_token_time": req.first_token_time, "last_token_time": req.last_token_time}
        # (lists copied: an output handed out keeps its step's values while the engine goes on appending; the prompt's
        # logprobs only while they grow)
        prompt_logprobs = req.prompt_logprobs
        if prompt_logprobs is not None and len(prompt_logprobs) < len(req.prompt_token_ids):
            prompt_logprobs = list(prompt_logprobs)
        return RequestOutput(req.request_id, req.prompt, req.prompt_token_ids, outs, prompt_logprobs,
                             req.finished, metrics, req.num_cached_tokens)


def truncate(ids: list[int], k: int | None, max_model_len: int) -> list[int]:
    """A prompt's last k tokens (vLLM's truncate_prompt_tokens; -1: as many as leave room in the context for one
    output token, max_model_len - 1)."""
    if k is None:
        return ids
    if k > max_model_len:
        raise ValueError(f"invalid sampling parameter truncate_prompt_tokens={k}: more than the model's context "
                         f"length, {max_model_len}")
    return ids[max(len(ids) - (max_model_len - 1 if k == -1 else k), 0):]
