"""Anthropic's Messages API (POST /v1/messages, /v1/messages/count_tokens), as vLLM and SGLang serve it, over chat
completions: a request becomes the chat request it stands for (system and content blocks as messages, tools' input
schemas as functions' parameters, tool_choice auto / any / tool / none), and the chat completion (or its chunks) the
message (or its stream of events).

Text, thinking, tool_use and tool_result blocks; images and Anthropic's server tools are refused by name.
"""
from __future__ import annotations

import json
from typing import Annotated, Any, AsyncIterator, ClassVar, Literal

from pydantic import BeforeValidator, Discriminator, Field, Tag, field_validator, model_validator
from pydantic_core import PydanticCustomError

from nanoflow.entrypoints import openai_protocol as api

# a chat completion's finish_reason as Anthropic's stop_reason ("stop" with a stop string: stop_sequence)
STOP_REASONS = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use"}
# nanoflow's error types as Anthropic's (its clients retry on overloaded_error)
ERROR_TYPES = {"internal_error": "api_error", "server_overloaded": "overloaded_error",
               "service_unavailable": "overloaded_error", 404: "not_found_error"}


class TextBlock(api._Request):
    type: Literal["text"]
    text: str
    cache_control: dict | None = None  # (Anthropic's prompt caching hint: the prefix cache needs none)
    citations: list | None = None


class ThinkingBlock(api._Request):
    type: Literal["thinking", "redacted_thinking"]
    thinking: str = ""
    signature: str | None = None
    data: str | None = None  # (a redacted one's: nothing readable)


class ToolUseBlock(api._Request):
    type: Literal["tool_use"]
    id: str
    name: str
    input: dict[str, Any]
    cache_control: dict | None = None


class ToolResultBlock(api._Request):
    type: Literal["tool_result"]
    tool_use_id: str
    content: Annotated[str | list[TextBlock], api.one_of("a string or a list of text blocks")] = ""
    is_error: bool | None = None
    cache_control: dict | None = None

    @property
    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "\n".join(b.text for b in self.content)


def _block_type(v) -> str | None:
    kind = v.get("type") if isinstance(v, dict) else getattr(v, "type", None)
    return kind.removeprefix("redacted_") if isinstance(kind, str) else None  # (None: refused, naming the block)


Block = Annotated[Annotated[TextBlock, Tag("text")] | Annotated[ThinkingBlock, Tag("thinking")]
                  | Annotated[ToolUseBlock, Tag("tool_use")] | Annotated[ToolResultBlock, Tag("tool_result")],
                  Discriminator(_block_type, custom_error_type="block_type", custom_error_message=(
                      "a content block is an object of type text, thinking, tool_use or tool_result"))]


class Message(api._Request):
    role: Literal["user", "assistant"]
    # (a string: one text block)
    content: Annotated[list[Block], BeforeValidator(lambda v: [{"type": "text", "text": v}] if isinstance(v, str)
                                                    else v)]


class Tool(api._Request):
    type: Literal["custom"] | None = None  # (Anthropic's server tools, e.g. web_search_20250305: refused)
    name: str = Field(min_length=1)
    description: str | None = None
    input_schema: dict[str, Any]
    cache_control: dict | None = None


class ToolChoice(api._Request):
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None
    disable_parallel_tool_use: bool | None = None


class Thinking(api._Request):
    type: Literal["enabled", "disabled", "adaptive"]
    budget_tokens: api.Int64 | None = None  # (taken; max_tokens bounds the whole output)


class OutputFormat(api._Request):
    type: Literal["json_schema"]
    json_schema: dict[str, Any] = Field(alias="schema")


class OutputConfig(api._Request):
    """(Anthropic's structured outputs, as the SDK's messages.parse sends them, and its reasoning effort)"""
    format: OutputFormat | None = None
    effort: str | None = None  # (the chat template's reasoning_effort)


