"""GPU check of structured outputs, logit_bias and allowed_token_ids (no default model on the device: the tiny
random Llama of the tests gets SmolLM2's tokenizer from .dev/tok)."""
import sys
import time
sys.path.insert(0, "tests")
import torch
from conftest import make_hf_model
from nanoflow import LLM, SamplingParams
from test_structured_output import CASES, PROMPT

path = "/tmp/m"
make_hf_model(path, "llama", ".dev/tok", seed=5, hidden_size=256, num_attention_heads=8, num_key_value_heads=2,
              intermediate_size=512, num_hidden_layers=3, initializer_range=0.05)
ok = True
for async_ in (True, False):
    llm = LLM(path, kv_cache_gb=1, async_scheduling=async_)
    print("device", llm.engine.device, "graphs", llm.engine.runner.graphs is not None, "async", async_)
    for grammar, check in CASES:
        params = [SamplingParams(temperature=0, max_tokens=12, structured_outputs=grammar),
                  SamplingParams(temperature=1.0, seed=4, n=3, max_tokens=12, structured_outputs=grammar)]
        t = time.time()
        outs = llm.generate([PROMPT, PROMPT], params, use_tqdm=False)
        for o in outs:
            for c in o.outputs:
                good = bool(check(c.text)) and c.finish_reason == "stop"
                ok &= good
                print(f"  {'ok ' if good else 'BAD'} {grammar} {c.text!r} {c.finish_reason}")
        print(f"  {time.time() - t:.2f} s")
    greedy = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    alone = llm.generate([PROMPT], greedy, use_tqdm=False)[0].outputs[0].token_ids
    forced, allowed, plain = llm.generate([PROMPT] * 3, [
        SamplingParams(temperature=0, max_tokens=5, ignore_eos=True, logprobs=0, logit_bias={42: 100.0}),
        SamplingParams(temperature=1.0, seed=3, max_tokens=12, ignore_eos=True, allowed_token_ids=[7, 8, 300]),
        greedy], use_tqdm=False)
    tk = llm.get_tokenizer()
    (bare,), (spaced,) = (tk.encode(w, add_special_tokens=False) for w in ("Paris", " Paris"))
    pushed = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logit_bias={bare: 50.0, spaced: 60.0})
    words = llm.generate([PROMPT, PROMPT], [pushed, SamplingParams(temperature=0, max_tokens=6, ignore_eos=True,
                         logit_bias={bare: 50.0, spaced: 60.0}, bad_words=["Paris"])], use_tqdm=False)
    lp = llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=10, logprobs=2,
                      structured_outputs={"choice": ["yes"]}), use_tqdm=False)[0].outputs[0]
    checks = {"bad_words": words[0].outputs[0].token_ids == [spaced] * 6
              and not {bare, spaced} & set(words[1].outputs[0].token_ids),
              "masked logprobs": lp.text == "yes" and lp.logprobs[-1][lp.token_ids[-1]].logprob == 0.0,
              "bias": forced.outputs[0].token_ids == [42] * 5,
              "allowed": set(allowed.outputs[0].token_ids) <= {7, 8, 300},
              "plain beside": plain.outputs[0].token_ids == alone}
    print("  ", checks)
    ok &= all(checks.values())
    del llm
    torch.cuda.empty_cache()
print("ALL OK" if ok else "FAILURES")
