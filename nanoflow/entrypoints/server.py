"""`nanoflow serve`: an OpenAI-compatible HTTP server (FastAPI + uvicorn) over an EngineClient: the local
engine (AsyncEngine) or, with --data-parallel-size, replicas on Ray behind a router (dp_router.Router).

POST /v1/completions and /v1/chat/completions (SSE streaming), /v1/responses and /v1/messages over chat, GET
/v1/models, /health, /metrics.
Errors are OpenAI-style bodies {"error": {"message", "type", "param", "code"}}: bad input is a 400 naming
the parameter, an unknown model 404, a bad API key 401, a full waiting queue 503 with Retry-After, as is a
request whose replica died after its output had started (in a stream: an error event).
"""
from __future__ import annotations

import asyncio
import hashlib
import importlib.util
import json
import logging
import os
import re
import resource
import secrets
import signal
import socket
import ssl
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import jinja2
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

import nanoflow
from nanoflow.beam_search import Beams
from nanoflow.engine.llm_engine import LLMEngine, truncate
from nanoflow.entrypoints import openai_protocol as api
from nanoflow.entrypoints.async_engine import (AsyncEngine, ClientDisconnected, EngineClient, EngineLost, Overloaded,
                                               RequestStream, ShuttingDown)
from nanoflow.entrypoints.metrics import Metrics
from nanoflow.entrypoints.messages import ERROR_TYPES as ANTHROPIC_ERRORS
from nanoflow.entrypoints.messages import CountTokensRequest, MessageRenderer, MessagesRequest
from nanoflow.entrypoints.responses import ResponseRenderer, ResponsesRequest
from nanoflow.entrypoints.tool_calls import PARSERS, ToolChoice
from nanoflow.entrypoints.tool_calls import new_id as new_tool_call_id
from nanoflow.executor.model_runner import settle_gc
from nanoflow.models.loader import default_model_path
from nanoflow.outputs import CompletionOutput, Logprob, RequestOutput
from nanoflow.reasoning import ReasoningStream, last_tag, reading, tag_ids
from nanoflow.reasoning import split as split_reasoning
from nanoflow.sampling_params import SamplingParams
from nanoflow.tokenizer import read_chat_template

log = logging.getLogger("nanoflow.server")
LOG_STATS_INTERVAL_S = 10.0  # as vLLM's
RETRY_AFTER_S = 1
ERRORS = {s: {"model": api.ErrorResponse} for s in (400, 401, 404, 503)}


ANTHROPIC = "/v1/messages"  # (Anthropic's Messages API's routes)


class APIError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.headers = status, headers
        self.info = api.ErrorInfo(message=message, type=type, param=param, code=code)

    def response(self, path: str = "") -> JSONResponse:
        """OpenAI's error body; under Anthropic's routes with its "type": "error" and error types (both clients read
        either body)."""
        body = api.ErrorResponse(error=self.info).model_dump()
        if path.startswith(ANTHROPIC):
            kind = ANTHROPIC_ERRORS.get(self.status, ANTHROPIC_ERRORS.get(self.info.type, self.info.type))
            body = {"type": "error", "error": body["error"] | {"type": kind}}
        return JSONResponse(body, self.status, self.headers)


def _bad_input(e: Exception, param: str | None = None) -> APIError:
    """A ValueError / TypeError of SamplingParams or the engine: a 400 naming the parameter it is about."""
    m = re.match(r"invalid (?:sampling|beam search) parameter (\w+)", str(e))
    return APIError(400, str(e), param=m.group(1) if m else param)


def _unavailable(e: Overloaded) -> APIError:
    """503, retry later: a full queue, no engine running, or the replica serving the request died."""
    return APIError(503, f"{e}; retry later", type="service_unavailable" if isinstance(e, EngineLost) else
                    "server_overloaded", headers={"Retry-After": str(RETRY_AFTER_S)})


class _Gate:
    """Plain ASGI middleware (so streaming and disconnects pass untouched): the API keys of /v1 routes (any one of
    them, after a Bearer scheme in any case, as vLLM's; on Anthropic's routes also as x-api-key), the count of their
    responses by status, and with request_id_headers each response's X-Request-Id: the request's, else a new one
    (vLLM's --enable-request-id-headers); with load, the POST /v1 requests in flight, their responses not yet ended
    (vLLM's --enable-server-load-tracking, read at GET /load)."""

    def __init__(self, app, api_keys: list[str], metrics: Metrics, request_id_headers: bool = False,
                 load: list[int] | None = None):
        self.app, self.metrics, self.request_id_headers, self.load = app, metrics, request_id_headers, load
        self.keys = [hashlib.sha256(k.encode()).digest() for k in api_keys]

    def _authorized(self, headers: dict, path: str) -> bool:
        scheme, _, key = headers.get(b"authorization", b"").partition(b" ")
        given = [key] if scheme.lower() == b"bearer" else []
        if path.startswith(ANTHROPIC) and b"x-api-key" in headers:  # (Anthropic's clients send the key so, or both)
            given.append(headers[b"x-api-key"])
        # digests of one length, every key compared: the time taken tells neither a key's length nor which one
        # nearly matched
        digests = [hashlib.sha256(g).digest() for g in given]
        return sum(secrets.compare_digest(d, k) for d in digests for k in self.keys) > 0

    async def __call__(self, scope, receive, send):
        # the route's path: under --root-path, uvicorn passes the root path's prefix in scope["path"] too
        path, root = scope.get("path", ""), scope.get("root_path", "")
        if root and path.startswith(root):
            path = path[len(root):]
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        if self.request_id_headers:
            send = self._with_request_id(send, headers.get(b"x-request-id") or uuid.uuid4().hex.encode())
        if not path.startswith("/v1"):
            return await self.app(scope, receive, send)
        if self.keys and not self._authorized(headers, path):
            self.metrics.responses.labels("401").inc()
            error = APIError(401, "invalid or missing API key (Authorization: Bearer KEY)",
                             type="authentication_error", code="invalid_api_key")
            return await error.response(path)(scope, receive, send)

        async def counted(message):
            if message["type"] == "http.response.start":
                self.metrics.responses.labels(str(message["status"])).inc()
            await send(message)

        tracked = self.load is not None and scope.get("method") == "POST"
        if tracked:
            self.load[0] += 1
        try:  # (the app returns once the response, a stream's too, has ended)
            await self.app(scope, receive, counted)
        except Exception:  # answered with a 500 by the outermost middleware
            self.metrics.responses.labels("500").inc()
            raise
        finally:
            if tracked:
                self.load[0] -= 1

    @staticmethod
    def _with_request_id(send, request_id: bytes):
        async def sent(message):
            if message["type"] == "http.response.start":
                message = message | {"headers": [*message.get("headers", []), (b"x-request-id", request_id)]}
            await send(message)
        return sent


