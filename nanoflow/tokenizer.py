"""Tokenizer: HF `tokenizers` for encode/decode, jinja2 for the chat template.

Loaded from an HF directory (tokenizer.json + tokenizer_config.json) or rebuilt from a GGUF
file's byte-level BPE vocabulary.
"""
from __future__ import annotations

import functools
import json
import os
from datetime import datetime
from pathlib import Path

import jinja2
import jinja2.ext
import jinja2.sandbox
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors
from tokenizers import Tokenizer as HFTokenizer

from nanoflow.config import read_json

# Control tokens that end a turn even where a file does not list them as EOS (llama.cpp does the same).
END_OF_GENERATION = {"<|endoftext|>", "<|im_end|>", "<|eot_id|>", "<|end_of_text|>", "<|eom_id|>", "</s>",
                     "<|end|>"}

# GGUF pre-tokenizer names -> the split regex of their byte-level BPE (as in llama.cpp's vocab code).
_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def _pre_tokenizer(pre: str):
    if pre in ("smollm", "starcoder", "refact"):
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                        pre_tokenizers.Split(Regex(_GPT2_SPLIT), "isolated"),
                                        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    splits = {"gpt2": _GPT2_SPLIT, "default": _GPT2_SPLIT, "llama-bpe": _LLAMA3_SPLIT, "llama3": _LLAMA3_SPLIT,
              "qwen2": _QWEN2_SPLIT}
    if pre not in splits:
        raise ValueError(f"unsupported GGUF pre-tokenizer {pre!r}; pass an HF tokenizer directory instead")
    return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(splits[pre]), "isolated"),
                                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


def _token_text(tok) -> str | None:
    if isinstance(tok, dict):
        return tok.get("content")
    return tok


class Encoding(dict):
    """A call's result, read as a dict or by attribute (enc.input_ids), as HF's BatchEncoding."""

    def __getattr__(self, name: str):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


# The special tokens HF names (its special_tokens_map), each a template variable of the same name
SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


