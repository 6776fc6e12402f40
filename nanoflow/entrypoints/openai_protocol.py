"""Request and response bodies of the OpenAI-compatible API (pydantic; the OpenAPI schema comes from them).

Requests are strict (no type coercion, finite floats), so a wrong type is a 400 naming the field rather
than a silent guess. Unknown fields are ignored with a warning, as vLLM does (clients send OpenAI's newer
fields, and replay a response's message with its null extras). Value ranges are SamplingParams' to check;
here only the bounds that keep values inside the engine's integer types (int64 tensors, torch generator
seeds).
"""
from __future__ import annotations

import json
import logging
import re
from dataclasses import replace
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    WrapValidator,
    field_validator,
    model_serializer,
    model_validator,
)
from pydantic_core import PydanticCustomError

from nanoflow.beam_search import BeamSearchParams
from nanoflow.entrypoints.tool_calls import TAGGED, ToolChoice, parameters_schema, required_schema
from nanoflow.sampling_params import MAX_LOGPROBS, SamplingParams
from nanoflow.tokenizer import template_content

MAX_N = 128  # as OpenAI
log = logging.getLogger(__name__)


def _whole(v):
    """JSON Schema counts 2.0 as an integer, and so do we (strict mode alone would refuse it)."""
    return int(v) if isinstance(v, float) and v.is_integer() else v


Int = Annotated[int, BeforeValidator(_whole)]
Int64 = Annotated[Int, Field(ge=-(2**63), le=2**63 - 1)]


def one_of(what: str) -> WrapValidator:
    """A union's error as one message saying what the field takes (pydantic's would list every branch by its
    internal name)."""
    def validate(v, handler):
        try:
            return handler(v)
        except ValidationError:
            raise PydanticCustomError("union_type", f"must be {what}") from None
    return WrapValidator(validate)


def only_default(*neutral) -> Any:
    """An OpenAI field this server does not implement: null, or a value that asks for nothing (its default, an
    empty list of tools, a tool_choice of "none"), is accepted, as clients send them; anything else is refused
    by name."""
    def check(v):
        if v is not None and not any(type(v) is type(n) and v == n for n in neutral):
            raise PydanticCustomError("unsupported", "is not supported by this server")
        return v
    return Annotated[Any, BeforeValidator(check)]


