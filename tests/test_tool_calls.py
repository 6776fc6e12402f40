"""Tool calling in chat completions: the parsers (hermes, llama3_json, required's array), their streams (which add up
to the unstreamed response), the request's checks, the tools and earlier calls in the chat template; then a real
server with --enable-auto-tool-choice driven by the openai client: named, required and auto calls, streamed and not."""
import json

import httpx
import openai
import pytest

from nanoflow.entrypoints import openai_protocol as api
from nanoflow.entrypoints.tool_calls import Call, ToolChoice, required_schema

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "enum": ["Paris", "Lyon"]},
                                                    "unit": {"type": "string", "enum": ["C", "F"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {"name": "get_time"}}  # (no parameters: it takes none)
USER = [{"role": "user", "content": "What is the weather in Paris?"}]

HERMES_TWO = ('Let me check. <tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "C"}}\n'
              '</tool_call>\n<tool_call>{"name": "get_time", "arguments": {}}</tool_call>')
DEEP = "[" * 100_000  # (deeper than any Python's JSON decoder goes: 3.12's took 5,000)
READS = [  # (mode, parser, text, content, calls)
    ("auto", "hermes", HERMES_TWO, "Let me check. ",
     [Call("get_weather", '{"city": "Paris", "unit": "C"}'), Call("get_time", "{}")]),
    ("auto", "hermes", '<tool_call>{"name": "get_time", "arguments": {"tz": "UTC"}}', None,  # (the last one unclosed)
     [Call("get_time", '{"tz": "UTC"}')]),
    ("auto", "hermes", "No tools needed: <tool_ is not a tag.", "No tools needed: <tool_ is not a tag.", []),
    ("auto", "hermes", '<tool_call>{"name": "get_time", "arguments": {</tool_call>',  # unreadable: all content
     '<tool_call>{"name": "get_time", "arguments": {</tool_call>', []),
    ("auto", "llama3_json", '{"name": "get_weather", "parameters": {"city": "Lyon", "unit": "F"}}; '
     '{"name": "get_time", "arguments": {}}', None,
     [Call("get_weather", '{"city": "Lyon", "unit": "F"}'), Call("get_time", "{}")]),
    ("auto", "llama3_json", '<|python_tag|>{"name": "get_time", "parameters": {}}', None, [Call("get_time", "{}")]),
    ("auto", "llama3_json", 'The answer is {"name": "x"}', 'The answer is {"name": "x"}', []),
    # blank lines before the calls; both argument keys given: arguments (as vLLM's)
    ("auto", "llama3_json", '\n\n{"name": "get_time", "parameters": {"tz": "UTC"}}', None,
     [Call("get_time", '{"tz": "UTC"}')]),
    ("auto", "llama3_json", '{"name": "f", "arguments": {"a": 1}, "parameters": {"b": 2}}', None,
     [Call("f", '{"a": 1}')]),
    ("auto", "llama3_json", '\n\nNo call.', '\n\nNo call.', []),
    ("auto", "llama3_json", '{"name": "get_time", "parameters": {}} and more', '{"name": "get_time", "parameters": {}} '
     'and more', []),
    ("required", None, '[{"name": "get_weather", "parameters": {"city": "Paris", "unit": "C"}}, '
     '{"name": "get_time", "parameters": {}}]', None,
     [Call("get_weather", '{"city": "Paris", "unit": "C"}'), Call("get_time", "{}")]),
    ("required", None, '[{"name": "get_weather", "param', '[{"name": "get_weather", "param', []),  # (cut by length)
    (None, None, HERMES_TWO, HERMES_TWO, []),  # (tool_choice none: nothing is read)
    # a closing tag inside a string is the string's; text after the calls is not the content (as vLLM's)
    ("auto", "hermes", '<tool_call>{"name": "f", "arguments": {"s": "</tool_call> }{"}}</tool_call> Done.', None,
     [Call("f", '{"s": "</tool_call> }{"}')]),
    ("auto", "hermes", '<tool_call>{"name": "f", "arguments": {}} junk</tool_call>',  # (not the call's JSON alone)
     '<tool_call>{"name": "f", "arguments": {}} junk</tool_call>', []),
    # arguments must be JSON text: a string is one, unless it is an object's text (as some models write them)
    ("auto", "hermes", '<tool_call>{"name": "f", "arguments": "Zürich"}</tool_call>', None, [Call("f", '"Zürich"')]),
    ("auto", "hermes", '<tool_call>{"name": "f", "arguments": "{\\"a\\": 1}"}</tool_call>', None,
     [Call("f", '{"a": 1}')]),
    ("auto", "llama3_json", '{"name": "f", "parameters": "1"}', None, [Call("f", '"1"')]),
    # a lone surrogate (JSON's escapes allow one) stays escaped in the arguments (unescaped, UTF-8 cannot carry it: a
    # 500), and in a name makes the call unreadable; NaN is not JSON (Python's json takes it)
    ("auto", "hermes", '<tool_call>{"name": "f", "arguments": {"s": "a\\ud800"}}</tool_call>', None,
     [Call("f", '{"s": "a\\ud800"}')]),
    ("auto", "hermes", '<tool_call>{"name": "f\\ud800", "arguments": {}}</tool_call>',
     '<tool_call>{"name": "f\\ud800", "arguments": {}}</tool_call>', []),
    ("auto", "llama3_json", '{"name": "f", "parameters": {"x": NaN}}', '{"name": "f", "parameters": {"x": NaN}}', []),
    # JSON nested deeper than Python's stack is unreadable, not an error
    ("auto", "hermes", "<tool_call>" + DEEP, "<tool_call>" + DEEP, []),
    ("auto", "llama3_json", '{"name": "f", "parameters": ' + DEEP, '{"name": "f", "parameters": ' + DEEP, []),
    ("required", None, DEEP, DEEP, []),
    # qwen3_coder (Qwen3-Coder's XML); without the tools' schemas every value is a string, each value's first and
    # last newline the tags'
    ("auto", "qwen3_coder", 'Let me check.\n<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n'
     '</parameter>\n<parameter=unit>\nC\n</parameter>\n</function>\n</tool_call>\n<tool_call>\n<function=get_time>'
     '\n</function>\n</tool_call>', "Let me check.\n",
     [Call("get_weather", '{"city": "Paris", "unit": "C"}'), Call("get_time", "{}")]),
    ("auto", "qwen3_coder", "<tool_call>\n<function=f>\n<parameter=code>\nx = 1\n\ny = 2\n</parameter>", None,
     [Call("f", '{"code": "x = 1\\n\\ny = 2"}')]),  # (the last call unclosed, cut by max_tokens)
    ("auto", "qwen3_coder", "<tool_call>\nno function</tool_call>", "<tool_call>\nno function</tool_call>", []),
    ("auto", "qwen3_coder", "No tools.", "No tools.", []),
    # the tag inside a value, or in prose before the call; two functions in a block; a function without the block
    ("auto", "qwen3_coder", "<tool_call>\n<function=f>\n<parameter=s>\nsplit('<tool_call>')\n</parameter>\n"
     "</function>\n</tool_call>", None, [Call("f", '{"s": "split(\'<tool_call>\')"}')]),
    ("auto", "qwen3_coder", "Calls go in <tool_call> tags:\n<tool_call>\n<function=f>\n</function>\n</tool_call>",
     "Calls go in ", [Call("f", "{}")]),
    ("auto", "qwen3_coder", "<tool_call>\n<function=f>\n</function>\n<function=g>\n</function>\n</tool_call>",
     None, [Call("f", "{}"), Call("g", "{}")]),
    ("auto", "qwen3_coder", "Sure.\n<function=f>\n<parameter=a>\n1\n</parameter>\n</function>", "Sure.\n",
     [Call("f", '{"a": "1"}')]),
    # mistral: v0.3's array after [TOOL_CALLS], v11's NAME[ARGS]{...} (repeated); arguments given as an object's text
    ("auto", "mistral", 'Sure. [TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris", "unit": "C"}}, '
     '{"name": "get_time", "arguments": {}}]', "Sure. ",
     [Call("get_weather", '{"city": "Paris", "unit": "C"}'), Call("get_time", "{}")]),
    ("auto", "mistral", '[TOOL_CALLS]get_weather[ARGS]{"city": "Lyon", "unit": "F"}[TOOL_CALLS]get_time[ARGS]{}',
     None, [Call("get_weather", '{"city": "Lyon", "unit": "F"}'), Call("get_time", "{}")]),
    ("auto", "mistral", '[TOOL_CALLS]{"name": "f", "arguments": "{\\"a\\": 2}"}', None, [Call("f", '{"a": 2}')]),
    ("auto", "mistral", '[TOOL_CALLS][{"name": "f", "arguments": {"s": "a [ARGS] b"}}]\n\nDone.</s>', None,
     [Call("f", '{"s": "a [ARGS] b"}')]),  # (text after v0.3's array dropped, as vLLM's)
    ("auto", "mistral", "Hi [TOOL_CALLS][]", "Hi [TOOL_CALLS][]", []),  # (no call: all content)
    ("auto", "mistral", "[TOOL_CALLS][ARGS]{}", "[TOOL_CALLS][ARGS]{}", []),  # (no name)
    ("auto", "mistral", "[TOOL_CALLS]f[ARGS]{", "[TOOL_CALLS]f[ARGS]{", []),  # (cut: content)
    # pythonic: a Python list of calls, the whole output, arguments as literals; what JSON cannot carry is content
    ("auto", "pythonic", '\n[get_weather(city="Paris", unit="C"), get_time()]', None,
     [Call("get_weather", '{"city": "Paris", "unit": "C"}'), Call("get_time", "{}")]),
    ("auto", "pythonic", "<|python_tag|>[f(a=(1, 2), b=None, c=True)]", None,
     [Call("f", '{"a": [1, 2], "b": null, "c": true}')]),
    *[("auto", "pythonic", text, text, []) for text in (
        "[f(1)]", "[f(a=x)]", "[f(a={1, 2})]", "[f(a=1e999)]", '[f(**{"a": 1})]', "[1, 2]", "[f()] and more",
        "[f(a=", "Hello [f()]", "[]", "[f(a=" + "-" * 100_000 + "1)]")],
]


@pytest.mark.parametrize("mode, parser, text, content, calls", READS, ids=[f"{m}-{p}-{i}" for i, (m, p, *_) in
                                                                            enumerate(READS)])
def test_calls_are_read_back_and_unreadable_text_is_content(mode, parser, text, content, calls):
    choice = ToolChoice(mode, parser=parser)
    assert choice.read(text) == (content, calls)
    assert choice.finish_reason("stop", calls) == ("tool_calls" if calls else "stop")
    assert choice.finish_reason(None, calls) is None  # (not finished)


@pytest.mark.parametrize("kind, value, typed", [
    ("integer", "5", 5), ("integer", "5.0", "5.0"), ("integer", "true", "true"), ("integer", "five", "five"),
    ("number", "3.0", 3), ("number", "2.5", 2.5), ("boolean", "True", True), ("boolean", "FALSE", False),
    ("boolean", "yes", False), ("string", "007", "007"), ("string", "NULL", None), ("object", '{"a": [1]}', {"a": [1]}),
    ("object", "{'k': 1}", {"k": 1}), ("array", "['a', 'b']", ["a", "b"]), (["number", "null"], "7", 7),
    (None, "12", "12"), ([{"x": 1}], "12", "12")])
def test_qwen3_coder_types_the_values_by_the_tools_schemas(kind, value, typed):
    """As vLLM's _convert_param_value: null in any case is None; a string stays as written; integers and numbers as
    Python reads them (a whole number an int); a boolean is "true" in any case; objects and arrays as JSON, else as
    a Python literal; no type, or one it does not know: the text."""
    schema = {"type": "object", "properties": {"p": {} if kind is None else {"type": kind}}}
    req = _request(tools=[{"type": "function", "function": {"name": "f", "parameters": schema}}])
    choice = req.tool_choice_for("qwen3_coder")
    content, calls = choice.read(f"<tool_call>\n<function=f>\n<parameter=p>\n{value}\n</parameter>\n"
                                 f"<parameter=extra>\n{value}\n</parameter>\n</function>\n</tool_call>")
    untyped = None if value.lower() == "null" else value  # (a parameter the tool lacks: the text, or null)
    assert content is None and json.loads(calls[0].arguments) == {"p": typed, "extra": untyped}
    assert req.sampling_params({}, choice).skip_special_tokens is False  # (its tags, as hermes')


def test_odd_schemas_and_mistral_ids():
    """A tool schema the request takes whatever its shape (properties not an object) types nothing and breaks
    nothing; Mistral's templates take only 9-letter ids (vLLM's), in a stream and unstreamed, under every mode."""
    for schema in ({"type": "object", "properties": None}, {"type": "object", "properties": ["n"]}):
        req = _request(tools=[{"type": "function", "function": {"name": "f", "parameters": schema}}])
        choice = req.tool_choice_for("qwen3_coder")
        assert choice.read("<tool_call>\n<function=f>\n<parameter=n>\n1\n</parameter>\n</function>")[1] == [
            Call("f", '{"n": "1"}')]
    from nanoflow.entrypoints.tool_calls import new_id
    assert len(new_id("mistral")) == 9 and new_id("mistral").isalnum() and new_id("hermes").startswith("chatcmpl-")
    for choice in (ToolChoice("auto", parser="mistral"), ToolChoice("named", name="f", parser="mistral")):
        _, calls = choice.stream().step('[TOOL_CALLS][{"name": "f", "arguments": {}}]' if choice.mode == "auto"
                                        else "{}", True)
        assert len(calls[0][1]) == 9


def test_a_named_call_and_parallel_calls_turned_off():
    named = ToolChoice("named", name="get_time")
    assert named.read('{"tz": "UTC"}') == (None, [Call("get_time", '{"tz": "UTC"}')])
    assert named.finish_reason("stop", named.read("{}")[1]) == "stop"  # (OpenAI's: a forced call is no choice)
    # required: "tool_calls" only for an output that ended by itself; one cut at max_tokens stays "length" (vLLM's)
    required, calls = ToolChoice("required"), [Call("get_time", "{}")]
    assert (required.finish_reason("stop", calls), required.finish_reason("length", calls)) == ("tool_calls", "length")
    one = ToolChoice("auto", parser="hermes", parallel=False)
    assert one.read(HERMES_TWO)[1] == [Call("get_weather", '{"city": "Paris", "unit": "C"}')]


def _streamed(choice: ToolChoice, text: str, cut: int):
    """What a stream sends for text arriving cut characters at a time: the content joined, and the calls' deltas
    merged by index (as a client adds them up)."""
    s, content, calls = choice.stream(), "", {}
    for end in range(cut, len(text) + cut, cut):
        piece, deltas = s.step(text[:end], end >= len(text))
        content += piece or ""
        for i, cid, name, args in deltas:
            entry = calls.setdefault(i, {"id": cid, "name": name, "arguments": ""})
            assert cid is None or entry["id"] == cid
            entry["arguments"] += args or ""
    return content or None, [Call(c["name"], c["arguments"]) for _, c in sorted(calls.items())], calls


@pytest.mark.parametrize("cut", [1, 3, 7, 1000])
@pytest.mark.parametrize("mode, parser, text, content, calls", READS + [("named", None, '{"tz": "UTC"}', None, [
    Call("get_time", '{"tz": "UTC"}')])], ids=[f"{m}-{p}-{i}" for i, (m, p, *_) in enumerate(READS + [("named", 0)])])
def test_a_stream_adds_up_to_the_response(mode, parser, text, content, calls, cut):
    choice = ToolChoice(mode, name="get_time", parser=parser)
    got_content, got_calls, raw = _streamed(choice, text, cut)
    assert (got_content, got_calls) == (content, calls)
    assert all(c["id"].startswith("chatcmpl-tool-") or parser == "mistral" and len(c["id"]) == 9 for c in raw.values())


def test_a_stream_holds_back_only_what_may_be_a_call():
    s = ToolChoice("auto", parser="hermes").stream()
    assert s.step("Let me <tool_", False) == ("Let me ", [])
    assert s.step("Let me <tool_x", False) == ("<tool_x", [])  # (it was not the tag)
    assert s.step('Let me <tool_x <tool_call>{"name": "f"', False) == (" ", [])
    s = ToolChoice("auto", parser="llama3_json").stream()
    assert s.step("\n\nHi", False) == ("\n\nHi", [])  # (blank lines, then no call: all of it at once)
    s = ToolChoice("auto", parser="llama3_json").stream()
    assert s.step("<|python", False) == (None, [])  # (the tag, still arriving)
    assert s.step("<|pythonic", False) == ("<|pythonic", [])
    assert ToolChoice("required").stream().step('[{"name": ', False) == (None, [])


def test_the_required_schema():
    tools = [api.ChatTool(**WEATHER), api.ChatTool(**TIME)]
    schema = required_schema(tools)
    assert schema["minItems"] == 1 and "maxItems" not in schema
    assert [i["properties"]["name"]["enum"] for i in schema["items"]["anyOf"]] == [["get_weather"], ["get_time"]]
    assert schema["items"]["anyOf"][1]["properties"]["parameters"] == {"type": "object", "properties": {}}
    assert required_schema(tools, parallel=False)["maxItems"] == 1
    # a tool's $defs move to the root, where its references point from inside the array
    unit = {"type": "string", "enum": ["C", "F"]}
    ref = {"type": "object", "properties": {"u": {"$ref": "#/$defs/unit"}}, "$defs": {"unit": unit}}
    with_defs = api.ChatTool(type="function", function={"name": "f", "parameters": ref})
    assert required_schema([with_defs])["$defs"] == {"unit": unit}
    other = api.ChatTool(type="function", function={"name": "g", "parameters": ref | {"$defs": {"unit": {}}}})
    with pytest.raises(ValueError, match="tools: two tools define \\$defs 'unit' differently"):
        required_schema([with_defs, other])


def _request(**kw):
    return api.ChatCompletionRequest(messages=USER, **kw)


def test_the_requests_tool_choice():
    tools = [WEATHER, TIME]
    assert _request(tools=tools).tool_choice_for("hermes").mode == "auto"  # (OpenAI's default with tools)
    assert _request().tool_choice_for(None).mode is None
    assert _request(tools=tools, tool_choice="none").tool_choice_for(None).mode is None
    assert _request(tools=[], tool_choice="required").tool_choice_for(None).mode is None  # (vLLM's: no tools, none)
    assert _request(tools=[], tool_choice="auto").tool_choice_for(None).mode is None
    named = _request(tools=tools, tool_choice={"type": "function", "function": {"name": "get_weather"}})
    params = named.sampling_params({}, named.tool_choice_for(None))
    assert params.structured_outputs.json == WEATHER["function"]["parameters"]
    # as vLLM's: a tool's and a named choice's "type" default to "function"; a role the template knows (Llama 3.1's
    # ipython, a tool's result there) reaches it
    untyped = api.ChatCompletionRequest(messages=USER + [{"role": "ipython", "content": "22 C"}],
                                        tools=[{"function": WEATHER["function"]}],
                                        tool_choice={"function": {"name": "get_weather"}})
    assert untyped.tools[0].type == "function" and untyped.tool_choice_for(None).name == "get_weather"
    assert untyped.messages[-1].for_template() == {"role": "ipython", "content": "22 C"}
    required = _request(tools=tools, tool_choice="required", parallel_tool_calls=False)
    params = required.sampling_params({}, required.tool_choice_for(None))
    assert params.structured_outputs.json == required_schema([api.ChatTool(**t) for t in tools], parallel=False)
    auto = _request(tools=tools)
    assert auto.sampling_params({}, auto.tool_choice_for("hermes")).skip_special_tokens is False  # (its tags)
    assert auto.sampling_params({}, auto.tool_choice_for("llama3_json")).skip_special_tokens is True
    with pytest.raises(ValueError, match='tool_choice: "auto" .* needs the server started with --enable-auto-tool'):
        auto.tool_choice_for(None)
    with pytest.raises(ValueError, match="invalid sampling parameter response_format: tool_choice 'required'"):
        _request(tools=tools, tool_choice="required", response_format={"type": "json_object"}).tool_choice_for(None)
    with pytest.raises(ValueError, match="guided_regex: tool_choice of the function 'get_time' holds the output"):
        _request(tools=tools, tool_choice={"type": "function", "function": {"name": "get_time"}},
                 guided_regex="a").tool_choice_for(None)
    assert _request(tools=tools, response_format={"type": "json_object"}).tool_choice_for("hermes").mode == "auto"


@pytest.mark.parametrize("kw, message", [
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
     "names the function 'nope', which is not among the tools"),
    ({"tool_choice": {"type": "function", "function": {"name": "get_time"}}}, "not among the tools"),
    ({"tool_choice": "required"}, "'required' needs tools"),
    ({"tool_choice": "auto", "tools": None}, "'auto' needs tools"),
    ({"tools": [WEATHER], "tool_choice": "sometimes"}, 'must be "none", "auto", "required" or {"type": "function"'),
    ({"tools": [{"type": "function", "function": {"name": ""}}]}, "at least 1 character"),
    ({"tools": [{"type": "retrieval"}]}, "tools.0.type"),
    ({"messages": [{"role": "assistant", "tool_calls": [{"id": "a", "type": "function", "function": {
        "name": "f", "arguments": "{oops"}}]}]}, "a call's arguments must be JSON text, got '{oops'"),
    ({"messages": [{"role": "assistant", "tool_calls": [{"id": "a", "type": "function", "function": {
        "name": "f", "arguments": DEEP + "]" * 100_000}}]}]}, "a call's arguments must be JSON text"),
    ({"tools": [WEATHER, TIME, WEATHER | {"function": {"name": "get_weather"}}]},
     "two tools are named 'get_weather': a call could not tell them apart"),
])
def test_bad_tool_requests_are_refused_by_name(kw, message):
    with pytest.raises(ValueError) as e:
        api.ChatCompletionRequest(**({"messages": USER} | kw))
    assert message in str(e.value)