class Tokenizer:
    def __init__(self, tk: HFTokenizer, chat_template: str | dict[str, str] | None, bos_token: str | None,
                 eos_token: str | None, eos_token_ids: set[int], special_tokens: dict | None = None):
        """chat_template: the template's text, or named templates ({name: text}, as HF's lists of them);
        special_tokens: the other named ones (SPECIAL_TOKENS, additional_special_tokens), for the template."""
        self.tk = tk
        self.chat_template = chat_template
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.special_tokens = (special_tokens or {}) | {"bos_token": bos_token, "eos_token": eos_token}
        self.eos_token_ids = eos_token_ids  # every end-of-generation token it names (GGUF: llama.cpp's EOG set)
        self.vocab_size = tk.get_vocab_size(with_added_tokens=True)

    # -- loading ---------------------------------------------------------------------------------
    @classmethod
    def from_dir(cls, path: str) -> "Tokenizer":
        file = os.path.join(path, "tokenizer.json")
        if os.path.exists(file):
            try:
                tk = HFTokenizer.from_file(file)
            except Exception as e:  # (the tokenizers library raises a bare Exception for a file it cannot parse)
                raise ValueError(f"malformed tokenizer {file}: {e}") from None
        elif slow := [n for n in _SLOW_FILES if os.path.exists(os.path.join(path, n))]:
            tk = _converted(path, slow)
        else:
            raise FileNotFoundError(f"no tokenizer.json in {path}")
        cfg = read_json(os.path.join(path, "tokenizer_config.json"))
        if "added_tokens_decoder" not in cfg:  # the older layout: special_tokens_map.json's names win (as HF's)
            cfg |= read_json(os.path.join(path, "special_tokens_map.json"))
        template = cfg.get("chat_template")
        if isinstance(template, list):  # named templates ({"name", "template"} each)
            template = {t["name"]: t["template"] for t in template}
        # files of their own win over tokenizer_config.json's, as HF's: chat_template.jinja (the default) and
        # transformers v5's additional_chat_templates/NAME.jinja (beside the config's template, where HF's drops it)
        jinja_file, named_dir = (os.path.join(path, n) for n in ("chat_template.jinja", "additional_chat_templates"))
        if os.path.exists(jinja_file):
            template = Path(jinja_file).read_text()
        if os.path.isdir(named_dir):
            template = ({"default": template} if isinstance(template, str) else template or {}) | {
                f.stem: f.read_text() for f in Path(named_dir).glob("*.jinja")}
        special = {k: _token_text(cfg.get(k)) for k in SPECIAL_TOKENS}
        special["additional_special_tokens"] = [_token_text(t) for t in cfg.get("additional_special_tokens") or []]
        bos, eos = special["bos_token"], special["eos_token"]
        return cls(tk, template, bos, eos, cls._end_ids(tk, eos), special)

    @classmethod
    def from_gguf(cls, reader) -> "Tokenizer":
        from nanoflow.models.gguf_file import field
        kind = field(reader, "tokenizer.ggml.model")
        if kind is None:
            raise FileNotFoundError("the GGUF file has no tokenizer (no tokenizer.ggml.model)")
        if kind != "gpt2":
            raise ValueError(f"unsupported GGUF tokenizer model {kind!r} (byte-level BPE 'gpt2' is supported); "
                             "pass an HF tokenizer directory instead")
        keys = ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.merges")
        tokens, types, merges = (field(reader, k) for k in keys)
        if missing := [k for k, v in zip(keys, (tokens, types, merges)) if v is None]:
            raise ValueError(f"the GGUF file's tokenizer lacks {', '.join(missing)}; pass an HF tokenizer directory "
                             f"instead (tokenizer=PATH; on the command line, --tokenizer PATH)")
        merges = [tuple(m.split(" ", 1)) for m in merges]
        vocab = {t: i for i, t in enumerate(tokens)}
        pre = field(reader, "tokenizer.ggml.pre") or "default"
        # Llama-3's BPE takes a word that is a whole vocabulary entry as that token, whatever its merges would give
        # (its tokenizer.json's ignore_merges; llama.cpp's too for these pre-tokenizers)
        tk = HFTokenizer(models.BPE(vocab, merges, fuse_unk=False, byte_fallback=False,
                                    ignore_merges=pre in ("llama-bpe", "llama3")))
        tk.pre_tokenizer = _pre_tokenizer(pre)
        tk.decoder = decoders.ByteLevel()
        # token types: 3 = control (special), 4 = user defined
        tk.add_tokens([AddedToken(t, special=False, normalized=False) for t, k in zip(tokens, types) if k == 4])
        tk.add_special_tokens([AddedToken(t, special=True, normalized=False) for t, k in zip(tokens, types) if k == 3])
        bos_id, eos_id = field(reader, "tokenizer.ggml.bos_token_id"), field(reader, "tokenizer.ggml.eos_token_id")
        bos = tokens[bos_id] if bos_id is not None else None
        eos = tokens[eos_id] if eos_id is not None else None
        if field(reader, "tokenizer.ggml.add_bos_token") and bos is not None:
            tk.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A $B",
                                                              special_tokens=[(bos, bos_id)])
        eos_ids = cls._end_ids(tk, eos) | {i for i, (t, k) in enumerate(zip(tokens, types))
                                           if k == 3 and t in END_OF_GENERATION}
        template = field(reader, "tokenizer.chat_template")
        if names := field(reader, "tokenizer.chat_templates"):  # named ones, as gguf-py writes them
            template = ({"default": template} if template else {}) | {
                n: field(reader, f"tokenizer.chat_template.{n}") for n in names}
        return cls(tk, template, bos, eos, eos_ids)

    @staticmethod
    def _end_ids(tk: HFTokenizer, eos: str | None) -> set[int]:
        ids = {tk.token_to_id(eos)} if eos is not None else set()
        return {i for i in ids if i is not None}

    def save(self, path: str) -> None:
        """Write tokenizer.json and tokenizer_config.json (an HF directory's tokenizer files)."""
        os.makedirs(path, exist_ok=True)
        self.tk.save(os.path.join(path, "tokenizer.json"))
        with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
            template = self.chat_template
            if isinstance(template, dict):
                template = [{"name": n, "template": t} for n, t in template.items()]
            json.dump(self.special_tokens_map | {
                "bos_token": self.bos_token, "eos_token": self.eos_token, "chat_template": template,
                "tokenizer_class": "PreTrainedTokenizerFast"}, f, indent=1)

    # -- use -------------------------------------------------------------------------------------
    def encode(self, text: str, add_special_tokens: bool = True, truncation: bool | None = None,
               max_length: int | None = None) -> list[int]:
        """max_length: the first max_length ids, unless truncation is False (HF's)."""
        try:
            ids = self.tk.encode(text, add_special_tokens=add_special_tokens).ids
            return ids[:max_length] if max_length is not None and truncation is not False else ids
        except TypeError:  # ("TextInputSequence must be str": a str with a lone surrogate, which JSON's escapes allow)
            at = next((i for i, ch in enumerate(text) if 0xD800 <= ord(ch) <= 0xDFFF), None) \
                if isinstance(text, str) else None
            if at is None:
                raise
            raise ValueError(f"the text is not valid Unicode: a lone surrogate U+{ord(text[at]):04X} at character "
                             f"{at}") from None

    def decode(self, ids: int | list[int], skip_special_tokens: bool = False,
               clean_up_tokenization_spaces: bool | None = None) -> str:
        """ids: a list, a token id, or a tensor or array of them. (clean_up_tokenization_spaces: taken and, as
        transformers 5 does for BPE vocabularies, ignored)"""
        ids = ids.tolist() if hasattr(ids, "tolist") else ids  # (torch's and numpy's)
        return self.tk.decode([ids] if isinstance(ids, int) else ids, skip_special_tokens=skip_special_tokens)

    # (what scripts call on vLLM's get_tokenizer(), an HF tokenizer: the same names, defaults and results)
    def __call__(self, text: str | list[str], add_special_tokens: bool = True, truncation: bool | None = None,
                 max_length: int | None = None, return_tensors: str | None = None) -> Encoding:
        """return_tensors: "pt" (torch) or "np" (numpy) tensors of one row a text (of equal lengths: no padding)."""
        texts = text if isinstance(text, list) else [text]
        ids = [self.encode(t, add_special_tokens, truncation, max_length) for t in texts]
        out = dict(input_ids=ids, attention_mask=[[1] * len(i) for i in ids])
        if return_tensors is None:
            return Encoding({k: v if isinstance(text, list) else v[0] for k, v in out.items()})
        if return_tensors not in ("pt", "np"):
            raise ValueError(f"return_tensors={return_tensors!r}: 'pt' or 'np' (or None: lists)")
        if len({len(i) for i in ids}) > 1:
            raise ValueError("return_tensors: the texts' ids differ in length, and nanoflow's tokenizer does not pad")
        import numpy as np
        import torch
        return Encoding({k: torch.tensor(v) if return_tensors == "pt" else np.array(v) for k, v in out.items()})

    def __len__(self) -> int:
        return self.vocab_size

    def batch_decode(self, sequences: list[list[int]], skip_special_tokens: bool = False) -> list[str]:
        sequences = sequences.tolist() if hasattr(sequences, "tolist") else sequences
        return self.tk.decode_batch(sequences, skip_special_tokens=skip_special_tokens)

    def tokenize(self, text: str) -> list[str]:
        return [self.piece(i) for i in self.encode(text, add_special_tokens=False)]

    def convert_ids_to_tokens(self, ids: int | list[int]) -> str | list[str]:
        return self.piece(ids) if isinstance(ids, int) else [self.piece(i) for i in ids]

    def convert_tokens_to_ids(self, tokens: str | list[str]) -> int | None | list[int | None]:
        return self.tk.token_to_id(tokens) if isinstance(tokens, str) else [self.tk.token_to_id(t) for t in tokens]

    def get_vocab(self) -> dict[str, int]:
        return self.tk.get_vocab(with_added_tokens=True)

    @property
    def special_tokens_map(self) -> dict:
        """The named special tokens (bos_token, eos_token, pad_token, ... and additional_special_tokens), as HF's."""
        return {k: v for k, v in self.special_tokens.items() if v}

    @property
    def all_special_tokens(self) -> list[str]:
        named = [v for k, v in self.special_tokens_map.items() if k != "additional_special_tokens"]
        return list(dict.fromkeys(named + self.special_tokens_map.get("additional_special_tokens", [])))

    @property
    def all_special_ids(self) -> list[int]:
        return [self.tk.token_to_id(t) for t in self.all_special_tokens]

    def _id(self, token: str | None) -> int | None:
        return self.tk.token_to_id(token) if token is not None else None

    # HF's names of the special tokens and their ids (eos_token_id: the one EOS; eos_token_ids: every end token)
    pad_token = property(lambda self: self.special_tokens.get("pad_token"))
    unk_token = property(lambda self: self.special_tokens.get("unk_token"))
    bos_token_id = property(lambda self: self._id(self.bos_token))
    eos_token_id = property(lambda self: self._id(self.eos_token))
    pad_token_id = property(lambda self: self._id(self.pad_token))
    unk_token_id = property(lambda self: self._id(self.unk_token))

    def piece(self, token_id: int) -> str:
        """The vocabulary's own string for a token (e.g. 'Ġthe' in byte-level BPE), as HF's convert_ids_to_tokens."""
        return self.tk.id_to_token(token_id)

    def apply_chat_template(self, conversation: list[dict] | list[list[dict]], tools: list[dict] | None = None, *,
                            chat_template: str | None = None, add_generation_prompt: bool = False,
                            continue_final_message: bool = False, tokenize: bool = True, return_dict: bool = True,
                            **template_kwargs):
        """As HF's (transformers 5; what vLLM's get_tokenizer() has): the rendered text (tokenize=False), else its
        ids (the template writes the special tokens) as {'input_ids', 'attention_mask'}, or a list of them with
        return_dict=False; a list of conversations gives a list. template_kwargs: the template's own variables.
        See render_chat."""
        if given := [k for k in _HF_ONLY if template_kwargs.get(k)]:
            raise ValueError(f"apply_chat_template: {given[0]} is not supported (lists of ids only)")
        if conversation and isinstance(conversation[0], list):
            outs = [self.apply_chat_template(c, tools, chat_template=chat_template, tokenize=tokenize,
                                             add_generation_prompt=add_generation_prompt, return_dict=return_dict,
                                             continue_final_message=continue_final_message, **template_kwargs)
                    for c in conversation]
            return {k: [o[k] for o in outs] for k in outs[0]} if tokenize and return_dict else outs
        text = self.render_chat(conversation, add_generation_prompt, chat_template, continue_final_message,
                                template_kwargs, tools)
        if not tokenize:
            return text
        ids = self.encode(text, add_special_tokens=False)
        return {"input_ids": ids, "attention_mask": [1] * len(ids)} if return_dict else ids

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True,
                    chat_template: str | None = None, continue_final_message: bool = False,
                    template_kwargs: dict | None = None, tools: list[dict] | None = None,
                    content_format: str = "auto") -> str:
        """The conversation as the template renders it. content_format (vLLM's chat_template_content_format): each
        message's content as a string, OpenAI's text parts joined by newlines ("string"), or as a list of text parts
        ("openai", a string its one part); "auto" takes "openai" for a template that loops over a message's content
        (as vLLM's detection), else "string". A null content is empty. continue_final_message: the text ends inside
        the last message (no end of turn), for the model to go on with it (as HF's and vLLM's). template_kwargs: the
        template's own variables, which may also set the two options (vLLM's chat_template_kwargs); tools: OpenAI's
        tool objects, the template's `tools` (as HF's)."""
        if content_format not in CONTENT_FORMATS:
            raise ValueError(f"chat_template_content_format={content_format!r}: expected one of "
                             f"{', '.join(map(repr, CONTENT_FORMATS))}")
        kwargs = ({"tools": tools} if tools else {}) | dict(template_kwargs or {})
        add_generation_prompt = kwargs.pop("add_generation_prompt", add_generation_prompt)
        continue_final_message = kwargs.pop("continue_final_message", continue_final_message)
        if not messages:
            raise ValueError("messages must not be empty")
        if continue_final_message and add_generation_prompt:
            raise ValueError("continue_final_message and add_generation_prompt cannot both be true "
                             "(add_generation_prompt is true unless set false)")
        source = self._template(chat_template, tools)
        parts = content_format == "openai" or content_format == "auto" and loops_over_content(source)
        messages = [_template_message(m, parts) for m in messages]
        if continue_final_message:
            content = messages[-1].get("content", [] if parts else "")
            if parts:  # (the tag at the end of the last part's text)
                *before, last = content or [{"type": "text", "text": ""}]
                content = before + [last | {"text": last["text"] + _CONTINUE_TAG}]
            else:
                content += _CONTINUE_TAG
            messages[-1] = messages[-1] | {"content": content}
        # the special tokens the tokenizer names (bos and eos always, empty where unnamed), then the caller's
        special = self.special_tokens_map | {"bos_token": self.bos_token or "", "eos_token": self.eos_token or ""}
        try:
            text = compile_template(source).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                                   **special | kwargs)
        except (jinja2.TemplateError, TypeError) as e:  # e.g. a message without the 'content' the template reads
            raise ValueError(f"chat template error: {e}") from None
        return _cut_at_continue_tag(text) if continue_final_message else text

    def _template(self, given: str | None, tools) -> str:
        """The template's text: the one given (or, among named templates, the one it names), else the model's:
        with named templates, 'tool_use' where tools are given and there is one, else 'default' (as HF's)."""
        named = self.chat_template if isinstance(self.chat_template, dict) else {}
        if given is not None:
            return named.get(given, given)
        if not named:
            if self.chat_template is None:
                raise ValueError("this model has no chat template: give one (chat_template=... in Python, or "
                                 "`nanoflow serve --chat-template`)")
            return self.chat_template
        if tools and "tool_use" in named:
            return named["tool_use"]
        if "default" not in named:
            raise ValueError(f"this model has named chat templates ({', '.join(sorted(named))}) and none is "
                             f"'default'; pass chat_template=NAME")
        return named["default"]