def _request_id(raw: Request, req) -> str | None:
    """The id a client gave its request, as vLLM takes it: an X-Request-Id header, else the body's request_id. It
    names the response; the engine's requests keep ids of their own (two clients may give the same)."""
    return raw.headers.get("x-request-id") or req.request_id


async def _disconnected(raw: Request) -> None:
    """Returns when the client has gone (the body is read by then, so only a disconnect can come)."""
    while (await raw.receive())["type"] != "http.disconnect":
        pass


class _Progress:
    """How much of one choice has been sent (a stream sends only what is new)."""
    __slots__ = ("chars", "done", "offset", "started", "tokens")

    def __init__(self):
        self.chars = self.tokens = self.offset = 0  # offset: text_offset of the next token's logprobs
        self.started = self.done = False


def _logprob(entry: Logprob) -> float:
    """As vLLM's: at least -9999.0, for JSON (a grammar's masked tokens have -inf)."""
    return max(entry.logprob, -9999.0)


def _token_str(entry: Logprob | None, token_id: int, as_id: bool = False, tokenizer=None) -> str:
    """A logprobs entry's token: its text, or (as_id: vLLM's --return-tokens-as-token-ids, for tokens whose text is
    not valid on its own, e.g. part of a character) "token_id:ID". An entry-less position's text by the tokenizer."""
    if entry is None and not as_id:
        return tokenizer.decode(token_id)
    return f"token_id:{token_id}" if as_id or entry.decoded_token is None else entry.decoded_token


def _completion_logprobs(token_ids: list[int], positions: list, k: int, p: _Progress, tokenizer=None,
                         lp: api.CompletionLogprobs | None = None, as_ids: bool = False) -> api.CompletionLogprobs:
    """Tokens and their positions' logprobs appended to lp: each token's, and its top k with it. A position
    without logprobs (an echoed prompt's first) has nulls, its token named by the tokenizer. as_ids: tokens as
    "token_id:ID"."""
    lp = lp or api.CompletionLogprobs(tokens=[], token_logprobs=[], top_logprobs=[], text_offset=[])
    for tid, pos in zip(token_ids, positions):
        tok = _token_str(pos[tid] if pos else None, tid, as_ids, tokenizer)
        lp.tokens.append(tok)
        lp.token_logprobs.append(_logprob(pos[tid]) if pos else None)
        ranked = sorted(pos.items(), key=lambda item: item[1].rank)[:k] if pos else []
        lp.top_logprobs.append({tok: _logprob(pos[tid])} | {_token_str(e, t, as_ids): _logprob(e) for t, e in ranked}
                               if pos else None)
        lp.text_offset.append(p.offset)
        p.offset += len(tok)
    return lp


def _chat_logprobs(c: CompletionOutput, start: int, k: int, as_ids: bool = False) -> api.ChatLogprobs:
    def top(entry: Logprob, t: int) -> api.TopLogprob:
        s = _token_str(entry, t, as_ids)
        return api.TopLogprob(token=s, logprob=_logprob(entry), bytes=list(s.encode()))

    content = []
    for tid, pos in zip(c.token_ids[start:], c.logprobs[start:]):
        # the position's entries: the sampled token, then the top k (the sampled one among them or not)
        ranked = sorted(pos.items(), key=lambda item: item[1].rank)[:k]
        content.append(api.TokenLogprob(**top(pos[tid], tid).model_dump(), top_logprobs=[top(e, t) for t, e in ranked]))
    return api.ChatLogprobs(content=content)


def _prompt_logprobs(out: RequestOutput) -> list | None:
    if out.prompt_logprobs is None:
        return None
    return [None if pos is None else {t: api.PromptLogprob(logprob=e.logprob, rank=e.rank,
                                                           decoded_token=e.decoded_token) for t, e in pos.items()}
            for pos in out.prompt_logprobs]


def _advance(c: CompletionOutput, p: _Progress) -> tuple[str, int, bool] | None:
    """(new text, index of the first new token, first piece of the choice), or None if nothing is new."""
    if p.done or (len(c.text) == p.chars and len(c.token_ids) == p.tokens and not c.finished()):
        return None
    text, start, first = c.text[p.chars:], p.tokens, not p.started
    p.chars, p.tokens, p.started, p.done = len(c.text), len(c.token_ids), True, c.finished()
    return text, start, first


def _event(body: BaseModel) -> str:
    return f"data: {body.model_dump_json()}\n\n"


def _usage(prompt_tokens: int, progress: list[_Progress], cached: int | None = None) -> api.Usage:
    """The request's, or with one choice's progress that choice's (vLLM's continuous usage). cached: the prompt
    tokens the prefix cache held, for prompt_tokens_details (None: not sent)."""
    completion = sum(p.tokens for p in progress)
    return api.Usage(prompt_tokens=prompt_tokens, completion_tokens=completion, total_tokens=prompt_tokens + completion,
                     prompt_tokens_details=None if cached is None else api.PromptTokensDetails(cached_tokens=cached))


class _Finished:
    """Outputs already complete (a beam search's), read as a RequestStream's: (prompt index, output)."""

    def __init__(self, outputs: list[RequestOutput]):
        self.id, self.outputs = uuid.uuid4().hex, outputs

    async def __aiter__(self):
        for i, out in enumerate(self.outputs):
            yield i, out

    def close(self) -> None:
        pass


async def _finals(stream: RequestStream | _Finished) -> dict[int, RequestOutput]:
    """The stream read to its end (then closed): each prompt's last, finished output."""
    final = {}
    try:
        async for i, out in stream:
            final[i] = out
    finally:
        stream.close()
    return final


