"""Model and engine configuration.

`ModelConfig` is the one description of an architecture that the loaders, the model, the
cost model and the pipeline share. It is read from an HF `config.json`, from GGUF metadata,
or from a named shape preset (for benchmarks with dummy weights).
"""
from __future__ import annotations

import json
import math
import numbers
import os
from dataclasses import dataclass, field, replace

import torch

# HF architecture name -> our family name. All are the Llama decoder with small variations.
ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "MixtralForCausalLM": "mixtral",  # the Mistral decoder with a mixture-of-experts MLP
    "Qwen2MoeForCausalLM": "qwen2_moe",  # Qwen2's with experts and a gated shared expert
    "Qwen3ForCausalLM": "qwen3",  # Qwen2's without the qkv bias, each head's q and k RMS-normalized
    "Qwen3MoeForCausalLM": "qwen3_moe",  # Qwen3's with experts (no shared one)
}
MODEL_TYPES = {name: name for name in ARCHITECTURES.values()}
QWEN = ("qwen2", "qwen2_moe", "qwen3", "qwen3_moe")  # (their configs' window fields)
ROPE_TYPES = ("default", "linear", "llama3", "yarn")
MAX_NUM_SEQS = 1024  # a dense 2048-token batch of const 1024/512 runs ~683 decode sequences
# the parameters each rope scaling type needs (transformers refuses a config without them)
ROPE_KEYS = {"linear": ("factor",), "llama3": ("factor", "high_freq_factor", "low_freq_factor",
                                               "original_max_position_embeddings"),
             "yarn": ("factor", "original_max_position_embeddings")}

# transformers' defaults by architecture for the fields a config may leave out (its config classes'; the others'
# defaults are the same for all: rms_norm_eps 1e-6, rope_theta 1e4, head_dim hidden_size / heads, no window)
HF_DEFAULTS = {
    "llama": {"max_position_embeddings": 2048},
    "mistral": {"max_position_embeddings": 131072, "sliding_window": 4096},
    "mixtral": {"max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "rope_theta": 1e6, "num_local_experts": 8,
                "num_experts_per_tok": 2},
    "qwen2": {"max_position_embeddings": 32768},
    "qwen3": {"max_position_embeddings": 32768, "head_dim": 128},
    "qwen2_moe": {"max_position_embeddings": 32768, "num_experts": 60, "num_experts_per_tok": 4,
                  "moe_intermediate_size": 1408, "shared_expert_intermediate_size": 5632},
    "qwen3_moe": {"max_position_embeddings": 32768, "num_experts": 128, "num_experts_per_tok": 8,
                  "moe_intermediate_size": 768},
}

# the shape's fields, by the name a config.json gives them
SHAPE_FIELDS = {"vocab_size": "vocab_size", "hidden_size": "hidden_size", "intermediate_size": "intermediate_size",
                "num_layers": "num_hidden_layers", "num_heads": "num_attention_heads",
                "num_kv_heads": "num_key_value_heads", "head_dim": "head_dim",
                "max_position_embeddings": "max_position_embeddings"}


def _positive(v) -> bool:
    """v is a positive integer (numpy's too; not a bool)."""
    return isinstance(v, numbers.Integral) and not isinstance(v, bool) and v > 0


