"""Incremental detokenization and stop strings.

Decoding only the new ids would break words apart (byte-level pieces, sentencepiece's leading
spaces), so each step decodes a short window that starts a few tokens back and emits what it adds
past the previous window. A trailing U+FFFD means an incomplete UTF-8 sequence: wait for more.
"""
from __future__ import annotations

from nanoflow.engine.sequence import Sequence
from nanoflow.tokenizer import Tokenizer


def detokenize(tokenizer: Tokenizer, seq: Sequence) -> str:
    """Append the text of newly generated tokens to seq.output_text and return it."""
    skip = seq.params.skip_special_tokens
    ids = seq.token_ids
    if seq.prefix_offset == seq.read_offset:  # the first call (the window is empty only then): start it in the prompt
        seq.prefix_offset = _window_start(tokenizer, ids, seq.read_offset, skip)
    prefix = tokenizer.decode(ids[seq.prefix_offset: seq.read_offset], skip_special_tokens=skip)
    full = tokenizer.decode(ids[seq.prefix_offset:], skip_special_tokens=skip)
    if len(full) <= len(prefix) or full.endswith("\ufffd"):
        return ""
    delta = full[len(prefix):]
    seq.prefix_offset, seq.read_offset = seq.read_offset, len(ids)
    seq.output_text += delta
    return delta


def _window_start(tokenizer: Tokenizer, ids: list[int], n: int, skip: bool) -> int:
    """Where the first window starts: 6 tokens back, or further back if that is inside a character (as vLLM's,
    which looks for a start from which the prompt's end decodes without U+FFFD). Byte-fallback tokens decode to
    U+FFFD all along a run of bytes that does not start on a character, so the output's own bytes would too.
    n: the prompt's length."""
    for start in range(max(n - 6, 0), max(n - 24, 0) - 1, -1):
        if "\ufffd" not in tokenizer.decode(ids[start:n], skip_special_tokens=skip):
            return start
    return max(n - 6, 0)


def find_stop(seq: Sequence, delta_len: int) -> str | None:
    """If a stop string now occurs in the output, cut the text there and return the stop string."""
    stops = seq.params.stop_strings
    if not stops or not delta_len:
        return None
    text = seq.output_text
    # only a match that reaches the new text can be new (each string's own reach: the older text may hold a match
    # of a short one that was not looked for, under min_tokens)
    hits = [(i + len(s), i, s) for s in stops if (i := text.find(s, max(len(text) - delta_len - len(s) + 1, 0))) >= 0]
    if not hits:
        return None
    # the one that completes first (of those, the longest), as if the text came a character at a time: where the
    # tokens' boundaries fall does not change the outcome
    _, i, stop = min(hits)
    seq.output_text = text[: i + len(stop)] if seq.params.include_stop_str_in_output else text[:i]
    return stop


def visible_text(seq: Sequence, finished: bool) -> str:
    """While running, hold back a tail that could still become a stop string."""
    stops = seq.params.stop_strings
    if finished or not stops or seq.params.include_stop_str_in_output:
        return seq.output_text
    hold = max(map(len, stops)) - 1
    return seq.output_text[: max(len(seq.output_text) - hold, 0)]  # (not a negative index: that counts from the end)


def marker_tail(text: str, marker: str) -> int:
    """The length of text's longest end that begins marker: what a stream holds back while marker may be arriving
    (a tool call's or the reasoning's tag)."""
    return next((n for n in range(min(len(marker) - 1, len(text)), 0, -1) if marker.startswith(text[-n:])), 0)
