"""Tokenizer loading, incremental detokenization and chat templates."""
import random

import pytest

from nanoflow.engine.detokenizer import detokenize
from nanoflow.engine.sequence import Request
from nanoflow.sampling_params import SamplingParams
from nanoflow.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tok(tokenizer_dir):
    return Tokenizer.from_dir(tokenizer_dir)


@pytest.mark.parametrize("seed", range(5))
def test_incremental_detokenization_equals_full_decode(tok, seed):
    rng = random.Random(seed)
    text = "".join(rng.choice(["Hello", " wörld", " ", "\n", "🎉", "東京", "123", "it's", "  x"]) for _ in range(30))
    ids = tok.encode(text, add_special_tokens=False)
    # split where the prompt ends on a whole character (else neither side decodes alone)
    k = next(k for k in range(5, len(ids)) if tok.decode(ids[:k]) + tok.decode(ids[k:]) == tok.decode(ids))
    prompt, output = ids[:k], ids[k:]
    seq = Request("r", None, prompt, SamplingParams()).seqs[0]
    pieces = []
    for t in output:
        seq.token_ids.append(t)
        pieces.append(detokenize(tok, seq))
    assert "".join(pieces) == seq.output_text == tok.decode(output)
    assert all("\ufffd" not in p for p in pieces)


def test_chat_template_matches_transformers(tok, tokenizer_dir):
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"},
            {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "2+2?"}]
    for gen in (True, False):
        assert tok.render_chat(msgs, gen) == hf.apply_chat_template(msgs, add_generation_prompt=gen, tokenize=False)


