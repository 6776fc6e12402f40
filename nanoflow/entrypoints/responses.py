"""OpenAI's Responses API (POST /v1/responses), as vLLM serves it, over chat completions: a request becomes the chat
request it stands for (instructions and input items as messages, Responses' flat function tools as chat's, text.format
as response_format), and the chat completion (or its stream of chunks) becomes the Response (or its stream of events).

Stateless, as vLLM's without its store: `store` is taken and answered false; `previous_response_id` and `background`
are refused by name. Only function tools; text and refusal parts in input messages.
"""
from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, AsyncIterator, Callable, ClassVar, Literal

from pydantic import AfterValidator, BeforeValidator, Discriminator, Field, Tag, field_validator, model_validator
from pydantic_core import PydanticCustomError

from nanoflow.entrypoints import openai_protocol as api

INCLUDES = ("message.output_text.logprobs", "reasoning.encrypted_content")  # (no encrypted reasoning: nothing to add)
# (vLLM's: the sampling parameters chat takes that a Responses request may carry too)
EXTRAS = ("top_k", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty", "seed", "stop",
          "request_id", "priority")


class InputText(api._Request):
    type: Literal["input_text", "output_text", "text", "refusal"]
    text: str | None = None
    refusal: str | None = None  # (a replayed refusal part's text)
    annotations: list | None = None  # (a replayed output_text part's; not used)
    logprobs: list | None = None

    @model_validator(mode="after")
    def _has_text(self):
        if (self.refusal if self.type == "refusal" else self.text) is None:
            raise PydanticCustomError("text", "a {type} part needs its text", {"type": self.type})
        return self


Parts = Annotated[str | list[InputText], api.one_of("a string or a list of input_text parts")]


def _joined(content: Parts) -> str:
    """Parts as one text, a line apart (vLLM's join of a message's text parts)."""
    return content if isinstance(content, str) else "\n".join(p.refusal if p.type == "refusal" else p.text
                                                               for p in content)


class InputMessage(api._Request):
    type: Literal["message"] = "message"
    role: Literal["user", "assistant", "system", "developer"]
    content: Parts
    id: str | None = None  # (a replayed output item's)
    status: str | None = None


class FunctionCallItem(api._Request):
    type: Literal["function_call"]
    call_id: str
    name: str
    arguments: Annotated[str, AfterValidator(api.json_arguments)]
    id: str | None = None
    status: str | None = None


class FunctionCallOutput(api._Request):
    type: Literal["function_call_output"]
    call_id: str
    output: Parts
    id: str | None = None
    status: str | None = None


class ReasoningText(api._Request):
    type: Literal["reasoning_text", "summary_text"]
    text: str


class ReasoningItem(api._Request):
    type: Literal["reasoning"]
    id: str | None = None
    summary: list[ReasoningText] = []
    content: list[ReasoningText] | None = None
    encrypted_content: None = None
    status: str | None = None


def _item_type(v) -> str | None:
    return v.get("type", "message") if isinstance(v, dict) else getattr(v, "type", None)


Item = Annotated[Annotated[InputMessage, Tag("message")] | Annotated[FunctionCallItem, Tag("function_call")]
                 | Annotated[FunctionCallOutput, Tag("function_call_output")]
                 | Annotated[ReasoningItem, Tag("reasoning")], Discriminator(_item_type, custom_error_type="item_type",
                 custom_error_message="an input item is a message or an object of type function_call, "
                                      "function_call_output or reasoning")]


class FunctionTool(api._Request):
    type: Literal["function"]
    name: str = Field(min_length=1)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class NamedFunction(api._Request):
    type: Literal["function"]
    name: str


class TextFormat(api._Request):
    type: Literal["text", "json_object", "json_schema"]
    name: str | None = None
    json_schema: dict[str, Any] | None = Field(None, alias="schema")
    description: str | None = None
    strict: bool | None = None

    _schema_given = model_validator(mode="after")(lambda self: api.schema_with_its_type(self, "schema"))


class TextConfig(api._Request):
    format: TextFormat | None = None
    verbosity: Literal["low", "medium", "high"] | None = None  # (echoed; no model here takes it)


class ReasoningConfig(api._Request):
    effort: Literal["none", "minimal", "low", "medium", "high", "xhigh", "max"] | None = None  # (the template's
    # reasoning_effort)
    summary: Literal["auto", "concise", "detailed"] | None = None  # (echoed: the reasoning is given whole)


