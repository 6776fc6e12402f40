"""Structured outputs (xgrammar): every output follows its request's grammar, sampled or greedy, with asynchronous
scheduling too; a plain request beside them is as alone; bad grammars are refused by name."""
import dataclasses
import json
import re

import pytest

from nanoflow import LLM, SamplingParams
from nanoflow.sampling_params import StructuredOutputsParams as Structured

pytest.importorskip("xgrammar")

PROMPT = [5, 17, 923, 4410, 88]
CASES = [  # (the grammar, a test of the whole output)
    (Structured(regex="[0-9]{3}"), lambda t: re.fullmatch("[0-9]{3}", t)),
    (Structured(choice=["yes", "no way", 'ü "q"']), lambda t: t in ("yes", "no way", 'ü "q"')),
    (Structured(json={"type": "string", "enum": ["red", "green"]}), lambda t: json.loads(t) in ("red", "green")),
    (Structured(grammar='root ::= "a" "b"? "c"'), lambda t: t in ("ac", "abc")),
    (Structured(grammar='?start: answer\nanswer: "yes" | "no"'), lambda t: t in ("yes", "no")),  # (Lark, as vLLM's)
]


@pytest.fixture(scope="module", params=[False, True], ids=["sync", "async"])
def llm(request, llama_dir):
    """Asynchronous scheduling would build a mask before the last token reached the matcher (the engine reads the
    iteration back first)."""
    return LLM(llama_dir, async_scheduling=request.param)


@pytest.mark.parametrize("grammar, check", CASES, ids=["regex", "choice", "json", "grammar", "lark"])
def test_outputs_follow_the_grammar(llm, grammar, check):
    params = [SamplingParams(temperature=0, max_tokens=12, structured_outputs=grammar),
              SamplingParams(temperature=1.0, seed=4, n=3, max_tokens=12, structured_outputs=grammar)]
    for out in llm.generate([PROMPT, PROMPT], params, use_tqdm=False):
        for c in out.outputs:
            assert check(c.text), c.text
            assert c.finish_reason == "stop"  # the grammar complete, only EOS is allowed


def test_a_json_object_and_a_plain_request_beside_it(llm):
    greedy = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    alone = llm.generate([PROMPT], greedy, use_tqdm=False)[0].outputs[0].token_ids
    obj, plain = llm.generate([PROMPT, PROMPT], [
        SamplingParams(temperature=0, max_tokens=30, structured_outputs={"json_object": True}), greedy],
        use_tqdm=False)
    assert obj.outputs[0].text.startswith("{") and plain.outputs[0].token_ids == alone


def test_vllms_json_options(llm):
    """structured_outputs' disable_any_whitespace (compact JSON) and disable_additional_properties (no property past
    the schema's, even where it allows them), as vLLM's: what each grammar takes, and a compact output."""
    from nanoflow.engine.structured_output import Grammars
    eng = llm.engine
    grammars = Grammars(eng.tokenizer, eng.model_config.vocab_size, eng.eos_token_ids)
    schema = {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "object", "properties": {
        "c": {"type": "integer"}}}}, "required": ["a"], "additionalProperties": True}

    def takes(text, **options):
        return grammars.matcher(grammars.compile(Structured(json=schema, **options)).result()).accept_string(text)
    assert takes('{"a": 1, "z": 2}') and not takes('{"a": 1, "z": 2}', disable_additional_properties=True)
    assert not takes('{"a": 1, "b": {"c": 1, "z": 2}}', disable_additional_properties=True)  # (nested objects too)
    assert takes('{"a": 1, "b": {"c": 1}}', disable_additional_properties=True)
    # (xgrammar's fixed separators then, ", " and ": ", as vLLM's xgrammar backend gives)
    assert takes('{ "a" : 1 }') and not takes('{ "a" : 1 }', disable_any_whitespace=True)
    assert takes('{"a": 1, "b": {"c": 2}}', disable_any_whitespace=True)
    compact = {"json": {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]},
               "disable_any_whitespace": True}
    out = llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=20, structured_outputs=compact),
                       use_tqdm=False)[0].outputs[0]
    assert re.fullmatch(r'\{"n": -?\d+\}', out.text), out.text
    with pytest.raises(ValueError, match="structured_outputs.disable_any_whitespace='yes': must be true or false"):
        SamplingParams(structured_outputs={"json_object": True, "disable_any_whitespace": "yes"})
    # a value in enum / const / default / examples stays as given (an object-like value was closed too, so the grammar
    # took only the changed value, which the schema refuses)
    from nanoflow.engine.structured_output import closed
    literal = {"type": "object", "properties": {}}
    valued = {"type": "object", "properties": {"f": {"const": literal, "default": literal}, "g": {"enum": [literal]}}}
    assert closed(valued)["properties"] == valued["properties"] and closed(valued)["additionalProperties"] is False

    def compiled(json_schema, **options):
        return grammars.matcher(grammars.compile(Structured(json=json_schema, **options)).result())
    assert compiled(valued, disable_additional_properties=True).accept_string(  # (xgrammar's const: compact)
        '{"f": {"type":"object","properties":{}}}')
    assert compiled({"type": "integer", "multipleOf": 5}).accept_string("15")  # (enforced on a bare integer: taken)
    # min_tokens past the grammar's end: the grammar ends it (the EOS ban forced tokens past the grammar's end); where
    # the grammar allows more (an integer's digits), min_tokens holds
    so = {"choice": ["yes", "no"]}
    out = llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=40, min_tokens=30, structured_outputs=so),
                       use_tqdm=False)[0].outputs[0]
    assert out.text in ("yes", "no") and out.finish_reason == "stop" and len(out.token_ids) < 30, out
    digits = {"json": {"type": "integer"}, "disable_any_whitespace": True}
    out = llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=12, min_tokens=8, structured_outputs=digits),
                       use_tqdm=False)[0].outputs[0]
    assert len(out.token_ids) >= 8 and re.fullmatch(r"-?\d+", out.text), out


