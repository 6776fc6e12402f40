"""Tool calling in chat completions (OpenAI's tools / tool_choice, as vLLM's): what a request's tool choice holds
the output to, and the calls read back from the generated text.

- named (`{"type": "function", "function": {"name": F}}`): the output is F's arguments, held by a grammar to F's
  parameters (a JSON schema); one call. Its finish_reason is the generation's (OpenAI's "stop").
- required: the output is a JSON array of `{"name", "parameters"}` objects, held to the tools' schemas (one item at
  most when parallel_tool_calls is false); a call each.
- auto (the server's --enable-auto-tool-choice with a --tool-call-parser): the model writes calls in its own format,
  which the parser reads back; the text before them is the content. hermes (Hermes, Qwen2.5):
  `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, several allowed; llama3_json (Llama 3.1 / 3.2):
  `{"name": ..., "parameters": {...}}` objects separated by ';' making up the whole output (blank lines before them
  allowed), optionally after `<|python_tag|>`; qwen3_coder (Qwen3-Coder's XML): `<tool_call><function=NAME>
  <parameter=KEY>VALUE</parameter>...</function></tool_call>`, each value typed by the tool's schema (a string, or a
  number, boolean, null, object or array read as JSON), as vLLM's; mistral (Mistral v0.3:
  `[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]`; its v11 tokenizers: `[TOOL_CALLS]NAME[ARGS]{...}`,
  repeated); pythonic (Llama 3.2 / 4: `[get_weather(city="Paris"), ...]`, the whole output, arguments as Python
  literals). Text the parser cannot read is the content, as vLLM's; hermes and qwen3_coder drop text after the
  calls, as vLLM's.
- none: the tools reach the chat template only.

Where calls are read back (required, auto), finish_reason is "tool_calls" when there are some. A stream sends the
content that cannot be part of a call as it comes, and the calls whole when the choice ends (a named call's
arguments stream as they come); the stream adds up to the response the same request gets unstreamed.
"""
from __future__ import annotations

import ast
import json
import logging
import math
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from nanoflow.engine.detokenizer import marker_tail

log = logging.getLogger(__name__)

PARSERS = ("hermes", "llama3_json", "mistral", "pythonic", "qwen3_coder")
TAGGED = ("hermes", "mistral", "qwen3_coder")  # (formats whose tags may be special tokens: kept in the text)
_HERMES_START, _HERMES_END = "<tool_call>", "</tool_call>"
_MISTRAL, _MISTRAL_ARGS = "[TOOL_CALLS]", "[ARGS]"
_JSON_SPACE = re.compile(r"[ \t\n\r]*")
_PYTHON_TAG = "<|python_tag|>"


@dataclass(frozen=True, slots=True)
class Call:
    name: str
    arguments: str  # JSON text, as OpenAI's tool calls carry it


def new_id(parser: str | None = None) -> str:
    """A call's id; Mistral's templates take only 9 letters and digits (vLLM's mistral ids)."""
    return uuid.uuid4().hex[:9] if parser == "mistral" else f"chatcmpl-tool-{uuid.uuid4().hex}"


def _not_json(constant: str):
    raise ValueError(f"{constant} is not JSON")


_DECODER = json.JSONDecoder(parse_constant=_not_json)  # (Python's json takes NaN and Infinity, which clients do not)


def _call(obj, *keys: str) -> Call:
    """A call from the model's JSON object: its name and, under the first of keys it has, its arguments. Arguments the
    model wrote encoded (an object's text, as some do) are that object; any other string is a string value."""
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        raise ValueError(f"a tool call must be an object with a string 'name', got {obj!r}")
    obj["name"].encode()  # (a lone surrogate, which JSON's escapes allow, is no UTF-8: a UnicodeEncodeError)
    args = next((obj[k] for k in keys if k in obj), {})
    if isinstance(args, str):
        try:
            decoded = _DECODER.decode(args)
            args = decoded if isinstance(decoded, dict) else args
        except ValueError:
            pass
    return Call(obj["name"], _json_text(args))


def _json_text(value) -> str:
    """value as JSON text, its characters as they are unless one is a lone surrogate (escaped then, as UTF-8 cannot
    carry it)."""
    text = json.dumps(value, ensure_ascii=False, allow_nan=False)  # (NaN, Infinity: no JSON, a ValueError)
    try:
        text.encode()
    except UnicodeEncodeError:
        return json.dumps(value)
    return text