class ResponsesRequest(api._Request):
    # chat's names -> this API's, in errors (chat's messages are not the input's items one for one: named whole)
    RENAMED: ClassVar[dict[str, str]] = {
        "max_tokens": "max_output_tokens", "max_completion_tokens": "max_output_tokens",
        "response_format": "text.format", "messages": "input"}
    model: str | None = None
    # (a string: one user message, OpenAI's shorthand)
    input: Annotated[list[Item], BeforeValidator(lambda v: [{"role": "user", "content": v}] if isinstance(v, str)
                                                 else v)]
    instructions: str | None = None
    max_output_tokens: api.Int64 | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_logprobs: api.Int64 | None = None
    tools: list[FunctionTool] | None = None
    tool_choice: Annotated[Literal["none", "auto", "required"] | NamedFunction | None, api.one_of(
        '"none", "auto", "required" or {"type": "function", "name": ...}')] = None
    parallel_tool_calls: bool | None = None
    text: TextConfig | None = None
    reasoning: ReasoningConfig | None = None
    include: list[str] | None = None
    stream: bool | None = None
    store: bool | None = None  # (taken; nothing is kept, so the response says false)
    metadata: dict[str, str] | None = None
    user: str | None = None
    service_tier: Literal["auto", "default", "flex", "scale", "priority"] | None = None  # (echoed)
    truncation: Literal["disabled"] | None = None
    previous_response_id: api.only_default() = None
    background: api.only_default(False) = None
    request_id: str | None = None  # (vLLM's) the response's id is resp_ID
    priority: api.Int64 | None = None  # (vLLM's, as the other EXTRAS)
    top_k: api.Int64 | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    seed: api.Int64 | None = None
    stop: Annotated[str | list[str] | None, api.one_of("a string or a list of strings")] = None

    @field_validator("input")
    @classmethod
    def _not_empty(cls, v):
        if not v:
            raise PydanticCustomError("empty", "must not be empty")
        return v

    @field_validator("include")
    @classmethod
    def _known(cls, v):
        if bad := [i for i in v or () if i not in INCLUDES]:
            raise PydanticCustomError("include", "{bad} is not supported by this server (it takes {known})",
                                      {"bad": repr(bad[0]), "known": " and ".join(map(repr, INCLUDES))})
        return v

    def messages(self) -> list[dict]:
        """The conversation as chat messages: instructions (unless empty) as the system message; an assistant's
        function calls joined to its message, as chat completions carry them, and the reasoning items before them
        as its reasoning (a turn's reasoning with no assistant output after it is dropped)."""
        out = [{"role": "system", "content": self.instructions}] if self.instructions else []
        thoughts = []
        for item in self.input:
            if item.type == "reasoning":
                thoughts.append("".join(p.text for p in item.content or item.summary))
                continue
            if item.type == "function_call_output":
                out.append({"role": "tool", "tool_call_id": item.call_id, "content": _joined(item.output)})
            elif item.type == "function_call":
                call = {"id": item.call_id, "type": "function",
                        "function": {"name": item.name, "arguments": item.arguments}}
                if not (out and out[-1]["role"] == "assistant"):
                    out.append({"role": "assistant", "content": None})
                out[-1].setdefault("tool_calls", []).append(call)
            else:
                out.append({"role": item.role, "content": _joined(item.content)})
            if thoughts and out[-1]["role"] == "assistant":
                out[-1]["reasoning"] = "\n\n".join(filter(None, [out[-1].get("reasoning"), *thoughts]))
            thoughts = []
        return out

    def as_chat(self) -> api.ChatCompletionRequest:
        """The chat completion this request stands for (ValueError, the field named as this request's, if the
        chat request refuses it)."""
        fmt = self.text.format if self.text else None
        body = dict(model=self.model, messages=self.messages(), max_completion_tokens=self.max_output_tokens,
                    temperature=self.temperature, top_p=self.top_p, parallel_tool_calls=self.parallel_tool_calls,
                    user=self.user, stream=self.stream, **{k: getattr(self, k) for k in EXTRAS},
                    stream_options={"include_usage": True} if self.stream else None,
                    tools=[{"type": "function", "function": t.model_dump(exclude={"type"}, exclude_none=True)}
                           for t in self.tools] if self.tools is not None else None,
                    # ("auto" without tools: the Responses API's default, which asks for nothing)
                    tool_choice=({"type": "function", "function": {"name": self.tool_choice.name}}
                                 if isinstance(self.tool_choice, NamedFunction) else
                                 None if self.tools is None and self.tool_choice == "auto" else self.tool_choice),
                    response_format=fmt and ({"type": fmt.type} | ({"json_schema": {
                        "name": fmt.name or "response", "schema": fmt.json_schema, "description": fmt.description,
                        "strict": fmt.strict}} if fmt.type == "json_schema" else {})))
        if "message.output_text.logprobs" in (self.include or ()):
            body |= dict(logprobs=True, top_logprobs=self.top_logprobs or 0)
        if self.reasoning and self.reasoning.effort:
            body["chat_template_kwargs"] = {"reasoning_effort": self.reasoning.effort}
        return api.chat_request(body, self.RENAMED)