@pytest.mark.parametrize("kw, message", [
    (dict(regex="[0-9"), "structured_outputs.regex: Regex parsing error"),
    (dict(json='{"type": "nope"}'), "structured_outputs.json: Unsupported type"),
    (dict(grammar="root ::= "), "structured_outputs.grammar: EBNF parser error"),
    # keywords xgrammar parses but does not enforce (an output broke them): refused, as vLLM refuses those it knows
    (dict(json={"type": "array", "items": {"enum": [1, 2, 3]}, "uniqueItems": True}),
     "structured_outputs.json: uniqueItems at $ is not supported (it would not be enforced)"),
    (dict(json={"type": "object", "properties": {"a": {"type": "string", "pattern": "^[a-z]+$", "maxLength": 3}}}),
     "maxLength beside pattern at $.properties.a is not supported"),
    (dict(json={"type": "array", "items": [{"type": "integer", "not": {"const": 3}}]}),
     "not at $.items[0] is not supported"),
    (dict(json={"allOf": [{"type": "integer"}, {"minimum": 3}]}), "allOf of several schemas at $ is not supported"),
    # (xgrammar drops multipleOf but on a bare integer: outputs broke it)
    (dict(json={"type": "object", "properties": {"price": {"type": "number", "multipleOf": 0.25}}}),
     "multipleOf of a non-integer at $.properties.price is not supported"),
    (dict(json={"type": "integer", "minimum": 1, "multipleOf": 5}), "multipleOf beside a range at $ is not supported"),
])
def test_a_bad_grammar_is_refused_by_name(llama_dir, kw, message):
    llm = LLM(llama_dir)
    with pytest.raises(ValueError, match=re.escape(message)):
        llm.generate([PROMPT], SamplingParams(structured_outputs=Structured(**kw)), use_tqdm=False)
    assert not llm.engine.has_unfinished_requests() and not llm.engine.scheduler.waiting