def _hermes(text: str) -> tuple[str | None, list[Call]] | None:
    at = text.find(_HERMES_START)
    if at < 0:
        return None
    calls, i = [], at
    while i >= 0:  # (each call's JSON decoded whole: a "</tool_call>" inside one of its strings does not end it)
        obj, i = _DECODER.raw_decode(text, _JSON_SPACE.match(text, i + len(_HERMES_START)).end())
        calls.append(_call(obj, "arguments"))
        j = _JSON_SPACE.match(text, i).end()
        if j < len(text) and not text.startswith(_HERMES_END, j):  # (the last call may be unclosed)
            raise ValueError(f"a tool call's JSON must end at {_HERMES_END}, got {text[j:j + 20]!r} after it")
        i = text.find(_HERMES_START, i)
    return text[:at] or None, calls


_CALL_BLOCK = re.compile(r"<tool_call>(.*?)(?:</tool_call>|$)", re.S)
_FUNCTION_START = "<function="
_FUNCTION = re.compile(r"<function=([^>\n]+)>(.*?)(?:</function>|$)", re.S)
_PARAMETER = re.compile(r"<parameter=([^>\n]+)>(.*?)(?:</parameter>|(?=<parameter=)|$)", re.S)
_NAMED_TYPES = {"string": str, "str": str, "text": str, "varchar": str, "char": str, "enum": str,
                "integer": int, "int": int, "number": float, "float": float, "double": float, "boolean": bool,
                "bool": bool, "object": object, "array": object, "dict": object, "list": object}


def _qwen3_coder(text: str, schemas: dict[str, dict]) -> tuple[str | None, list[Call]] | None:
    """schemas: each tool's parameters (a JSON schema), which type its values. Each <tool_call> block's functions
    (a <function=...> without the block too, as vLLM's back-off); the content is the text before the first."""
    blocks = [(m.start(), m.group(1)) for m in _CALL_BLOCK.finditer(text)]
    if not blocks and (at := text.find(_FUNCTION_START)) >= 0:
        blocks = [(at, text[at:])]
    calls, first = [], None
    for at, block in blocks:
        for name, body in _FUNCTION.findall(block):
            first = at if first is None else first
            properties = _properties(schemas.get(name.strip()))
            calls.append(Call(name.strip(), _json_text({
                key.strip(): _typed(value.removeprefix("\n").removesuffix("\n"), properties.get(key.strip()))
                for key, value in _PARAMETER.findall(body)})))
    return (text[:first] or None, calls) if calls else None


def _properties(schema) -> dict:
    properties = schema.get("properties") if isinstance(schema, dict) else None
    return properties if isinstance(properties, dict) else {}


def _typed(value: str, schema) -> object:
    """A parameter's text as its schema's type says, as vLLM's: null (any case) is None; a string stays as written
    (also without a schema, or a type it does not know); an integer or number as Python reads it (a whole float as
    an int); a boolean is "true" (any case) or not; an object or array as JSON, else as a Python literal; what does
    not read stays the text."""
    kind = schema.get("type") if isinstance(schema, dict) else None
    kind = next((k for k in kind if k != "null"), None) if isinstance(kind, list) else kind
    want = _NAMED_TYPES.get(kind.strip().lower(), str) if isinstance(kind, str) else str
    if value.strip().lower() == "null":
        return None
    try:
        if want is int:
            return int(value.strip())
        if want is float:
            number = float(value.strip())
            return int(number) if number.is_integer() and math.isfinite(number) else number
        if want is bool:
            return value.strip().lower() == "true"
        if want is object:
            try:
                return _DECODER.decode(value.strip())
            except ValueError:
                return ast.literal_eval(value.strip())
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        pass
    return value


def _mistral(text: str) -> tuple[str | None, list[Call]] | None:
    at = text.find(_MISTRAL)
    if at < 0:
        return None
    calls = []
    for part in text[at + len(_MISTRAL):].split(_MISTRAL):
        if part.strip()[:1] in ("[", "{"):  # (v0.3: an array of calls, or one; text after it dropped, as vLLM's)
            items = _DECODER.raw_decode(part.strip())[0]
            calls += [_call(item, "arguments") for item in (items if isinstance(items, list) else [items])]
            continue
        name, given, args = part.partition(_MISTRAL_ARGS)
        if given:  # (v11: NAME[ARGS]{...})
            if not name.strip():
                raise ValueError(f"a call's name goes before {_MISTRAL_ARGS}, got {part[:40]!r}")
            calls.append(_call({"name": name.strip(), "arguments": _DECODER.decode(args.strip())}, "arguments"))
            continue
        raise ValueError(f"{_MISTRAL} must be followed by calls, got {part[:40]!r}")
    return text[:at] or None, calls


