"""The Llama family decoder (Llama 2/3/3.1, Mistral, Qwen2, Qwen3, Mixtral, Qwen2-MoE, Qwen3-MoE), written as per-layer
operations.

Each operation reads and writes rows [a, b) of a `Workspace` (one row per token), so the same
model runs plainly (every op over all rows) or cut into nano-batches by the pipeline. Weights are
fused where that makes fewer, larger GEMMs: q|k|v in one matrix, gate|up in another.

Qwen3 RMS-normalizes each head of q and k before the rotation (in `rope_kv`). A mixture-of-experts model (Mixtral,
Qwen2-MoE, Qwen3-MoE) replaces the MLP's gate_up, act and down by two ops: `router` (the
gate's logits) and `experts` (top-k routing, each expert's SwiGLU MLP over the rows routed to it, the weighted sum;
Qwen2-MoE's shared expert, gated per row, is added there too).

With tensor parallelism each rank holds a shard (`ModelConfig.shard`): its query and KV heads in qkv (column
parallel), its slice of gate and of up in gate_up, the matching input columns of o and down (row parallel, their
partial sums added over the ranks by the ops o_allreduce / down_allreduce), and a slice of the vocabulary in the
embedding and the lm_head. Each expert, the shared one too, is split like the dense MLP (its slice of the
intermediate size); the router and the shared expert's gate are replicated, so every rank routes and gates alike
and down_allreduce sums the experts' partial outputs.

The attention output's projection has a second form, NanoFlow's for LLaMA-2-70B, that a pipeline spec may pick per
nano-batch: all-gather the ranks' attention outputs (attn_allgather), project them onto this rank's slice of the
hidden columns (o_gathered: o split by output rows instead of input columns), all-gather the slices (o_allgather).
Two all-gathers move the bytes of one all-reduce, but add nothing up and split the collective in two, so that
each half can overlap other work.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from nanoflow import kernels
from nanoflow.kernels import reference
from nanoflow.config import ModelConfig
from nanoflow.distributed.parallel_state import (
    SINGLE,
    TPGroup,
    all_gather_columns,
    all_reduce,
    gather,
    gather_columns,
    row_buffer,
)
from nanoflow.layers.rotary import cos_sin_table
from nanoflow.models.batch import DECODE, PREFILL, ForwardBatch

# The operations of one decoder layer, in dependency order.
LAYER_OPS = ("attn_norm", "qkv", "rope_kv", "decode_attn", "prefill_attn", "o_proj",
             "mlp_norm", "gate_up", "act", "down")
# With tensor parallelism, the all-reduces of the row-parallel projections' outputs are ops of their own, so that
# a pipeline spec can place them (on a network unit) like any other op.
NETWORK_OPS = ("o_allreduce", "down_allreduce", "attn_allgather", "o_allgather")
# the two forms of the attention output's projection under tensor parallelism, for the rows a spec gives each
O_ALLREDUCE, O_ALLGATHER = ("o_proj", "o_allreduce"), ("attn_allgather", "o_gathered", "o_allgather")
MOE_OPS = ("router", "experts")
MOE_LAYER_OPS = LAYER_OPS[:7] + MOE_OPS


def layer_ops(tp_size: int, moe: bool = False) -> tuple[str, ...]:
    ops = MOE_LAYER_OPS if moe else LAYER_OPS
    return ops[:6] + ("o_allreduce",) + ops[6:] + ("down_allreduce",) if tp_size > 1 else ops


TP_LAYER_OPS = layer_ops(2)


@dataclass(slots=True)
class Workspace:
    """Activation buffers of one iteration, one row per token."""
    residual: torch.Tensor
    hidden: torch.Tensor  # output of o_proj / down, added into residual by the next norm
    normed: torch.Tensor
    qkv: torch.Tensor
    attn: torch.Tensor
    gate_up: torch.Tensor  # dense MLP only (width 0 with experts: theirs are sized by the routing)
    act: torch.Tensor
    router: torch.Tensor  # mixture of experts only: the gate's logits per expert
    attn_all: torch.Tensor  # tensor parallelism only: every rank's attention outputs (attn_allgather)
    o_part: torch.Tensor  # tensor parallelism only: this rank's hidden columns of o (o_gathered)

    @classmethod
    def allocate(cls, cfg: ModelConfig, num_tokens: int, dtype: torch.dtype, device, tp_size: int = 1) -> "Workspace":
        """cfg: a rank's shard. `hidden`, which the all-reduces sum, through row_buffer (with tensor parallelism
        every rank allocates it)."""
        def buf(name, width):
            return (row_buffer if name == "hidden" else torch.empty)(num_tokens, width, dtype=dtype, device=device)
        return cls(*map(buf, cls.__slots__, cls._widths(cfg, tp_size)))

    @classmethod
    def bytes_for(cls, cfg: ModelConfig, num_tokens: int, dtype: torch.dtype, tp_size: int = 1,
                  kernels=reference) -> int:
        """The buffers' bytes, and with experts the scratch of their op on the backend `kernels`: per pair slot
        (each expert's gap up to a multiple of its moe_pad at these rows, which fewer rows never exceed) the input
        row and what its experts_mlp allocates (experts_scratch); per row the float32 sum, and the shared expert's
        rows."""
        size = torch.empty((), dtype=dtype).element_size()
        width = sum(cls._widths(cfg, tp_size))
        if not cfg.is_moe:
            return num_tokens * width * size
        width += 2 * cfg.hidden_size + 3 * cfg.shared_expert_intermediate_size + cfg.hidden_size  # (shared expert)
        k, e = cfg.num_experts_per_tok, cfg.num_experts
        slots = reference.moe_slots(num_tokens, k, e, kernels.moe_pad(num_tokens, k, e))
        return ((num_tokens * width + slots * cfg.hidden_size) * size
                + kernels.experts_scratch(slots, cfg.hidden_size, cfg.intermediate_size, dtype))

    @staticmethod
    def _widths(cfg: ModelConfig, tp_size: int) -> list[int]:
        h, i = cfg.hidden_size, Workspace._dense_mlp(cfg)
        attn_all, o_part = (cfg.q_size * tp_size, h // tp_size) if tp_size > 1 else (0, 0)
        return [h, h, h, cfg.q_size + 2 * cfg.kv_size, cfg.q_size, 2 * i, i, cfg.num_experts, attn_all, o_part]

    @staticmethod
    def _dense_mlp(cfg: ModelConfig) -> int:
        return 0 if cfg.is_moe else cfg.intermediate_size

    def rows(self, n: int) -> "Workspace":
        return Workspace(*(getattr(self, f)[:n] for f in self.__slots__))


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor) -> None:
    if bias is None:
        torch.mm(x, weight.t(), out=out)
    else:
        torch.addmm(bias, x, weight.t(), out=out)


def _param(*shape, dtype, device) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape, dtype=dtype, device=device), requires_grad=False)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, dtype, device):
        super().__init__()
        h, i = cfg.hidden_size, cfg.intermediate_size
        qkv = cfg.q_size + 2 * cfg.kv_size
        p = dict(dtype=dtype, device=device)
        self.attn_norm = _param(h, **p)
        self.qkv = _param(qkv, h, **p)
        self.qkv_bias = _param(qkv, **p) if cfg.qkv_bias else None
        self.q_norm = _param(cfg.head_dim, **p) if cfg.qk_norm else None
        self.k_norm = _param(cfg.head_dim, **p) if cfg.qk_norm else None
        self.o = _param(h, cfg.q_size, **p)
        self.o_bias = _param(h, **p) if cfg.o_bias else None
        self.o_rows = self.o_rows_bias = None  # o split by output rows, for o_gathered (prepare_o_allgather)
        self.mlp_norm = _param(h, **p)
        if cfg.is_moe:  # the experts' gate|up and down stacked: [experts, out, in] (LlamaModel.experts_interleaved)
            self.router = _param(cfg.num_experts, h, **p)
            self.experts_gate_up = _param(cfg.num_experts, 2 * i, h, **p)
            self.experts_down = _param(cfg.num_experts, h, i, **p)
            if s := cfg.shared_expert_intermediate_size:
                self.shared_gate_up = _param(2 * s, h, **p)
                self.shared_down = _param(h, s, **p)
                self.shared_gate = _param(1, h, **p)
            return
        self.gate_up = _param(2 * i, h, **p)
        self.gate_up_bias = _param(2 * i, **p) if cfg.mlp_bias else None
        self.down = _param(h, i, **p)
        self.down_bias = _param(h, **p) if cfg.mlp_bias else None


class LlamaModel(nn.Module):
    def __init__(self, cfg: ModelConfig, dtype: torch.dtype, device: torch.device, max_positions: int,
                 tp: TPGroup = SINGLE):
        """cfg: the whole model's shape; self.cfg is this rank's shard of it."""
        super().__init__()
        self.full_cfg, self.tp = cfg, tp
        cfg = self.cfg = cfg.shard(tp.size)
        self.dtype, self.device = dtype, device
        self.ops = layer_ops(tp.size, cfg.is_moe)
        p = dict(dtype=dtype, device=device)
        # this rank's vocabulary rows [vocab_start, vocab_start + vocab_rows); the last rank's may run past the
        # vocabulary (padding: never looked up, its logits cut off)
        self.vocab_rows = -(-cfg.vocab_size // tp.size)
        self.vocab_start = tp.rank * self.vocab_rows
        self.embed = _param(self.vocab_rows, cfg.hidden_size, **p)
        self.layers = nn.ModuleList(DecoderLayer(cfg, dtype, device) for _ in range(cfg.num_layers))
        self.norm = _param(cfg.hidden_size, **p)
        self.lm_head = self.embed if cfg.tie_word_embeddings else _param(self.vocab_rows, cfg.hidden_size, **p)
        self.register_buffer("cos_sin", cos_sin_table(cfg, max_positions, device), persistent=False)
        self.scale = cfg.head_dim ** -0.5
        self.k = kernels.backend(device)
        # the experts' gate and up rows interleaved, as the backend's experts_mlp takes them (the loader fills them so)
        self.experts_interleaved = cfg.is_moe and self.k.experts_interleaved(dtype)
        self.kv_cache: torch.Tensor | None = None  # [layers, 2, blocks, block_size, kv_heads, head_dim]

    @property
    def capturable(self) -> bool:
        """Whether the forward runs without a host sync, so that a CUDA graph can capture it: the experts need the
        grouped GEMMs (the reference's loop over experts reads the counts on the host)."""
        return not self.cfg.is_moe or self.k.experts_capturable(self.dtype)

    # -- operations over rows [a, b) -------------------------------------------------------------
    def embed_tokens(self, ws: Workspace, batch: ForwardBatch, a: int, b: int) -> None:
        if self.tp.size == 1:
            torch.index_select(self.embed, 0, batch.input_ids[a:b], out=ws.residual[a:b])
            return
        # vocabulary parallel: each rank looks up the tokens in its slice, zeros for the others, and the sum over
        # the ranks is the embedding (not an op of the spec: it precedes the layers)
        local = batch.input_ids[a:b] - self.vocab_start
        outside = (local < 0) | (local >= self.vocab_rows)
        torch.index_select(self.embed, 0, local.masked_fill(outside, 0), out=ws.residual[a:b])
        ws.residual[a:b].masked_fill_(outside.unsqueeze(1), 0)
        all_reduce(ws.residual[a:b])

    def attn_norm(self, l: int, ws: Workspace, batch: ForwardBatch, a: int, b: int) -> None:
        w = self.layers[l].attn_norm
        if l == 0:  # the embedding was written straight into the residual stream
            self.k.rms_norm(ws.residual[a:b], w, self.cfg.rms_norm_eps, out=ws.normed[a:b])
        else:
            self.k.add_rms_norm(ws.hidden[a:b], ws.residual[a:b], w, self.cfg.rms_norm_eps, out=ws.normed[a:b])

    def qkv(self, l: int, ws: Workspace, batch: ForwardBatch, a: int, b: int) -> None:
        layer = self.layers[l]
        _linear(ws.normed[a:b], layer.qkv, layer.qkv_bias, ws.qkv[a:b])

    def _split_qkv(self, ws: Workspace, a: int, b: int):
        c, n = self.cfg, b - a
        qkv = ws.qkv[a:b]
        q = qkv[:, : c.q_size].view(n, c.num_heads, c.head_dim)
        k = qkv[:, c.q_size: c.q_size + c.kv_size].view(n, c.num_kv_heads, c.head_dim)
        v = qkv[:, c.q_size + c.kv_size:].view(n, c.num_kv_heads, c.head_dim)
        return q, k, v

    def rope_kv(self, l: int, ws: Workspace, batch: ForwardBatch, a: int, b: int) -> None:
        q, k, v = self._split_qkv(ws, a, b)
        if (layer := self.layers[l]).q_norm is not None:
            self.k.qk_norm(q, k, layer.q_norm, layer.k_norm, self.cfg.rms_norm_eps)
        self.k.rope_append_kv(q, k, v, batch.positions[a:b], self.cos_sin, self.kv_cache[l, 0], self.kv_cache[l, 1],
                              batch.slot_mapping[a:b])

    def _attention(self, kind: str, l: int, ws: Workspace, batch: ForwardBatch, a: int, b: int) -> None:
        meta = batch.attention(kind, a, b)
        if meta.capacity == 0:
            return
        c, n = self.cfg, ws.qkv.shape[0]
        q = ws.qkv[:, : c.q_size].view(n, c.num_heads, c.head_dim)
        out = ws.attn.view(n, c.num_heads, c.head_dim)
        fn = self.k.decode_attention if kind == DECODE else self.k.prefill_attention
        fn(q, self.kv_cache[l, 0], self.kv_cache[l, 1], meta, self.scale, out, c.window(l))

    def decode_attn(self, l: int, ws: Workspace, batch: ForwardBatch, a: int, b: int) -> None:
        self._attention(DECODE, l, ws, batch, a, b)

    def prefill_attn(self, l: int, ws: Workspace, batch: ForwardBatch, a: int, b: int) -> None:
        self._attention(PREFILL, l, ws, batch, a, b)

    def _row_bias(self, bias: torch.Tensor | None) -> torch.Tensor | None:
        """A row-parallel projection's bias, added on rank 0 only: the all-reduce sums the ranks' outputs."""
        return bias if self.tp.rank == 0 else None

    def o_proj(self, l: int, ws: Workspace, batch: ForwardBatch, a: int, b: int) -> None:
        layer = self.layers[l]
        _linear(ws.attn[a:b], layer.o, self._row_bias(layer.o_bias), ws.hidden[a:b])

    def o_allreduce(self, l: int, ws: Workspace, batch: ForwardBatch, a: int, b: int) -> None:
        all_reduce(ws.hidden[a:b])

    def attn_allgather(self, l: int, ws: Workspace, batch: ForwardBatch, a: int, b: int) -> None:
        all_gather_columns(ws.attn[a:b], ws.attn_all[a:b])

    def o_gathered(self, l: int, ws: Workspace, batch: ForwardBatch, a: int, b: int) -> None:
        layer = self.layers[l]
        _linear(ws.attn_all[a:b], layer.o_rows, layer.o_rows_bias, ws.o_part[a:b])

    def o_allgather(self, l: int, ws: Workspace, batch: ForwardBatch, a: int, b: int) -> None:
        all_gather_columns(ws.o_part[a:b], ws.hidden[a:b])

    def prepare_o_allgather(self) -> None:
        """The weights o_gathered needs: o's rows of this rank's hidden slice, over every rank's query columns,
        gathered from the ranks' shards (a collective: every rank calls it; once, later calls do nothing)."""
        if self.layers[0].o_rows is not None:
            return
        cut = slice(self.tp.rank * self.cfg.hidden_size // self.tp.size,
                    (self.tp.rank + 1) * self.cfg.hidden_size // self.tp.size)
        for layer in self.layers:
            whole = layer.o.new_empty(self.cfg.hidden_size, self.cfg.q_size * self.tp.size)
            all_gather_columns(layer.o.data, whole)
            layer.o_rows = whole[cut].clone()
            layer.o_rows_bias = None if layer.o_bias is None else layer.o_bias.data[cut]

    def mlp_norm(self, l: int, ws: Workspace, batch: ForwardBatch, a: int, b: int) -> None:
        w = self.layers[l].mlp_norm
        self.k.add_rms_norm(ws.hidden[a:b], ws.residual[a:b], w, self.cfg.rms_norm_eps, out=ws.normed[a:b])

    def gate_up(self, l: int, ws: Workspace, batch: ForwardBatch, a: int, b: int) -> None:
        layer = self.layers[l]
        _linear(ws.normed[a:b], layer.gate_up, layer.gate_up_bias, ws.gate_up[a:b])

    def act(self, l: int, ws: Workspace, batch: ForwardBatch, a: int, b: int) -> None:
        self.k.silu_mul(ws.gate_up[a:b], out=ws.act[a:b])

    def down(self, l: int, ws: Workspace, batch: ForwardBatch, a: int, b: int) -> None:
        layer = self.layers[l]
        _linear(ws.act[a:b], layer.down, self._row_bias(layer.down_bias), ws.hidden[a:b])

    def router(self, l: int, ws: Workspace, batch: ForwardBatch, a: int, b: int) -> None:
        _linear(ws.normed[a:b], self.layers[l].router, None, ws.router[a:b])

    def experts(self, l: int, ws: Workspace, batch: ForwardBatch, a: int, b: int) -> None:
        """Each row's top-k experts by token permutation: the (row, expert) pairs sorted by expert, so that each
        expert runs its SwiGLU MLP on contiguous rows (the backend's experts_mlp: grouped GEMMs on the GPU); then
        each row gathers its k outputs, weighted, summed in float32 (moe_combine). Routing as HF Mixtral
        (the backend's moe_route): softmax in float32, top-k, weights renormalized over the k; each row's sum in
        increasing expert order, as HF adds them (Qwen2-MoE: weights not renormalized, then the shared expert's
        output times sigmoid(x · its gate)). Nothing here waits for the host. A CUDA graph's padding rows
        (batch.live_rows) go to no expert. Each expert's rows start at a multiple of the backend's moe_pad for these
        rows, the gap zero rows (the GPU's grouped GEMM then computes its tiles' spare rows from zeros)."""
        layer, c = self.layers[l], self.cfg
        pad = self.k.moe_pad(b - a, c.num_experts_per_tok, c.num_experts)
        rows, where, weights, offs = self.k.moe_route(ws.router[a:b], c.num_experts_per_tok, c.norm_topk_prob,
                                                      batch.live_rows, a, pad)
        x = ws.normed[a:b]
        y = self.k.experts_mlp(self.k.moe_gather(x, rows), layer.experts_gate_up, layer.experts_down, offs, pad)
        shared = None
        if c.shared_expert_intermediate_size:
            act = torch.empty(b - a, c.shared_expert_intermediate_size, dtype=x.dtype, device=x.device)
            self.k.silu_mul(torch.mm(x, layer.shared_gate_up.t()), out=act)
            shared = torch.mm(x, layer.shared_gate.t()).float().sigmoid() * torch.mm(act, layer.shared_down.t()).float()
        self.k.moe_combine(y, where, weights, ws.hidden[a:b], shared)

    down_allreduce = o_allreduce  # the same sum of the ranks' partial hidden rows, after down (or the experts)

    def _local_logits(self, ws: Workspace, rows: torch.Tensor) -> torch.Tensor:
        """This rank's vocabulary slice of the logits of the given rows, in the model's dtype."""
        x = ws.residual.index_select(0, rows) + ws.hidden.index_select(0, rows)
        # plain torch: the row count changes every iteration, and this runs outside the CUDA graph
        x = reference.rms_norm(x, self.norm, self.cfg.rms_norm_eps)
        return torch.mm(x, self.lm_head.t())

    def compute_logits(self, ws: Workspace, rows: torch.Tensor) -> torch.Tensor | None:
        """Logits (float32) of the given rows (on the device). With tensor parallelism, each rank computes its
        vocabulary slice and rank 0, which samples, gathers them; the other ranks get None."""
        logits = self._local_logits(ws, rows)
        if self.tp.size == 1:
            return logits.float()
        # gathered in the model's dtype, widened as placed: the same values as widening first, half the bytes moved
        return gather_columns(logits, self.tp, torch.float32, self.cfg.vocab_size)

    def race_tokens(self, ws: Workspace, rows: torch.Tensor, temperature: torch.Tensor,
                    generator: torch.Generator) -> torch.Tensor | None:
        """With tensor parallelism, the sampler's exponential race for rows that only scale by a temperature
        (ModelRunner decides): each rank races over its own vocabulary slice with noise of its own, and rank 0
        takes the best of the ranks' winners. That is a draw from softmax(logits / T) as racing over the gathered
        logits would be, without moving them; a row of temperature 0 gets the argmax, the lowest id among equal
        logits. Rank 0 gets the tokens (long), the others None."""
        logits = self._local_logits(ws, rows)[:, : self.cfg.vocab_size - self.vocab_start]  # (the padding never wins)
        q = torch.empty(logits.shape, device=logits.device).exponential_(generator=generator)
        best, token = self.k.exponential_race(logits, temperature, q)
        parts = gather(torch.stack((best.double(), (token + self.vocab_start).double()), 1), self.tp)
        if parts is None:
            return None
        ranks = torch.stack(parts)  # [ranks, rows, (score, token)]
        winner = ranks[..., 0].argmax(0, keepdim=True)  # the first of equal scores: the lowest rank, so the lowest id
        return ranks[..., 1].gather(0, winner)[0].long()

    # -- the plain forward: every op over all rows, in order --------------------------------------
    def forward_layers(self, batch: ForwardBatch, ws: Workspace) -> None:
        n = batch.num_tokens
        self.embed_tokens(ws, batch, 0, n)
        for l in range(self.cfg.num_layers):
            for op in self.ops:
                getattr(self, op)(l, ws, batch, 0, n)