@pytest.mark.parametrize("kw, message", [
    (dict(), "give exactly one of json, regex, choice, grammar, json_object (got none)"),
    (dict(regex="a", choice=["b"]), "(got regex, choice)"),
    (dict(choice=[]), "structured_outputs.choice=[]: must be a non-empty list of strings"),
    (dict(json=5), "structured_outputs.json=5: must be a JSON schema"),
])
def test_bad_structured_outputs_params(kw, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        Structured(**kw)


def test_structured_outputs_need_a_tokenizer(tmp_path):
    from conftest import make_hf_model
    make_hf_model(str(tmp_path), "llama", None)
    with pytest.raises(ValueError, match="structured outputs need the model's tokenizer"):
        LLM(str(tmp_path)).generate([PROMPT], SamplingParams(structured_outputs={"regex": "a"}), use_tqdm=False)


def test_ignore_eos_goes_on_past_the_grammar(llm, caplog):
    """As vLLM's: with ignore_eos the EOS that completes the grammar does not end the output, and past it nothing is
    masked (the matcher has terminated). The step asked the terminated matcher for a mask, which raised."""
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True,
                            structured_outputs=Structured(regex="[0-9]{3}"))
    out = llm.generate([PROMPT], params, use_tqdm=False)[0].outputs[0]
    ids, (eos,) = out.token_ids, llm.engine.eos_token_ids
    assert out.finish_reason == "length" and len(ids) == 10 and eos in ids
    end = ids.index(eos) + 1
    assert re.fullmatch("[0-9]{3}", llm.get_tokenizer().decode(ids[:end], skip_special_tokens=True))
    free = SamplingParams(temperature=0, max_tokens=10 - end, ignore_eos=True)
    assert llm.generate([PROMPT + ids[:end]], free, use_tqdm=False)[0].outputs[0].token_ids == ids[end:]
    assert "does not follow" not in caplog.text


def test_a_choice_outside_the_basic_plane(llm):
    """A choice's characters past U+FFFF: JSON's escapes write them as surrogate pairs, which the EBNF took as two
    characters (the output was bytes of neither)."""
    params = SamplingParams(temperature=0, max_tokens=10, structured_outputs=Structured(choice=["😀 hi"]))
    assert llm.generate([PROMPT], params, use_tqdm=False)[0].outputs[0].text == "😀 hi"


def test_logprobs_are_of_the_masked_logits(llm):
    """As vLLM's: the grammar's bitmask goes on the logits before the sampler, so its logprobs (raw, vLLM's default)
    are of what the grammar allows. Where it allows one token, that token's logprob is 0 and the rest are -inf."""
    params = SamplingParams(temperature=0, max_tokens=10, logprobs=2, structured_outputs=Structured(choice=["yes"]))
    out = llm.generate([PROMPT], params, use_tqdm=False)[0].outputs[0]
    assert out.text == "yes"
    (eos,), last = llm.engine.eos_token_ids, out.logprobs[-1]  # the grammar complete, EOS alone is allowed
    assert out.token_ids[-1] == eos and last[eos].logprob == 0.0 and last[eos].rank == 1
    assert len(last) == 2 and all(e.logprob == float("-inf") for t, e in last.items() if t != eos)


def test_the_grammar_cache_is_bounded(llama_dir, monkeypatch):
    """xgrammar's compiler caches every grammar it compiled, unbounded unless told (a server's unique schemas, ~40 kB
    each here, grew it for ever); bounded as vLLM's (VLLM_XGRAMMAR_CACHE_MB, 512 MiB)."""
    from nanoflow.engine import structured_output
    monkeypatch.setattr(structured_output, "CACHE_BYTES", 100_000)
    eng = LLM(llama_dir).engine
    for i in range(8):
        schema = {"properties": {f"k{i}": {"type": "integer"}}}
        eng._compile(SamplingParams(structured_outputs=Structured(json=schema))).result()
    assert 0 < eng.grammars.compiler.get_cache_size_bytes() <= 100_000


def test_a_grammar_compiles_off_the_engines_thread(llm, monkeypatch):
    """As vLLM's: a request waits outside the scheduler while its grammar compiles (on a thread of its own), and the
    requests already running go on meanwhile; one aborted meanwhile never runs; one whose compile fails ends with
    finish_reason "abort", and the engine goes on."""
    from concurrent.futures import Future

    from nanoflow.engine.structured_output import Grammars
    eng, held = llm.engine, []
    choice = SamplingParams(temperature=0, max_tokens=6, structured_outputs=Structured(choice=["yes"]))
    compiled = eng._compile(choice).result()

    def compile_later(self, p):  # (its future, finished by hand below)
        held.append(Future())
        return held[-1]
    monkeypatch.setattr(Grammars, "compile", compile_later)
    plain = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    eng.add_request("plain", PROMPT, plain)
    eng.add_request("held", PROMPT, choice)
    eng.add_request("dropped", PROMPT, choice)
    eng.add_request("broken", PROMPT, choice)
    done = {}
    while eng.requests.keys() & {"plain"}:
        done |= {o.request_id: o for o in eng.step() if o.finished}
    assert set(done) == {"plain"} and [r.request_id for _, r in eng.compiling] == ["held", "dropped", "broken"]
    assert not eng.scheduler.has_work  # (the waiting ones are outside it)
    eng.abort_request("dropped")
    assert held[1].cancelled() and [r.request_id for _, r in eng.compiling] == ["held", "broken"]
    eng.add_request("dropped", PROMPT, plain)  # (an id given again: the aborted request must not come back under it)
    held[0].set_result(compiled)
    held[2].set_exception(RuntimeError("xgrammar failed"))
    while eng.has_unfinished_requests():
        done |= {o.request_id: o for o in eng.step() if o.finished}
    assert done["held"].outputs[0].text == "yes" and done["broken"].outputs[0].finish_reason == "abort"
    assert done["dropped"].outputs[0].token_ids == done["plain"].outputs[0].token_ids and not eng.compiling


