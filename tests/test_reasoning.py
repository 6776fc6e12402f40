"""Reasoning outputs (--reasoning-parser): the parsers, their streams (which add up to the unstreamed message), and the
server's chat completions over a scripted engine (a given text, a few characters an output), with tool calls read
from the content after the reasoning."""
import asyncio
import json

import pytest
from fastapi.testclient import TestClient

from nanoflow.entrypoints.async_engine import ACCEPTED, EngineClient
from nanoflow.entrypoints.metrics import Metrics
from nanoflow.reasoning import END, START, ReasoningStream, last_tag, reading, split
from nanoflow.entrypoints.server import build_app
from nanoflow.outputs import CompletionOutput, Logprob, RequestOutput

SPLITS = [  # (parser, whole output, reasoning, content)
    ("deepseek_r1", "Let me think.</think>The answer is 4.", "Let me think.", "The answer is 4."),
    ("deepseek_r1", "<think>Hmm.</think>\n\n4", "Hmm.", "\n\n4"),
    ("deepseek_r1", "Still thinking when cut off", "Still thinking when cut off", ""),  # (no </think>: all reasoning)
    ("deepseek_r1", "a </thin b</think>c", "a </thin b", "c"),  # (a partial tag inside is the reasoning's)
    ("qwen3", "<think>\nhmm\n</think>\n\nHi", "\nhmm\n", "\n\nHi"),
    ("qwen3", "Hi there</think>", None, "Hi there</think>"),  # (reasoning only when the output opens with <think>)
    ("qwen3", "<think>cut inside", "cut inside", ""),
    ("qwen3", "<th", None, "<th"),
    ("qwen3", "", None, ""),
]


@pytest.mark.parametrize("parser, text, reasoning, content", SPLITS)
@pytest.mark.parametrize("cut", [1, 2, 5, 1000])
def test_reasoning_is_told_from_content_and_streams_add_up(parser, text, reasoning, content, cut):
    assert split(parser, text)[:2] == (reasoning, content)
    s, thought, said = ReasoningStream(parser), "", None
    for end in [*range(cut, len(text), cut), len(text)]:
        piece, said = s.step(text[:end], end >= len(text))
        thought += piece or ""
        assert end >= len(text) or said is None or content.startswith(said)  # (content once known stays so)
        assert thought == (reasoning or "")[:len(thought)]  # (nothing sent that is not the reasoning's)
    assert (thought, said) == (reasoning or "", content)


def test_a_prompts_last_tag_says_how_its_output_is_read():
    start, end = [7, 8], [9]
    assert last_tag([1, 2, 7, 8], start, end) == START  # (DeepSeek-R1's template opens <think> in the prompt)
    assert last_tag([1, 7, 8, 3, 9, 4], start, end) == END  # (Qwen3's with thinking off: <think></think>)
    assert last_tag([1, 2], start, end) is None  # (Qwen3's thinking: nothing in the prompt, the output opens it)
    assert last_tag([7, 8, 9, 5, 7, 8], start, end) == START  # (an earlier turn's reasoning, then this one's opened)
    assert last_tag([9, 7], start, end) == END  # (an end without a start: ended, as vLLM's)
    # only the last turn's tags count, after the last control token (a turn's start or end): a user's "<think>"
    # before it does not; a prefill inside the reasoning does
    assert last_tag([1, 7, 8, 3, 5, 6, 2], start, end, frozenset({5, 6})) is None
    assert last_tag([1, 7, 8, 3, 5, 6, 2, 7, 8, 4], start, end, frozenset({5, 6})) == START
    assert last_tag([1, 9, 5, 7, 8, 9, 2], start, end, frozenset({5})) == END
    # qwen3 after a prompt that opened <think> (Qwen3.5's, the Thinking-2507 models'): read as deepseek_r1
    assert [reading("qwen3", t) for t in (START, END, None)] == ["deepseek_r1", None, "qwen3"]
    # (a prompt that ended the reasoning: all content, whatever the parser; deepseek_r1 read it all as reasoning)
    assert [reading("deepseek_r1", t) for t in (START, END, None)] == ["deepseek_r1", None, "deepseek_r1"]