# HF apply_chat_template's options for tensors and padding, which a list of ids has no use for
_HF_ONLY = ("return_tensors", "padding", "truncation", "max_length", "documents", "return_assistant_tokens_mask",
            "tokenizer_kwargs")


CONTENT_FORMATS = ("auto", "string", "openai")


def _template_message(m, parts: bool) -> dict:
    """The message as the template takes it: its content a string, or with parts a list of text parts."""
    if not isinstance(m, dict) or "role" not in m:
        raise ValueError(f"each message needs a 'role' (and 'content'), got {m!r}")
    m = dict(m)  # (the caller's stays as it was)
    if "content" in m:  # (a template that reads a missing one says so)
        m["content"] = template_content(m["content"], parts)
    if isinstance(m.get("tool_calls"), list):  # earlier calls' arguments as objects, as HF's tool-use templates take
        m["tool_calls"] = [_decoded_arguments(c) for c in m["tool_calls"]]
    return m


def template_content(content, parts: bool) -> str | list[dict]:
    """A string (parts joined by newlines), or parts a list of text parts: a string its one part (an empty one too,
    as vLLM's), None none."""
    if content is None:
        return [] if parts else ""
    if isinstance(content, list):  # text parts, and an assistant's refusal parts (their text, as vLLM's)
        if bad := [p for p in content if not isinstance(p, dict) or p.get("type") not in ("text", "refusal")
                   or not isinstance(p.get(p["type"]), str)]:
            raise ValueError(f"a message's content parts must be text parts ({{'type': 'text', 'text': ...}}) or "
                             f"refusals ({{'type': 'refusal', 'refusal': ...}}), got {bad[0]!r}")
        texts = [p[p["type"]] for p in content]
    else:
        texts = [content]
    return [{"type": "text", "text": t} for t in texts] if parts else "\n".join(texts)


