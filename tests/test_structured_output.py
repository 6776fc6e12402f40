"""Structured outputs (xgrammar): every output follows its request's grammar, sampled or greedy, with asynchronous
scheduling too; a plain request beside them is as alone; bad grammars are refused by name."""
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
]


@pytest.fixture(scope="module", params=[False, True], ids=["sync", "async"])
def llm(request, llama_dir):
    """Asynchronous scheduling would build a mask before the last token reached the matcher (the engine reads the
    iteration back first)."""
    return LLM(llama_dir, async_scheduling=request.param)


@pytest.mark.parametrize("grammar, check", CASES, ids=["regex", "choice", "json", "grammar"])
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


@pytest.mark.parametrize("kw, message", [
    (dict(regex="[0-9"), "structured_outputs.regex: Regex parsing error"),
    (dict(json='{"type": "nope"}'), "structured_outputs.json: Unsupported type"),
    (dict(grammar="root ::= "), "structured_outputs.grammar: EBNF parser error"),
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