class MessagesRequest(api._Request):
    """(max_tokens is required, as Anthropic's)"""
    # chat's names -> this API's, in errors ("messages" too: chat's are not this request's one for one, so an error
    # in one names the messages whole)
    RENAMED: ClassVar[dict[str, str]] = {"max_completion_tokens": "max_tokens", "messages": "messages",
                                         "stop": "stop_sequences", "response_format": "output_config.format"}
    model: str | None = None
    max_tokens: api.Int64
    messages: list[Message] = Field(min_length=1)
    system: Annotated[str | list[TextBlock] | None, api.one_of("a string or a list of text blocks")] = None
    stop_sequences: list[str] | None = None
    stream: bool | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: api.Int64 | None = None
    tools: list[Tool] | None = None
    tool_choice: ToolChoice | None = None
    thinking: Thinking | None = None  # (the chat template's enable_thinking)
    output_config: OutputConfig | None = None
    metadata: dict[str, Any] | None = None  # (user_id: taken, not used)
    service_tier: str | None = None  # (taken, not used)

    @field_validator("tool_choice")
    @classmethod
    def _named(cls, v):
        if v is not None and (v.type == "tool") != (v.name is not None):
            raise PydanticCustomError("tool_choice", "name goes with type tool, and only there")
        return v

    @model_validator(mode="after")
    def _one_grammar(self):
        if self.output_config and self.output_config.format and self.tool_choice and self.tool_choice.type in (
                "any", "tool"):
            raise PydanticCustomError("output_config", "output_config.format: tool_choice {kind} holds the output to "
                                      "the tools' schemas, and takes no other format",
                                      {"kind": repr(self.tool_choice.type)})
        return self

    @property
    def prefilled(self) -> bool:
        """The conversation ends with the assistant's own start of its answer (Anthropic's prefill), which the
        model continues."""
        return self.messages[-1].role == "assistant" and all(b.type == "text" for b in self.messages[-1].content)

    def chat_messages(self) -> list[dict]:
        """The conversation as chat messages: the system prompt first (without Claude Code's per-request billing
        header, which would defeat the prefix cache: vLLM's); an assistant's text, thinking and tool_use blocks as
        one message; a user's tool_result blocks as tool messages (before its text, which follows them). Several
        text blocks are one text, a line apart (vLLM's)."""
        system = self.system if isinstance(self.system, str) or self.system is None else "".join(
            b.text for b in self.system if not b.text.startswith("x-anthropic-billing-header"))
        out = [{"role": "system", "content": system}] if system else []
        for m in self.messages:
            text = "\n".join(b.text for b in m.content if b.type == "text")
            if m.role == "assistant":
                message = {"role": "assistant", "content": text or None}
                if thought := "".join(b.thinking for b in m.content if b.type in ("thinking", "redacted_thinking")):
                    message["reasoning"] = thought
                if calls := [{"id": b.id, "type": "function", "function": {
                        "name": b.name, "arguments": json.dumps(b.input, ensure_ascii=False)}}
                        for b in m.content if b.type == "tool_use"]:
                    message["tool_calls"] = calls
                out.append(message)
                continue
            out += [{"role": "tool", "tool_call_id": b.tool_use_id, "content": b.text}
                    for b in m.content if b.type == "tool_result"]
            if text or not any(b.type == "tool_result" for b in m.content):
                out.append({"role": "user", "content": text})
        return out

    def as_chat(self, stream: bool | None = None) -> api.ChatCompletionRequest:
        """The chat completion this request stands for (ValueError, the field named as this request's)."""
        choice, stream, config = self.tool_choice, self.stream if stream is None else stream, self.output_config
        effort = {"reasoning_effort": config.effort} if config and config.effort else {}
        body = dict(model=self.model, messages=self.chat_messages(), max_completion_tokens=self.max_tokens,
                    temperature=self.temperature, top_p=self.top_p, top_k=self.top_k, stop=self.stop_sequences,
                    stream=stream, stream_options={"include_usage": True, "continuous_usage_stats": True} if stream
                    else None,
                    response_format={"type": "json_schema", "json_schema": {
                        "name": "output", "schema": config.format.json_schema}} if config and config.format else None,
                    tools=[{"type": "function", "function": {"name": t.name, "description": t.description,
                                                             "parameters": t.input_schema}}
                           for t in self.tools] if self.tools else None,
                    tool_choice=None if choice is None else (
                        {"type": "function", "function": {"name": choice.name}} if choice.type == "tool" else
                        {"any": "required"}.get(choice.type, choice.type)),
                    parallel_tool_calls=False if choice and choice.disable_parallel_tool_use else None,
                    continue_final_message=self.prefilled or None, add_generation_prompt=not self.prefilled,
                    chat_template_kwargs=effort | ({"enable_thinking": self.thinking.type != "disabled"}
                                                   if self.thinking else {}) or None)
        return api.chat_request(body, self.RENAMED)


def _input(arguments: str) -> dict:
    """A call's arguments as a tool_use block's input (an object; other JSON values wrapped, as nothing else fits)."""
    try:
        value = json.loads(arguments)
    except ValueError:
        value = arguments
    return value if isinstance(value, dict) else {"value": value}