def _pythonic(text: str) -> tuple[str | None, list[Call]] | None:
    body = text.strip().removeprefix(_PYTHON_TAG)
    if not body.startswith("["):
        return None
    try:
        tree = ast.parse(body, mode="eval").body
    except SyntaxError as e:
        raise ValueError(f"the calls are no Python list: {e}") from None
    if not isinstance(tree, ast.List) or not all(isinstance(c, ast.Call) and isinstance(c.func, ast.Name)
                                                 and not c.args for c in tree.elts):
        raise ValueError(f"the calls must be a list of name(key=value, ...), got {body[:40]!r}")
    if any(k.arg is None for c in tree.elts for k in c.keywords):
        raise ValueError("a call's arguments must be key=value (no **)")
    try:  # (a literal JSON has no form for, a set or bytes: a TypeError)
        return None, [Call(c.func.id, _json_text({k.arg: ast.literal_eval(k.value) for k in c.keywords}))
                      for c in tree.elts]
    except TypeError as e:
        raise ValueError(f"an argument JSON cannot carry: {e}") from None


def _llama3_json(text: str) -> tuple[str | None, list[Call]] | None:
    text = text.lstrip()  # (a model may open with blank lines)
    body = text.removeprefix(_PYTHON_TAG)
    if body == text and not text.startswith("{"):
        return None
    calls, i = [], 0
    while True:
        while i < len(body) and (body[i].isspace() or body[i] == ";"):
            i += 1
        if i == len(body):
            return (None, calls) if calls else None
        obj, i = _DECODER.raw_decode(body, i)
        calls.append(_call(obj, "arguments", "parameters"))  # (both given: arguments, as vLLM's)


def _required(text: str) -> tuple[str | None, list[Call]] | None:
    items = _DECODER.decode(text)
    if not isinstance(items, list) or not items:
        raise ValueError(f"required tool calls must be a non-empty JSON array, got {text!r}")
    return None, [_call(item, "parameters") for item in items]


def _before(*markers: str) -> Callable[[str], int]:
    """Where the content surely ends in a partial text of a format whose calls open with one of markers: at the
    first, or before what may be its start."""
    def end(text: str) -> int:
        return min(at if (at := text.find(m)) >= 0 else len(text) - marker_tail(text, m) for m in markers)
    return end


def _whole(opening: str) -> Callable[[str], int]:
    """Where the content surely ends in a partial text of a format whose calls are the whole output (after blank
    lines, maybe after <|python_tag|>), opening with `opening`: nowhere while they may be ahead, else at its end."""
    def end(text: str) -> int:
        head = text.lstrip()
        return 0 if head.startswith((opening, _PYTHON_TAG)) or _PYTHON_TAG.startswith(head) else len(text)
    return end


def _untyped(read: Callable) -> Callable:
    """A format's reader that needs no tools' schemas, taking them as qwen3_coder's does."""
    return lambda text, schemas: read(text)


# each format's (reader of a whole text, given the tools' schemas; where content surely ends in a partial one)
_READ = {"hermes": (_untyped(_hermes), _before(_HERMES_START)), "llama3_json": (_untyped(_llama3_json), _whole("{")),
         "mistral": (_untyped(_mistral), _before(_MISTRAL)), "pythonic": (_untyped(_pythonic), _whole("[")),
         "qwen3_coder": (_qwen3_coder, _before(_HERMES_START, _FUNCTION_START)),
         "required": (_untyped(_required), lambda text: 0)}


def parameters_schema(function) -> dict:
    """A function's parameters; one without takes none: its arguments are {} (as vLLM's)."""
    return function.parameters or {"type": "object", "properties": {}}


