"""OpenAI's Responses API (POST /v1/responses) over chat completions: the request as the chat request it stands for,
its refusals by name, the Response and its events checked against the openai package's types (a scripted engine with
reasoning and a tool call), then a real server driven by the openai client, against its chat completions."""
import json
import typing

import openai
import openai.types.responses as oai
import pytest
from fastapi.testclient import TestClient
from test_reasoning import Scripted

from conftest import start_server, stop_server
from nanoflow.entrypoints.responses import ResponsesRequest
from nanoflow.entrypoints.server import build_app

WEATHER = {"type": "function", "name": "get_weather", "description": "The weather in a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}
_UNION = typing.get_args(oai.ResponseStreamEvent)[0]
EVENTS = {typing.get_args(c.model_fields["type"].annotation)[0]: c for c in typing.get_args(_UNION)}


def _checked(cls, body: dict):
    """body validated as the openai package's cls. (Its usage asks for cache_write_tokens too, a field of OpenAI's
    newer than vLLM's: nanoflow does not send it, as vLLM does not; the openai client reads a response without it.)"""
    def fill(v):
        if isinstance(v, dict):
            return {k: fill(x) for k, x in v.items()} | ({"cache_write_tokens": 0} if "cached_tokens" in v else {})
        return [fill(x) for x in v] if isinstance(v, list) else v
    return cls.model_validate(fill(body))


def test_the_input_as_chat_messages():
    req = ResponsesRequest(instructions="Be brief.", input=[
        {"role": "user", "content": "Weather in Paris?"},  # (no type: a message, OpenAI's easy form)
        {"type": "reasoning", "summary": [], "content": [{"type": "reasoning_text", "text": "A tool."}]},
        {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Let me look.",
                                                              "annotations": []}]},
        {"type": "function_call", "call_id": "c1", "name": "get_weather", "arguments": '{"city": "Paris"}'},
        {"type": "function_call", "call_id": "c2", "name": "get_weather", "arguments": '{"city": "Lyon"}'},
        {"type": "function_call_output", "call_id": "c1", "output": "22 C"},
        {"type": "function_call_output", "call_id": "c2", "output": [{"type": "input_text", "text": "19 C"}]},
        {"type": "function_call", "call_id": "c3", "name": "get_weather", "arguments": "{}"},
    ], tools=[WEATHER], tool_choice={"type": "function", "name": "get_weather"}, max_output_tokens=7,
        text={"format": {"type": "json_schema", "name": "w", "schema": {"type": "object"}}},
        include=["message.output_text.logprobs"], top_logprobs=2, reasoning={"effort": "low"})
    call = lambda cid, city: {"id": cid, "type": "function", "function": {  # noqa: E731
        "name": "get_weather", "arguments": json.dumps({"city": city} if city else {})}}
    assert req.messages() == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "Let me look.", "tool_calls": [call("c1", "Paris"), call("c2", "Lyon")],
         "reasoning": "A tool."},
        {"role": "tool", "tool_call_id": "c1", "content": "22 C"},
        {"role": "tool", "tool_call_id": "c2", "content": "19 C"},
        {"role": "assistant", "content": None, "tool_calls": [call("c3", None)]}]
    chat = req.as_chat()
    assert chat.tools[0].function.name == "get_weather" and chat.tool_choice.function.name == "get_weather"
    assert chat.max_completion_tokens == 7 and chat.logprobs and chat.top_logprobs == 2
    assert chat.response_format.json_schema.json_schema == {"type": "object"}
    assert chat.chat_template_kwargs == {"reasoning_effort": "low"}
    assert ResponsesRequest(input="Hi").messages() == [{"role": "user", "content": "Hi"}]


@pytest.mark.parametrize("body, message", [
    ({"previous_response_id": "resp_1"}, "previous_response_id"),
    ({"background": True}, "background"),
    ({"tools": [{"type": "web_search"}]}, "tools.0"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]}, "input"),
    ({"input": []}, "input: must not be empty"),
    ({"input": [{"type": "computer_call"}]}, "input"),
    ({"include": ["file_search_call.results"]}, "'file_search_call.results' is not supported"),
    ({"truncation": "auto"}, "truncation"),
    ({"text": {"format": {"type": "json_schema", "name": "x"}}}, "schema goes with type json_schema"),
    ({"input": [{"type": "function_call", "call_id": "a", "name": "f", "arguments": "{oops"}]},
     "input.0.function_call.arguments: a call's arguments must be JSON text, got '{oops'"),
    ({"tool_choice": "required"}, "'required' needs tools"),
    ({"max_output_tokens": 0}, "max_output_tokens"),
])
def test_bad_requests_are_a_400_naming_the_field(default_llm, body, message):
    with TestClient(build_app(Scripted(default_llm.tokenizer, "Paris."), "m")) as client:
        r = client.post("/v1/responses", json={"input": "Hi"} | body)
    assert r.status_code == 400 and message in r.json()["error"]["message"], r.text