def test_the_hf_tokenizer_calls_scripts_make(tok, tokenizer_dir):
    """vLLM's get_tokenizer() is an HF tokenizer, and scripts call its methods: ours answer as HF's do, with HF's
    defaults (apply_chat_template tokenizes and adds no generation prompt; decode keeps special tokens)."""
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
    msgs = [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello."}]
    def plain(x):  # (HF's BatchEncoding as a dict)
        return x if isinstance(x, (str, list)) else dict(x)
    for kw in ({}, {"tokenize": False, "add_generation_prompt": True}, {"tokenize": False},
               {"add_generation_prompt": True, "return_dict": False},
               {"continue_final_message": True, "tokenize": False}):
        assert tok.apply_chat_template(msgs, **kw) == plain(hf.apply_chat_template(msgs, **kw)), kw
    for kw in ({}, {"tokenize": False}, {"return_dict": False}):
        assert tok.apply_chat_template([msgs, msgs[:1]], **kw) == plain(hf.apply_chat_template([msgs, msgs[:1]], **kw))
    ids = hf.apply_chat_template(msgs, return_dict=False)
    text = "Hello, wörld! <|im_end|>"
    assert tok.decode(ids) == hf.decode(ids) and tok.batch_decode([ids, ids[:3]]) == hf.batch_decode([ids, ids[:3]])
    assert tok.decode(ids, skip_special_tokens=True) == hf.decode(ids, skip_special_tokens=True)
    assert tok.decode(ids[0]) == hf.decode(ids[0])
    spaced = tok.encode("Hi , you 're here !", add_special_tokens=False)
    for clean in (True, False):
        assert tok.decode(spaced, clean_up_tokenization_spaces=clean) == hf.decode(
            spaced, clean_up_tokenization_spaces=clean)
    assert tok(text) == dict(hf(text)) and tok([text, "x"]) == dict(hf([text, "x"]))
    assert tok(text).input_ids == hf(text).input_ids  # (by attribute too, as HF's BatchEncoding)
    assert tok(text, add_special_tokens=False) == dict(hf(text, add_special_tokens=False))
    assert tok.tokenize(text) == hf.tokenize(text)
    assert tok.convert_ids_to_tokens(ids) == hf.convert_ids_to_tokens(ids)
    assert tok.convert_ids_to_tokens(ids[0]) == hf.convert_ids_to_tokens(ids[0])
    pieces = hf.convert_ids_to_tokens(ids)
    assert tok.convert_tokens_to_ids(pieces) == hf.convert_tokens_to_ids(pieces) == ids
    assert tok.convert_tokens_to_ids(pieces[0]) == hf.convert_tokens_to_ids(pieces[0])
    assert len(tok) == len(hf) and tok.get_vocab() == hf.get_vocab()
    assert (tok.bos_token_id, tok.eos_token_id) == (hf.bos_token_id, hf.eos_token_id)
    # the special tokens' names and ids; tensors to decode, tensors back, truncation (each was an AttributeError or
    # a TypeError)
    import numpy as np
    import torch
    for name in ("special_tokens_map", "all_special_tokens", "all_special_ids", "pad_token", "pad_token_id",
                 "unk_token", "unk_token_id"):
        assert getattr(tok, name) == getattr(hf, name), name
    assert tok.decode(torch.tensor(ids)) == hf.decode(torch.tensor(ids)) == tok.decode(np.array(ids))
    assert tok.decode(torch.tensor(ids[0])) == hf.decode(torch.tensor(ids[0]))
    assert tok.batch_decode(torch.tensor([ids, ids])) == hf.batch_decode(torch.tensor([ids, ids]))
    for kw in ({"truncation": True, "max_length": 2}, {"max_length": 3}, {"truncation": False, "max_length": 2}):
        assert tok.encode(text, **kw) == hf.encode(text, **kw), kw
        assert tok(text, **kw) == dict(hf(text, **kw)), kw
    for kind, same in (("pt", torch.equal), ("np", np.array_equal)):
        ours, theirs = tok([text, text], return_tensors=kind), hf([text, text], return_tensors=kind)
        assert set(ours) == set(theirs) and all(same(ours[k], theirs[k]) for k in ours), kind
    with pytest.raises(ValueError, match="differ in length, and nanoflow's tokenizer does not pad"):
        tok([text, "x"], return_tensors="pt")
    for option in (dict(return_tensors="pt"), dict(padding=True)):
        with pytest.raises(ValueError, match=f"{next(iter(option))} is not supported"):
            tok.apply_chat_template(msgs, **option)


def test_chat_template_errors(tok):
    with pytest.raises(ValueError, match="empty"):
        tok.render_chat([])
    with pytest.raises(ValueError, match="role"):
        tok.render_chat([{"content": "x"}])
    with pytest.raises(ValueError, match="chat template error: nope"):
        tok.render_chat([{"role": "user", "content": "x"}], chat_template="{{ raise_exception('nope') }}")
    with pytest.raises(ValueError, match="chat template error: .*content"):  # (was jinja2's UndefinedError)
        tok.render_chat([{"role": "user"}], chat_template="{{ messages[0]['content'].strip() }}")


@pytest.mark.parametrize("model, error, message", [
    (None, FileNotFoundError, "the GGUF file has no tokenizer"),
    ("gpt2", ValueError, "tokenizer lacks tokenizer.ggml.merges; pass an HF tokenizer directory")])
def test_a_gguf_without_tokenizer_metadata_says_what_it_lacks(tmp_path, model, error, message):
    """(The engine then serves token ids only where the file has no tokenizer at all, as an HF directory without
    tokenizer.json.)"""
    gguf = pytest.importorskip("gguf")
    import numpy as np
    from nanoflow.models.gguf_file import open_gguf
    w = gguf.GGUFWriter(str(tmp_path / "t.gguf"), "llama")
    if model is not None:
        w.add_tokenizer_model(model)
        w.add_token_list(["a", "b"])
        w.add_token_types([1, 1])
    w.add_tensor("token_embd.weight", np.zeros((2, 4), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(error, match=message):
        Tokenizer.from_gguf(open_gguf(str(tmp_path / "t.gguf")))


def test_a_gguf_without_a_tokenizer_takes_its_vocabulary_from_the_embedding(tmp_path):
    """(len() of the missing token list raised a TypeError; such a file serves token ids.)"""
    gguf = pytest.importorskip("gguf")
    import numpy as np
    from nanoflow.models.gguf_file import config_from_gguf, open_gguf
    w = gguf.GGUFWriter(str(tmp_path / "m.gguf"), "llama")
    for add, v in ((w.add_block_count, 1), (w.add_embedding_length, 8), (w.add_head_count, 2),
                   (w.add_feed_forward_length, 16), (w.add_context_length, 64)):
        add(v)
    w.add_tensor("token_embd.weight", np.zeros((37, 8), np.float32))  # 37 tokens of 8
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    assert config_from_gguf(open_gguf(str(tmp_path / "m.gguf"))).vocab_size == 37


def test_template_files_and_named_templates_as_transformers_picks_them(tokenizer_dir, tmp_path):
    """chat_template.jinja wins over tokenizer_config.json's template, and additional_chat_templates/NAME.jinja
    adds named ones; a list of named templates gives 'tool_use' when tools are passed, else 'default' (as HF's);
    without a 'default' the error says so; chat_template=NAME picks one; save() writes them back as a list."""
    import json
    import shutil
    transformers = pytest.importorskip("transformers")
    msgs = [{"role": "user", "content": "hi"}]
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    body = "{% for m in messages %}{{ m.content }}{% endfor %}"

    def variant(name, template=None, jinja=None, extra=None):
        d = tmp_path / name
        shutil.copytree(tokenizer_dir, d)
        cfg = json.loads((d / "tokenizer_config.json").read_text())
        cfg["chat_template"] = template
        (d / "tokenizer_config.json").write_text(json.dumps(cfg))
        if jinja is not None:
            (d / "chat_template.jinja").write_text(jinja)
        for n, t in (extra or {}).items():
            (d / "additional_chat_templates").mkdir(exist_ok=True)
            (d / "additional_chat_templates" / f"{n}.jinja").write_text(t)
        return str(d)

    named = [{"name": "default", "template": "DEFAULT:" + body},
             {"name": "tool_use", "template": "TOOLS={{ tools | map(attribute='function.name') | join(',') }}:" + body}]
    for d in (variant("file", "OLD:" + body, jinja="NEW:" + body), variant("named", named),
              variant("v5", None, jinja="DEFAULT:" + body, extra={"tool_use": named[1]["template"]})):
        hf = transformers.AutoTokenizer.from_pretrained(d)
        ours = Tokenizer.from_dir(d)
        for kw in ({}, {"tools": tools}):
            assert ours.render_chat(msgs, **kw) == hf.apply_chat_template(
                msgs, tokenize=False, add_generation_prompt=True, **kw), (d, kw)
    ours = Tokenizer.from_dir(variant("named2", named))
    assert ours.render_chat(msgs, chat_template="tool_use", tools=tools).startswith("TOOLS=get_weather:")
    ours.save(str(tmp_path / "saved"))
    assert Tokenizer.from_dir(str(tmp_path / "saved")).chat_template == ours.chat_template
    with pytest.raises(ValueError, match=r"named chat templates \(a, b\) and none is 'default'"):
        Tokenizer.from_dir(variant("nodefault", [{"name": "a", "template": body}, {"name": "b", "template": body}])
                           ).render_chat(msgs)


def test_a_gguf_llama3_vocabulary_takes_whole_words_over_merges(tmp_path):
    """Llama-3's byte-level BPE (GGUF pre-tokenizer llama-bpe) ignores merges for a word that is a vocabulary entry,
    as its tokenizer.json says and llama.cpp does: "abc" is one token here though no merge builds it."""
    gguf = pytest.importorskip("gguf")
    import numpy as np
    from nanoflow.models.gguf_file import open_gguf
    tokens = ["a", "b", "c", "Ġ", "Ġa", "bc", "Ġabc"]
    for pre, expect in (("llama-bpe", [6]), ("gpt2", [4, 5])):
        w = gguf.GGUFWriter(str(tmp_path / f"{pre}.gguf"), "llama")
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre(pre)
        w.add_token_list(tokens)
        w.add_token_types([1] * len(tokens))
        w.add_token_merges(["Ġ a", "b c"])
        w.add_tensor("token_embd.weight", np.zeros((len(tokens), 4), np.float32))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        tk = Tokenizer.from_gguf(open_gguf(str(tmp_path / f"{pre}.gguf")))
        assert tk.encode(" abc", add_special_tokens=False) == expect, pre


def _tokenizer_variant(tokenizer_dir, d, config=None, files=None, drop=()):
    """A copy of the tokenizer's directory with config keys set (None: dropped) and files written or removed."""
    import json
    import shutil
    shutil.copytree(tokenizer_dir, d)
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    cfg = {k: v for k, v in (cfg | (config or {})).items() if v is not None}
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    for name, body in (files or {}).items():
        (d / name).write_text(body if isinstance(body, str) else json.dumps(body))
    for name in drop:
        (d / name).unlink()
    return str(d)


def test_special_tokens_of_the_older_layout_and_every_named_one_in_the_template(tokenizer_dir, tmp_path):
    """special_tokens_map.json names the special tokens where tokenizer_config.json has no added_tokens_decoder
    (its names win there, as HF's); the template sees every named special token (pad_token, unk_token, ...), as
    HF's: the prompt kept its BOS and end of turn, and the EOS its stop (it was None)."""
    transformers = pytest.importorskip("transformers")
    template = ("{{ bos_token }}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}{{ eos_token }}"
                "\n{% endfor %}[{{ pad_token }}|{{ unk_token }}|{{ sep_token is defined }}]")
    old = _tokenizer_variant(tokenizer_dir, tmp_path / "old", {"bos_token": None, "eos_token": None,
                                                                 "chat_template": template},
                             {"special_tokens_map.json": {"bos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
                                                          "eos_token": {"content": "<|im_end|>"},
                                                          "pad_token": "<|im_start|>"}})
    new = _tokenizer_variant(tokenizer_dir, tmp_path / "new", {"chat_template": template, "pad_token": "<|im_end|>",
                                                                 "added_tokens_decoder": {}},
                             {"special_tokens_map.json": {"pad_token": "<|im_start|>", "eos_token": "<|im_start|>"}})
    msgs = [{"role": "user", "content": "Hi"}]
    for d in (old, new):
        hf, ours = transformers.AutoTokenizer.from_pretrained(d), Tokenizer.from_dir(d)
        assert ours.render_chat(msgs, False) == hf.apply_chat_template(msgs, tokenize=False), d
        assert (ours.bos_token, ours.eos_token, ours.eos_token_id) == (hf.bos_token, hf.eos_token, hf.eos_token_id)
    assert Tokenizer.from_dir(old).eos_token_ids == {Tokenizer.from_dir(old).tk.token_to_id("<|im_end|>")}


def test_content_parts_for_a_template_that_loops_over_them(tok):
    """chat_template_content_format: "auto" gives a template that loops over a message's content OpenAI's list of
    text parts (a string content as its one part), as vLLM's detection (it rendered an empty message: the loop went
    over a string's characters); other templates get the string (parts joined by newlines); "openai" and "string"
    force either; continue_final_message ends inside the last part."""
    loops = "{% for m in messages %}{{ m.role }}:{% for p in m['content'] %}<{{ p.text }}>{% endfor %};{% endfor %}"
    loops_attr = "{% for m in messages %}{% for p in m.content %}<{{ p['text'] }}>{% endfor %}{% endfor %}"
    plain = "{% for m in messages %}{{ m.role }}:{{ m.content }};{% endfor %}"
    msgs = [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "Hello"}, {"type": "text", "text": "there"}]},
            {"role": "assistant", "content": None}]
    assert tok.render_chat(msgs, False, loops) == "system:<Be brief.>;user:<Hello><there>;assistant:;"
    assert tok.render_chat(msgs, False, loops_attr) == "<Be brief.><Hello><there>"
    assert tok.render_chat(msgs, False, plain) == "system:Be brief.;user:Hello\nthere;assistant:;"
    assert tok.render_chat(msgs, False, plain, content_format="openai").startswith(
        "system:[{'type': 'text', 'text': 'Be brief.'}];")
    assert tok.render_chat(msgs, False, loops, content_format="string") == (  # (a loop over characters)
        f"system:{'<>' * 9};user:{'<>' * 11};assistant:;")
    continued = tok.render_chat(msgs[:2], False, loops, continue_final_message=True)
    assert continued == "system:<Be brief.>;user:<Hello><there"
    with pytest.raises(ValueError, match="chat_template_content_format='list': expected one of 'auto', 'string', "):
        tok.render_chat(msgs, False, plain, content_format="list")
    # a loop over a name set to the content is one too; an empty string is one empty part (vLLM's), so that a
    # template reading its first part renders (it was no part: an error)
    aliased = "{% for m in messages %}{% set c = m['content'] %}{% for p in c %}<{{ p.text }}>{% endfor %}{% endfor %}"
    assert tok.render_chat(msgs[:2], False, aliased) == "<Be brief.><Hello><there>"
    first = "{% for m in messages %}{% if m.content is string %}{{ m.content }}{% else %}[{{ m.content[0].text }}]" \
            "{% for p in m.content %}{% endfor %}{% endif %}{% endfor %}"
    assert tok.render_chat([{"role": "system", "content": ""}, msgs[1]], False, first) == "[][Hello]"