def _new(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def _logprobs(lp: api.ChatLogprobs | None) -> list[dict]:
    return [t.model_dump() for t in lp.content] if lp is not None else []


def _message(text: str, status: str, logprobs: list[dict], id: str | None = None) -> dict:
    return dict(type="message", id=id or _new("msg"), status=status, role="assistant",
                content=[dict(type="output_text", text=text, annotations=[], logprobs=logprobs)])


def _reasoning(text: str, id: str | None = None) -> dict:
    return dict(type="reasoning", id=id or _new("rs"), summary=[], content=[dict(type="reasoning_text", text=text)],
                status="completed")


def _call(call_id: str, name: str, arguments: str, id: str | None = None, reason: str | None = None) -> dict:
    """reason: the choice's finish reason. A call is incomplete where the token limit cut its arguments (they are no
    whole JSON then; the calls read whole before it are complete)."""
    cut = reason == "length" and not api.is_json(arguments)
    return dict(type="function_call", id=id or _new("fc"), call_id=call_id, name=name, arguments=arguments,
                status="incomplete" if cut else "completed")


class ResponseRenderer:
    """One request's Response: its fields as the request set them, then its output, as a whole or as events."""

    def __init__(self, req: ResponsesRequest, model: str, response_id: str, count: Callable[[str], int]):
        """count: a text's tokens (the reasoning's, for the usage)."""
        self.req, self.seq, self.count = req, 0, count
        fmt = req.text.format if req.text and req.text.format else None
        self.head = dict(
            id=f"resp_{response_id}", object="response", created_at=int(time.time()), model=model,
            instructions=req.instructions, max_output_tokens=req.max_output_tokens, metadata=req.metadata or {},
            parallel_tool_calls=req.parallel_tool_calls is not False, previous_response_id=None,
            reasoning=req.reasoning.model_dump() if req.reasoning else None, store=False,
            temperature=req.temperature, top_p=req.top_p, top_logprobs=req.top_logprobs,
            text=dict(format=fmt.model_dump(by_alias=True, exclude_none=True) if fmt else {"type": "text"},
                      **({"verbosity": req.text.verbosity} if req.text and req.text.verbosity else {})),
            tool_choice=(req.tool_choice.model_dump() if isinstance(req.tool_choice, NamedFunction) else
                         req.tool_choice or ("auto" if req.tools else "none")),
            tools=[t.model_dump(exclude_none=True) for t in req.tools or ()], truncation="disabled", user=req.user,
            service_tier=req.service_tier or "auto", background=False, error=None)

    def response(self, output: list[dict], finish_reason: str | None, usage: dict | None) -> dict:
        status = {None: "in_progress", "length": "incomplete"}.get(finish_reason, "completed")
        return self.head | dict(status=status, output=output, usage=usage, incomplete_details=(
            {"reason": "max_output_tokens"} if status == "incomplete" else None))

    def _usage(self, usage: api.Usage | None, output: list[dict]) -> dict | None:
        if usage is None:
            return None
        cached = usage.prompt_tokens_details.cached_tokens if usage.prompt_tokens_details else 0
        thought = "".join(p["text"] for item in output if item["type"] == "reasoning" for p in item["content"])
        return dict(input_tokens=usage.prompt_tokens, input_tokens_details={"cached_tokens": cached},
                    output_tokens=usage.completion_tokens,
                    output_tokens_details={"reasoning_tokens": self.count(thought) if thought else 0},
                    total_tokens=usage.total_tokens)

    def whole(self, chat: api.ChatCompletionResponse) -> dict:
        choice = chat.choices[0]
        m, status = choice.message, "incomplete" if choice.finish_reason == "length" else "completed"
        output = [_reasoning(m.reasoning)] if m.reasoning else []
        if m.content:  # (as vLLM's: no text, no message)
            output.append(_message(m.content, status, _logprobs(choice.logprobs)))
        output += [_call(c.id, c.function.name, c.function.arguments, reason=choice.finish_reason)
                   for c in m.tool_calls or ()]
        return self.response(output, choice.finish_reason, self._usage(chat.usage, output))

    def error(self, info: api.ErrorInfo) -> dict:
        """The event a failed stream ends with."""
        return self._event("error", code=info.code or info.type, message=info.message, param=info.param)

    def _event(self, type: str, **fields) -> dict:
        self.seq += 1
        return dict(type=type, sequence_number=self.seq - 1, **fields)

    async def events(self, chunks: AsyncIterator[api.ChatCompletionChunk]) -> AsyncIterator[dict]:
        """The Responses events of a chat stream (whose last chunk carries the usage). Items open as their first
        piece comes (a function call's: the delta with its id) and close when another opens or the stream ends.
        A message's logprobs are all of the output's, as the whole response's: those of tokens before its text go
        with its first delta, those after its last with its close."""
        yield self._event("response.created", response=self.response([], None, None))
        yield self._event("response.in_progress", response=self.response([], None, None))
        output: list[dict] = []
        kind, text, logprobs, held = None, "", [], []  # the open item's kind, text and logprobs; logprobs not sent
        reason, usage = None, None

        def where() -> dict:
            return dict(item_id=output[-1]["id"], output_index=len(output) - 1)

        def text_delta(piece: str) -> dict:
            nonlocal text, logprobs, held
            text, logprobs, held, sent = text + piece, logprobs + held, [], held
            return self._event("response.output_text.delta", **where(), content_index=0, delta=piece, logprobs=sent)

        def close() -> list[dict]:
            nonlocal kind, text, logprobs
            at, item = len(output) - 1, output[-1]
            if kind == "function_call":
                output[at] = _call(item["call_id"], item["name"], text, item["id"], reason)
                events = [self._event("response.function_call_arguments.done", **where(), name=item["name"],
                                      arguments=text)]
            elif kind == "reasoning":
                output[at] = _reasoning(text, item["id"])
                events = [self._event("response.reasoning_text.done", **where(), content_index=0, text=text)]
            else:
                events = [text_delta("")] if held else []
                output[at] = _message(text, "incomplete" if reason == "length" else "completed", logprobs, item["id"])
                events.append(self._event("response.output_text.done", **where(), content_index=0, text=text,
                                          logprobs=logprobs))
            if kind != "function_call":
                events.append(self._event("response.content_part.done", **where(), content_index=0,
                                          part=output[at]["content"][0]))
            kind, text, logprobs = None, "", []
            return events + [self._event("response.output_item.done", output_index=at, item=output[at])]

        def open_(new: str, item: dict) -> list[dict]:
            nonlocal kind
            events = close() if kind else []
            kind = new
            output.append(item)
            events.append(self._event("response.output_item.added", output_index=len(output) - 1,
                                      item=item | {"status": "in_progress"}))
            if new != "function_call":
                part = (dict(type="reasoning_text", text="") if new == "reasoning" else
                        dict(type="output_text", text="", annotations=[], logprobs=[]))
                events.append(self._event("response.content_part.added", **where(), content_index=0, part=part))
            return events

        async for chunk in chunks:
            if chunk.usage is not None and not chunk.choices:
                usage = chunk.usage
                continue
            choice = chunk.choices[0]
            d, reason = choice.delta, choice.finish_reason or reason
            held += _logprobs(choice.logprobs)
            if d.reasoning:
                for e in open_("reasoning", dict(type="reasoning", id=_new("rs"), summary=[], content=[])) \
                        if kind != "reasoning" else []:
                    yield e
                text += d.reasoning
                yield self._event("response.reasoning_text.delta", **where(), content_index=0, delta=d.reasoning)
            if d.content:
                for e in open_("message", dict(type="message", id=_new("msg"), role="assistant", content=[])) \
                        if kind != "message" else []:
                    yield e
                yield text_delta(d.content)
            for call in d.tool_calls or ():
                if call.id is not None:  # (a call's first delta; a named call's arguments come in pieces after it)
                    for e in open_("function_call", dict(type="function_call", id=_new("fc"), call_id=call.id,
                                                         name=call.function.name or "", arguments="")):
                        yield e
                if piece := call.function.arguments:
                    text += piece
                    yield self._event("response.function_call_arguments.delta", **where(), delta=piece)
        for e in close() if kind else []:
            yield e
        # (an incomplete one too, as vLLM's: the openai client's stream helper ends only at response.completed)
        yield self._event("response.completed", response=self.response(output, reason or "stop",
                                                                        self._usage(usage, output)))