class MessageRenderer:
    """One request's message: as a whole, or as Anthropic's stream of events."""

    def __init__(self, model: str, message_id: str):
        self.head = dict(id=f"msg_{message_id}", type="message", role="assistant", model=model)

    @staticmethod
    def _stop(finish_reason: str | None, stop_reason, called: bool) -> dict:
        """stop_reason and stop_sequence of a chat choice's end (called: with a tool_use block, whose stop_reason
        is tool_use, as Anthropic's, also for a forced call: clients loop on it)."""
        if finish_reason == "stop" and isinstance(stop_reason, str):
            return dict(stop_reason="stop_sequence", stop_sequence=stop_reason)
        if called and finish_reason == "stop":
            finish_reason = "tool_calls"
        return dict(stop_reason=STOP_REASONS.get(finish_reason, "end_turn"), stop_sequence=None)

    @staticmethod
    def _usage(usage: api.Usage | None, output_tokens: int | None = None) -> dict:
        """(output_tokens: in place of the usage's)"""
        if usage is None:
            return dict(input_tokens=0, output_tokens=0)
        cached = usage.prompt_tokens_details.cached_tokens if usage.prompt_tokens_details else None
        # (Anthropic's input_tokens leave out those read from the cache: the prompt is their sum)
        return dict(input_tokens=usage.prompt_tokens - (cached or 0),
                    output_tokens=usage.completion_tokens if output_tokens is None else output_tokens,
                    **({"cache_read_input_tokens": cached} if cached is not None else {}))

    def whole(self, chat: api.ChatCompletionResponse) -> dict:
        choice = chat.choices[0]
        m = choice.message
        content = [dict(type="thinking", thinking=m.reasoning, signature="")] if m.reasoning else []
        content += [dict(type="text", text=m.content)] if m.content else []
        content += [dict(type="tool_use", id=c.id, name=c.function.name, input=_input(c.function.arguments))
                    for c in m.tool_calls or ()]
        return self.head | dict(content=content, **self._stop(choice.finish_reason, choice.stop_reason,
                                                              bool(m.tool_calls)), usage=self._usage(chat.usage))

    def error(self, info: api.ErrorInfo) -> dict:
        """The event a failed stream ends with."""
        return dict(type="error", error=dict(type=ERROR_TYPES.get(info.type, info.type), message=info.message))

    async def events(self, chunks: AsyncIterator[api.ChatCompletionChunk]) -> AsyncIterator[dict]:
        """The events of a chat stream whose chunks carry the usage so far (continuous_usage_stats). A block starts
        with its first piece and stops when another starts or the message ends; a tool_use block's input goes
        whole, as one input_json_delta, at its stop (an object, as the whole message's)."""
        index, kind, finish, stop, usage, arguments, called, started = -1, None, None, None, None, "", False, False

        def stop_block() -> list[dict]:
            nonlocal arguments
            if kind is None:
                return []
            events = [dict(type="content_block_delta", index=index, delta=dict(
                type="input_json_delta", partial_json=json.dumps(_input(arguments), ensure_ascii=False)))
                      ] if kind == "tool_use" else []
            arguments = ""
            return events + [dict(type="content_block_stop", index=index)]

        def start(new: str, block: dict) -> list[dict]:
            nonlocal index, kind
            events = stop_block()
            index, kind = index + 1, new
            return events + [dict(type="content_block_start", index=index, content_block=block)]

        async for chunk in chunks:
            if not started:  # (the first chunk: its usage tells the prompt's tokens)
                started = True
                yield dict(type="message_start", message=self.head | dict(
                    content=[], stop_reason=None, stop_sequence=None, usage=self._usage(chunk.usage, 0)))
            usage = chunk.usage or usage
            if not chunk.choices:
                continue
            choice = chunk.choices[0]
            d = choice.delta
            if choice.finish_reason:
                finish, stop = choice.finish_reason, choice.stop_reason
            for new, piece, block, delta in (
                    ("thinking", d.reasoning, dict(type="thinking", thinking="", signature=""),
                     lambda p: dict(type="thinking_delta", thinking=p)),
                    ("text", d.content, dict(type="text", text=""), lambda p: dict(type="text_delta", text=p))):
                if piece:
                    for e in start(new, block) if kind != new else []:
                        yield e
                    yield dict(type="content_block_delta", index=index, delta=delta(piece))
            for call in d.tool_calls or ():
                if call.id is not None:  # (a call's first delta; a named call's arguments follow in pieces)
                    called = True
                    for e in start("tool_use", dict(type="tool_use", id=call.id, name=call.function.name or "",
                                                    input={})):
                        yield e
                arguments += call.function.arguments or ""
        for e in stop_block():
            yield e
        yield dict(type="message_delta", delta=self._stop(finish, stop, called), usage=self._usage(usage))
        yield dict(type="message_stop")


class CountTokensRequest(MessagesRequest):
    """/v1/messages/count_tokens: the input tokens a message request would take."""
    max_tokens: api.Int64 | None = None