def test_a_slow_tokenizer_is_converted_as_transformers_does(tokenizer_dir, tmp_path, monkeypatch):
    """A directory with vocab.json + merges.txt and no tokenizer.json (an older layout vLLM serves through
    AutoTokenizer): transformers converts it, and it encodes as HF's does (it was taken for no tokenizer at all);
    without transformers the error says what the files are and what to do."""
    import json
    import sys
    transformers = pytest.importorskip("transformers")
    model = json.loads(open(f"{tokenizer_dir}/tokenizer.json").read())["model"]
    merges = "\n".join(m if isinstance(m, str) else " ".join(m) for m in model["merges"])
    d = _tokenizer_variant(tokenizer_dir, tmp_path / "slow", {"tokenizer_class": "GPT2Tokenizer"},
                           {"vocab.json": model["vocab"], "merges.txt": "#version: 0.2\n" + merges},
                           drop=["tokenizer.json"])
    hf, ours = transformers.AutoTokenizer.from_pretrained(d), Tokenizer.from_dir(d)
    for text in ("Hello world", "it's 2024, wörld!\n  x"):
        assert ours.encode(text) == hf(text)["input_ids"] and ours.decode(ours.encode(text)) == hf.decode(
            hf(text)["input_ids"])
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(ValueError, match=r"no tokenizer.json, only a slow tokenizer's files "
                                         r"\(vocab.json, merges.txt\): install transformers"):
        Tokenizer.from_dir(d)
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        Tokenizer.from_dir(str(tmp_path))