async def _sse(stream: RequestStream | _Finished, chunks: AsyncIterator,
               renderer: ResponseRenderer | MessageRenderer | None = None) -> AsyncIterator[str]:
    """Server-sent events of the chunks, then [DONE]; an engine failure ends the stream with an error event. With a
    renderer (the Responses API's, the Messages API's), the chunks are its events, each sent under its type's name,
    and no [DONE] (as OpenAI's and Anthropic's)."""
    def failed(info: api.ErrorInfo) -> str:
        return _named(renderer.error(info)) if renderer else _event(api.ErrorResponse(error=info))
    try:
        async for chunk in chunks:
            yield _named(chunk) if renderer else _event(chunk)
    except ClientDisconnected:
        return
    except Overloaded as e:
        yield failed(_unavailable(e).info)
    except Exception as e:
        log.exception("stream failed")
        yield failed(api.ErrorInfo(message=f"internal error: {e}", type="internal_error"))
    finally:
        stream.close()
    if not renderer:
        yield "data: [DONE]\n\n"


def _named(event: dict) -> str:
    return f"event: {event['type']}\ndata: {json.dumps(event, ensure_ascii=False)}\n\n"


def build_app(engine: EngineClient, model_name: str | list[str], api_key: str | list[str] | None = None,
              tool_parser: str | None = None,
              chat_template: str | None = None, reasoning_parser: str | None = None,
              prompt_tokens_details: bool = False, cors: dict | None = None,
              log_stats_interval: float | None = None, docs: bool = True,
              request_id_headers: bool = False, tokens_as_ids: bool = False, load_tracking: bool = False,
              content_format: str = "auto", chat_template_kwargs: dict | None = None) -> FastAPI:
    """tool_parser: the calls format read back under tool_choice "auto" (tool_calls.PARSERS; None: "auto" is
    refused, as vLLM's without --enable-auto-tool-choice); chat_template: one in place of the model's;
    reasoning_parser: how a thinking model's reasoning is told from its content (config.REASONING_PARSERS);
    prompt_tokens_details: each usage tells the prompt's tokens found in the prefix cache; cors: Starlette
    CORSMiddleware's arguments (None: no CORS headers), outside the API key's check, so that a browser's
    preflight needs no key; log_stats_interval: seconds between the logged stats lines (vLLM's; None: none);
    docs: FastAPI's /docs, /redoc and /openapi.json (vLLM's --disable-fastapi-docs turns them off);
    api_key: one, or several (a request gives any one); request_id_headers: each response's X-Request-Id header;
    tokens_as_ids: logprobs name tokens "token_id:ID" unless a request says otherwise (return_tokens_as_token_ids);
    load_tracking: GET /load tells the POST /v1 requests in flight (vLLM's --enable-server-load-tracking; else 0);
    content_format: a message's content as the chat template gets it (Tokenizer.render_chat's);
    chat_template_kwargs: the template's variables for every request, a request's own over them (vLLM's
    --default-chat-template-kwargs, e.g. {"enable_thinking": false}).
    model_name: the model's name in the API, or several (as vLLM's --served-model-name): a request may name any, and
    its response names the one it named (the first, if none)."""
    names = [model_name] if isinstance(model_name, str) else list(model_name)
    metrics = engine.metrics
    # Tokenizing here keeps that work off the engine thread; HF tokenizers' encode is safe across threads.
    tokenizer = engine.tokenizer
    think_ids = tag_ids(tokenizer) if reasoning_parser and tokenizer is not None else None
    started = int(time.time())

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        engine.start()
        stats = asyncio.ensure_future(log_stats(log_stats_interval)) if log_stats_interval else None
        yield
        if stats is not None:
            stats.cancel()
        engine.stop()

    async def log_stats(interval: float) -> None:
        since: dict[str, float] = {}
        while True:
            await asyncio.sleep(interval)
            if line := metrics.stats_line(since, interval):
                log.info(line)

    app = FastAPI(title="nanoflow", summary="OpenAI-compatible API", lifespan=lifespan,
                  **({} if docs else dict(docs_url=None, redoc_url=None, openapi_url=None)))
    load = [0] if load_tracking else None  # (the gate counts, /load reads)
    app.add_middleware(_Gate, api_keys=_checked_keys(api_key), metrics=metrics, request_id_headers=request_id_headers,
                       load=load)
    if cors is not None:  # (added last: the outermost)
        app.add_middleware(CORSMiddleware, **cors)
    app.state.engine = engine

    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError):
        return e.response(request.url.path)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, e: RequestValidationError):
        errors = e.errors()
        messages, param = [], None
        for err in errors[:3]:
            loc = [str(x) for x in err["loc"][1:]]  # [0] is "body"
            if err["type"] == "json_invalid":
                messages.append(f"malformed JSON body: {err.get('ctx', {}).get('error', err['msg'])}")
                continue
            param = param or (loc[0] if loc else err.get("ctx", {}).get("param"))
            if loc:
                messages.append(f"{'.'.join(loc)}: {err['msg']}")
            elif param:  # a check of the whole body, naming its field
                messages.append(err["msg"])
            else:
                messages.append(f"the body must be a JSON object sent as application/json ({err['msg']})")
        return APIError(400, "; ".join(messages), param=param).response(request.url.path)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException):
        return APIError(e.status_code, str(e.detail), headers=e.headers).response(request.url.path)

    @app.exception_handler(Overloaded)
    async def unavailable(request: Request, e: Overloaded):
        return _unavailable(e).response(request.url.path)

    @app.exception_handler(ClientDisconnected)
    async def client_gone(_, e: ClientDisconnected):
        return Response(status_code=499)  # nobody reads it; the status shows in the metrics

    @app.exception_handler(Exception)
    async def internal_error(request: Request, e: Exception):
        log.exception("internal error")
        return APIError(500, f"internal error: {e}", type="internal_error").response(request.url.path)

    def as_ids(req: api.CompletionRequest | api.ChatCompletionRequest) -> bool:
        """Whether its logprobs name tokens "token_id:ID": the request's choice, else the server's."""
        given = req.return_tokens_as_token_ids
        return tokens_as_ids if given is None else given

    def check_model(name: str | None) -> str:
        """The served name a request gives (an empty one is the first, as vLLM's)."""
        if name and name not in names:
            raise APIError(404, f"the model {name!r} does not exist; this server serves "
                           f"{' or '.join(map(repr, names))}", param="model", code="model_not_found")
        return name or names[0]

    async def encode(text: str, add_special_tokens: bool = True, param: str = "prompt") -> list[int]:
        """On a thread of its own (as vLLM's): a large prompt took seconds on the event loop, every stream stalled."""
        if tokenizer is None:
            raise APIError(400, "this model has no tokenizer: send the prompt as token ids", param=param)
        try:
            return await asyncio.to_thread(tokenizer.encode, text, add_special_tokens)
        except ValueError as e:  # (text that is not valid Unicode)
            raise APIError(400, f"{param}: {e}", param=param) from None

    def cached_tokens(outs) -> int | None:
        """The prompts' tokens found in the prefix cache, if usage is to tell them."""
        return sum(out.num_cached_tokens or 0 for out in outs) if prompt_tokens_details else None

    def sampling_params(req: api.CompletionRequest | api.ChatCompletionRequest, *tools) -> SamplingParams:
        try:
            return req.sampling_params(engine.sampling_defaults, *tools)
        except (ValueError, TypeError) as e:
            raise _bad_input(e) from None

    def truncated(prompts: list[list[int]], params: SamplingParams) -> list[list[int]]:
        """The prompts as the engine takes them (truncate_prompt_tokens: their last k tokens), for the usage and the
        context's check."""
        try:
            return [truncate(p, params.truncate_prompt_tokens, engine.max_model_len) for p in prompts]
        except ValueError as e:
            raise _bad_input(e) from None

    def tool_choice(req: api.ChatCompletionRequest) -> ToolChoice:
        try:
            return req.tool_choice_for(tool_parser)
        except ValueError as e:
            raise _bad_input(e) from None

    def check_room(prompts: list[list[int]], max_tokens: int | None, limit: str) -> None:
        """limit: the request's field that gave max_tokens (chat's max_completion_tokens, or max_tokens)."""
        longest = max(map(len, prompts))  # (one that leaves no room at all is the engine's to refuse, as the prompt)
        if max_tokens is not None and longest + max_tokens > engine.max_model_len > longest:
            raise APIError(400, f"the model's context length is {engine.max_model_len} tokens, and this request asks "
                           f"for {longest + max_tokens}: {longest} in the prompt and {max_tokens} to generate; "
                           f"shorten the prompt or lower {limit}", param=limit)

    async def submit(prompts: list[list[int]], params: SamplingParams, raw: Request, param: str,
                     grammar_source: str | None, priority: int, limit: str = "max_tokens") -> RequestStream:
        """grammar_source: the request's field its grammar came from, which names the grammar's errors; limit:
        check_room's."""
        check_room(prompts, params.max_tokens, limit)
        try:
            return await engine.submit(prompts, params, lambda: _disconnected(raw), priority=priority)
        except (ValueError, TypeError) as e:
            if grammar_source not in (None, "structured_outputs"):  # a grammar refused: named as sent
                e = ValueError(re.sub(r"structured_outputs(\.\w+)?", grammar_source, str(e), count=1))
            raise _bad_input(e, param) from None

    async def search(prompts: list[list[int]], params: SamplingParams, req: api.CompletionRequest |
                     api.ChatCompletionRequest, raw: Request, param: str, limit: str = "max_tokens") -> _Finished:
        """use_beam_search: the search's steps through the engine (each live beam a one-token request), then
        every prompt's beams as the outputs of one finished request (params: the request's, for max_tokens,
        ignore_eos, logprobs and skip_special_tokens). Without max_tokens each beam may run to the context's end.
        Each step's requests count against --max-waiting-requests: a busy server may answer a later step with 503."""
        check_room(prompts, params.max_tokens, limit)
        try:  # (a prompt with no room left: the engine refuses it, by name, at the first step)
            beam = req.beam_search_params(params.max_tokens or max(engine.max_model_len - min(map(len, prompts)), 1),
                                          params.ignore_eos)
        except ValueError as e:
            raise _bad_input(e) from None
        if len(prompts) * beam.beam_width > engine.max_waiting:
            raise APIError(400, f"{len(prompts)} prompts of {beam.beam_width} beams are more requests than the server "
                           f"queues (--max-waiting-requests {engine.max_waiting}): each step runs every beam as a "
                           f"request", param="n")
        beams = Beams(prompts, beam, engine.eos_token_ids, engine.max_model_len, params.logprobs or 0)
        while not beams.done:
            step = beams.requests()
            try:
                outs = await _finals(await submit(step, beams.step_params, raw, param, None, req.priority))
            except ShuttingDown:  # (between two steps: the search ends as its requests would, aborted)
                if not beams.steps:
                    raise
                beams.abort()
                break
            beams.advance([outs[i] for i in range(len(step))])
        decode = (lambda ids: tokenizer.decode(ids, params.skip_special_tokens)) if tokenizer else None
        return _Finished([RequestOutput(
            f"beam-{i}", None, prompt, [CompletionOutput(j, s.text or "", s.tokens[len(prompt):], s.cum_logprob,
                                                         s.logprobs if params.logprobs is not None else None,
                                                         s.finish_reason, s.stop_reason)
                                        for j, s in enumerate(result.sequences)], finished=True)
            for i, (prompt, result) in enumerate(zip(prompts, beams.results(decode)))])

    @app.get("/health")
    @app.api_route("/ping", methods=["GET", "POST"], include_in_schema=False)  # (SageMaker's, as vLLM's)
    async def health():
        if not engine.alive:
            raise APIError(503, "the engine is not running", type="internal_error")
        return Response(status_code=200)  # (no body, as vLLM's)

    @app.get("/version")
    async def version():
        return {"version": nanoflow.__version__}

    @app.get("/load")
    async def server_load():
        """(vLLM's, for load balancers: 0 unless --enable-server-load-tracking)"""
        return {"server_load": load[0] if load else 0}

    @app.get("/metrics", response_class=Response)
    async def prometheus():
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    async def chat_prompt(req: api.ChatCompletionRequest | api.TokenizeRequest, add_special_tokens=False
                          ) -> list[int]:
        """The messages through the model's chat template, encoded (the template writes its own special tokens);
        off the event loop, as encode."""
        if tokenizer is None:
            raise APIError(400, "this model has no tokenizer, hence no chat template", param="messages")
        try:
            text = await asyncio.to_thread(
                tokenizer.render_chat, [m.for_template() for m in req.messages], req.add_generation_prompt,
                chat_template, req.continue_final_message,
                {**(chat_template_kwargs or {}), **(req.chat_template_kwargs or {})}, api.template_tools(req.tools),
                content_format)
        except (ValueError, TypeError, jinja2.TemplateError) as e:
            if str(e).startswith("continue_final_message"):  # (the two options, given or as template variables)
                raise APIError(400, str(e), param="continue_final_message") from None
            raise APIError(400, f"the messages do not fit the model's chat template: {e}", param="messages") from None
        return await encode(text, add_special_tokens, "messages")

    def card(name: str) -> api.ModelCard:
        return api.ModelCard(id=name, created=started, root=engine.model_path, max_model_len=engine.max_model_len)

    @app.get("/v1/models", response_model=api.ModelList, responses=ERRORS)
    async def models():
        return api.ModelList(data=[card(n) for n in names])

    @app.get("/v1/models/{model:path}", response_model=api.ModelCard, responses=ERRORS)
    async def model(model: str):
        return card(check_model(model))

    @app.post("/tokenize", response_model=api.TokenizeResponse, responses=ERRORS)
    async def tokenize(req: api.TokenizeRequest):
        """As vLLM's: the ids a completion (prompt) or chat (messages) request would send to the model."""
        check_model(req.model)
        if req.prompt is not None:
            tokens = await encode(req.prompt, req.add_special_tokens is not False)
        else:
            tokens = await chat_prompt(req, bool(req.add_special_tokens))
        return api.TokenizeResponse(count=len(tokens), max_model_len=engine.max_model_len, tokens=tokens,
                                    token_strs=[tokenizer.piece(t) for t in tokens] if req.return_token_strs else None)

    @app.post("/detokenize", response_model=api.DetokenizeResponse, responses=ERRORS)
    async def detokenize(req: api.DetokenizeRequest):
        check_model(req.model)
        if tokenizer is None:
            raise APIError(400, "this model has no tokenizer", param="tokens")
        if bad := [t for t in req.tokens if not 0 <= t < tokenizer.vocab_size]:
            raise APIError(400, f"token id {bad[0]} is out of the vocabulary's range [0, {tokenizer.vocab_size})",
                           param="tokens")
        return api.DetokenizeResponse(prompt=tokenizer.decode(req.tokens, skip_special_tokens=False))

    @app.post("/v1/completions", response_model=api.CompletionResponse, responses=ERRORS)
    async def completions(req: api.CompletionRequest, raw: Request):
        served = check_model(req.model)
        params = sampling_params(req)
        p = req.prompt
        if not p:
            raise APIError(400, "the prompt is empty", param="prompt")
        texts = [p] if isinstance(p, str) else p if isinstance(p[0], str) else None
        prompts = truncated([await encode(x) for x in texts] if texts else [p] if isinstance(p[0], int) else p,
                            params)
        if req.echo and (texts is None or params.truncate_prompt_tokens is not None):  # ids echo as their text
            if tokenizer is None:
                raise APIError(400, "echo of token ids needs a tokenizer, and this model has none", param="echo")
            texts = [tokenizer.decode(ids, skip_special_tokens=False) for ids in prompts]
        stream = await (search(prompts, params, req, raw, "prompt") if req.use_beam_search else
                        submit(prompts, params, raw, "prompt", next(iter(req.grammar_sources), None), req.priority))
        head = dict(id=f"cmpl-{_request_id(raw, req) or stream.id}", created=int(time.time()), model=served)
        progress = [_Progress() for _ in range(len(prompts) * params.n)]
        k, by_id = params.logprobs, as_ids(req)

        def choices(i: int, out: RequestOutput) -> list[api.CompletionChoice]:
            new = []
            for c in out.outputs:
                p = progress[i * params.n + c.index]
                if (piece := _advance(c, p)) is None:
                    continue
                text, start, first = piece
                lp = None
                if req.echo and first:  # the prompt first (alone with max_tokens 0: its computed token dropped)
                    text = texts[i] + ("" if req.echo_only else text)
                    if k is not None:
                        lp = _completion_logprobs(out.prompt_token_ids, out.prompt_logprobs, k, p, tokenizer,
                                                  as_ids=by_id)
                if req.echo_only:
                    p.tokens = 0
                elif k is not None:
                    lp = _completion_logprobs(c.token_ids[start:], c.logprobs[start:], k, p, lp=lp, as_ids=by_id)
                new.append(api.CompletionChoice(
                    index=i * params.n + c.index, text=text, finish_reason=c.finish_reason, stop_reason=c.stop_reason,
                    logprobs=lp, prompt_logprobs=_prompt_logprobs(out) if first else None))
            return new

        if req.stream:
            async def chunks():
                last = {}
                async for i, out in stream:
                    last[i] = out
                    for choice in choices(i, out):  # one a chunk, as OpenAI's and vLLM's
                        usage = (_usage(len(prompts[i]), [progress[choice.index]], cached_tokens([out]))
                                 if req.continuous_usage else None)
                        yield api.CompletionResponse(**head, choices=[choice], usage=usage)
                if req.include_usage:
                    usage = _usage(sum(map(len, prompts)), progress, cached_tokens(last.values()))
                    yield api.CompletionResponse(**head, choices=[], usage=usage)
            return StreamingResponse(_sse(stream, chunks()), media_type="text/event-stream")
        final = await _finals(stream)
        merged = sorted((c for i, out in final.items() for c in choices(i, out)), key=lambda c: c.index)
        return api.CompletionResponse(**head, choices=merged, usage=_usage(sum(map(len, prompts)), progress,
                                                                          cached_tokens(final.values())))

    @app.post("/v1/chat/completions", response_model=api.ChatCompletionResponse, responses=ERRORS)
    async def chat_completions(req: api.ChatCompletionRequest, raw: Request):
        result = await chat(req, raw)
        return StreamingResponse(_sse(*result), media_type="text/event-stream") if req.stream else result

    async def over_chat(req: ResponsesRequest | MessagesRequest, raw: Request,
                        render: Callable[[str, str], ResponseRenderer | MessageRenderer]):
        """Another API's request answered by the chat completion it stands for (req.as_chat()): render(model, id)
        gives it whole, or its chunks as the API's events. Errors name fields as the API does (req.RENAMED)."""
        try:
            as_chat = req.as_chat()
        except ValueError as e:
            raise _bad_input(e) from None
        try:
            result = await chat(as_chat, raw)
        except APIError as e:
            e.info.message, e.info.param = api.renamed(e.info.message, req.RENAMED), e.info.param and api.renamed(
                e.info.param, req.RENAMED)
            raise
        stream, chunks = result if req.stream else (None, None)
        # (the chat completion's id, as vLLM's: a client's request id, else the engine's)
        renderer = render(check_model(req.model), _request_id(raw, as_chat) or (
            stream.id if stream else result.id.removeprefix("chatcmpl-")))
        if not req.stream:
            return renderer.whole(result)
        return StreamingResponse(_sse(stream, renderer.events(chunks), renderer), media_type="text/event-stream")

    @app.post("/v1/responses", responses=ERRORS)
    async def responses(req: ResponsesRequest, raw: Request):
        """OpenAI's Responses API (nanoflow.entrypoints.responses)."""
        def count(text: str) -> int:  # (the reasoning's tokens, for the usage)
            return len(tokenizer.encode(text, False))
        return await over_chat(req, raw, lambda model, rid: ResponseRenderer(req, model, rid, count))

    @app.post(ANTHROPIC, responses=ERRORS)
    async def messages(req: MessagesRequest, raw: Request):
        """Anthropic's Messages API (nanoflow.entrypoints.messages)."""
        return await over_chat(req, raw, MessageRenderer)

    @app.post(f"{ANTHROPIC}/count_tokens", responses=ERRORS)
    async def count_tokens(req: CountTokensRequest):
        """The input tokens the same message request would take (its prompt through the chat template)."""
        check_model(req.model)
        try:
            as_chat = req.as_chat(stream=False)
        except ValueError as e:
            raise _bad_input(e) from None
        return {"input_tokens": len(await chat_prompt(as_chat))}

    async def chat(req: api.ChatCompletionRequest, raw: Request):
        """The chat completion, or with req.stream (its RequestStream, its chunks)."""
        served = check_model(req.model)
        tools = tool_choice(req)
        params = sampling_params(req, tools)
        prompt, = truncated([await chat_prompt(req)], params)
        grammar_source = "tools" if tools.mode in ("named", "required") else next(iter(req.grammar_sources), None)
        limit = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
        stream = await (search([prompt], params, req, raw, "messages", limit) if req.use_beam_search else
                        submit([prompt], params, raw, "messages", grammar_source, req.priority, limit))
        head = dict(id=f"chatcmpl-{_request_id(raw, req) or stream.id}", created=int(time.time()), model=served)
        progress = [_Progress() for _ in range(params.n)]
        # (qwen3 after a prompt that opened <think>: read as deepseek_r1, as the engine's grammar waits for it)
        parser = reading(reasoning_parser, last_tag(prompt, *think_ids)) if think_ids else reasoning_parser

        by_id = as_ids(req)
        echo = req.echoed()

        def logprobs(c: CompletionOutput, start: int) -> api.ChatLogprobs | None:
            return _chat_logprobs(c, start, params.logprobs, by_id) if c.logprobs is not None else None

        if req.stream:
            async def chunks():
                sent_prompt, out = False, None
                streams = [(ReasoningStream(parser) if parser else None, tools.stream())
                           for _ in range(params.n)]
                async for _, out in stream:
                    for c in out.outputs:  # one choice a chunk, as OpenAI's and vLLM's
                        if (piece := _advance(c, progress[c.index])) is None:
                            continue
                        _, start, first = piece
                        done = c.finished()
                        thought, said = (streams[c.index][0].step(c.text, done) if parser
                                         else (None, c.text))
                        thought = thought if req.include_reasoning else None
                        content, calls = streams[c.index][1].step(said, done) if said is not None else (None, [])
                        lp = logprobs(c, start)
                        if first:  # a choice opens with its role alone, as vLLM's (a client's stream helper takes
                            # a choice's first chunk whole, then adds its logprobs again)
                            usage = (_usage(len(prompt), [_Progress()], cached_tokens([out]))
                                     if req.continuous_usage else None)
                            yield api.ChatCompletionChunk(
                                **head, choices=[api.ChatStreamChoice(index=c.index, delta=api.ChatDelta(
                                    role="assistant", content=""))], usage=usage,
                                prompt_logprobs=None if sent_prompt else _prompt_logprobs(out))
                            sent_prompt = True
                            if echo:  # (vLLM's: the echoed prefill, a delta of its own after the role)
                                yield api.ChatCompletionChunk(**head, choices=[api.ChatStreamChoice(
                                    index=c.index, delta=api.ChatDelta(content=echo))], usage=usage)
                        if not (thought or content or calls or lp or done):
                            continue  # (text held back while it may be a tool call or the end of the reasoning)
                        delta = api.ChatDelta(content=content, reasoning=thought, reasoning_content=thought,
                                              tool_calls=[api.DeltaToolCall(
                                                  index=i, id=cid, type="function" if cid else None,
                                                  function=api.DeltaFunctionCall(name=name, arguments=args))
                                                  for i, cid, name, args in calls] or None)
                        reason = tools.finish_reason(c.finish_reason, calls)
                        choice = api.ChatStreamChoice(index=c.index, delta=delta, logprobs=lp,
                                                      finish_reason=reason, stop_reason=c.stop_reason)
                        usage = (_usage(len(prompt), [progress[c.index]], cached_tokens([out]))
                                 if req.continuous_usage else None)
                        yield api.ChatCompletionChunk(**head, choices=[choice], usage=usage,
                                                      prompt_logprobs=None if sent_prompt else _prompt_logprobs(out))
                        sent_prompt = True
                if req.include_usage:
                    usage = _usage(len(prompt), progress, cached_tokens([out] if out else []))
                    yield api.ChatCompletionChunk(**head, choices=[], usage=usage)
            return stream, chunks()
        out = (await _finals(stream))[0]
        choices = []
        for c in out.outputs:
            _advance(c, progress[c.index])
            thought, said, _ = split_reasoning(parser, c.text) if parser else (None, c.text, 0)
            content, calls = tools.read(said)
            thought = (thought or None) if req.include_reasoning else None
            made = [api.ToolCall(id=new_tool_call_id(tools.parser),
                                 function=api.FunctionCall(name=call.name, arguments=call.arguments))
                    for call in calls]
            if echo:
                content = echo + (content or "")
            message = api.ChatMessageOut(content=content or None if parser else content,
                                         tool_calls=made or None, reasoning=thought, reasoning_content=thought)
            choices.append(api.ChatChoice(index=c.index, message=message, logprobs=logprobs(c, 0),
                                          finish_reason=tools.finish_reason(c.finish_reason, calls),
                                          stop_reason=c.stop_reason))
        return api.ChatCompletionResponse(**head, choices=choices, usage=_usage(len(prompt), progress,
                                                                                cached_tokens([out])),
                                          prompt_logprobs=_prompt_logprobs(out))

    @app.post("/invocations", include_in_schema=False)
    async def invocations(raw: Request):
        """SageMaker's one route, as vLLM's: a body with messages is a chat completion, one with a prompt a
        completion."""
        try:
            body = await raw.json()
        except ValueError as e:
            raise APIError(400, f"malformed JSON body: {e}") from None
        kind = next((k for k in ("messages", "prompt") if isinstance(body, dict) and k in body), None)
        if kind is None:
            raise APIError(400, "an /invocations body holds messages (a chat completion) or prompt (a completion)")
        model, handler = ((api.ChatCompletionRequest, chat_completions) if kind == "messages" else
                          (api.CompletionRequest, completions))
        try:
            req = model.model_validate(body)
        except ValidationError as e:  # (answered as a route's own body is: 400 naming the field)
            raise RequestValidationError([err | {"loc": ("body", *err["loc"])} for err in e.errors()]) from None
        return await handler(req, raw)

    return app