@pytest.mark.parametrize("async_", [False, True], ids=["sync", "async"])
def test_a_grammar_holds_only_what_follows_the_reasoning(tmp_path, tokenizer_dir, async_):
    """With a reasoning_parser the grammar starts after the reasoning's end tag (as vLLM's), which it never sees: a
    model pushed to write </think> first writes it, then the grammar's text. Without the parser the grammar holds from
    the first token (the tag is masked). A prompt whose reasoning already ended (Qwen3's empty <think></think>, with
    thinking off) is held from its first token. (The test tokenizer gets the tags as special tokens, as Qwen3's.)"""
    import shutil

    from tokenizers import Tokenizer as HFTokenizer

    from conftest import make_hf_model
    path = tmp_path / "m"
    make_hf_model(str(path), "llama", None, seed=1, vocab_size=49154)
    tk = HFTokenizer.from_file(f"{tokenizer_dir}/tokenizer.json")
    assert tk.add_special_tokens(["<think>", "</think>"]) == 2
    tk.save(str(path / "tokenizer.json"))
    shutil.copy(f"{tokenizer_dir}/tokenizer_config.json", path)
    think, end = tk.token_to_id("<think>"), tk.token_to_id("</think>")
    params = SamplingParams(temperature=0, max_tokens=8, logit_bias={end: 100.0}, skip_special_tokens=False,
                            structured_outputs=Structured(choice=["yes"]))
    thinking = LLM(str(path), reasoning_parser="deepseek_r1", async_scheduling=async_)
    out = thinking.generate([PROMPT], params, use_tqdm=False)[0].outputs[0]
    assert (out.token_ids[0], out.text, out.finish_reason) == (end, "</think>yes", "stop")
    out = LLM(str(path), async_scheduling=async_).generate([PROMPT], params, use_tqdm=False)[0].outputs[0]
    assert out.text == "yes" and end not in out.token_ids
    out = thinking.generate([PROMPT + [think, end]], params, use_tqdm=False)[0].outputs[0]
    assert out.text == "yes" and end not in out.token_ids
    # qwen3: the output reasons only if it opens with <think> (else it is all content, which the grammar then holds
    # from its first token: it held nothing before); pushed to open it, the grammar starts after </think>
    qwen3 = LLM(str(path), reasoning_parser="qwen3", async_scheduling=async_)
    out = qwen3.generate([PROMPT], params, use_tqdm=False)[0].outputs[0]
    assert out.text == "yes" and end not in out.token_ids
    # (</think> outweighs <think>, but the first token's mask allows only the grammar's and <think>)
    opened = dataclasses.replace(params, logit_bias={think: 100.0, end: 200.0})
    out = qwen3.generate([PROMPT], opened, use_tqdm=False)[0].outputs[0]
    assert (out.token_ids[:2], out.text, out.finish_reason) == ([think, end], "<think></think>yes", "stop")
    # qwen3 after a prompt that opened <think> (Qwen3.5's template): the output starts inside the reasoning, so the
    # grammar waits for its </think>, as deepseek_r1's (the first token's mask held it to <think> or the grammar's)
    out = qwen3.generate([PROMPT + [think]], params, use_tqdm=False)[0].outputs[0]
    assert (out.token_ids[0], out.text, out.finish_reason) == (end, "</think>yes", "stop")
    with pytest.raises(ValueError, match="reasoning_parser must be one of"):
        LLM(str(path), reasoning_parser="o1")
