"""Text output invariants with the real SmolLM2 tokenizer (and a small Llama-2-style byte-fallback one), over many
random cases: streamed text adds up to the full decode, stop strings cut where one first completes (streamed text
never runs past it), logprobs' tokens spell the text, and the chat template renders as transformers' does."""
import random

import pytest

from nanoflow import LLM
from nanoflow.engine.detokenizer import detokenize
from nanoflow.engine.sequence import Request
from nanoflow.sampling_params import SamplingParams
from nanoflow.tokenizer import Tokenizer

WORDS = ["Hello", " wörld", " ", "\n", "🎉", "東京", "123", "it's", "  x", "👨‍👩‍👧", "é", ".", "ab", "abc", " the"]
SPECIALS = ["<|im_start|>", "<|im_end|>", "<jupyter_text>"]


@pytest.fixture(scope="module")
def tok(tokenizer_dir):
    return Tokenizer.from_dir(tokenizer_dir)


@pytest.fixture(scope="module")
def llm(llama_dir):
    return LLM(llama_dir)


def random_text(rng: random.Random, k: int, specials: bool = False) -> str:
    return "".join(rng.choice(WORDS + SPECIALS * specials) for _ in range(k))


def test_streamed_text_is_the_full_decode(tok):
    """Random ids, many of them pieces of UTF-8 characters or special tokens: the deltas add up to the output text,
    which is the full decode of the same ids less an incomplete last character (held back, as vLLM's)."""
    partial = [i for i in range(tok.vocab_size) if len(tok.piece(i)) == 1 and tok.decode(i) == "\ufffd"]
    assert len(partial) > 100  # the bytes of multi-byte characters
    rng = random.Random(0)
    for _ in range(600):
        skip = rng.random() < 0.5
        prompt = tok.encode(random_text(rng, rng.randrange(1, 4)), add_special_tokens=False)
        pool = [lambda: rng.choice(partial), lambda: rng.randrange(17), lambda: rng.randrange(tok.vocab_size),
                lambda: rng.choice(tok.encode(rng.choice(WORDS), add_special_tokens=False))]
        output = [rng.choice(pool)() for _ in range(rng.randrange(1, 25))]
        seq = Request("r", None, prompt, SamplingParams(skip_special_tokens=skip)).seqs[0]
        deltas = []
        for t in output:
            seq.token_ids.append(t)
            deltas.append(detokenize(tok, seq))
        full = tok.decode(output, skip_special_tokens=skip)
        case = (prompt, output, skip)
        assert "".join(deltas) == seq.output_text, case
        assert full.startswith(seq.output_text) and set(full[len(seq.output_text):]) <= {"\ufffd"}, case


def feed(engine, prompt: list[int], output: list[int], params: SamplingParams):
    """The engine's bookkeeping of a sequence given these output tokens one per iteration: the text each
    iteration's output shows, and the last output."""
    req = Request("r", None, prompt, params)
    seq, shown = req.seqs[0], []
    for t in output:
        seq.token_ids.append(t)
        engine._check_stop(seq, t)
        out = engine._output(req).outputs[0]
        shown.append(out.text)
        if out.finish_reason:
            break
    return shown, out


def first_stop(text: str, stops: list[str], after: int):
    """(end, start, stop) of the stop string that completes first in text past its first `after` characters (of
    those that complete there, the longest)."""
    hits = [(i + len(s), i, s) for s in stops for i in range(len(text)) if text.startswith(s, i) and i + len(s) > after]
    return min(hits, default=None)


def random_stops(rng: random.Random, text: str) -> list[str]:
    def sub(i, n):
        return text[i: i + n] or "zz"
    i, n = rng.randrange(len(text)), rng.randrange(1, 7)
    shapes = [lambda: [sub(i, n)],                              # anywhere, across token boundaries
              lambda: [sub(0, n)],                              # in the first token
              lambda: [sub(i, n), sub(i + 1, n + 2)],           # overlapping
              lambda: [sub(i, n), sub(i, n + 3)],               # one a prefix of the other
              lambda: [sub(i, n + 3), sub(i + 1, max(n - 1, 1))],  # one inside the other
              lambda: [sub(i, n), "never there"]]
    return rng.choice(shapes)()