def serve(args) -> int:
    """Load the model (with --data-parallel-size: start its replicas on Ray), then serve until SIGTERM / SIGINT:
    stop accepting connections, let the requests in flight finish for up to --graceful-shutdown-timeout seconds,
    abort the rest (they end with finish_reason "abort"), exit 0. If the engine stops for good (a tensor-parallel
    worker exited), exit 1, as vLLM's server does when its engine dies."""
    from nanoflow.entrypoints.cli import engine_kwargs

    try:  # a socket per connection: lift the soft limit on open files (often 1024) to the hard one
        resource.setrlimit(resource.RLIMIT_NOFILE, (resource.getrlimit(resource.RLIMIT_NOFILE)[1],) * 2)
    except (ValueError, OSError):
        pass
    for flag, value, low, high in (("--stream-interval", args.stream_interval, 1, None),  # (before the model loads)
                                   ("--max-waiting-requests", args.max_waiting_requests, 1, None),
                                   ("--port", args.port, 0, 65535)):
        if value < low or high is not None and value > high:
            raise ValueError(f"{flag} must be >= {low}{f' and <= {high}' if high else ''}, not {value}")
    if args.data_parallel_size == 1 and args.ray_address is None and args.api_server_count == 1:
        args.data_parallel_size = None  # (vLLM's default: the one engine in this process, no Ray)
    if args.api_server_count < 1 or args.api_server_count > 1 and args.data_parallel_size is None:
        raise ValueError(f"--api-server-count must be >= 1 ({args.api_server_count} given), and above 1 only with "
                         f"--data-parallel-size")
    if args.data_parallel_size is None and args.ray_address is not None:
        raise ValueError("--ray-address is for --data-parallel-size")
    if args.data_parallel_size is not None and args.data_parallel_size < 1:
        raise ValueError(f"--data-parallel-size must be >= 1, not {args.data_parallel_size}")
    if args.data_parallel_size is not None and importlib.util.find_spec("ray") is None:
        raise ValueError("--data-parallel-size runs its replicas on Ray, which is not installed: pip install "
                         "'nanoflow[ray]'")
    if args.enable_auto_tool_choice and args.tool_call_parser is None:
        raise ValueError(f"--enable-auto-tool-choice needs --tool-call-parser (one of {', '.join(PARSERS)})")
    args.chat_template = read_chat_template(args.chat_template)
    if not args.disable_log_stats:
        _log_stats_interval()  # (a bad $NANOFLOW_LOG_STATS_INTERVAL refused before the model loads)
    _keep_alive_on_engine_death()
    _check_ssl(args)
    _api_keys(args)
    # Bound before the model loads (as vLLM does), so that a port in use is reported at once, not after the load
    sock = listen_socket(args.host, args.port)
    if args.api_server_count > 1:
        sock.close()  # (a check only, taken by none: each API-server process binds its own, beside the others)
        from nanoflow.entrypoints.api_servers import serve_api_servers
        return serve_api_servers(args)
    with sock:
        if args.data_parallel_size is None:
            engine = AsyncEngine(LLMEngine(args.model, **engine_kwargs(args)), Metrics(served_names(args)[0]),
                                 args.max_waiting_requests, args.stream_interval)
            settle_gc()
        else:
            from nanoflow.entrypoints.dp_router import Router  # Ray is imported only here
            engine = Router.launch(args.model, engine_kwargs(args), args.data_parallel_size, args.ray_address,
                                   args.max_waiting_requests, args.stream_interval, served_names(args)[0])
        # (an engine thread stuck on a dead peer left the group behind: the CLI then ends the process by os._exit)
        return run_http(engine, args, sock)


