"""Data dependencies between nano-ops: which nano-ops' outputs a nano-op reads.

Ops work on rows, so a nano-op depends on the nano-ops of its input op whose rows overlap its own.
Two exceptions: the first norm of a layer reads the previous layer's `down` (or the embedding), and
prefill attention reads the KV of every earlier row of its sequences, so it depends on the KV append
(`rope_kv`) of every range that starts before its end.
"""
from __future__ import annotations

from nanoflow.pipeline.spec import NanoOp

INPUTS = {"qkv": ("attn_norm",), "rope_kv": ("qkv",), "decode_attn": ("rope_kv",), "prefill_attn": ("rope_kv",),
          "o_proj": ("decode_attn", "prefill_attn"), "mlp_norm": ("o_proj",), "gate_up": ("mlp_norm",),
          "act": ("gate_up",), "down": ("act",)}


def _overlap(a: NanoOp, b: NanoOp) -> bool:
    return a.start < b.end and b.start < a.end


def dependencies(n: NanoOp, layer: list[NanoOp]) -> list[NanoOp]:
    """The nano-ops of the same layer whose outputs n reads (attn_norm's inputs are in the layer before)."""
    deps = []
    for m in layer:
        if m.op not in INPUTS.get(n.op, ()) or m.start == m.end:
            continue
        if _overlap(m, n) or (n.op == "prefill_attn" and m.start < n.end):
            deps.append(m)
    return deps


def previous_layer_dependencies(n: NanoOp, layer: list[NanoOp]) -> list[NanoOp]:
    """For a layer's first norm: the previous layer's `down` nano-ops it reads."""
    if n.op != "attn_norm":
        return []
    return [m for m in layer if m.op == "down" and m.start < m.end and _overlap(m, n)]
