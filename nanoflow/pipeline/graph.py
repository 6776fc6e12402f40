"""Data dependencies between nano-ops: which nano-ops' outputs a nano-op reads.

Ops work on rows, so a nano-op depends on the nano-ops of its input op whose rows overlap its own.
Two exceptions: the first norm of a layer reads the previous layer's `down` (or the embedding), and
prefill attention reads the KV of every earlier row of its sequences, so it depends on the KV append
(`rope_kv`) of every range that starts before its end. With tensor parallelism, o_proj's and down's outputs are
complete only after their all-reduce, which their readers then wait for instead; in the all-gather form, o_gathered
reads the gathered attention outputs and mlp_norm the gathered projection. A mixture-of-experts layer's
MLP is router then experts (which reads the normed rows and the router's logits).
"""
from __future__ import annotations

from nanoflow.models.llama import NETWORK_OPS
from nanoflow.pipeline.spec import NanoOp

INPUTS = {"qkv": ("attn_norm",), "rope_kv": ("qkv",), "decode_attn": ("rope_kv",), "prefill_attn": ("rope_kv",),
          "o_proj": ("decode_attn", "prefill_attn"), "mlp_norm": ("o_proj",), "gate_up": ("mlp_norm",),
          "act": ("gate_up",), "down": ("act",), "router": ("mlp_norm",), "experts": ("mlp_norm", "router")}
TP_INPUTS = INPUTS | {"o_allreduce": ("o_proj",), "attn_allgather": ("decode_attn", "prefill_attn"),
                      "o_gathered": ("attn_allgather",), "o_allgather": ("o_gathered",),
                      "mlp_norm": ("o_allreduce", "o_allgather"), "down_allreduce": ("down", "experts")}


def _tensor_parallel(layer: list[NanoOp]) -> bool:
    return any(m.op in NETWORK_OPS for m in layer)


def _overlap(a: NanoOp, b: NanoOp) -> bool:
    return a.start < b.end and b.start < a.end


def dependencies(n: NanoOp, layer: list[NanoOp]) -> list[NanoOp]:
    """The nano-ops of the same layer whose outputs n reads (attn_norm's inputs are in the layer before)."""
    deps = []
    inputs = (TP_INPUTS if _tensor_parallel(layer) else INPUTS).get(n.op, ())
    for m in layer:
        if m.op not in inputs or m.start == m.end:
            continue
        if _overlap(m, n) or (n.op == "prefill_attn" and m.start < n.end):
            deps.append(m)
    return deps


def previous_layer_dependencies(n: NanoOp, layer: list[NanoOp]) -> list[NanoOp]:
    """For a layer's first norm: the previous layer's `down` (`down_allreduce`, `experts`) nano-ops it reads."""
    if n.op != "attn_norm":
        return []
    last = "down_allreduce" if _tensor_parallel(layer) else "experts" if any(m.op == "experts" for m in layer) \
        else "down"
    return [m for m in layer if m.op == last and m.start < m.end and _overlap(m, n)]