def _events(text: str) -> list[dict]:
    """A Responses stream's events, each checked: its SSE name is its type, and it is the openai package's event."""
    events = []
    for block in text.strip().split("\n\n"):
        name, data = block.split("\n")
        event = json.loads(data.removeprefix("data: "))
        assert name == f"event: {event['type']}"
        _checked(EVENTS[event["type"]], event)
        events.append(event)
    return events


CALL = '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>'
NAMED = {"tool_choice": {"type": "function", "name": "get_weather"}}
LOGPROBS = {"include": ["message.output_text.logprobs"], "top_logprobs": 1}


@pytest.mark.parametrize("text, reasoning_parser, body, kinds", [
    ("<think>Let me think.</think>Paris. " + CALL, "deepseek_r1", {}, ["reasoning", "message", "function_call"]),
    ("Paris.", None, {}, ["message"]),
    ("", None, {}, []),  # (no text, no message: vLLM's)
    ("<think>Still thinking", "deepseek_r1", {}, ["reasoning"]),  # (cut in its reasoning)
    ('{"city": "Paris"}', None, NAMED, ["function_call"]),  # (a named call's arguments stream in pieces: one item)
    # logprobs: all of the output's on its message (the reasoning's and the call's tokens' too), in the stream as well
    ("<think>Hm.</think>Paris. " + CALL, "deepseek_r1", LOGPROBS, ["reasoning", "message", "function_call"]),
    ("<think>Hm.</think>" + CALL, "deepseek_r1", LOGPROBS, ["reasoning", "function_call"]),
])
def test_a_response_and_its_stream(default_llm, text, reasoning_parser, body, kinds):
    app = build_app(Scripted(default_llm.tokenizer, text), "m", reasoning_parser=reasoning_parser,
                    tool_parser="hermes")
    body = {"input": "Weather in Paris?", "tools": [WEATHER], "metadata": {"k": "v"}, "store": True} | body
    with TestClient(app) as client:
        whole = client.post("/v1/responses", json=body).json()
        events = _events(client.post("/v1/responses", json=body | {"stream": True}).text)
    response = _checked(oai.Response, whole)
    assert whole["status"] == "completed" and whole["store"] is False and whole["metadata"] == {"k": "v"}
    assert [item["type"] for item in whole["output"]] == kinds
    items = {item["type"]: item for item in whole["output"]}
    if "reasoning" in items:
        thought = text[len("<think>"):].partition("</think>")[0]
        assert items["reasoning"]["content"][0]["text"] == thought
        assert whole["usage"]["output_tokens_details"]["reasoning_tokens"] == len(
            default_llm.tokenizer.encode(thought, False))
    if "function_call" in items:
        assert items["function_call"]["name"] == "get_weather"
        assert json.loads(items["function_call"]["arguments"]) == {"city": "Paris"}
    if "message" in items:
        assert response.output_text == ("Paris." if text == "Paris." else "Paris. ")
        lps = items["message"]["content"][0]["logprobs"]
        assert [lp["logprob"] for lp in lps] == ([-t / 100 for t in range(len(text))] if body.get("include") else [])
    # the stream: numbered from 0, created first, the whole response last; its deltas add up to each item
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    assert [e["type"] for e in events[:2]] == ["response.created", "response.in_progress"]
    assert events[-1]["type"] == "response.completed"
    final = events[-1]["response"]
    strip = lambda r: [{k: v for k, v in i.items() if k not in ("id", "call_id")} for i in r["output"]]  # noqa: E731
    assert strip(final) == strip(whole) and final["usage"] == whole["usage"]
    for at, item in enumerate(final["output"]):
        mine = [e for e in events if e.get("output_index") == at]
        assert mine[0]["type"] == "response.output_item.added" and mine[-1]["type"] == "response.output_item.done"
        assert mine[-1]["item"] == item and {e.get("item_id", item["id"]) for e in mine} == {item["id"]}
        pieces = "".join(e["delta"] for e in mine if "delta" in e)
        assert pieces == (item["arguments"] if item["type"] == "function_call" else item["content"][0]["text"])
        if item["type"] == "message":
            assert sum((e["logprobs"] for e in mine if "delta" in e), []) == item["content"][0]["logprobs"]