def test_refused_tools_are_the_only_error():
    """(tool_choice was checked against the tools left after their error: "not among the tools", "needs tools")"""
    for choice in ("required", {"type": "function", "function": {"name": "get_weather"}}):
        with pytest.raises(ValueError) as e:
            api.ChatCompletionRequest(messages=USER, tools=[WEATHER, WEATHER], tool_choice=choice)
        assert e.value.error_count() == 1 and e.value.errors()[0]["loc"] == ("tools",)


TOOL_TEMPLATE = (  # a hermes-style template (as Qwen2.5's) that renders tools, earlier calls and their results
    "{% if tools %}<|im_start|>system\nTools:{% for t in tools %} {{ t.function | tojson }}{% endfor %}<|im_end|>\n"
    "{% endif %}{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}"
    "{% for c in m.tool_calls or [] %}<tool_call>{{ {'name': c.function.name, 'arguments': c.function.arguments}"
    " | tojson }}</tool_call>{% endfor %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
HISTORY = USER + [{"role": "assistant", "content": "", "tool_calls": [{"id": "c1", "type": "function", "function": {
    "name": "get_weather", "arguments": '{"city": "Paris", "unit": "C"}'}}]},
    {"role": "tool", "tool_call_id": "c1", "content": "18 degrees"}]


def test_tools_and_earlier_calls_reach_the_template(default_llm):
    """As HF's apply_chat_template: the tools as OpenAI's objects, and an earlier call's arguments as the object they
    encode (vLLM's), so that the template writes them once, not as a JSON string inside JSON."""
    before = json.dumps(HISTORY)
    rendered = default_llm.chat_prompt(HISTORY, chat_template=TOOL_TEMPLATE, tools=[WEATHER])["prompt"]
    assert json.dumps(HISTORY) == before  # (the caller's messages as they were: their arguments were decoded in place)
    assert '"name": "get_weather", "description": "The weather in a city"' in rendered
    assert '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris", "unit": "C"}}</tool_call>' in rendered
    assert "<|im_start|>tool\n18 degrees<|im_end|>" in rendered
    with pytest.raises(ValueError, match="a tool call's arguments must be JSON text, got '{oops'"):
        bad = [{"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "{oops"}}]}]
        default_llm.chat_prompt(bad, chat_template=TOOL_TEMPLATE)


# -- a server with --enable-auto-tool-choice ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def server(tmp_path_factory):
    pytest.importorskip("xgrammar")
    from conftest import start_server, stop_server
    d = tmp_path_factory.mktemp("tools")
    (d / "template.jinja").write_text(TOOL_TEMPLATE)
    proc, url = start_server(["--max-model-len", "1024", "--kv-cache-gb", "0.25", "--enable-auto-tool-choice",
                              "--tool-call-parser", "hermes", "--chat-template", str(d / "template.jinja"),
                              "--enable-prompt-tokens-details", "--schedule-policy", "priority"], d / "log")
    yield url
    assert stop_server(proc) == 0


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key="none", max_retries=0)


def _create(client, stream=False, **kw):
    """The response, or (streamed) the message its chunks add up to, as a client merges them."""
    kw = {"model": client.models.list().data[0].id, "messages": USER, "max_tokens": 60, "temperature": 0} | kw
    if not stream:
        r = client.chat.completions.create(**kw)
        m = r.choices[0].message
        calls = [(c.function.name, c.function.arguments) for c in m.tool_calls or ()]
        return m.content, calls, r.choices[0].finish_reason
    content, calls, reason, roles = "", {}, None, []
    for chunk in client.chat.completions.create(stream=True, **kw):
        for ch in chunk.choices:
            roles.append(ch.delta.role)
            content += ch.delta.content or ""
            for d in ch.delta.tool_calls or ():
                entry = calls.setdefault(d.index, [None, ""])
                entry[0] = entry[0] or d.function.name
                entry[1] += d.function.arguments or ""
            reason = ch.finish_reason or reason
    assert roles[0] == "assistant" and set(roles[1:]) <= {None}
    return content or None, [tuple(c) for _, c in sorted(calls.items())], reason


@pytest.mark.parametrize("stream", [False, True])
def test_a_named_call_follows_the_functions_schema(client, stream):
    content, calls, reason = _create(client, stream, tools=[WEATHER, TIME],
                                     tool_choice={"type": "function", "function": {"name": "get_weather"}})
    assert content is None and reason == "stop" and [name for name, _ in calls] == ["get_weather"]
    args = json.loads(calls[0][1])
    assert args["city"] in ("Paris", "Lyon") and args["unit"] in ("C", "F") and set(args) == {"city", "unit"}
    assert (content, calls, reason) == _create(client, not stream, tools=[WEATHER, TIME],
                                               tool_choice={"type": "function", "function": {"name": "get_weather"}})


def test_the_openai_clients_stream_helper_takes_the_calls_and_logprobs(client):
    """openai's chat.completions.stream() adds the deltas up: a later delta's "type": null overwrote the call's type
    (an AssertionError in the helper; the deltas now leave their null fields out, as OpenAI's), and a choice's first
    chunk was taken whole and its logprobs added again (each choice now opens with its role alone, as vLLM's)."""
    kw = {"model": client.models.list().data[0].id, "messages": USER, "max_tokens": 60, "temperature": 0}
    with client.chat.completions.stream(**kw, tools=[WEATHER], tool_choice={
            "type": "function", "function": {"name": "get_weather"}}) as s:
        (call,) = s.get_final_completion().choices[0].message.tool_calls
    assert (call.type, call.function.name) == ("function", "get_weather") and json.loads(call.function.arguments)
    with client.chat.completions.stream(**kw | {"max_tokens": 6, "temperature": 0.8, "seed": 1}, n=2, logprobs=True,
                                        extra_body={"ignore_eos": True}) as s:  # (no EOS: its text is not content)
        try:
            choices = s.get_final_completion().choices
        except openai.LengthFinishReasonError as e:
            choices = e.completion.choices
    for c in choices:
        assert "".join(t.token for t in c.logprobs.content) == c.message.content, c


@pytest.mark.parametrize("stream", [False, True])
def test_required_calls_one_of_the_tools(client, stream):
    content, calls, reason = _create(client, stream, tools=[WEATHER, TIME], tool_choice="required",
                                     parallel_tool_calls=False)
    assert content is None and reason == "tool_calls" and len(calls) == 1, (content, calls, reason)
    assert calls[0][0] in ("get_weather", "get_time") and isinstance(json.loads(calls[0][1]), dict)


@pytest.mark.parametrize("stream", [False, True])
def test_auto_reads_the_models_calls_back(client, stream):
    """The model's own text (here held to a call by a regex: this small model does not call tools) is read back by
    the hermes parser: the text before the call is the content."""
    said = 'Checking. <tool_call>{"name": "get_weather", "arguments": {"city": "Lyon", "unit": "F"}}</tool_call>'
    regex = said.replace(".", "\\.").replace("{", "\\{").replace("}", "\\}")
    held = {"structured_outputs": {"regex": regex}}  # (the model may take the text in many small tokens)
    content, calls, reason = _create(client, stream, tools=[WEATHER], extra_body=held, max_tokens=200)
    assert (content, calls, reason) == ("Checking. ", [("get_weather", '{"city": "Lyon", "unit": "F"}')], "tool_calls")
    # without tools nothing is read
    content, calls, reason = _create(client, stream, extra_body=held, max_tokens=200)
    assert (content, calls, reason) == (said, [], "stop")


def test_a_request_priority_on_a_priority_server(server):
    """(vLLM's priority field: taken where the engine schedules by it; test_server.py's fcfs server refuses it)"""
    r = httpx.post(f"{server}/v1/completions", json={"prompt": "Hi", "max_tokens": 2, "priority": -3})
    assert r.status_code == 200, r.text


def test_a_conversation_with_earlier_calls(server, client):
    r = httpx.post(f"{server}/tokenize", json={"messages": HISTORY, "tools": [WEATHER]})
    assert r.status_code == 200, r.text
    text = httpx.post(f"{server}/detokenize", json={"tokens": r.json()["tokens"]}).json()["prompt"]
    assert '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris", "unit": "C"}}</tool_call>' in text
    assert '"name": "get_weather", "description"' in text and "18 degrees" in text
    assert _create(client, messages=HISTORY, tools=[WEATHER], tool_choice="none", max_tokens=4)[1] == []


@pytest.mark.parametrize("body, names", [
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tools": [WEATHER], "tool_choice": "required", "guided_json": {"type": "object"}}, "guided_json"),
    # (a schema the grammar compiler refuses: named as the tools it came in)
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "nope"}}}],
      "tool_choice": {"type": "function", "function": {"name": "f"}}}, "tools"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"$defs": {"u": {"type": "string"}}}}},
               {"type": "function", "function": {"name": "g", "parameters": {"$defs": {"u": {}}}}}],
        "tool_choice": "required"}, "tools"),
    ({"tools": [WEATHER, WEATHER]}, "tools"),
    ({"messages": [{"role": "assistant", "tool_calls": [{"id": "a", "type": "function", "function": {
        "name": "f", "arguments": DEEP + "]" * 100_000}}]}]}, "messages"),  # (it was a RecursionError: 500)
])
def test_bad_tool_requests_are_a_400_naming_the_field(server, body, names):
    r = httpx.post(f"{server}/v1/chat/completions", json={"messages": USER} | body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == names, error
    assert httpx.get(f"{server}/health").status_code == 200


def test_serve_checks_its_tool_flags_before_loading(capsys, tmp_path):
    from nanoflow.entrypoints.cli import main
    assert main(["serve", "--enable-auto-tool-choice", "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert "needs --tool-call-parser (one of hermes, llama3_json, mistral, pythonic, qwen3_coder)" in err
    assert main(["serve", "--chat-template", str(tmp_path / "missing.jinja"), "--port", "0"]) == 2
    assert "no such file, nor a template" in capsys.readouterr().err
    (tmp_path / "bad.jinja").write_text("{% for %}")
    assert main(["serve", "--chat-template", str(tmp_path / "bad.jinja"), "--port", "0"]) == 2
    assert "--chat-template: not a valid template" in capsys.readouterr().err


def test_usage_tells_the_prompt_tokens_the_cache_held(server, client):
    """--enable-prompt-tokens-details (vLLM's): usage.prompt_tokens_details.cached_tokens, the prompt's tokens found in
    the prefix cache (its full blocks of 16 once the same prompt ran), unstreamed and in a stream's usage chunk;
    completions add up their prompts'. (This file's server; test_server.py's, without the flag, sends none.)"""
    kw = dict(model=client.models.list().data[0].id, max_tokens=2,
              messages=[{"role": "user", "content": "Tell me about the prefix cache. " * 8}])
    first = client.chat.completions.create(**kw).usage
    second = client.chat.completions.create(**kw).usage
    full = first.prompt_tokens // 16 * 16
    assert first.prompt_tokens_details.cached_tokens < full == second.prompt_tokens_details.cached_tokens
    chunks = list(client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens == full
    body = {"prompt": ["Tell me about the prefix cache. " * 8] * 2, "max_tokens": 1}
    httpx.post(f"{server}/v1/completions", json=body)  # (its two prompts run at once: neither finds the other's)
    usage = httpx.post(f"{server}/v1/completions", json=body).json()["usage"]
    ids = httpx.post(f"{server}/tokenize", json={"prompt": body["prompt"][0]}).json()["count"]
    assert usage["prompt_tokens_details"]["cached_tokens"] == 2 * (ids // 16 * 16) > 0