def _decoded_arguments(call):
    f = call.get("function") if isinstance(call, dict) else None
    if not isinstance(f, dict) or not isinstance(f.get("arguments"), str):
        return call
    try:
        return call | {"function": f | {"arguments": json.loads(f["arguments"])}}
    except (ValueError, RecursionError):
        raise ValueError(f"a tool call's arguments must be JSON text, got {f['arguments']!r}") from None


# Appended to the final message for continue_final_message, to find where its content ends in the rendered text
# (searching for the content itself may find it again in the template's text after it: 'end' in '<|im_end|>').
# Its trailing space shows whether the template strips the content's end.
_CONTINUE_TAG = "<|nanoflow_continue_here|> "


def _cut_at_continue_tag(text: str) -> str:
    """text up to the end of the final message's content, where the template put the tag (as HF's)."""
    at = text.rfind(_CONTINUE_TAG.strip())
    if at < 0:
        raise ValueError("continue_final_message: the final message's text must appear in the rendered conversation")
    return text[:at] if text.startswith(_CONTINUE_TAG, at) else text[:at].rstrip()


def _raise(message: str):
    raise ValueError(f"chat template error: {message}")


class _Generation(jinja2.ext.Extension):
    """{% generation %}...{% endgeneration %}, which marks the assistant's text for transformers' training masks:
    its body as is (a scope of its own, as HF's)."""
    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.Scope(body, lineno=lineno)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    """As HF's: JSON as is (jinja2's own escapes HTML), with json.dumps' options that templates use."""
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def read_chat_template(given: str | None) -> str | None:
    """--chat-template: a file's text, or the template itself (as vLLM's), checked before the model loads."""
    if given is None:
        return None
    if os.path.isfile(given):
        with open(given) as f:
            given = f.read()
    elif not any(tag in given for tag in ("{{", "{%")):
        raise ValueError(f"--chat-template {given!r}: no such file, nor a template (it has no {{{{ or {{% tags)")
    try:
        compile_template(given)
    except jinja2.TemplateError as e:
        raise ValueError(f"--chat-template: not a valid template: {e}") from None
    return given


