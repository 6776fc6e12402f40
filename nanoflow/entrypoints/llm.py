"""The offline API: `LLM(model).generate(prompts, params)` and `LLM.chat(messages, params)`."""
from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence

from tqdm import tqdm

from nanoflow.beam_search import BeamSearchOutput, BeamSearchParams, beam_search
from nanoflow.engine.llm_engine import LLMEngine, Prompt
from nanoflow.entrypoints import vllm_args
from nanoflow.outputs import RequestOutput
from nanoflow.sampling_params import SamplingParams, integer


class LLM:
    def __init__(self, model: str | None = None, *, enforce_eager: bool = False, **kwargs):
        """model: an HF directory, a .gguf file, a shape preset (with load_format='dummy'), or None for the
        embedded default (SmolLM2-135M-Instruct). kwargs: see LLMEngine and EngineConfig. As vLLM's:
        enforce_eager, no CUDA graphs (cuda_graph=False); vLLM's names of nanoflow's options (vllm_args.translate:
        scheduling_policy, num_gpu_blocks_override, kv_cache_memory_bytes, rope_scaling, rope_theta); and vLLM's
        arguments that ask for what nanoflow does anyway (vllm_args: trust_remote_code, quantization=None, ...;
        other values refused by name)."""
        if enforce_eager:
            kwargs["cuda_graph"] = False
        kwargs = vllm_args.take(vllm_args.translate(kwargs), vllm_args.ENGINE | vllm_args.LLM_ONLY)
        self.engine = self.llm_engine = LLMEngine(model, **kwargs)  # (llm_engine: vLLM's name for it)
        self.tokenizer = self.engine.tokenizer
        self._ids = itertools.count()

    def get_tokenizer(self):
        """The model's Tokenizer (nanoflow's own: encode, decode, apply_chat_template), or None; as vLLM's."""
        return self.tokenizer

    def get_default_sampling_params(self) -> SamplingParams:
        """What a call without sampling params uses: the model's generation config's defaults (temperature, top_p,
        top_k, min_p, repetition_penalty, max_new_tokens), else SamplingParams()'s; as vLLM's."""
        return self.engine.default_params()

    def reset_prefix_cache(self) -> bool:
        """Forget every cached prefix, e.g. between benchmark runs (as vLLM's); False while requests hold KV
        blocks (a stream not yet consumed)."""
        return self.engine.reset_prefix_cache()

    def shutdown(self) -> None:
        """Stop the tensor-parallel workers, if any (also done at exit)."""
        self.engine.shutdown()

    def generate(self, prompts: Prompt | Sequence[Prompt],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = True, lora_request=None,
                 priority: Sequence[int] | None = None) -> list[RequestOutput]:
        """priority: each prompt's (with schedule_policy "priority", lower first), as vLLM's; lora_request: None
        (vLLM's argument; no adapters here)."""
        _no_lora(lora_request)
        prompts = _as_list(prompts)
        params = (list(sampling_params) if isinstance(sampling_params, (list, tuple))
                  else [sampling_params] * len(prompts))
        for name, given in (("sampling params", params), ("priorities", priority)):
            if given is not None and len(given) != len(prompts):  # (vLLM's: one each, or one for all)
                raise ValueError(f"got {len(given)} {name} for {len(prompts)} prompts: give one each")
        ids, done = [], {}
        try:
            for prompt, p, rank in zip(prompts, params, priority or [0] * len(prompts)):  # a bad one rejects all
                ids.append(str(next(self._ids)))
                self.engine.add_request(ids[-1], prompt, p, rank)
            mine = set(ids)
            with tqdm(total=len(ids), desc="generating", disable=not use_tqdm) as bar:
                while len(done) < len(ids):
                    for out in self.engine.step():
                        if out.finished and out.request_id in mine:
                            done[out.request_id] = out
                            bar.update(1)
        except BaseException:  # a bad prompt, an error or an interrupt: this call's requests go, the engine stays
            for rid in ids:
                self.engine.abort_request(rid)
            raise
        return [done[i] for i in ids]

    def stream(self, prompt: Prompt, sampling_params: SamplingParams | None = None) -> Iterator[RequestOutput]:
        """Yield the request's cumulative output after every iteration that changed it."""
        rid = str(next(self._ids))
        self.engine.add_request(rid, prompt, sampling_params)
        try:
            while True:
                for out in self.engine.step():
                    if out.request_id == rid:
                        yield out
                        if out.finished:
                            return
                if rid not in self.engine.requests:
                    raise RuntimeError(f"stream {rid}: its request ended in a step another call took (generate or "
                                       f"another stream stepped the engine); consume a stream before other calls")
        finally:
            self.engine.abort_request(rid)

    def beam_search(self, prompts: Prompt | Sequence[Prompt], params: BeamSearchParams, lora_request=None,
                    use_tqdm: bool = False, concurrency_limit: int | None = None) -> list[BeamSearchOutput]:
        """Each prompt's params.beam_width likeliest continuations, best first (nanoflow.beam_search), as vLLM's:
        a sequence's text is all its tokens' (the prompt's too, special tokens kept); concurrency_limit: search that
        many prompts at a time (all: None)."""
        _no_lora(lora_request)
        ids = [self.engine.tokenize(p)[1] for p in _as_list(prompts)]
        if concurrency_limit is not None and (isinstance(concurrency_limit, bool) or
                                              not isinstance(concurrency_limit, int) or concurrency_limit < 1):
            raise ValueError(f"concurrency_limit must be an integer >= 1 or None, not {concurrency_limit!r}")
        step = concurrency_limit or max(len(ids), 1)
        outs = [out for i in range(0, len(ids), step)
                for out in beam_search(lambda ps, sp: self.generate(ps, sp, use_tqdm=False), ids[i:i + step], params,
                                       self.engine.eos_token_ids, self.engine.max_model_len, None, use_tqdm)]
        for s in (s for out in outs for s in out.sequences) if self.tokenizer else ():
            s.text = self.tokenizer.decode(s.tokens)
        return outs

    def chat(self, messages: list[dict] | list[list[dict]],
             sampling_params: SamplingParams | Sequence[SamplingParams] | None = None, use_tqdm: bool = True,
             lora_request=None, chat_template: str | None = None, chat_template_content_format: str = "auto", *,
             add_generation_prompt: bool = True, continue_final_message: bool = False,
             chat_template_kwargs: dict | None = None, tools: list[dict] | None = None) -> list[RequestOutput]:
        """One conversation or a list of them, as vLLM's LLM.chat (see chat_prompt)."""
        _no_lora(lora_request)
        conversations = messages if messages and isinstance(messages[0], list) else [messages]
        prompts = [self.chat_prompt(c, chat_template=chat_template, add_generation_prompt=add_generation_prompt,
                                    continue_final_message=continue_final_message,
                                    chat_template_kwargs=chat_template_kwargs, tools=tools,
                                    chat_template_content_format=chat_template_content_format)
                   for c in conversations]
        return self.generate(prompts, sampling_params, use_tqdm)

    def chat_prompt(self, messages: list[dict], *, chat_template: str | None = None, add_generation_prompt: bool = True,
                    continue_final_message: bool = False, chat_template_kwargs: dict | None = None,
                    tools: list[dict] | None = None, chat_template_content_format: str = "auto") -> dict:
        """Token ids of a conversation rendered by the chat template (special tokens come from the template).
        continue_final_message: end inside the last message, for the model to continue it (with
        add_generation_prompt=False); chat_template_kwargs: the template's own variables; tools: OpenAI's tool
        objects, for a template that renders them (the calls the model then writes are its text);
        chat_template_content_format: each message's content as a string or as OpenAI's parts (render_chat's)."""
        if self.tokenizer is None:
            raise ValueError("this model has no tokenizer, so it has no chat template")
        text = self.tokenizer.render_chat(messages, add_generation_prompt, chat_template, continue_final_message,
                                          chat_template_kwargs, tools, chat_template_content_format)
        return {"prompt": text, "prompt_token_ids": self.tokenizer.encode(text, add_special_tokens=False)}


def _no_lora(lora_request) -> None:
    if lora_request is not None:
        raise ValueError("lora_request: nanoflow serves no LoRA adapters (pass None)")


def _as_list(prompts) -> list:
    if isinstance(prompts, (str, dict)):
        return [prompts]
    if isinstance(prompts, (list, tuple)) and prompts and all(integer(t) for t in prompts):
        return [list(prompts)]  # one prompt of token ids
    try:
        return list(prompts)
    except TypeError:
        raise TypeError(f"prompts must be a string, a list of token ids, a dict or a list of these, got "
                        f"{type(prompts).__name__}") from None
