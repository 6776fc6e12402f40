"""Anthropic's Messages API (POST /v1/messages, /v1/messages/count_tokens) over chat completions: the request as the
chat request it stands for, its refusals by name, the message and its events checked against the anthropic package's
types (a scripted engine with thinking and a tool call), then a real server driven by the anthropic client."""
import json

import anthropic
import anthropic.types as ant
import pytest
from fastapi.testclient import TestClient
from pydantic import TypeAdapter
from test_reasoning import Scripted

from conftest import start_server, stop_server
from nanoflow.entrypoints.messages import MessagesRequest
from nanoflow.entrypoints.server import build_app

WEATHER = {"name": "get_weather", "description": "The weather in a city",
           "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}}}
EVENT = TypeAdapter(ant.RawMessageStreamEvent)


def test_the_request_as_chat_messages():
    req = MessagesRequest(max_tokens=7, system=[  # (Claude Code's per-request header left out: the prefix cache's)
        {"type": "text", "text": "x-anthropic-billing-header: cc_version=2; cch=1;"},
        {"type": "text", "text": "Be brief."}], messages=[
        {"role": "user", "content": [{"type": "text", "text": "<reminder/>"}, {"type": "text", "text": "Weather?"}]},
        {"role": "assistant", "content": [
            {"type": "thinking", "thinking": "A tool.", "signature": "x"},
            {"type": "text", "text": "Let me look."},
            {"type": "tool_use", "id": "t1", "name": "get_weather", "input": {"city": "Paris"}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": "22 C"},
                                     {"type": "text", "text": "And Lyon?"}]},
        {"role": "assistant", "content": [{"type": "tool_use", "id": "t2", "name": "get_weather",
                                           "input": {"city": "Lyon"}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t2",
                                      "content": [{"type": "text", "text": "19 C"}]}]},
    ], tools=[WEATHER], tool_choice={"type": "tool", "name": "get_weather", "disable_parallel_tool_use": True},
        stop_sequences=["\n\n"], top_k=5, thinking={"type": "disabled"})
    call = lambda cid, city: [{"id": cid, "type": "function", "function": {  # noqa: E731
        "name": "get_weather", "arguments": json.dumps({"city": city})}}]
    assert req.chat_messages() == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "<reminder/>\nWeather?"},  # (text blocks a line apart, as vLLM's)
        {"role": "assistant", "content": "Let me look.", "reasoning": "A tool.", "tool_calls": call("t1", "Paris")},
        {"role": "tool", "tool_call_id": "t1", "content": "22 C"},
        {"role": "user", "content": "And Lyon?"},
        {"role": "assistant", "content": None, "tool_calls": call("t2", "Lyon")},
        {"role": "tool", "tool_call_id": "t2", "content": "19 C"}]
    chat = req.as_chat()
    assert chat.tools[0].function.parameters == WEATHER["input_schema"] and chat.tool_choice.function.name == \
        "get_weather"
    assert (chat.max_completion_tokens, chat.stop, chat.top_k, chat.parallel_tool_calls) == (7, ["\n\n"], 5, False)
    assert chat.chat_template_kwargs == {"enable_thinking": False}
    user = [{"role": "user", "content": "x"}]
    assert MessagesRequest(max_tokens=1, messages=user, tools=[WEATHER], tool_choice={"type": "any"}).as_chat(
        ).tool_choice == "required"
    formatted = MessagesRequest(max_tokens=1, messages=user, output_config={"format": {
        "type": "json_schema", "schema": {"type": "object"}}, "effort": "low"}, stream=True)
    chat = formatted.as_chat()
    assert chat.response_format.json_schema.json_schema == {"type": "object"}
    assert chat.chat_template_kwargs == {"reasoning_effort": "low"} and chat.stream_options.continuous_usage_stats
    assert formatted.as_chat(stream=False).stream_options is None  # (count_tokens' of a streamed body)
    # usage as Anthropic's: input_tokens leave out those read from the cache
    from nanoflow.entrypoints import openai_protocol as api
    from nanoflow.entrypoints.messages import MessageRenderer
    usage = api.Usage(prompt_tokens=140, completion_tokens=5, total_tokens=145,
                      prompt_tokens_details=api.PromptTokensDetails(cached_tokens=128))
    assert MessageRenderer._usage(usage) == dict(input_tokens=12, output_tokens=5, cache_read_input_tokens=128)


