"""Structured outputs (vLLM's): a request's output held to a JSON schema, any JSON object, a regex, a choice of
strings or an EBNF grammar, by xgrammar (the optional extra `structured`).

The engine parses a request's grammar when it comes (a bad one is refused at once), compiles it for the tokenizer
on a thread of its own (as vLLM's: tens of milliseconds for a large schema and vocabulary, which would stall every
running request on the engine's thread), and gives each sequence a matcher when that is done; until then the request
waits outside the scheduler. Before each of the sequence's samples the runner sets the logits of the tokens its
matcher does not allow to -inf (`mask_logits`: before the logprobs too, as vLLM's runner masks the logits before its
sampler), and the engine feeds the matcher each sampled token. A mask needs the last token on the host, so the
engine does not schedule ahead while a constrained request runs.
"""
from __future__ import annotations

import json
import re
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from nanoflow.sampling_params import StructuredOutputsParams

CACHE_BYTES = 512 * 2**20  # compiled grammars kept (xgrammar's cache is unbounded by default); vLLM's default
# JSON-schema keywords that xgrammar parses and then does not enforce (measured on xgrammar 0.2): refused by name,
# as vLLM refuses those it knows of, rather than an output that breaks the schema. (An unknown `format` is an
# annotation, as JSON Schema has it by default: not refused.)
UNENFORCED = ("uniqueItems", "contains", "minContains", "maxContains", "not", "if", "then", "else",
              "dependentRequired", "dependentSchemas")
RANGE = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum")
VALUES = ("enum", "const", "default", "examples")  # a schema's keywords whose content is values, not schemas


class Grammars:
    """Parses requests' grammars and compiles them for one tokenizer (xgrammar caches what it compiled)."""

    def __init__(self, tokenizer, vocab_size: int, stop_token_ids: set[int]):
        try:
            import xgrammar
            from transformers import PreTrainedTokenizerFast
        except ImportError:
            raise ValueError("structured outputs need xgrammar: pip install 'nanoflow[structured]'") from None
        self.xgr = xgrammar
        # the model's vocabulary may be padded past the tokenizer's: those rows are never allowed
        info = xgrammar.TokenizerInfo.from_huggingface(PreTrainedTokenizerFast(tokenizer_object=tokenizer.tk),
                                                       vocab_size=vocab_size, stop_token_ids=sorted(stop_token_ids))
        self.compiler = xgrammar.GrammarCompiler(info, cache_limit_bytes=CACHE_BYTES)
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="nanoflow-grammars")  # (xgrammar threads its own work)

    def compile(self, p: StructuredOutputsParams) -> Future:
        """p's grammar, parsed now (a ValueError naming what does not parse) and compiled on the pool's thread: the
        future's result makes matchers (`matcher`)."""
        g = self.xgr.Grammar
        try:
            if p.json is not None or p.json_object:  # (an object, as vLLM's: xgrammar's any-JSON takes any value)
                schema = {"type": "object"} if p.json is None else json.loads(p.json) if isinstance(p.json, str) \
                    else p.json
                if (why := unenforced(schema)) is not None:
                    raise ValueError(f"{why} is not supported (it would not be enforced)")
                if p.disable_additional_properties:
                    schema = closed(schema)
                grammar = g.from_json_schema(json.dumps(schema), any_whitespace=not p.disable_any_whitespace)
            elif p.regex is not None:
                grammar = g.from_regex(p.regex)
            elif p.choice is not None:  # (EBNF's strings take JSON's escapes, but not its surrogate pairs)
                grammar = g.from_ebnf("root ::= " + " | ".join(json.dumps(s, ensure_ascii=False) for s in p.choice))
            else:  # (EBNF's rules are `name ::= ...`; Lark's `name: ...`, which vLLM also takes)
                grammar = g.from_ebnf(p.grammar) if "::=" in p.grammar else g.from_lark(p.grammar)
        except (RuntimeError, ValueError, TypeError) as e:  # (xgrammar's errors on a bad schema, regex or grammar)
            why = re.sub(r"^\[[\d:]+\] \S+:\d+: ", "", str(e).strip())  # (the C++ source's place)
            raise ValueError(f"invalid sampling parameter structured_outputs.{p.kind}: {why}") from None
        return self.pool.submit(self.compiler.compile_grammar, grammar)

    def matcher(self, compiled):
        """A fresh matcher of a compiled grammar (one per sequence)."""
        return self.xgr.GrammarMatcher(compiled)


NAMED_SCHEMAS = ("properties", "patternProperties", "$defs", "definitions")


def closed(schema):
    """The schema with every object's additionalProperties false (vLLM's disable_additional_properties)."""
    if isinstance(schema, list):
        return [closed(x) for x in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: v if k in VALUES else {name: closed(s) for name, s in v.items()}
           if k in NAMED_SCHEMAS and isinstance(v, dict) else closed(v)
           for k, v in schema.items()}  # (a map of names to schemas: its names are no keywords; values stay values)
    if out.get("type") == "object" or "properties" in out:
        out["additionalProperties"] = False
    return out


def unenforced(schema, path: str = "$") -> str | None:
    """The first keyword of the schema (and where) that xgrammar would leave unenforced, or None."""
    if isinstance(schema, list):
        return next((w for i, x in enumerate(schema) if (w := unenforced(x, f"{path}[{i}]")) is not None), None)
    if not isinstance(schema, dict):
        return None
    if bad := [k for k in UNENFORCED if k in schema and not (k == "uniqueItems" and schema[k] is False)]:
        return f"{bad[0]} at {path}"
    if isinstance(schema.get("allOf"), list) and len(schema["allOf"]) > 1:  # (one schema it takes as that schema)
        return f"allOf of several schemas at {path}"
    # (xgrammar enforces multipleOf on a bare integer only)
    if "multipleOf" in schema and (schema.get("type") != "integer" or any(k in schema for k in RANGE)):
        return f"multipleOf {'beside a range' if schema.get('type') == 'integer' else 'of a non-integer'} at {path}"
    if ("pattern" in schema or "format" in schema) and (length := [k for k in ("minLength", "maxLength")
                                                                   if k in schema]):
        return f"{length[0]} beside {'pattern' if 'pattern' in schema else 'format'} at {path}"
    for k, v in schema.items():
        if k in VALUES:
            continue
        if k in ("properties", "patternProperties", "$defs", "definitions") and isinstance(v, dict):  # names: schemas
            w = next((w for name, x in v.items() if (w := unenforced(x, f"{path}.{k}.{name}")) is not None), None)
        else:
            w = unenforced(v, f"{path}.{k}")
        if w is not None:
            return w
    return None


def mask_logits(logits: torch.Tensor, rows: list[int], matchers: list) -> None:
    """Set logits[row] to -inf on every token its matcher does not allow next ([R, V] on any device). A matcher
    that has terminated (its EOS taken, with ignore_eos) masks nothing, as vLLM's."""
    import xgrammar
    vocab = logits.shape[1]
    bitmask = xgrammar.allocate_token_bitmask(len(rows), vocab)  # int32 [n, ceil(V / 32)], bit i of word w: 32w + i
    for i, m in enumerate(matchers):
        if not m.is_terminated():  # (a terminated one raises; its row stays all ones)
            m.fill_next_token_bitmask(bitmask, i)
    bits = bitmask.to(logits.device, non_blocking=True)
    shifts = torch.arange(32, device=logits.device, dtype=torch.int32)
    allowed = ((bits[:, :, None] >> shifts) & 1).bool().flatten(1)[:, :vocab]
    index = torch.tensor(rows, device=logits.device)
    logits[index] = logits[index].masked_fill(~allowed, float("-inf"))