@functools.lru_cache(maxsize=16)
def loops_over_content(source: str) -> bool:
    """Whether the template loops over a message's content (`for part in message['content']`, or `.content`):
    one that takes OpenAI's list of parts (vLLM's "auto" detection of the content format)."""
    try:
        tree = jinja2.Environment(extensions=["jinja2.ext.loopcontrols", _Generation]).parse(source)
    except jinja2.TemplateSyntaxError:
        return False  # (rendering names the error)

    def content(node) -> bool:
        return (isinstance(node, jinja2.nodes.Getitem) and getattr(node.arg, "value", None) == "content"
                or isinstance(node, jinja2.nodes.Getattr) and node.attr == "content")
    # (and a name set to it: {% set c = message['content'] %}{% for part in c %})
    aliases = {a.target.name for a in tree.find_all(jinja2.nodes.Assign)
               if isinstance(a.target, jinja2.nodes.Name) and content(a.node)}
    return any(content(loop.iter) or isinstance(loop.iter, jinja2.nodes.Name) and loop.iter.name in aliases
               for loop in tree.find_all(jinja2.nodes.For))


# A directory's slow tokenizer files, which transformers converts to a fast tokenizer (tokenizer.json's)
_SLOW_FILES = ("tokenizer.model", "vocab.json", "merges.txt", "vocab.txt")


def _converted(path: str, files: list[str]) -> HFTokenizer:
    """The fast tokenizer transformers builds from a slow one's files (what vLLM serves through AutoTokenizer)."""
    named = ", ".join(files)
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise ValueError(f"{path} has no tokenizer.json, only a slow tokenizer's files ({named}): install "
                         "transformers to convert them, or save the tokenizer with its tokenizer.json") from None
    try:
        backend = AutoTokenizer.from_pretrained(path, local_files_only=True).backend_tokenizer
    except Exception as e:  # (transformers raises many kinds here: a missing sentencepiece, a bad file)
        raise ValueError(f"{path} has no tokenizer.json, and converting its slow tokenizer's files ({named}) "
                         f"failed: {e}") from None
    return HFTokenizer.from_str(backend.to_str())


@functools.lru_cache(maxsize=16)  # (a template given with each call, as the server's --chat-template, compiles once)
def compile_template(source: str) -> jinja2.Template:
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                       extensions=["jinja2.ext.loopcontrols", _Generation])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)
