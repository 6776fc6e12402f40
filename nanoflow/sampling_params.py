"""Per-request sampling parameters (the vLLM / OpenAI set), validated on construction."""
from __future__ import annotations

import copy
import logging
import math
import numbers
from dataclasses import dataclass, field

MAX_LOGPROBS = 20
log = logging.getLogger(__name__)
GRAMMAR_KINDS = ("json", "regex", "choice", "grammar", "json_object")
JSON_OPTIONS = ("disable_any_whitespace", "disable_additional_properties")  # (vLLM's, for json and json_object)
MIN_TEMPERATURE = 0.01  # a lower one (but 0) is raised to it, as vLLM's (logits / 1e-38 overflow float32)


@dataclass(slots=True)
class StructuredOutputsParams:
    """Exactly one of: json (a JSON schema, as a dict or its text), regex, choice (the output is one of these
    strings), grammar (EBNF or Lark, as xgrammar and vLLM take them) or json_object=True (any JSON object). As
    vLLM's, for JSON: disable_any_whitespace (no whitespace between its tokens but xgrammar's separators, ", " and
    ": "), disable_additional_properties (no properties beyond the schema's, even where it allows them)."""
    json: str | dict | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    disable_any_whitespace: bool = False
    disable_additional_properties: bool = False

    def __post_init__(self):
        given = [k for k in GRAMMAR_KINDS if getattr(self, k) not in (None, False)]
        if len(given) != 1:
            raise ValueError(f"invalid sampling parameter structured_outputs: give exactly one of "
                             f"{', '.join(GRAMMAR_KINDS)} (got {', '.join(given) or 'none'})")
        kinds = {"json": ((str, dict), "a JSON schema (a dict or its text)"), "regex": (str, "a string"),
                 "grammar": (str, "a string"), "json_object": (bool, "true"),
                 "choice": ((list, tuple), "a non-empty list of strings")}
        kind = given[0]
        types, what = kinds[kind]
        v = getattr(self, kind)
        if not isinstance(v, types) or kind == "choice" and not (v and all(isinstance(c, str) for c in v)):
            raise ValueError(f"invalid sampling parameter structured_outputs.{kind}={v!r}: must be {what}")
        for name in JSON_OPTIONS:
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"invalid sampling parameter structured_outputs.{name}={getattr(self, name)!r}: "
                                 f"must be true or false")

    @property
    def kind(self) -> str:
        """The one of GRAMMAR_KINDS given."""
        return next(k for k in GRAMMAR_KINDS if getattr(self, k) not in (None, False))