@dataclass(slots=True)
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    sliding_window: int | None = None
    full_attention_layers: tuple[int, ...] = ()  # layers without the window (Qwen2's max_window_layers, layer_types)
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)
    torch_dtype: str | None = None
    # mixture of experts (0: a dense MLP): each token's MLP is the weighted sum of its top num_experts_per_tok
    # experts (SwiGLU MLPs of intermediate_size), their weights renormalized over the k if norm_topk_prob
    num_experts: int = 0
    num_experts_per_tok: int = 0
    norm_topk_prob: bool = True
    # Qwen2-MoE: plus a shared expert every token uses (a SwiGLU MLP of this width), scaled by sigmoid(x · gate)
    shared_expert_intermediate_size: int = 0
    qk_norm: bool = False  # Qwen3: each head of q and of k RMS-normalized (weights of head_dim) before the rotation

    def window(self, layer: int) -> int | None:
        """The layer's sliding attention window (None: it attends to the whole context)."""
        return None if layer in self.full_attention_layers else self.sliding_window

    def __post_init__(self):
        for name in SHAPE_FIELDS:  # (a hand-edited config's "4096" or 4096.0 would fail far from here)
            if not _positive(v := getattr(self, name)):
                raise ValueError(f"model config: {SHAPE_FIELDS[name]} must be a positive integer, got {v!r}")
        if self.num_experts and not 0 < self.num_experts_per_tok <= self.num_experts:
            raise ValueError(f"num_experts_per_tok ({self.num_experts_per_tok}) must be in [1, num_experts "
                             f"({self.num_experts})]")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_attention_heads ({self.num_heads}) must be a multiple of "
                             f"num_key_value_heads ({self.num_kv_heads})")
        rope_type = (self.rope_scaling or {}).get("rope_type", "default")
        if rope_type not in ROPE_TYPES:
            raise ValueError(f"unsupported rope scaling type {rope_type!r} (supported: {ROPE_TYPES})")
        if missing := [k for k in ROPE_KEYS.get(rope_type, ()) if self.rope_scaling.get(k) is None]:
            raise ValueError(f"rope scaling {rope_type!r} lacks {', '.join(missing)}")

    @property
    def context_length(self) -> int:
        """The longest sequence the model takes, as vLLM derives it: max_position_embeddings times the factor of
        linear rope scaling (a linear-scaled checkpoint keeps its original max_position_embeddings); YaRN's
        original_max_position_embeddings times its factor."""
        scaling = self.rope_scaling or {}
        if scaling.get("rope_type") == "linear":
            return int(self.max_position_embeddings * scaling["factor"])
        if scaling.get("rope_type") == "yarn":
            return int(scaling["original_max_position_embeddings"] * scaling["factor"])
        return self.max_position_embeddings

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    def num_params(self, experts: int | None = None) -> int:
        """Parameter count (embedding included once; tied lm_head not counted twice). experts: count that many
        experts per layer instead of all of them."""
        h, i, s = self.hidden_size, self.intermediate_size, self.shared_expert_intermediate_size
        mlps = 1 if not self.is_moe else self.num_experts if experts is None else experts
        layer = h * (self.q_size + 2 * self.kv_size) + self.q_size * h + mlps * 3 * h * i + self.num_experts * h + 2 * h
        layer += 3 * h * s + (h if s else 0)  # the shared expert and its gate
        layer += 2 * self.head_dim if self.qk_norm else 0
        emb = self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        return self.num_layers * layer + emb + h

    def active_params(self) -> int:
        """Parameters a token's forward uses: with mixture of experts, only its top-k experts' (what a token costs;
        the cost model's P)."""
        return self.num_params(self.num_experts_per_tok if self.is_moe else None)

    def shard(self, tp_size: int) -> "ModelConfig":
        """One tensor-parallel rank's shape: its share of the query heads, KV heads and MLP width (with mixture of
        experts, of each expert's: every rank holds a slice of every expert). The vocabulary stays whole here (the
        embedding and lm_head split it themselves, padded to a multiple of tp_size)."""
        if tp_size == 1:
            return self
        for what, n in (("num_attention_heads", self.num_heads), ("num_key_value_heads", self.num_kv_heads),
                        ("intermediate_size", self.intermediate_size), ("hidden_size", self.hidden_size),
                        ("shared_expert_intermediate_size", self.shared_expert_intermediate_size)):
            if n % tp_size:
                raise ValueError(f"tensor_parallel_size {tp_size} must divide the model's {what} ({n})")
        return replace(self, num_heads=self.num_heads // tp_size, num_kv_heads=self.num_kv_heads // tp_size,
                       intermediate_size=self.intermediate_size // tp_size,
                       shared_expert_intermediate_size=self.shared_expert_intermediate_size // tp_size)

    def kv_bytes_per_token(self, dtype: torch.dtype) -> int:
        return 2 * self.num_layers * self.kv_size * torch.empty((), dtype=dtype).element_size()

    @classmethod
    def from_hf(cls, cfg: dict) -> "ModelConfig":
        archs = cfg.get("architectures") or []
        if isinstance(archs, str):  # (a hand-written config's one name; iterated, it was read as its letters)
            archs = [archs]
        arch = next((ARCHITECTURES[a] for a in archs if a in ARCHITECTURES), None)
        if arch is None and not archs:
            arch = MODEL_TYPES.get(cfg.get("model_type", ""))
        if arch is None:
            raise ValueError(f"unsupported architecture {archs or cfg.get('model_type')!r}; "
                             f"supported: {sorted(ARCHITECTURES)}")
        if quant := cfg.get("quantization_config"):
            method = quant.get("quant_method") if isinstance(quant, dict) else quant
            raise ValueError(f"quantized checkpoints are not supported (quant_method {method!r}): load the model's "
                             f"unquantized weights, or a GGUF file of it")
        cfg = HF_DEFAULTS[arch] | cfg
        try:
            heads = cfg["num_attention_heads"]
            hidden = cfg["hidden_size"]
            # transformers >= 5 writes rope_parameters; older configs rope_theta + rope_scaling.
            rope = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
            theta = rope.pop("rope_theta", cfg.get("rope_theta", 10000.0))
            if "type" in rope and "rope_type" not in rope:
                rope["rope_type"] = rope.pop("type")
            if rope.get("rope_type") in ("llama3", "yarn"):  # (transformers' defaults for them; a top-level
                # original_max_position_embeddings first, as transformers takes it)
                original = cfg.get("original_max_position_embeddings") or rope.get("original_max_position_embeddings")
                rope["original_max_position_embeddings"] = original or cfg["max_position_embeddings"]
            # every supported architecture's MLP is SwiGLU: another activation would run as silu, silently
            if (act := cfg.get("hidden_act", "silu")) not in ("silu", "swish"):
                raise ValueError(f"unsupported hidden_act {act!r}; supported: 'silu'")
            eos = cfg.get("eos_token_id")
            window = cfg.get("sliding_window")
            qkv_biased = arch in ("qwen2", "qwen2_moe")
            if arch in QWEN and not cfg.get("use_sliding_window", False) or arch == "llama":  # (Llama's: no window)
                window = None
            layers = cfg["num_hidden_layers"]
            if types := cfg.get("layer_types"):  # (transformers >= 5 writes each layer's kind)
                full = tuple(i for i, t in enumerate(types[:layers]) if t != "sliding_attention")
            elif arch in ("qwen2", "qwen3"):  # windowed from max_window_layers on (HF's default: 28)
                full = tuple(range(min(cfg.get("max_window_layers", 28), layers)))
            elif arch == "qwen2_moe":  # transformers' rule for it: even layers below max_window_layers
                full = tuple(i for i in range(layers) if i % 2 or i >= cfg.get("max_window_layers", 28))
            else:
                full = ()
            if window is None or len(full) == layers:
                window, full = None, ()
            qwen_moe = arch in ("qwen2_moe", "qwen3_moe")
            if qwen_moe and (cfg.get("mlp_only_layers") or (cfg.get("decoder_sparse_step") or 1) != 1):
                raise ValueError("Qwen-MoE with dense MLP layers among the expert layers (mlp_only_layers, "
                                 "decoder_sparse_step > 1) is not supported")
            return cls(
                architecture=arch,
                vocab_size=cfg["vocab_size"],
                hidden_size=hidden,
                # (Qwen-MoE: every layer's MLP is experts, of moe_intermediate_size)
                intermediate_size=cfg["moe_intermediate_size" if qwen_moe else "intermediate_size"],
                num_layers=cfg["num_hidden_layers"],
                num_heads=heads,
                num_kv_heads=cfg.get("num_key_value_heads") or heads,
                # (a bad hidden_size or head count is named by __post_init__, which checks them before head_dim)
                head_dim=cfg.get("head_dim") or (hidden // heads if _positive(hidden) and _positive(heads) else None),
                rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
                rope_theta=float(theta),
                rope_scaling=rope if rope.get("rope_type", "default") != "default" else None,
                max_position_embeddings=cfg["max_position_embeddings"],
                tie_word_embeddings=cfg.get("tie_word_embeddings", False),
                qkv_bias=qkv_biased or cfg.get("attention_bias", False),
                o_bias=not qkv_biased and cfg.get("attention_bias", False),
                mlp_bias=cfg.get("mlp_bias", False),
                sliding_window=window,
                full_attention_layers=full,
                bos_token_id=cfg.get("bos_token_id"),
                eos_token_ids=[] if eos is None else ([eos] if isinstance(eos, int) else list(eos)),
                torch_dtype=cfg.get("torch_dtype") or cfg.get("dtype"),
                num_experts=cfg.get("num_local_experts") or cfg.get("num_experts") or 0,
                num_experts_per_tok=cfg.get("num_experts_per_tok") or 0,
                norm_topk_prob=cfg.get("norm_topk_prob", not qwen_moe),  # (HF's defaults)
                shared_expert_intermediate_size=cfg.get("shared_expert_intermediate_size") or 0,
                qk_norm=arch in ("qwen3", "qwen3_moe"),
            )
        except KeyError as e:
            raise ValueError(f"malformed model config: missing field {e.args[0]!r}") from None

    @classmethod
    def from_file(cls, path: str, overrides: dict | None = None) -> "ModelConfig":
        """overrides: fields set over the file's, as vLLM's hf_overrides (a rope dict replaces the file's)."""
        try:
            with open(path) as f:
                cfg = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"malformed model config {path}: {e}") from None
        if not isinstance(cfg, dict):
            raise ValueError(f"malformed model config {path}: expected a JSON object")
        if overrides and {"rope_scaling", "rope_parameters"} & overrides.keys():
            # (either name replaces the rope dict, whichever the file used; its rope_theta stays)
            old = cfg.pop("rope_parameters", None) or cfg.pop("rope_scaling", None) or {}
            cfg.pop("rope_scaling", None)
            if "rope_theta" in old:
                cfg.setdefault("rope_theta", old["rope_theta"])
        if overrides and "rope_theta" in overrides:  # (over the file's, wherever it keeps it: transformers >= 5 in
            for name in ("rope_parameters", "rope_scaling"):  # rope_parameters, which from_hf reads first)
                if isinstance(rope := cfg.get(name), dict):
                    cfg[name] = {k: v for k, v in rope.items() if k != "rope_theta"}
        return cls.from_hf(cfg | (overrides or {}))


def _preset(arch, vocab, hidden, inter, layers, heads, kv, theta, max_pos, eps, **kw) -> ModelConfig:
    kw.setdefault("head_dim", hidden // heads)
    return ModelConfig(architecture=arch, vocab_size=vocab, hidden_size=hidden, intermediate_size=inter,
                       num_layers=layers, num_heads=heads, num_kv_heads=kv, rope_theta=theta,
                       max_position_embeddings=max_pos, rms_norm_eps=eps, **kw)


_LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192}

# Shapes of the public models (from their config.json), for benchmarks with dummy weights.
PRESETS: dict[str, ModelConfig] = {
    "llama-2-7b": _preset("llama", 32000, 4096, 11008, 32, 32, 32, 1e4, 4096, 1e-5, bos_token_id=1, eos_token_ids=[2]),
    "llama-2-13b": _preset("llama", 32000, 5120, 13824, 40, 40, 40, 1e4, 4096, 1e-5, bos_token_id=1, eos_token_ids=[2]),
    "llama-2-70b": _preset("llama", 32000, 8192, 28672, 80, 64, 8, 1e4, 4096, 1e-5, bos_token_id=1, eos_token_ids=[2]),
    "llama-3-8b": _preset("llama", 128256, 4096, 14336, 32, 32, 8, 5e5, 8192, 1e-5, bos_token_id=128000,
                          eos_token_ids=[128001, 128009]),
    "llama-3-70b": _preset("llama", 128256, 8192, 28672, 80, 64, 8, 5e5, 8192, 1e-5, bos_token_id=128000,
                           eos_token_ids=[128001, 128009]),
    "llama-3.1-8b": _preset("llama", 128256, 4096, 14336, 32, 32, 8, 5e5, 131072, 1e-5, bos_token_id=128000,
                            eos_token_ids=[128001, 128008, 128009], rope_scaling=_LLAMA3_ROPE),
    "qwen2-7b": _preset("qwen2", 152064, 3584, 18944, 28, 28, 4, 1e6, 32768, 1e-6, qkv_bias=True,
                        eos_token_ids=[151643]),
    "qwen2-72b": _preset("qwen2", 152064, 8192, 29568, 80, 64, 8, 1e6, 32768, 1e-6, qkv_bias=True,
                         eos_token_ids=[151643]),
    "mistral-7b": _preset("mistral", 32768, 4096, 14336, 32, 32, 8, 1e6, 32768, 1e-5, bos_token_id=1,
                          eos_token_ids=[2]),
    "mistral-7b-v0.1": _preset("mistral", 32000, 4096, 14336, 32, 32, 8, 1e4, 32768, 1e-5, bos_token_id=1,
                               eos_token_ids=[2], sliding_window=4096),
    "mixtral-8x7b": _preset("mixtral", 32000, 4096, 14336, 32, 32, 8, 1e6, 32768, 1e-5, bos_token_id=1,
                            eos_token_ids=[2], num_experts=8, num_experts_per_tok=2),
    "qwen1.5-moe-a2.7b": _preset("qwen2_moe", 151936, 2048, 1408, 24, 16, 16, 1e6, 8192, 1e-6, qkv_bias=True,
                                 eos_token_ids=[151643], num_experts=60, num_experts_per_tok=4, norm_topk_prob=False,
                                 shared_expert_intermediate_size=5632),
    "qwen3-8b": _preset("qwen3", 151936, 4096, 12288, 36, 32, 8, 1e6, 40960, 1e-6, head_dim=128, qk_norm=True,
                        bos_token_id=151643, eos_token_ids=[151645]),
    "qwen3-30b-a3b": _preset("qwen3_moe", 151936, 2048, 768, 48, 32, 4, 1e6, 40960, 1e-6, head_dim=128, qk_norm=True,
                             bos_token_id=151643, eos_token_ids=[151645], num_experts=128, num_experts_per_tok=8),
}


def preset(name: str, **overrides) -> ModelConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; presets: {sorted(PRESETS)}")
    return replace(PRESETS[name], **overrides)


def resolve_device(name: str | None) -> torch.device:
    """The device to run on (default: CUDA if there is one); ValueError naming it if it is not a usable one."""
    try:
        device = torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError:
        raise ValueError(f"device {name!r} is not a device torch knows (cpu, cuda, cuda:N)") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device {name!r}: nanoflow runs on cpu or cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r}: this torch has no usable CUDA device")
    return device