def test_a_stream_holds_back_only_what_may_end_the_reasoning():
    s = ReasoningStream("deepseek_r1")
    assert s.step("Hmm </th", False) == ("Hmm ", None)
    assert s.step("Hmm </thx", False) == ("</thx", None)
    assert s.step("Hmm </thx</think>ok", False) == (None, "ok")
    s = ReasoningStream("qwen3")
    assert s.step("<thi", False) == (None, None)
    assert s.step("<think>a", False) == ("a", None)


class Scripted(EngineClient):
    """Answers every request with `text`, a few characters an output (each choice the same)."""
    tokenizer = None
    max_model_len, model_path, sampling_defaults, eos_token_ids = 1024, "scripted", {}, set()

    def __init__(self, tokenizer, text: str, cut: int = 3):
        super().__init__(Metrics(), 8)
        self.tokenizer, self.text, self.cut = tokenizer, text, cut

    def start(self):
        pass

    def stop(self):
        pass

    def abort_all(self):
        pass

    @property
    def alive(self):
        return True

    def _abort(self, request_id):
        pass

    def _add(self, add):
        add.sink.put(ACCEPTED)

        async def play():
            text = self.text
            for end in range(self.cut, len(text) + self.cut, self.cut) or [0]:  # (no text: one output, finished)
                done = end >= len(text)
                ids = list(range(min(end, len(text))))  # (a token a character; logprobs when asked: -t / 100)
                lps = None if add.params.logprobs is None else [{t: Logprob(-t / 100, 1, text[t])} for t in ids]
                outs = [CompletionOutput(i, text[:end], ids, logprobs=lps, finish_reason="stop" if done else None)
                        for i in range(add.params.n)]
                for rid in add.request_ids:
                    add.sink.put(RequestOutput(rid, None, [1], outs, finished=done))
                await asyncio.sleep(0.001)  # (the reader takes them one at a time, mostly)
        asyncio.ensure_future(play())


def _chat(default_llm, text, body, reasoning_parser="deepseek_r1", tool_parser=None, chat_template=None):
    """(the unstreamed message and finish_reason, the streamed one added up as a client does)"""
    app = build_app(Scripted(default_llm.tokenizer, text), "m", tool_parser=tool_parser,
                    reasoning_parser=reasoning_parser, chat_template=chat_template)
    body = {"messages": [{"role": "user", "content": "2 + 2?"}]} | body
    with TestClient(app) as client:
        r = client.post("/v1/chat/completions", json=body)
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        whole = {k: v for k, v in choice["message"].items() if v is not None}, choice["finish_reason"]
        r = client.post("/v1/chat/completions", json=body | {"stream": True})
        merged, reason, calls = {}, None, {}
        for event in r.text.split("data: ")[1:-1]:
            for c in json.loads(event)["choices"]:
                for key, value in c["delta"].items():
                    if key == "tool_calls" and value:
                        for d in value:
                            entry = calls.setdefault(d["index"], {"id": d["id"], "type": "function", "function": {
                                "name": d["function"]["name"], "arguments": ""}})
                            entry["function"]["arguments"] += d["function"]["arguments"] or ""
                    elif value is not None:
                        merged[key] = merged.get(key, "") + value
                reason = c["finish_reason"] or reason
        if calls:
            merged["tool_calls"] = [calls[i] for i in sorted(calls)]
    return whole, (merged, reason)