def test_stop_strings_cut_where_one_first_completes(tok, llm):
    rng = random.Random(1)
    for _ in range(400):
        skip = rng.random() < 0.7
        text = random_text(rng, rng.randrange(1, 12), specials=True)
        output = tok.encode(text, add_special_tokens=False)
        prompt = tok.encode(random_text(rng, 2), add_special_tokens=False)
        decoded = tok.decode(output, skip_special_tokens=skip)
        if not decoded:
            continue
        stops = random_stops(rng, decoded)
        include = rng.random() < 0.3
        min_tokens = rng.choice([0, 0, 0, rng.randrange(len(output))])
        params = SamplingParams(max_tokens=len(output), min_tokens=min_tokens, stop=stops, ignore_eos=True,
                                include_stop_str_in_output=include, skip_special_tokens=skip)
        shown, out = feed(llm.engine, prompt, output, params)
        after = len(tok.decode(output[:min_tokens], skip_special_tokens=skip).rstrip("\ufffd"))
        hit = first_stop(decoded, stops, after)
        case = (decoded, stops, include, min_tokens, output)
        if hit is None:
            assert (out.text, out.finish_reason, out.stop_reason) == (decoded, "length", None), case
        else:
            end, start, stop = hit
            assert (out.text, out.finish_reason, out.stop_reason) == (
                decoded[: end if include else start], "stop", stop), case
        assert all(a == out.text[: len(a)] for a in shown), case  # shown text never runs past the final text


@pytest.mark.parametrize("text, stops, min_tokens, want", [
    # a short stop string inside the first min_tokens tokens' text, seen only after them, does not stop
    ("é wörld", ["é wö", "never there"], 3, ("é wörld", "length", None)),
    # of two stops in one token's text, the one that completes first wins, however the text is cut into tokens
    (" hello", ["ell", " hello"], 0, (" h", "stop", "ell")),
])
def test_stop_string_cases(tok, llm, text, stops, min_tokens, want):
    output = tok.encode(text, add_special_tokens=False)
    params = SamplingParams(max_tokens=len(output), min_tokens=min_tokens, stop=stops)
    _, out = feed(llm.engine, tok.encode("Hi", add_special_tokens=False), output, params)
    assert (out.text, out.finish_reason, out.stop_reason) == want


def test_streamed_generation_with_stops_and_logprobs(tok, llm):
    """End to end: stop strings taken from what the model says stop it there; the stream only ever adds text; each
    sampled token's decoded string, as vLLM's, is that token's text."""
    rng = random.Random(2)
    prompts = [random_text(rng, 3) for _ in range(8)]
    greedy = dict(temperature=0, max_tokens=16, ignore_eos=True)
    refs = llm.generate(prompts, SamplingParams(**greedy, logprobs=0), use_tqdm=False)
    for prompt, ref in zip(prompts, refs):
        ref = ref.outputs[0]
        assert [p[t].decoded_token for t, p in zip(ref.token_ids, ref.logprobs)] == [
            tok.decode([t], skip_special_tokens=False) for t in ref.token_ids]
        assert ref.text == tok.decode(ref.token_ids, skip_special_tokens=True)
        stops = random_stops(rng, ref.text)
        include = rng.random() < 0.5
        shown = [o.outputs[0] for o in llm.stream(prompt, SamplingParams(**greedy, stop=stops,
                                                                          include_stop_str_in_output=include))]
        out = shown[-1]
        end, start, stop = first_stop(ref.text, stops, 0)
        assert (out.text, out.finish_reason, out.stop_reason) == (ref.text[: end if include else start], "stop", stop)
        assert all(a.text == b.text[: len(a.text)] for a, b in zip(shown, shown[1:]))


def test_chat_template_renders_as_transformers(tok, tokenizer_dir):
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
    rng = random.Random(3)
    pieces = WORDS + SPECIALS + ["{{ x }}", "{% if %}", "  ", "\t", "\n\n", "</s>", "'\"", "\\n"]
    for _ in range(150):
        roles = ["system"] * (rng.random() < 0.5) + [rng.choice(["user", "assistant"]) for _ in range(rng.randrange(
            1, 5))]
        msgs = [{"role": r, "content": "".join(rng.choice(pieces) for _ in range(rng.randrange(4)))} for r in roles]
        mode = rng.choice(["generate", "end", "continue"])
        if mode == "continue" and not msgs[-1]["content"].strip():
            mode = "end"
        kw = dict(add_generation_prompt=mode == "generate", continue_final_message=mode == "continue")
        assert tok.render_chat(msgs, **kw) == hf.apply_chat_template(msgs, tokenize=False, **kw), (msgs, kw)


