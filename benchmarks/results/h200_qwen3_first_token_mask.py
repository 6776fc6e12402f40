"""The qwen3 parser's first-token mask on the GPU: test_structured_output's reasoning test on CUDA, with SmolLM2's
tokenizer saved in .dev/tok (the default model's GGUF is not on the device)."""
import functools
import pathlib
import sys
import tempfile

import torch

sys.path.insert(0, "tests")
import test_structured_output as t  # noqa: E402

t.LLM = functools.partial(t.LLM, kv_cache_gb=1)  # (each engine's cache: room for the next)
tok = str(pathlib.Path(".dev/tok").resolve())
for async_ in (False, True):
    with tempfile.TemporaryDirectory() as d:
        t.test_a_grammar_holds_only_what_follows_the_reasoning(pathlib.Path(d), tok, async_)
    print("qwen3 first-token mask test passed, async", async_, "on", torch.cuda.get_device_name(0), flush=True)
