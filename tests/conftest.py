import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

# Without a GPU, Triton kernels run in Triton's interpreter (set before anything imports triton).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(scope="session", autouse=True)
def cpu_sized_kv_cache():
    """On a GPU, an engine that a test builds without sizing its KV cache gets the CPU's 1 GiB, not 90 % of the card:
    fixtures keep engines alive across tests, and two of 90 % do not fit."""
    if not torch.cuda.is_available():
        yield
        return
    from nanoflow.config import EngineConfig
    init = EngineConfig.__init__

    def sized(self, *args, **kw):
        if not {"num_kv_blocks", "kv_cache_gb", "gpu_memory_utilization"} & kw.keys():
            kw["kv_cache_gb"] = 1
        init(self, *args, **kw)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(EngineConfig, "__init__", sized)
        yield

# Small random models of each supported family, saved as HF directories with a real tokenizer.
ARCH_CONFIGS = {
    # Llama 3.1-style: GQA and llama3 rope scaling (a short original context makes the scaling bite)
    "llama": dict(model_type="llama", rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                    "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
                  rope_theta=500000.0),
    # Qwen2: qkv bias, tied embeddings
    "qwen2": dict(model_type="qwen2", tie_word_embeddings=True, rope_theta=1000000.0),
    # Mistral: a sliding window shorter than the prompts
    "mistral": dict(model_type="mistral", sliding_window=12),
    # Mixtral: 4 experts, top-2
    "mixtral": dict(model_type="mixtral", num_local_experts=4, num_experts_per_tok=2, rope_theta=1000000.0),
    # Qwen2-MoE: 4 experts, top-2, weights not renormalized, a gated shared expert, qkv bias
    "qwen2_moe": dict(model_type="qwen2_moe", num_experts=4, num_experts_per_tok=2, moe_intermediate_size=48,
                      shared_expert_intermediate_size=80, rope_theta=1000000.0),
    # Qwen3: each head's q and k RMS-normalized, no qkv bias, a head_dim other than hidden / heads (as Qwen3-0.6B's);
    # YaRN rope scaling, as Qwen3's model cards extend the context (it scales cos and sin too)
    "qwen3": dict(model_type="qwen3", head_dim=32, rope_theta=1000000.0,
                  rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128}),
    # Qwen3-MoE: 4 experts, top-2, weights renormalized, no shared expert
    "qwen3_moe": dict(model_type="qwen3_moe", num_experts=4, num_experts_per_tok=2, moe_intermediate_size=48,
                      norm_topk_prob=True, head_dim=32, rope_theta=1000000.0),
}


@pytest.fixture(scope="session")
def default_model_path():
    from nanoflow.models.loader import default_model_path
    return default_model_path()


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory, default_model_path):
    """SmolLM2's tokenizer (from the GGUF), saved as tokenizer.json + tokenizer_config.json."""
    from nanoflow.models.gguf_file import open_gguf
    from nanoflow.tokenizer import Tokenizer
    path = tmp_path_factory.mktemp("tokenizer")
    Tokenizer.from_gguf(open_gguf(default_model_path)).save(str(path))
    return str(path)


def make_hf_model(path, arch: str, tokenizer_dir: str | None, seed: int = 0, max_shard_size=None, **overrides):
    """A small random HF model saved at path; with tokenizer_dir, its tokenizer files are copied in."""
    import transformers
    kw = dict(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=512, initializer_range=0.2, bos_token_id=1,
              eos_token_id=2, rms_norm_eps=1e-6)
    kw.update({k: v for k, v in ARCH_CONFIGS[arch].items() if k != "model_type"})
    kw.update(overrides)
    config = transformers.AutoConfig.for_model(ARCH_CONFIGS[arch]["model_type"], **kw)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():  # non-trivial norm weights and biases, so that their loading is tested too
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.copy_(1 + 0.2 * torch.randn_like(p) if "norm" in name else 0.2 * torch.randn_like(p))
    os.makedirs(path, exist_ok=True)
    model.save_pretrained(path, **({"max_shard_size": max_shard_size} if max_shard_size else {}))
    for f in ("tokenizer.json", "tokenizer_config.json") if tokenizer_dir else ():
        shutil.copy(os.path.join(tokenizer_dir, f), os.path.join(path, f))
    return model


def make_gpu_model(tmp_path_factory, arch: str) -> str:
    """The GPU tests' small random model of an architecture (wide enough for the kernels' bf16 tiles)."""
    path = str(tmp_path_factory.mktemp(f"gpu_{arch}"))
    make_hf_model(path, arch, None, seed=5, hidden_size=256, num_attention_heads=8, num_key_value_heads=2,
                  intermediate_size=512, num_hidden_layers=3, initializer_range=0.05)
    return path


@pytest.fixture(scope="session", params=sorted(ARCH_CONFIGS))
def hf_model(request, tmp_path_factory, tokenizer_dir):
    """(path, HF model) for each family."""
    path = str(tmp_path_factory.mktemp(request.param))
    return path, make_hf_model(path, request.param, tokenizer_dir)


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory, tokenizer_dir):
    path = str(tmp_path_factory.mktemp("llama"))
    make_hf_model(path, "llama", tokenizer_dir, seed=1)
    return path


@pytest.fixture(scope="session")
def default_llm():
    from nanoflow import LLM
    return LLM()


# -- a real `nanoflow serve` for the server tests (a subprocess on a free loopback port) --------------------------
def start_server(args: list[str], log_path) -> tuple[subprocess.Popen, str]:
    import httpx
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "nanoflow.entrypoints.cli", "serve", *args, "--port", str(port)],
                            stdout=open(log_path, "w"), stderr=subprocess.STDOUT)
    url = f"{'https' if '--ssl-certfile' in args else 'http'}://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while proc.poll() is None and time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/health", timeout=1, verify=False).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    pytest.fail(f"the server did not come up:\n{open(log_path).read()[-3000:]}")


def stop_server(proc: subprocess.Popen) -> int:
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise


def metrics(url: str) -> dict[str, float]:
    """The samples by name and labels, less vLLM's model_name label (one model a server: test_metrics checks it)."""
    import httpx
    def unnamed(sample: str) -> str:
        name, _, labels = sample.partition("{")
        kept = [label for label in re.findall(r'\w+="[^"]*"', labels) if not label.startswith("model_name=")]
        return name + ("{" + ",".join(kept) + "}" if kept else "")
    lines = httpx.get(f"{url}/metrics").text.splitlines()
    return {unnamed(k): float(v) for line in lines if line and not line.startswith("#")
            for k, v in [line.rsplit(" ", 1)]}