@pytest.mark.parametrize("body, message", [
    ({"max_tokens": None}, "max_tokens"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "user", "content": [{"type": "image", "source": {}}]}]}, "messages"),
    ({"tools": [{"type": "web_search_20250305", "name": "web_search"}]}, "tools.0"),
    ({"tool_choice": {"type": "tool"}}, "name goes with type tool"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"stop_sequences": [""]}, "stop_sequences"),
    ({"tool_choice": {"type": "auto"}}, "'auto' needs tools"),  # (Anthropic's and vLLM's chat: refused by name)
    ({"tools": [WEATHER], "tool_choice": {"type": "any"}, "output_config": {"format": {
        "type": "json_schema", "schema": {}}}}, "output_config.format: tool_choice 'any' holds the output"),
])
def test_bad_requests_are_a_400_naming_the_field(default_llm, body, message):
    with TestClient(build_app(Scripted(default_llm.tokenizer, "Paris."), "m")) as client:
        r = client.post("/v1/messages", json={"max_tokens": 8, "messages": [{"role": "user", "content": "Hi"}]} | body)
    assert r.status_code == 400 and message in r.json()["error"]["message"], r.text
    assert r.json()["type"] == "error"  # (Anthropic's error body; OpenAI's error object too)


def test_errors_auth_and_prefill_as_anthropics(default_llm):
    """Errors carry Anthropic's types (its clients retry on overloaded_error); a key in either header opens the
    route (its clients may send both); a conversation that ends with the assistant's text is continued (prefill)."""
    from nanoflow.entrypoints.messages import MessageRenderer
    from nanoflow.entrypoints.openai_protocol import ErrorInfo
    event = MessageRenderer("m", "x").error(ErrorInfo(message="busy", type="server_overloaded"))
    assert event == {"type": "error", "error": {"type": "overloaded_error", "message": "busy"}}
    app = build_app(Scripted(default_llm.tokenizer, "Paris."), "m", api_key="k")
    body = {"max_tokens": 8, "messages": [{"role": "user", "content": "Hi"}]}
    with TestClient(app) as client:
        r = client.post("/v1/messages", json=body | {"model": "claude"}, headers={"x-api-key": "k"})
        assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"
        for headers, status in (({"x-api-key": "no", "authorization": "Bearer k"}, 200),
                                ({"x-api-key": "k", "authorization": "Bearer no"}, 200),
                                ({"x-api-key": "no"}, 401)):
            assert client.post("/v1/messages", json=body, headers=headers).status_code == status, headers
        assert client.get("/v1/models", headers={"x-api-key": "k"}).status_code == 401  # (Anthropic's routes only)
    prefill = MessagesRequest(max_tokens=8, messages=[{"role": "user", "content": "Capital of France?"},
                                                      {"role": "assistant", "content": "The capital is"}]).as_chat()
    assert prefill.continue_final_message and not prefill.add_generation_prompt


CALL = '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>'