def test_replayed_reasoning_goes_with_its_turn():
    """Reasoning items go to the assistant message after them (several joined); a turn's reasoning with no
    assistant output after it is dropped, not given to the next turn's."""
    think = lambda t: {"type": "reasoning", "summary": [], "content": [{"type": "reasoning_text", "text": t}]}  # noqa
    call = lambda c: {"type": "function_call", "call_id": c, "name": "f", "arguments": "{}"}  # noqa: E731
    req = ResponsesRequest(input=[
        {"role": "user", "content": "a"}, think("R0"), {"role": "user", "content": "b"},
        think("R1"), call("c1"), think("R2"), call("c2"), {"type": "function_call_output", "call_id": "c1",
                                                           "output": "x"}])
    messages = req.messages()
    assert [m["role"] for m in messages] == ["user", "user", "assistant", "tool"]
    assert messages[2]["reasoning"] == "R1\n\nR2" and len(messages[2]["tool_calls"]) == 2
    assert ResponsesRequest(input="Hi", instructions="").messages() == [{"role": "user", "content": "Hi"}]
    # the Responses API's defaults and vLLM's sampling extras: "auto" without tools asks for nothing
    chat = ResponsesRequest(input="Hi", tool_choice="auto", seed=3, top_k=5, stop=["x"], priority=2,
                            reasoning={"effort": "xhigh"}, service_tier="flex").as_chat()
    assert (chat.tool_choice, chat.seed, chat.top_k, chat.stop, chat.priority) == (None, 3, 5, ["x"], 2)


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    proc, url = start_server(["--max-model-len", "1024", "--kv-cache-gb", "0.25"],
                             tmp_path_factory.mktemp("responses") / "log")
    yield openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)
    assert stop_server(proc) == 0


def test_the_openai_client_against_chat_completions(client):
    """A response's text is what the same chat completion says; cut at max_output_tokens it is incomplete; the
    client's stream helper adds the events up to the same response."""
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "The capital of France?"}]
    chat = client.chat.completions.create(model="", messages=messages, max_completion_tokens=6, temperature=0)
    kw = dict(model="", instructions="Be brief.", input="The capital of France?", max_output_tokens=6,
              temperature=0)
    response = client.responses.create(**kw)
    assert response.output_text == chat.choices[0].message.content
    assert (response.status, response.incomplete_details.reason) == ("incomplete", "max_output_tokens")
    assert (response.usage.input_tokens, response.usage.output_tokens) == (chat.usage.prompt_tokens, 6)
    with client.responses.stream(**kw) as stream:
        deltas = "".join(e.delta for e in stream if e.type == "response.output_text.delta")
        final = stream.get_final_response()
    assert deltas == final.output_text == response.output_text and final.status == "incomplete"
    # a conversation in items, ended by itself
    response = client.responses.create(model="", input=[
        {"role": "user", "content": "Say yes."}, {"role": "assistant", "content": "Yes."},
        {"role": "user", "content": "Again."}], max_output_tokens=200, temperature=0)
    assert response.status == "completed" and response.output[0].status == "completed" and response.output_text
    # a named call cut by the limit: its item incomplete too (it said completed, over arguments that are no JSON)
    cut = dict(model="", input="Weather in Paris?", tools=[WEATHER], max_output_tokens=3, temperature=0,
               tool_choice={"type": "function", "name": "get_weather"})
    response = client.responses.create(**cut)
    with client.responses.stream(**cut) as stream:
        final = stream.get_final_response()
    for r in (response, final):
        assert r.status == "incomplete" and [(o.type, o.status) for o in r.output] == [("function_call", "incomplete")]
    # (a call read whole before the limit is complete: the last chunk closed every call with its finish reason)
    from nanoflow.entrypoints.responses import _call
    assert [_call("c", "f", args, reason=reason)["status"] for args, reason in (
        ('{"a": 1}', "length"), ('{"a', "length"), ('{"a', "stop"))] == ["completed", "incomplete", "completed"]