def test_the_server_sends_reasoning_apart(default_llm):
    (message, reason), streamed = _chat(default_llm, "Two and two.</think>4", {})
    assert message == {"role": "assistant", "content": "4", "reasoning": "Two and two.",
                       "reasoning_content": "Two and two."} and reason == "stop"
    assert streamed == (message, reason)
    # include_reasoning false drops it (vLLM's)
    (message, _), (merged, _) = _chat(default_llm, "Two and two.</think>4", {"include_reasoning": False})
    assert message == merged == {"role": "assistant", "content": "4"}
    # qwen3: an output that does not open with <think> is all content
    (message, _), (merged, _) = _chat(default_llm, "Just 4.", {}, "qwen3")
    assert message == merged == {"role": "assistant", "content": "Just 4."}
    # ... unless the prompt opened <think> (a template such as Qwen3.5's): then reasoning up to </think>, as vLLM's
    opens = "{% for m in messages %}{{ m.content }}\n\n{% endfor %}<think>"
    (message, _), (merged, _) = _chat(default_llm, "Let me think.</think>\n\nIt is 4.", {}, "qwen3", None, opens)
    assert message == merged == {"role": "assistant", "content": "\n\nIt is 4.", "reasoning": "Let me think.",
                                 "reasoning_content": "Let me think."}
    # a user's (or a tool's) text that says <think> is an earlier turn's, behind the template's turn tokens: the
    # output is read as qwen3's still (it was all reasoning, its content and tool calls lost)
    asks = {"messages": [{"role": "user", "content": "Explain this tag:\n<think>"}]}  # (the tag's own tokens here)
    (message, _), (merged, _) = _chat(default_llm, "It marks reasoning.", asks, "qwen3")
    assert message == merged == {"role": "assistant", "content": "It marks reasoning."}
    # after a prompt that ended the reasoning (Qwen3's template with enable_thinking false), all content, for
    # deepseek_r1 too (it was all reasoning: a grammar's output and tool calls lost)
    ended = "{% for m in messages %}{{ m.content }}\n\n{% endfor %}<think>\n\n</think>\n\n"  # (Qwen3's words)
    for parser in ("deepseek_r1", "qwen3"):
        (message, _), (merged, _) = _chat(default_llm, "Just 4.", {}, parser, None, ended)
        assert message == merged == {"role": "assistant", "content": "Just 4."}, parser
    # no parser: the tags are text
    (message, _), _ = _chat(default_llm, "a</think>b", {}, None)
    assert message == {"role": "assistant", "content": "a</think>b"}


def test_tool_calls_are_read_from_the_content_after_the_reasoning(default_llm):
    text = '<think>I need the weather.</think>\n<tool_call>{"name": "w", "arguments": {"city": "Paris"}}</tool_call>'
    tools = [{"type": "function", "function": {"name": "w", "parameters": {"type": "object"}}}]
    (message, reason), (merged, streamed_reason) = _chat(default_llm, text, {"tools": tools}, "qwen3", "hermes")
    assert message["reasoning"] == "I need the weather." and message["content"] == "\n" and reason == "tool_calls"
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in message["tool_calls"]] == \
        [("w", {"city": "Paris"})]
    assert streamed_reason == reason and merged["reasoning"] == message["reasoning"]
    assert merged["content"] == message["content"] and [c["function"] for c in merged["tool_calls"]] == \
        [c["function"] for c in message["tool_calls"]]
    # a named call after a reasoning that never ended: no call (there was one, its arguments "", no JSON)
    named = {"tools": tools, "tool_choice": {"type": "function", "function": {"name": "w"}}}
    (message, reason), streamed = _chat(default_llm, "still thinking", named)
    assert message == {"role": "assistant", "reasoning": "still thinking", "reasoning_content": "still thinking"}
    merged, streamed_reason = streamed  # (its role chunk's content is "")
    assert merged == message | {"content": ""} and streamed_reason == reason == "stop"


def test_an_assistants_earlier_reasoning_reaches_the_template(tokenizer_dir):
    """As vLLM's: an assistant message's reasoning, sent as `reasoning` or `reasoning_content`, is the template's under
    both names (Qwen3's template keeps it in tool-call loops); it was dropped as an unknown field."""
    from nanoflow.entrypoints import openai_protocol as api
    from nanoflow.tokenizer import Tokenizer
    tok = Tokenizer.from_dir(tokenizer_dir)
    template = "{% for m in messages %}[{{ m.reasoning_content }}|{{ m.reasoning }}]{% endfor %}"
    for field in ("reasoning", "reasoning_content"):
        m = api.ChatMessage.model_validate({"role": "assistant", "content": "4", field: "2+2"})
        assert tok.render_chat([m.for_template()], False, template) == "[2+2|2+2]"
    plain = api.ChatMessage.model_validate({"role": "user", "content": "hi"}).for_template()
    assert "reasoning" not in plain and "reasoning_content" not in plain