def listen_socket(host: str, port: int, reuse_port: bool = False) -> socket.socket:
    """A TCP socket bound to host:port (uvicorn listens on it); a port in use is a ValueError naming it."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as e:
        raise ValueError(f"--host {host!r}: {e.strerror}") from None
    if reuse_port and not hasattr(socket, "SO_REUSEPORT"):
        raise ValueError("--api-server-count > 1 needs SO_REUSEPORT (Linux, BSD, macOS)")
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind(address)
        sock.listen()  # (holds the port: a bound socket alone lets another SO_REUSEADDR one bind it too)
    except OSError as e:
        sock.close()
        raise ValueError(f"cannot listen on {host}:{port}: {e.strerror}") from None
    return sock


def _log_stats_interval() -> float:
    """Seconds between the stats lines: $NANOFLOW_LOG_STATS_INTERVAL (as vLLM's VLLM_LOG_STATS_INTERVAL), or 10."""
    text = os.environ.get("NANOFLOW_LOG_STATS_INTERVAL", str(LOG_STATS_INTERVAL_S))
    try:
        if (interval := float(text)) > 0:
            return interval
    except ValueError:
        pass
    raise ValueError(f"NANOFLOW_LOG_STATS_INTERVAL={text!r}: must be a number of seconds > 0")


def _keep_alive_on_engine_death() -> bool:
    """$NANOFLOW_KEEP_ALIVE_ON_ENGINE_DEATH (as vLLM's VLLM_KEEP_ALIVE_ON_ENGINE_DEATH): keep serving (health and
    every request 503) after the engine stopped for good, rather than exit for a supervisor to restart it."""
    text = os.environ.get("NANOFLOW_KEEP_ALIVE_ON_ENGINE_DEATH", "0")
    if text.lower() not in ("0", "1", "false", "true"):
        raise ValueError(f"NANOFLOW_KEEP_ALIVE_ON_ENGINE_DEATH={text!r}: must be 0, 1, false or true")
    return text.lower() in ("1", "true")


def _checked_keys(given: str | list[str] | None) -> list[str]:
    """The API keys as a list; an empty one refused (an unset variable in `--api-key "$K"`: a bare "Bearer" would
    match it)."""
    keys = [given] if isinstance(given, str) else list(given or [])
    if "" in keys:
        raise ValueError("--api-key: an empty key (an unset variable?) would let any request in")
    return keys


def _api_keys(args) -> list[str]:
    """--api-key's, else $NANOFLOW_API_KEY, else vLLM's $VLLM_API_KEY (for its launch files)."""
    return _checked_keys(args.api_key or os.environ.get("NANOFLOW_API_KEY") or os.environ.get("VLLM_API_KEY"))


def _ssl(args) -> dict:
    """uvicorn's TLS settings from vLLM's --ssl-* flags (none: plain HTTP)."""
    return dict(ssl_keyfile=args.ssl_keyfile, ssl_certfile=args.ssl_certfile, ssl_ca_certs=args.ssl_ca_certs,
                ssl_cert_reqs=args.ssl_cert_reqs)


def _check_ssl(args) -> None:
    """A TLS setting that cannot serve refused before the model loads, naming the flag and why."""
    for flag, given in (("--ssl-keyfile", args.ssl_keyfile), ("--ssl-ca-certs", args.ssl_ca_certs),
                        ("--ssl-cert-reqs", args.ssl_cert_reqs)):
        if given and not args.ssl_certfile:
            raise ValueError(f"{flag} needs --ssl-certfile (the server's certificate: without it, plain HTTP)")
    if args.ssl_cert_reqs not in (ssl.CERT_NONE, ssl.CERT_OPTIONAL, ssl.CERT_REQUIRED):
        raise ValueError(f"--ssl-cert-reqs must be 0 (no client certificate), 1 (optional) or 2 (required), "
                         f"not {args.ssl_cert_reqs}")
    if args.ssl_cert_reqs != ssl.CERT_NONE and not args.ssl_ca_certs:
        raise ValueError("--ssl-cert-reqs 1 or 2 needs --ssl-ca-certs (the CAs that sign the clients' certificates)")
    if not args.ssl_certfile:
        return
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    for flag, load in (("--ssl-certfile / --ssl-keyfile", lambda: context.load_cert_chain(args.ssl_certfile,
                                                                                         args.ssl_keyfile)),
                       ("--ssl-ca-certs", lambda: args.ssl_ca_certs and context.load_verify_locations(
                           args.ssl_ca_certs))):
        try:
            load()
        except (OSError, ssl.SSLError) as e:
            raise ValueError(f"{flag}: {e.strerror or e}") from None


def served_names(args) -> list[str]:
    """The model's names in the API: --served-model-name's, else MODEL as given (the default model: its file's)."""
    return args.served_model_name or [args.model or os.path.basename(default_model_path()).removesuffix(".gguf")]


def run_http(engine: EngineClient, args, sock: socket.socket) -> int:
    """The API over engine, on a socket bound to args.host:args.port, until SIGTERM / SIGINT (see serve), or until
    the engine stops for good (a tensor-parallel worker exited): then 1, unless kept alive."""
    import uvicorn
    keep_alive = _keep_alive_on_engine_death()

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):
            if not self.should_exit:  # uvicorn waits for the requests in flight; we bound that wait
                loop = asyncio.get_event_loop()  # a signal handler runs between the loop's callbacks
                loop.call_soon_threadsafe(loop.call_later, args.graceful_shutdown_timeout, engine.drain)
            super().handle_exit(sig, frame)

        engine_died = False  # (the exit is the engine's, not a signal's)

        async def on_tick(self, counter: int) -> bool:  # (uvicorn's main loop, every 0.1 s)
            if engine.lost is not None and not keep_alive and not self.should_exit:
                log.error("the server exits: the engine stopped for good (%s)", engine.lost)
                self.should_exit = self.engine_died = True  # (its requests have failed: nothing waits)
            return await super().on_tick(counter)

    app = build_app(engine, served_names(args), _api_keys(args),
                    args.tool_call_parser if args.enable_auto_tool_choice else None, args.chat_template,
                    args.reasoning_parser, args.enable_prompt_tokens_details,
                    dict(allow_origins=args.allowed_origins, allow_methods=args.allowed_methods,
                         allow_headers=args.allowed_headers, allow_credentials=args.allow_credentials),
                    None if args.disable_log_stats else _log_stats_interval(), not args.disable_fastapi_docs,
                    args.enable_request_id_headers, args.return_tokens_as_token_ids, args.enable_server_load_tracking,
                    args.chat_template_content_format, args.default_chat_template_kwargs)
    # the server's own log (warnings, errors, the stats lines) on stderr beside uvicorn's, at info
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s %(asctime)s %(name)s: %(message)s", "%m-%d %H:%M:%S"))
    logging.getLogger("nanoflow").addHandler(handler)
    logging.getLogger("nanoflow").setLevel(logging.INFO)
    # uvicorn's own bound only backs ours up (a response stuck on a client that does not read)
    config = uvicorn.Config(app, host=args.host, port=args.port, access_log=False, log_level=args.uvicorn_log_level,
                            root_path=args.root_path, timeout_graceful_shutdown=args.graceful_shutdown_timeout + 5,
                            **_ssl(args))
    # After its graceful shutdown, uvicorn re-raises the signal it caught to the handler that was there
    # before; an ignoring one lets the process exit 0 instead of dying by the signal.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    server = Server(config)
    try:
        server.run(sockets=[sock])
    finally:  # (a second signal force-quits uvicorn past the app's shutdown: an engine thread still stepping then
        engine.stop()  # met the interpreter's exit, and the process died by SIGABRT)
    return 1 if server.engine_died else 0