@pytest.mark.parametrize("content", ["end", "<|im_end|>", "|>", " spaced  ", "a\n"])
def test_continue_final_message_ends_inside_it(tok, tokenizer_dir, content):
    """The text ends right after the final message's content, also where the template's text after the content
    holds it again (as the end of turn '<|im_end|>' holds 'end')."""
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
    msgs = [{"role": "user", "content": "Say it"}, {"role": "assistant", "content": content}]
    kw = dict(add_generation_prompt=False, continue_final_message=True)
    assert tok.render_chat(msgs, **kw) == hf.apply_chat_template(msgs, tokenize=False, **kw)
    # (a final message without content continues as an empty one, as a null content does)
    assert tok.render_chat(msgs[:1] + [{"role": "assistant"}], **kw).endswith("<|im_start|>assistant\n")


def test_template_tojson_takes_transformers_options(tok, tokenizer_dir):
    """Templates serialize tools and arguments with tojson's options (indent, separators, sort_keys,
    ensure_ascii); each changes the prompt."""
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
    template = ("{% set x = {'b': ['é', 1], 'a': none} %}{{ x | tojson }}|{{ x | tojson(indent=2) }}|"
                "{{ x | tojson(separators=(',', ':')) }}|{{ x | tojson(sort_keys=true) }}|"
                "{{ x | tojson(ensure_ascii=true) }}{{ messages[0]['content'] }}")
    msgs = [{"role": "user", "content": "<b>&"}]
    assert tok.render_chat(msgs, chat_template=template) == hf.apply_chat_template(
        msgs, chat_template=template, tokenize=False, add_generation_prompt=True)


def test_template_generation_blocks_render_their_body(tok, tokenizer_dir):
    """Training templates mark the assistant's text with {% generation %} (transformers' assistant mask); rendering
    keeps the body."""
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
    template = ("{% for m in messages %}{{ m['role'] }}: {% if m['role'] == 'assistant' %}{% generation %}"
                "{{ m['content'] }}.{% endgeneration %}{% else %}{{ m['content'] }}{% endif %}\n{% endfor %}")
    msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    assert tok.render_chat(msgs, chat_template=template) == hf.apply_chat_template(
        msgs, chat_template=template, tokenize=False, add_generation_prompt=True)


@pytest.fixture(scope="module")
def byte_fallback_tok():
    """A Llama-2-style tokenizer (sentencepiece BPE: '▁' for spaces, bytes of characters out of the vocabulary as
    <0x..> tokens), small."""
    from tokenizers import AddedToken, decoders, models, normalizers
    from tokenizers import Tokenizer as HFTokenizer
    vocab = {t: i for i, t in enumerate(["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + list(
        "▁abehlo") + ["▁h", "▁he", "▁hel", "▁hell", "▁hello", "▁a", "ab", "é", "東"])}
    merges = [("▁", "h"), ("▁h", "e"), ("▁he", "l"), ("▁hel", "l"), ("▁hell", "o"), ("▁", "a"), ("a", "b")]
    tk = HFTokenizer(models.BPE(vocab, merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tk.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tk.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                    decoders.Strip(" ", 1, 0)])
    tk.add_special_tokens([AddedToken(t, special=True) for t in ("<unk>", "<s>", "</s>")])
    return Tokenizer(tk, None, "<s>", "</s>", {2})


def test_byte_fallback_text_streams_whole(byte_fallback_tok):
    """Random texts cut into prompt and output at random: the streamed output is the whole text's decode past the
    prompt's. (The prompt's last tokens may be the bytes of an emoji: a window starting among them decodes to
    U+FFFD all along its run of bytes.)"""
    tok = byte_fallback_tok
    words = ["hello", " hello", " ab", "東京", " 🎉", "é", "\n", " a", "  ", "🎉", "x", " "]
    rng = random.Random(4)
    for _ in range(300):
        skip = rng.random() < 0.5
        ids = tok.encode("".join(rng.choice(words) for _ in range(rng.randrange(2, 10))))
        whole = tok.decode(ids, skip_special_tokens=skip)
        cuts = [k for k in range(1, len(ids)) if whole.startswith(p := tok.decode(ids[:k], skip_special_tokens=skip))
                and not p.endswith("\ufffd")]  # (the prompt ends on a whole character)
        if not cuts:
            continue
        k = rng.choice(cuts)
        seq = Request("r", None, ids[:k], SamplingParams(skip_special_tokens=skip)).seqs[0]
        for t in ids[k:]:
            seq.token_ids.append(t)
            detokenize(tok, seq)
        assert seq.output_text == whole[len(tok.decode(ids[:k], skip_special_tokens=skip)):], (ids, k, skip)