def required_schema(tools, parallel: bool = True) -> dict:
    """The JSON schema of tool_choice "required": an array of {name, parameters} objects, each of one tool. The
    tools' $defs move to the root, where their references ("#/$defs/...") point from inside the array."""
    items = [{"properties": {"name": {"type": "string", "enum": [t.function.name]},
                             "parameters": parameters_schema(t.function)},
              "required": ["name", "parameters"]} for t in tools]
    schema = {"type": "array", "minItems": 1, "items": {"type": "object", "anyOf": items}}
    if not parallel:
        schema["maxItems"] = 1
    defs = {}
    for t in tools:
        given = parameters_schema(t.function).get("$defs")
        for name, d in given.items() if isinstance(given, dict) else ():  # (a malformed one: the grammar's to refuse)
            if defs.setdefault(name, d) != d:
                raise ValueError(f"invalid sampling parameter tools: two tools define $defs {name!r} differently, "
                                 f"which tool_choice 'required' cannot tell apart")
    return schema | ({"$defs": defs} if defs else {})


class ToolChoice:
    """A request's tool choice, resolved: `mode` is "named", "required", "auto" or None (no calls are read), and the
    server's parser (the format "auto" reads; its calls' ids under every mode). Makes each choice's message (and its
    stream)."""
    __slots__ = ("mode", "name", "parallel", "parser", "schemas")

    def __init__(self, mode: str | None, name: str | None = None, parser: str | None = None, parallel: bool = True,
                 schemas: dict[str, dict] | None = None):
        """schemas: each tool's parameters, by name (qwen3_coder types its values by them)."""
        self.mode, self.name, self.parser, self.parallel, self.schemas = mode, name, parser, parallel, schemas or {}

    @property
    def reads_calls(self) -> bool:
        return self.mode in ("required", "auto")

    @property
    def _format(self) -> tuple:
        """(the parse of a whole text, where content surely ends in a partial one) of the calls' format."""
        return _READ[self.parser if self.mode == "auto" else "required"]

    def read(self, text: str) -> tuple[str | None, list[Call]]:
        """(content, calls) of a choice's whole text; text no call can be read from is all content."""
        if self.mode == "named":  # (no text, as when a reasoning never ended: no call, rather than one without JSON)
            return None, [Call(self.name, text)] if text else []
        if not self.reads_calls:
            return text, []
        try:
            found = self._format[0](text, self.schemas)
        except Exception as e:  # (the model's text, whatever it holds: json's ValueErrors, deep nesting, ast's limits)
            log.warning("tool calls not read (the text is the content): %s", e)
            found = None
        if found is None or not found[1]:  # (an empty list of calls is no call: the text stays, as vLLM's)
            return text, []
        content, calls = found
        return content, calls if self.parallel or self.mode == "required" else calls[:1]

    def finish_reason(self, reason: str | None, calls: list[Call]) -> str | None:
        """"tool_calls" where calls were read (a required choice's only if it ended by itself, as vLLM's: one cut at
        max_tokens stays "length")."""
        if self.mode == "required" and reason != "stop":
            return reason
        return "tool_calls" if reason is not None and calls and self.reads_calls else reason

    def stream(self) -> "ToolStream":
        return ToolStream(self)


class ToolStream:
    """One choice's stream. step(text, finished) takes the choice's whole text so far and returns what to send now:
    (content, [(index, id, name, arguments)]): content that no call can start in; the calls when the choice ends
    (a named call: its arguments piece by piece, id and name with the first)."""
    __slots__ = ("choice", "id", "sent")

    def __init__(self, choice: ToolChoice):
        self.choice, self.sent, self.id = choice, 0, None

    def step(self, text: str, finished: bool) -> tuple[str | None, list[tuple]]:
        c = self.choice
        if c.mode == "named":
            piece, self.sent = text[self.sent:], len(text)
            if not piece:  # (the call opens with its first text: none, no call, as read's)
                return None, []
            first, self.id = self.id is None, self.id or new_id(c.parser)
            return None, [(0, self.id if first else None, c.name if first else None, piece)]
        if not c.reads_calls:
            piece, self.sent = text[self.sent:], len(text)
            return piece, []
        if not finished:
            end = max(c._format[1](text), self.sent)
            piece, self.sent = text[self.sent:end], end
            return piece or None, []
        content, calls = c.read(text)
        rest = (content or "")[self.sent:] if calls else text[self.sent:]
        self.sent = len(text)
        return rest or None, [(i, new_id(c.parser), call.name, call.arguments) for i, call in enumerate(calls)]
