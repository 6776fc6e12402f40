"""Reasoning outputs (vLLM's --reasoning-parser): a thinking model's text up to </think> is the message's
`reasoning` (also sent as vLLM's older `reasoning_content`), the rest its content, from which tool calls are read;
a request's grammar (structured outputs, a named or required tool choice) holds only what follows the reasoning.

- deepseek_r1 (DeepSeek-R1 and its distills, whose template opens <think> in the prompt): everything before
  </think>, after a <think> the output may begin with, is reasoning; an output without </think> is all reasoning.
- qwen3 (Qwen3, whose output opens with <think> when it thinks): reasoning only when the output begins with <think>
  (with enable_thinking false, or from an instruct model, it is all content); an output cut inside it is all
  reasoning. When the prompt itself leaves <think> open (Qwen3.5's template, the Thinking-2507 models'), the output
  is read as deepseek_r1 reads it (`reading`): reasoning up to </think>, as vLLM's qwen3 reads such outputs.

A stream sends the reasoning as it comes, holding back only what may begin </think>, then the content; it adds up to
the unstreamed response. (vLLM's qwen3 differs in one case: an output cut inside its reasoning is content there.)
"""
from __future__ import annotations

from nanoflow.engine.detokenizer import marker_tail

START, END = "<think>", "</think>"


def split(parser: str, text: str, finished: bool = True) -> tuple[str | None, str | None, int]:
    """(reasoning, content text, how much of the reasoning is surely final) of the output so far: content None while
    it may still be reasoning; reasoning None where the output does not reason."""
    if parser == "qwen3" and not text.startswith(START):
        return (None, None, 0) if START.startswith(text) and not finished else (None, text, 0)
    if not finished and START.startswith(text):  # (the tag, still arriving: nothing is known)
        return None, None, 0
    body = text.removeprefix(START)
    reasoning, end, content = body.partition(END)
    if end:
        return reasoning, content, len(reasoning)
    return body, ("" if finished else None), len(body) - (0 if finished else marker_tail(body, END))


class ReasoningStream:
    """One choice's stream: step(text, finished) -> (reasoning to send now, the content text so far, or None while
    the output still reasons)."""
    __slots__ = ("parser", "sent")

    def __init__(self, parser: str):
        self.parser, self.sent = parser, 0

    def step(self, text: str, finished: bool) -> tuple[str | None, str | None]:
        reasoning, content, final = split(self.parser, text, finished)
        piece = reasoning[self.sent:final] if reasoning is not None else ""
        self.sent = max(self.sent, final)
        return piece or None, content


def tag_ids(tokenizer) -> tuple[list[int], list[int], frozenset[int]]:
    """The token ids of <think> and </think> in this tokenizer, and its control tokens (the added tokens marked
    special, such as a turn's <|im_start|>), the tags' aside."""
    start, end = (tokenizer.encode(t, add_special_tokens=False) for t in (START, END))
    control = {i for i, t in tokenizer.tk.get_added_tokens_decoder().items() if t.special}
    return start, end, frozenset(control - set(start) - set(end))


def last_tag(ids: list[int], start: list[int], end: list[int], control: frozenset[int] = frozenset()) -> str | None:
    """The last reasoning tag of the prompt's last turn (ids: its token ids; start and end: the tags'; control: the
    tokens that open and close turns), the one being generated: END where it has ended (a template that turns
    thinking off writes Qwen3's empty <think></think>), START where it leaves the reasoning open (DeepSeek-R1's
    template, Qwen3.5's, a prefill inside it), None where it has neither. A tag in an earlier turn (a user's or a
    tool's text that says "<think>") does not count: it made the output all reasoning. (Where a template's turn
    markers are no special tokens, as DeepSeek-R1's <｜User｜> / <｜Assistant｜>, the last turn starts at the last
    special token before it: an earlier turn's tags may still count there.)"""
    first = next((i + 1 for i in range(len(ids) - 1, -1, -1) if ids[i] in control), 0)

    def last(tag):
        return next((i for i in range(len(ids) - len(tag), first - 1, -1) if ids[i:i + len(tag)] == tag), -1)
    at_start, at_end = last(start), last(end)
    return None if at_start == at_end == -1 else END if at_end > at_start else START


def reading(parser: str, prompt_tag: str | None) -> str | None:
    """How an output is read after a prompt whose last tag is prompt_tag: qwen3's outputs as deepseek_r1's when the
    prompt opened the reasoning (the output then starts inside it, with no <think> of its own); None (all content)
    after a prompt that ended it, whatever the parser (Qwen3's template with enable_thinking false: deepseek_r1 read
    it all as reasoning, a grammar's output and tool calls with it; vLLM's server, and the engine's grammar, take it
    all as content)."""
    if prompt_tag == END:
        return None
    return "deepseek_r1" if parser == "qwen3" and prompt_tag == START else parser