@dataclass(slots=True)
class SamplingParams:
    n: int = 1
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: off
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    max_tokens: int | None = 16  # None: up to the context length
    min_tokens: int = 0
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    seed: int | None = None
    logprobs: int | None = None  # top-k logprobs per output token (the sampled one always included)
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True  # (vLLM's; a fast tokenizer's decode has no such option: no effect)
    detokenize: bool = True  # False: token ids only, no text (and no stop strings), as vLLM's
    logit_bias: dict[int, float] | None = None  # token id -> added to its logit (before penalties, as vLLM)
    allowed_token_ids: list[int] | None = None  # only these may be sampled
    structured_outputs: StructuredOutputsParams | None = None  # (a dict of its fields is taken too)
    bad_words: list[str] | None = None  # words never completed: a word's last token is banned after the rest
    truncate_prompt_tokens: int | None = None  # only the prompt's last k tokens (-1: max_model_len - 1)
    stop_strings: tuple[str, ...] = field(init=False, default=())

    def __post_init__(self):
        def check(ok: bool, name: str, rule: str):
            if not ok:
                raise ValueError(f"invalid sampling parameter {name}={getattr(self, name)!r}: {rule}")

        for name in ("logprobs", "prompt_logprobs"):  # (as vLLM's: True asks for the sampled token's; False, none)
            if isinstance(v := getattr(self, name), bool):
                setattr(self, name, 1 if v else None)
        if self.seed == -1:  # (vLLM's: no seed)
            self.seed = None
        for name in _SCALARS:  # (numpy's scalars too, as vLLM takes them: as Python's int and float from here on)
            v = getattr(self, name)
            if integer(v) and type(v) is not int:
                setattr(self, name, int(v))
            elif isinstance(v, numbers.Real) and not isinstance(v, (bool, float, numbers.Integral)):
                setattr(self, name, float(v))
        check(integer(self.n) and self.n >= 1, "n", "must be an integer >= 1")
        check(finite_number(self.temperature) and self.temperature >= 0, "temperature", "must be a finite number >= 0")
        check(finite_number(self.top_p) and 0 < self.top_p <= 1, "top_p", "must be in (0, 1]")
        check(integer(self.top_k) and self.top_k >= -1, "top_k", "must be -1, 0 (off) or >= 1")
        check(finite_number(self.min_p) and 0 <= self.min_p <= 1, "min_p", "must be in [0, 1]")
        check(finite_number(self.repetition_penalty) and self.repetition_penalty > 0, "repetition_penalty",
              "must be > 0")
        check(finite_number(self.presence_penalty) and -2 <= self.presence_penalty <= 2, "presence_penalty",
              "must be in [-2, 2]")
        check(finite_number(self.frequency_penalty) and -2 <= self.frequency_penalty <= 2, "frequency_penalty",
              "must be in [-2, 2]")
        check(self.max_tokens is None or (integer(self.max_tokens) and self.max_tokens >= 1),
              "max_tokens", "must be an integer >= 1")
        check(natural(self.min_tokens), "min_tokens", "must be an integer >= 0")
        check(self.max_tokens is None or self.min_tokens <= self.max_tokens, "min_tokens", "must be <= max_tokens")
        check(self.seed is None or integer(self.seed), "seed", "must be an integer")
        for name in ("logprobs", "prompt_logprobs"):
            v = getattr(self, name)
            check(v is None or (natural(v) and v <= MAX_LOGPROBS), name,
                  f"must be an integer in [0, {MAX_LOGPROBS}]")
        for name in ("include_stop_str_in_output", "ignore_eos", "skip_special_tokens", "spaces_between_special_tokens",
                     "detokenize"):
            check(isinstance(getattr(self, name), bool), name, "must be true or false")
        check(self.stop is None or isinstance(self.stop, (str, list, tuple)), "stop",
              "must be a string or a list of strings")
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        check(all(isinstance(s, str) and s for s in stop), "stop", "must be non-empty strings")
        self.stop, self.stop_strings = stop, tuple(stop)  # (a list, as vLLM's reads back)
        check(self.detokenize or not stop, "stop", "stop strings need detokenize=True (their text is matched)")
        check(self.stop_token_ids is None or isinstance(self.stop_token_ids, (list, tuple)), "stop_token_ids",
              "must be a list of token ids")
        self.stop_token_ids = list(self.stop_token_ids or [])
        check(all(natural(t) for t in self.stop_token_ids), "stop_token_ids", "must be token ids >= 0")
        check(self.logit_bias is None or isinstance(self.logit_bias, dict) and all(
            natural(t) and finite_number(b) for t, b in self.logit_bias.items()), "logit_bias",
            "must map token ids >= 0 to finite numbers")
        check(self.allowed_token_ids is None or isinstance(self.allowed_token_ids, (list, tuple)) and
              self.allowed_token_ids and all(natural(t) for t in self.allowed_token_ids), "allowed_token_ids",
              "must be a non-empty list of token ids >= 0")
        k = self.truncate_prompt_tokens
        check(k is None or natural(k) and k >= 1 or k == -1, "truncate_prompt_tokens", "must be -1 or an integer >= 1")
        check(self.bad_words is None or isinstance(self.bad_words, (list, tuple)) and all(
            isinstance(w, str) and w.strip() for w in self.bad_words), "bad_words", "must be a list of words")
        if isinstance(self.structured_outputs, dict):
            if unknown := sorted(set(self.structured_outputs) - set(GRAMMAR_KINDS) - set(JSON_OPTIONS)):
                raise ValueError(f"invalid sampling parameter structured_outputs: unknown field {unknown[0]!r} (the "
                                 f"fields: {', '.join(GRAMMAR_KINDS + JSON_OPTIONS)})")
            self.structured_outputs = StructuredOutputsParams(**self.structured_outputs)
        check(self.structured_outputs is None or isinstance(self.structured_outputs, StructuredOutputsParams),
              "structured_outputs", "must be StructuredOutputsParams")
        if self.top_k == -1:
            self.top_k = 0
        if 0 < self.temperature < MIN_TEMPERATURE:
            log.warning("temperature %s is below %s, which may overflow the logits: raised to %s (as vLLM does)",
                        self.temperature, MIN_TEMPERATURE, MIN_TEMPERATURE)
            self.temperature = MIN_TEMPERATURE
        check(self.n == 1 or not self.greedy, "n", "must be 1 when sampling greedily (temperature 0): the samples "
                                                   "would be one and the same")

    def clone(self) -> SamplingParams:
        """A deep copy, as vLLM's."""
        return copy.deepcopy(self)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def penalized(self) -> bool:
        return self.repetition_penalty != 1 or self.presence_penalty != 0 or self.frequency_penalty != 0

    @property
    def biased(self) -> bool:
        """A bias is added to the logits before sampling (logit_bias, allowed_token_ids, bad_words)."""
        return bool(self.logit_bias) or self.allowed_token_ids is not None or bool(self.bad_words)

    @property
    def plain(self) -> bool:
        """Sampled from softmax(logits / temperature) alone: no bias, grammar, penalty, filter, seed or logprobs."""
        return (not self.penalized and not self.biased and self.structured_outputs is None and self.top_k == 0
                and self.top_p == 1 and self.min_p == 0 and self.seed is None and self.logprobs is None)


_SCALARS = ("n", "temperature", "top_p", "top_k", "min_p", "repetition_penalty", "presence_penalty",
            "frequency_penalty", "max_tokens", "min_tokens", "seed", "logprobs", "prompt_logprobs",
            "truncate_prompt_tokens")


def integer(t) -> bool:
    """An integer, numpy's included, but not a bool (True would pass for 1: logprobs=True, as OpenAI's chat API spells
    it, is not a count)."""
    return isinstance(t, numbers.Integral) and not isinstance(t, bool)


def natural(t) -> bool:
    """An integer >= 0 (not a bool)."""
    return integer(t) and t >= 0


def finite_number(x) -> bool:
    """A finite number (not a bool): NaN and infinities would turn every logit into NaN."""
    return isinstance(x, numbers.Real) and not isinstance(x, bool) and math.isfinite(x)