def resolve_dtype(dtype: str | torch.dtype, device: torch.device, model_dtype: str | None) -> torch.dtype:
    """'auto' means fp32 on the CPU and the checkpoint's half type (else bf16) on the GPU."""
    if isinstance(dtype, torch.dtype):
        return dtype
    names = {"float32": torch.float32, "float": torch.float32, "fp32": torch.float32, "float16": torch.float16,
             "fp16": torch.float16, "half": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
    if dtype == "auto":
        if device.type == "cpu":
            return torch.float32
        return torch.float16 if model_dtype == "float16" else torch.bfloat16
    if dtype not in names:
        raise ValueError(f"unsupported dtype {dtype!r}; choose auto, {', '.join(names)}")
    return names[dtype]


MODES = ("non-overlap", "nanobatch-only", "pipeline")
SCHEDULE_POLICIES = ("fcfs", "lof", "slack", "priority")
REASONING_PARSERS = ("deepseek_r1", "qwen3")  # (reasoning.py)
KV_CACHE_DTYPES = {"auto": None, "fp8": torch.float8_e4m3fn}  # None: the model's dtype


@dataclass(slots=True)
class EngineConfig:
    """Knobs of the engine; defaults follow vLLM's where the meaning is the same."""
    max_num_batched_tokens: int | None = None  # dense token budget per iteration
    max_num_seqs: int = MAX_NUM_SEQS
    max_model_len: int | None = None
    # tokens a KV block (a page of decode attention); None: 16, or 32 over an fp8 cache, whose decode kernel is bound
    # by its per-page work: pages of 32 ran Mixtral 1.007-1.019x faster on an H200 (BENCHMARKS.md #10, session 24)
    block_size: int | None = None
    num_kv_blocks: int | None = None  # else sized from memory
    gpu_memory_utilization: float = 0.9
    # the KV cache's size in GiB when num_kv_blocks is not given; set, it ignores gpu_memory_utilization (as vLLM's
    # kv_cache_memory_bytes); None: on a GPU what gpu_memory_utilization leaves, on the CPU 1
    kv_cache_gb: float | None = None
    # "auto": the model's dtype; "fp8": float8 e4m3, unscaled (vLLM's fp8 without calibration): half the bytes of
    # bf16, so twice the tokens and half the reads of decode attention, at 3 bits of mantissa
    kv_cache_dtype: str = "auto"
    admission: str = "kv"  # "kv": free blocks for the prompt; "predicted": predicted peak use
    predicted_output_len: int | None = None  # for admission="predicted"; None: max_tokens
    # which waiting request is admitted next: "fcfs", in arrival order; "lof", longest output (max_tokens) first,
    # as SGLang's: in an offline batch the long ones start early, so the run does not end on a few long decodes;
    # "slack": arrival order, but a request whose max_tokens outlasts the work in hand (the fewest iterations the
    # budget allows the waiting queue, and the KV cache the waiting and running requests) goes first, longest first:
    # no long drain, the others' ends stay staggered; "priority": by each request's priority (lower first), then in
    # arrival order, and the lowest-priority running sequence is the one preempted (vLLM's)
    schedule_policy: str = "fcfs"
    # None: CUDA graphs on the GPU, plain eager on the CPU. True on the CPU runs the graph path's static
    # buffers and padding eagerly (how the CPU tests cover it); False: eager everywhere (--enforce-eager).
    cuda_graph: bool | None = None
    # None: on for CUDA (iteration i + 1 is scheduled while the GPU runs i), off on the CPU
    async_scheduling: bool | None = None
    # "non-overlap": every op over the whole batch; "nanobatch-only": the pipeline spec's nano-batches,
    # issued in its order on one stream (the cost of nano-batching alone); "pipeline": the spec's nano-ops on
    # its execution units (SM-partitioned streams, CUDA only)
    mode: str = "non-overlap"
    # "auto": the spec `nanoflow tune` saved for this GPU, model shape, dtype and budget, else the shipped hand
    # spec for Llama-3-8B shapes, else non-overlap; or a spec file, or the name of a shipped one
    pipeline_spec: str = "auto"
    # full KV blocks shared by prefix hash; a cached prefix is not computed again
    enable_prefix_caching: bool = True
    # host memory for the KV of cached blocks that leave the GPU (NanoFlow's offload); 0: off
    kv_offload_gb: float = 0.0
    # ranks (processes; GPUs on CUDA) that the model's heads, MLP and vocabulary are split over
    tensor_parallel_size: int = 1
    num_layers: int | None = None  # only the model's first this many decoder layers (benchmarks)
    seed: int = 0  # (None: 0, as vLLM V1's, which has no unseeded engine)
    # a thinking model's format (reasoning.py): a request's grammar then holds only what follows its reasoning
    reasoning_parser: str | None = None

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.kv_cache_dtype == "fp8_e4m3":  # (vLLM's name of the same format)
            self.kv_cache_dtype = "fp8"
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype must be one of {tuple(KV_CACHE_DTYPES)} (or fp8_e4m3, fp8's vLLM "
                             f"name), got {self.kv_cache_dtype!r}")
        if self.admission not in ("kv", "predicted"):
            raise ValueError(f"admission must be 'kv' or 'predicted', got {self.admission!r}")
        if self.schedule_policy not in SCHEDULE_POLICIES:
            raise ValueError(f"schedule_policy must be one of {SCHEDULE_POLICIES}, got {self.schedule_policy!r}")
        # (None, where vLLM's own default is None or one nanoflow takes: "the default")
        if self.enable_prefix_caching is None:
            self.enable_prefix_caching = True
        if self.max_num_seqs is None:
            self.max_num_seqs = MAX_NUM_SEQS
        if isinstance(self.pipeline_spec, os.PathLike):  # (a pathlib.Path to a spec file)
            self.pipeline_spec = os.fspath(self.pipeline_spec)
        if not isinstance(self.pipeline_spec, str):
            raise ValueError(f"pipeline_spec must be 'auto', a spec file's path or a shipped spec's name, got "
                             f"{type(self.pipeline_spec).__name__} {self.pipeline_spec!r}")
        if self.reasoning_parser not in (None, *REASONING_PARSERS):
            raise ValueError(f"reasoning_parser must be one of {REASONING_PARSERS}, got {self.reasoning_parser!r}")
        if self.block_size is None:
            self.block_size = 32 if self.kv_cache_dtype == "fp8" else 16
        for name in ("block_size", "max_num_seqs"):
            if not _positive(getattr(self, name)):
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if not (isinstance(self.gpu_memory_utilization, (int, float)) and 0 < self.gpu_memory_utilization <= 1):
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.max_num_batched_tokens is not None and self.max_num_batched_tokens <= 0:
            raise ValueError("max_num_batched_tokens must be positive")
        if self.tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size must be >= 1, got {self.tensor_parallel_size}")
        if not 0 <= self.kv_offload_gb < math.inf:  # (NaN fails it too)
            raise ValueError(f"kv_offload_gb must be a number >= 0, got {self.kv_offload_gb}")
        for name in ("max_model_len", "num_kv_blocks", "predicted_output_len", "num_layers"):
            v = getattr(self, name)
            if v is not None and not _positive(v):
                raise ValueError(f"{name} must be a positive integer (or None), got {v!r}")
        if self.kv_cache_gb is not None and not 0 < self.kv_cache_gb < math.inf:
            raise ValueError(f"kv_cache_gb must be a number > 0, got {self.kv_cache_gb}")
        if self.seed is None:
            self.seed = 0
        if (isinstance(self.seed, bool) or not isinstance(self.seed, numbers.Integral)
                or not -2**63 <= self.seed < 2**64):  # (torch.manual_seed's range)
            raise ValueError(f"seed must be an integer in [-2**63, 2**64), got {self.seed!r}")
        self.seed = int(self.seed)  # (numpy's integers too)
        if self.kv_offload_gb and not self.enable_prefix_caching:
            raise ValueError("kv_offload_gb needs prefix caching (host blocks are found by prefix hash)")


def read_json(path: str) -> dict:
    """A JSON file's content ({} if there is none); ValueError naming the file if it is not JSON."""
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not JSON: {e}") from None