class _Request(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow", allow_inf_nan=False)

    @model_validator(mode="after")
    def _warn_ignored(self):
        if self.model_extra:
            log.warning("fields of a %s ignored: %s", type(self).__name__, ", ".join(sorted(self.model_extra)))
        return self


class StreamOptions(_Request):
    include_usage: bool = False
    continuous_usage_stats: bool = False  # (vLLM's) usage so far in every chunk, with include_usage


GUIDED = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice", "guided_grammar": "grammar"}
# what beam search cannot honor, each with the values that ask for nothing: refused by name at any other (the
# sampling knobs, meaningless to a deterministic search, are ignored, as vLLM's)
BEAM_SEARCH_REFUSES = {"stop": ("", []), "stop_token_ids": ([],), "min_tokens": (0,), "repetition_penalty": (1,),
                       "presence_penalty": (0,), "frequency_penalty": (0,), "logit_bias": ({},),
                       "allowed_token_ids": (), "bad_words": ([],), "prompt_logprobs": (), "echo": (False,),
                       "tools": ([],)}


class JsonSchema(_Request):
    name: str | None = None
    description: str | None = None
    json_schema: dict[str, Any] = Field(alias="schema")  # ("schema" would shadow BaseModel's)
    strict: bool | None = None


class ResponseFormat(_Request):
    """OpenAI's: plain text, any JSON object, or JSON of a schema."""
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchema | None = None

    _schema_given = model_validator(mode="after")(lambda self: schema_with_its_type(self, "json_schema"))


def schema_with_its_type(fmt, name: str):
    """A format's schema (its json_schema attribute, given as name) comes with type json_schema, and only there."""
    if (fmt.type == "json_schema") != (fmt.json_schema is not None):
        raise PydanticCustomError(name, "{name} goes with type json_schema, and only there", {"name": name})
    return fmt


class _SamplingRequest(_Request):
    """The fields common to both endpoints; null means the default, as OpenAI clients send it."""
    model: str | None = None
    n: Int | None = Field(None, ge=1, le=MAX_N)
    temperature: float | None = None
    top_p: float | None = None
    top_k: Int64 | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    min_tokens: Int64 | None = None
    stop: Annotated[str | list[str] | None, one_of("a string or a list of strings")] = None
    stop_token_ids: list[Int64] | None = None
    include_stop_str_in_output: bool | None = None
    ignore_eos: bool | None = None
    seed: Int64 | None = None
    prompt_logprobs: Int64 | None = None
    skip_special_tokens: bool | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    user: str | None = None  # an end-user id; accepted and not used
    request_id: str | None = None  # (vLLM's) the response's id is cmpl-ID / chatcmpl-ID (an X-Request-Id header wins)
    return_tokens_as_token_ids: bool | None = None  # (vLLM's) logprobs name tokens "token_id:ID" (None: the server's)
    # token id (a JSON object's key, so a string) -> bias, clamped to OpenAI's [-100, 100] as vLLM does
    logit_bias: dict[str, float] | None = None
    allowed_token_ids: list[Int64] | None = None  # (vLLM's)
    bad_words: list[str] | None = None  # (vLLM's)
    truncate_prompt_tokens: Int64 | None = None  # (vLLM's) only the prompt's last k tokens; -1: as many as fit
    priority: Int64 = 0  # (vLLM's) with the engine's schedule_policy "priority": lower first
    use_beam_search: bool = False  # (vLLM's) n beams: the n likeliest continuations (nanoflow.beam_search)
    length_penalty: float = 1.0  # (vLLM's) with use_beam_search: a beam's score is its logprob / length ** this
    response_format: ResponseFormat | None = None
    structured_outputs: dict[str, Any] | None = None  # (vLLM's) StructuredOutputsParams' fields
    # (vLLM's before 0.12, which clients still send: each one of structured_outputs' fields)
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None

    @field_validator("logit_bias")
    @classmethod
    def _token_keys(cls, v):
        if v is None:
            return v
        if bad := next((k for k in v if not k.strip().isdigit()), None):
            raise PydanticCustomError("token_key", "keys must be token ids, got {key}", {"key": repr(bad)})
        return {int(k): min(100.0, max(-100.0, b)) for k, b in v.items()}

    @field_validator("stream_options")
    @classmethod
    def _needs_stream(cls, v, info):
        if v is not None and not info.data.get("stream"):
            raise PydanticCustomError("needs_stream", "is only for stream=true")
        return v

    def _sampling_params(self, defaults: dict, max_tokens: int | None, logprobs: int | None) -> SamplingParams:
        """defaults: the model's (generation config), for what the request leaves unset; its max_tokens bounds the
        request's, as vLLM's (a request without one: the server cuts it to the context left). Raises ValueError
        naming the parameter (see SamplingParams)."""
        names = ("n", "temperature", "top_p", "top_k", "min_p", "repetition_penalty", "presence_penalty",
                 "frequency_penalty", "min_tokens", "stop", "stop_token_ids", "include_stop_str_in_output",
                 "ignore_eos", "seed", "prompt_logprobs", "skip_special_tokens", "logit_bias", "allowed_token_ids",
                 "structured_outputs", "bad_words", "truncate_prompt_tokens")
        given = {k: v for k, v in defaults.items() if k != "max_tokens"}
        given |= {k: v for k in names if (v := getattr(self, k)) is not None}
        if self.use_beam_search:  # (its n beams are ranked by raw logprobs: no temperature, so no greedy n = 1 rule)
            given["temperature"] = 1.0
        sources = self.grammar_sources
        if len(sources) > 1:
            raise ValueError(f"invalid sampling parameter {sources[1]}: give one of {' and '.join(sources)}, not both")
        if sources and sources[0] in GUIDED:
            given["structured_outputs"] = {GUIDED[sources[0]]: getattr(self, sources[0])}
        elif sources == ["response_format"]:
            f = self.response_format
            given["structured_outputs"] = ({"json_object": True} if f.type == "json_object" else
                                           {"json": f.json_schema.json_schema})
        if max_tokens is not None and (bound := defaults.get("max_tokens")) is not None and bound < max_tokens:
            if self.min_tokens is not None and self.min_tokens > bound:
                raise ValueError(f"invalid sampling parameter min_tokens={self.min_tokens}: must be <= max_tokens, "
                                 f"which the model's generation config bounds at {bound}")
            max_tokens = bound
        return SamplingParams(**given, max_tokens=max_tokens, logprobs=logprobs)

    def beam_search_params(self, max_tokens: int, ignore_eos: bool) -> BeamSearchParams:
        """use_beam_search's: n beams of up to max_tokens tokens. Raises ValueError naming a field it cannot
        honor."""
        if refused := [k for k, neutral in BEAM_SEARCH_REFUSES.items()
                       if (v := getattr(self, k, None)) is not None and v not in neutral]:
            raise ValueError(f"invalid sampling parameter {refused[0]}: beam search (use_beam_search) does not take it")
        if self.grammar_sources:
            raise ValueError(f"invalid sampling parameter {self.grammar_sources[0]}: beam search (use_beam_search) "
                             f"does not take a grammar")
        if (n := self.n or 1) > MAX_LOGPROBS // 2:
            raise ValueError(f"invalid sampling parameter n={n}: beam search takes at most {MAX_LOGPROBS // 2} beams")
        return BeamSearchParams(n, max_tokens, ignore_eos, length_penalty=self.length_penalty,
                                include_stop_str_in_output=bool(self.include_stop_str_in_output))

    @property
    def grammar_sources(self) -> list[str]:
        """The fields that ask for a grammar (one at most is taken; its errors are named by it)."""
        sources = [k for k in ("structured_outputs", *GUIDED) if getattr(self, k) is not None]
        return sources + (["response_format"] if self.response_format and self.response_format.type != "text" else [])

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    @property
    def continuous_usage(self) -> bool:
        return self.include_usage and self.stream_options.continuous_usage_stats


class CompletionRequest(_SamplingRequest):
    prompt: Annotated[str | list[str] | list[Int64] | list[list[Int64]],
                      one_of("a string, a list of strings, a list of token ids or a list of lists of token ids")]
    max_tokens: Int64 | None = 16  # null: up to the context length (or the model's default, if less)
    logprobs: Int64 | None = None
    echo: bool | None = None  # the prompt before the completion (its logprobs too); with max_tokens 0, alone
    best_of: only_default(1) = None
    suffix: only_default("") = None

    @property
    def echo_only(self) -> bool:
        """The prompt and its logprobs, no completion (as lm-eval's loglikelihood asks)."""
        return bool(self.echo) and self.max_tokens == 0

    def sampling_params(self, defaults: dict) -> SamplingParams:
        # (echo alone: one token is computed, for the prompt's logprobs, and dropped)
        params = self._sampling_params(defaults, 1 if self.echo_only else self.max_tokens, self.logprobs)
        if self.echo and self.logprobs is not None and params.prompt_logprobs is None:  # (the echoed prompt's)
            params = replace(params, prompt_logprobs=self.logprobs)
        return params


class TextPart(_Request):
    type: Literal["text"]
    text: str


class RefusalPart(_Request):
    """(An assistant's refusal in a replayed conversation: its text, as vLLM reads it.)"""
    type: Literal["refusal"]
    refusal: str


class FunctionCallIn(_Request):
    name: str
    arguments: str  # JSON text


class ToolCallIn(_Request):
    """A call an earlier assistant message made."""
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCallIn


def is_json(text: str) -> bool:
    try:
        json.loads(text)
    except (ValueError, RecursionError):  # (nesting deeper than Python's stack is no JSON here either)
        return False
    return True


def json_arguments(text: str) -> str:
    """A call's arguments as a request gives them: JSON text, else a validation error."""
    if not is_json(text):
        raise PydanticCustomError("json_arguments", "a call's arguments must be JSON text, got {arguments}",
                                  {"arguments": repr(text)})
    return text


class ChatMessage(_Request):
    # system, developer, user, assistant, tool; or another the model's template knows (Llama 3.1's ipython), as
    # vLLM's custom roles
    role: str = Field(min_length=1)
    content: Annotated[str | list[TextPart | RefusalPart] | None, one_of("a string or a list of text parts")] = None
    name: str | None = None
    tool_calls: list[ToolCallIn] | None = None  # (an assistant's)
    tool_call_id: str | None = None  # (a tool's result: the call it answers)
    # (an assistant's earlier reasoning, which templates such as Qwen3's keep in tool-call loops: under either name,
    # given to the template under both, as vLLM's)
    reasoning: str | None = None
    reasoning_content: str | None = None

    @field_validator("tool_calls")
    @classmethod
    def _json_arguments(cls, v):
        for call in v or ():
            json_arguments(call.function.arguments)
        return v

    def for_template(self) -> dict:
        """(The tokenizer joins text parts and decodes the calls' arguments; extra fields stay out.)"""
        m = self.model_dump(include={"role", "content", "name", "tool_calls", "tool_call_id"}, exclude_none=True)
        if (thought := self.reasoning if self.reasoning is not None else self.reasoning_content) is not None:
            m |= {"reasoning": thought, "reasoning_content": thought}
        return {"content": None} | m


class FunctionDefinition(_Request):
    name: str = Field(min_length=1)
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema of the arguments
    strict: bool | None = None


class ChatTool(_Request):
    type: Literal["function"] = "function"  # (vLLM's default)
    function: FunctionDefinition


def template_tools(tools: list[ChatTool] | None) -> list[dict] | None:
    """The tools as the chat template gets them (HF's: OpenAI's objects), under every tool_choice (vLLM's)."""
    return [t.model_dump(exclude_none=True) for t in tools] if tools else None


class FunctionName(_Request):
    name: str


class NamedToolChoice(_Request):
    type: Literal["function"] = "function"  # (vLLM's default)
    function: FunctionName


class ChatCompletionRequest(_SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: Int64 | None = None  # the older name of max_completion_tokens
    max_completion_tokens: Int64 | None = None  # null: up to the context length (or the model's default, if less)
    logprobs: bool | None = None
    top_logprobs: Int64 | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False  # (vLLM's) the text ends inside the last message, for the model to go on
    chat_template_kwargs: dict[str, Any] | None = None  # (vLLM's) the template's own variables
    tools: list[ChatTool] | None = None
    tool_choice: Annotated[Literal["none", "auto", "required"] | NamedToolChoice | None, one_of(
        '"none", "auto", "required" or {"type": "function", "function": {"name": ...}}')] = None
    parallel_tool_calls: bool | None = None
    include_reasoning: bool = True  # (vLLM's) with the server's --reasoning-parser: false drops the reasoning
    echo: bool = False  # (vLLM's) each choice's content starts with the last message's, where that is the assistant's
    functions: only_default([]) = None
    function_call: only_default("none", "auto") = None

    @field_validator("tools")
    @classmethod
    def _named_once(cls, v):
        seen = set()
        for name in (t.function.name for t in v or ()):
            if name in seen:
                raise PydanticCustomError("tool_names", "two tools are named {name}: a call could not tell them apart",
                                          {"name": repr(name)})
            seen.add(name)
        return v

    @field_validator("tool_choice")
    @classmethod
    def _among_the_tools(cls, v, info):
        if "tools" not in info.data:  # (the tools were refused: that error is the one to read)
            return v
        tools = info.data["tools"]
        if v in ("required", "auto") and tools is None:  # (as vLLM's and OpenAI's; an empty list: none, as vLLM's)
            raise PydanticCustomError("tool_choice", "{v} needs tools", {"v": repr(v)})
        if isinstance(v, NamedToolChoice) and v.function.name not in {t.function.name for t in tools or ()}:
            raise PydanticCustomError("tool_choice", "names the function {name}, which is not among the tools",
                                      {"name": repr(v.function.name)})
        return v

    def echoed(self) -> str:
        """With echo, the text each choice's content starts with: the last message's content where it is the
        assistant's (a prefill the model continues), its text parts joined by newlines (as vLLM's)."""
        last = self.messages[-1]
        if not self.echo or last.role != "assistant":
            return ""
        return template_content(last.for_template()["content"], parts=False)

    def tool_choice_for(self, parser: str | None) -> ToolChoice:
        """The request's tool choice (OpenAI's default: "auto" with tools, else "none"; with an empty list of tools,
        "auto" and "required" ask for nothing, as vLLM's). "auto" needs the server's parser; "named" and "required"
        hold the output to a schema, so they take no grammar of the request's own."""
        choice = self.tool_choice or ("auto" if self.tools else "none")
        if not self.tools or choice == "none":
            return ToolChoice(None)
        if choice == "auto" and parser is None:
            raise ValueError('invalid sampling parameter tool_choice: "auto" (the default with tools) needs the '
                             'server started with --enable-auto-tool-choice and --tool-call-parser; or ask for '
                             '"required", "none" or a named function')
        if choice != "auto" and self.grammar_sources:
            what = repr(choice) if isinstance(choice, str) else f"of the function {choice.function.name!r}"
            raise ValueError(f"invalid sampling parameter {self.grammar_sources[0]}: tool_choice {what} holds the "
                             f"output to the tools' schemas, and takes no other grammar")
        parallel = self.parallel_tool_calls is not False
        if isinstance(choice, NamedToolChoice):
            return ToolChoice("named", name=choice.function.name, parser=parser)
        return ToolChoice(choice, parser=parser, parallel=parallel,
                          schemas={t.function.name: parameters_schema(t.function) for t in self.tools})

    def sampling_params(self, defaults: dict, tools: ToolChoice | None = None) -> SamplingParams:
        """tools: the request's tool choice (tool_choice_for), whose grammar this takes."""
        if self.top_logprobs and not self.logprobs:  # (0 asks for nothing: taken, as vLLM's)
            raise ValueError("invalid sampling parameter top_logprobs: needs logprobs=true")
        if self.top_logprobs is not None and not 0 <= self.top_logprobs <= MAX_LOGPROBS:
            raise ValueError(f"invalid sampling parameter top_logprobs={self.top_logprobs}: must be an integer in "
                             f"[0, {MAX_LOGPROBS}]")
        k = (self.top_logprobs or 0) if self.logprobs else None
        max_tokens = self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
        params = self._sampling_params(defaults, max_tokens, k)
        if tools is not None and tools.mode == "named":
            function = next(t.function for t in self.tools if t.function.name == tools.name)
            params = replace(params, structured_outputs={"json": parameters_schema(function)})
        elif tools is not None and tools.mode == "required":
            params = replace(params, structured_outputs={"json": required_schema(self.tools, tools.parallel)})
        elif tools is not None and tools.mode == "auto" and tools.parser in TAGGED and self.skip_special_tokens is None:
            params = replace(params, skip_special_tokens=False)  # (its tags may be special tokens: vLLM's too)
        return params


def chat_request(body: dict, names: dict[str, str]) -> ChatCompletionRequest:
    """The chat request another API's request stands for (the Responses and Messages APIs'); body's None values
    left out. A ValueError names the field as that API does (names: chat's field -> its own; a renamed field named
    whole, since its items need not be the chat's one for one)."""
    try:
        return ChatCompletionRequest.model_validate({k: v for k, v in body.items() if v is not None})
    except ValidationError as e:
        err = e.errors()[0]
        top = str(err["loc"][0])
        where = names[top] if top in names else ".".join(str(x) for x in err["loc"])
        raise ValueError(f"invalid sampling parameter {where}: {err['msg']}") from None


def renamed(text: str, names: dict[str, str]) -> str:
    """An error's text with chat's parameter names as another API names them (a name before "=" or ":" only)."""
    for chat, theirs in names.items():
        text = re.sub(rf"\b{chat}(?=[=:]|$)", theirs, text)
    return text


class TokenizeRequest(_Request):
    """vLLM's /tokenize: a prompt as /v1/completions would encode it, or messages as /v1/chat/completions would."""
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(None, min_length=1)
    add_special_tokens: bool | None = None  # default: True for a prompt; the chat template holds its own
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: dict[str, Any] | None = None
    tools: list[ChatTool] | None = None
    return_token_strs: bool = False

    @model_validator(mode="after")
    def _one_input(self):
        if (self.messages is None) == (self.prompt is None):
            raise PydanticCustomError("one_input", "give exactly one of prompt and messages",
                                      {"param": "messages" if self.messages is not None else "prompt"})
        return self


class DetokenizeRequest(_Request):
    model: str | None = None
    tokens: list[Int64]


# -- responses -----------------------------------------------------------------------------------
class PromptTokensDetails(BaseModel):
    cached_tokens: int  # the prompt's tokens found in the prefix cache


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None  # (with --enable-prompt-tokens-details, as vLLM's)


class PromptLogprob(BaseModel):
    logprob: float
    rank: int
    decoded_token: str | None


class CompletionLogprobs(BaseModel):
    """(With echo, the prompt's first token has null in token_logprobs and top_logprobs.)"""
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


PromptLogprobs = list[dict[int, PromptLogprob] | None] | None


class _Choice(BaseModel):
    """What every choice carries beside its content."""
    index: int
    finish_reason: str | None = None  # stop | length | abort
    stop_reason: int | str | None = None  # the stop string or token id that ended it


class _Response(BaseModel):
    id: str
    created: int
    model: str


class CompletionChoice(_Choice):
    text: str
    logprobs: CompletionLogprobs | None = None
    prompt_logprobs: PromptLogprobs = None  # (its prompt's: a completion may have several prompts)


class CompletionResponse(_Response):
    """Also each chunk of a stream (one choice a chunk; usage in the last one, or in every one with
    continuous_usage_stats, when asked for)."""
    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionChoice]
    usage: Usage | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[TokenLogprob]


class FunctionCall(BaseModel):
    name: str
    arguments: str  # JSON text


class ToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessageOut(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None
    tool_calls: list[ToolCall] | None = None
    reasoning: str | None = None  # (with --reasoning-parser; also as vLLM's older name, reasoning_content)
    reasoning_content: str | None = None


class ChatChoice(_Choice):
    message: ChatMessageOut
    logprobs: ChatLogprobs | None = None


class _Sparse(BaseModel):
    """Sent without its null fields, as OpenAI's deltas are: a later delta's "type": null would overwrite the
    call's type in clients that accumulate deltas (the openai client's stream helper asserts on it)."""

    @model_serializer(mode="wrap")
    def _without_nulls(self, handler):
        return {k: v for k, v in handler(self).items() if v is not None}


class DeltaFunctionCall(_Sparse):
    name: str | None = None  # (in a call's first delta)
    arguments: str | None = None


class DeltaToolCall(_Sparse):
    index: int
    id: str | None = None  # (in a call's first delta, with its type)
    type: Literal["function"] | None = None
    function: DeltaFunctionCall


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None  # (in a choice's first delta)
    content: str | None = None
    tool_calls: list[DeltaToolCall] | None = None
    reasoning: str | None = None
    reasoning_content: str | None = None


class ChatCompletionResponse(_Response):
    object: Literal["chat.completion"] = "chat.completion"
    choices: list[ChatChoice]
    usage: Usage
    prompt_logprobs: PromptLogprobs = None


class ChatStreamChoice(_Choice):
    delta: ChatDelta
    logprobs: ChatLogprobs | None = None


class ChatCompletionChunk(_Response):
    """(prompt_logprobs in the first chunk, when asked for)"""
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    choices: list[ChatStreamChoice]
    usage: Usage | None = None
    prompt_logprobs: PromptLogprobs = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "nanoflow"
    root: str  # where the model came from (vLLM's)
    parent: str | None = None
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeResponse(BaseModel):
    prompt: str