@pytest.mark.parametrize("text, reasoning_parser, body, kinds, stop_reason", [
    ("<think>Let me think.</think>Paris. " + CALL, "deepseek_r1", {}, ["thinking", "text", "tool_use"], "tool_use"),
    ("Paris.", None, {}, ["text"], "end_turn"),
    # (a forced call ends as tool_use too, as Anthropic's: clients loop on it)
    ('{"city": "Paris"}', None, {"tool_choice": {"type": "tool", "name": "get_weather"}}, ["tool_use"], "tool_use"),
])
def test_a_message_and_its_stream(default_llm, text, reasoning_parser, body, kinds, stop_reason):
    app = build_app(Scripted(default_llm.tokenizer, text), "m", reasoning_parser=reasoning_parser,
                    tool_parser="hermes", api_key="k")
    body = {"max_tokens": 64, "messages": [{"role": "user", "content": "Weather?"}], "tools": [WEATHER]} | body
    with TestClient(app) as client:  # (the key as Anthropic's clients send it)
        whole = client.post("/v1/messages", json=body, headers={"x-api-key": "k"}).json()
        text_events = client.post("/v1/messages", json=body | {"stream": True}, headers={"x-api-key": "k"}).text
    message = ant.Message.model_validate(whole)
    assert [b.type for b in message.content] == kinds and message.stop_reason == stop_reason
    if "tool_use" in kinds:
        assert message.content[-1].input == {"city": "Paris"}
    # the stream: each event anthropic's, named by its type; started, blocks, message_delta, stopped; its blocks add
    # up to the whole message's
    events = []
    for block in text_events.strip().split("\n\n"):
        name, data = block.split("\n")
        events.append(json.loads(data.removeprefix("data: ")))
        assert name == f"event: {events[-1]['type']}"
        EVENT.validate_python(events[-1])
    assert events[0]["type"] == "message_start" and [e["type"] for e in events[-2:]] == ["message_delta",
                                                                                         "message_stop"]
    assert events[-2]["delta"]["stop_reason"] == stop_reason and events[-2]["usage"] == whole["usage"]
    blocks = []
    for e in events:
        if e["type"] == "content_block_start":
            assert e["index"] == len(blocks)
            blocks.append(dict(e["content_block"]) | ({"partial": ""} if e["content_block"]["type"] == "tool_use"
                                                      else {}))
        elif e["type"] == "content_block_delta":
            d, b = e["delta"], blocks[e["index"]]
            key = {"text_delta": "text", "thinking_delta": "thinking", "input_json_delta": "partial"}[d["type"]]
            b[key] += d[key if key != "partial" else "partial_json"]
    for b in blocks:
        if b["type"] == "tool_use":
            b["input"] = json.loads(b.pop("partial"))
    strip = lambda bs: [{k: v for k, v in b.items() if k != "id"} for b in bs]  # noqa: E731
    assert strip(blocks) == strip(whole["content"])


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    proc, url = start_server(["--max-model-len", "1024", "--kv-cache-gb", "0.25", "--api-key", "k",
                              "--served-model-name", "m"], tmp_path_factory.mktemp("messages") / "log")
    yield anthropic.Anthropic(base_url=url, api_key="k", max_retries=0), url
    assert stop_server(proc) == 0


def test_the_anthropic_client_against_chat_completions(client):
    """A message's text is what the same chat completion says; cut at max_tokens its stop_reason says so; the
    client's stream helper adds the events up to the same message; count_tokens is the chat prompt's length."""
    import openai
    client, url = client
    chat = openai.OpenAI(base_url=f"{url}/v1", api_key="k", max_retries=0).chat.completions.create(
        model="", messages=[{"role": "system", "content": "Be brief."},
                            {"role": "user", "content": "The capital of France?"}], max_tokens=6, temperature=0)
    kw = dict(model="m", system="Be brief.", messages=[{"role": "user", "content": "The capital of France?"}],
              max_tokens=6, extra_body={"temperature": 0})  # (the client's own argument no longer: older ones')
    message = client.messages.create(**kw)
    assert message.content[0].text == chat.choices[0].message.content and message.stop_reason == "max_tokens"
    assert (message.usage.input_tokens, message.usage.output_tokens) == (chat.usage.prompt_tokens, 6)
    with client.messages.stream(**kw) as stream:
        deltas = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert deltas == final.content[0].text == message.content[0].text and final.stop_reason == "max_tokens"
    assert final.usage.output_tokens == 6
    count = client.messages.count_tokens(model="m", system="Be brief.", messages=kw["messages"])  # (no max_tokens)
    assert count.input_tokens == chat.usage.prompt_tokens
    # a stop sequence that ends it
    stopped = client.messages.create(**kw | {"max_tokens": 64, "stop_sequences": [message.content[0].text[-2:]]})
    assert (stopped.stop_reason, stopped.stop_sequence) == ("stop_sequence", message.content[0].text[-2:])
    # structured output, as the client's parse() asks for it (output_config.format)
    from typing import Literal

    from pydantic import BaseModel

    class City(BaseModel):
        name: Literal["Paris", "Lyon"]
    parsed = client.messages.parse(**kw | {"max_tokens": 32}, output_format=City)
    assert parsed.parsed_output.name in ("Paris", "Lyon")
    with pytest.raises(anthropic.AuthenticationError):
        anthropic.Anthropic(base_url=url, api_key="wrong", max_retries=0).messages.create(**kw)
