"""The plain-torch kernels against independent formulations (dense attention, HF's rope and norm)."""
import shutil
import types

import pytest
import torch
import torch.nn.functional as F

from nanoflow.config import ModelConfig
from nanoflow.kernels import reference as ref
from nanoflow.layers.rotary import cos_sin_table
from nanoflow.models.batch import DECODE, PREFILL, ForwardBatch
from attention_cases import dense_kv, make_case


@pytest.mark.parametrize("window", [None, 5])
def test_paged_attention_matches_dense_causal(window):
    # decode, decode, chunked prefill (6 new of 13), whole prefill
    q_lens, seq_lens = [1, 1, 6, 9], [13, 1, 13, 9]
    q, kc, vc, batch = make_case(q_lens, seq_lens, num_decode=2)
    hq, hkv, d = q.shape[1], kc.shape[2], q.shape[2]
    out = torch.full_like(q, float("nan"))
    for kind in (DECODE, PREFILL):
        ref.paged_attention(q, kc, vc, batch.build_attention(kind, 0, q.shape[0], capacity=6), d ** -0.5, out,
                            window)
    for i, (L, n) in enumerate(zip(seq_lens, q_lens)):
        pos_q = torch.arange(L - n, L)[:, None]
        pos_k = torch.arange(L)[None]
        mask = (pos_k <= pos_q) & ((pos_q - pos_k < window) if window else True)
        k = dense_kv(kc, batch.block_tables[i], L).repeat_interleave(hq // hkv, 1)
        v = dense_kv(vc, batch.block_tables[i], L).repeat_interleave(hq // hkv, 1)
        rows = slice(batch.query_start[i], batch.query_start[i + 1])
        expect = F.scaled_dot_product_attention(q[rows].transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
                                                attn_mask=mask).transpose(0, 1)
        torch.testing.assert_close(out[rows], expect, atol=1e-5, rtol=1e-5)


def test_append_kv_writes_only_its_slots():
    kc, vc = torch.zeros(4, 4, 2, 8), torch.zeros(4, 4, 2, 8)
    k, v = torch.randn(3, 2, 8), torch.randn(3, 2, 8)
    ref.append_kv(k, v, kc, vc, torch.tensor([5, 0, 14]))
    assert torch.equal(kc[1, 1], k[0]) and torch.equal(kc[0, 0], k[1]) and torch.equal(vc[3, 2], v[2])
    assert int((kc.abs().sum(-1).sum(-1) > 0).sum()) == 3


def test_rope_and_norm_match_transformers():
    transformers = pytest.importorskip("transformers")
    from transformers.models.llama import modeling_llama as hf
    cfg_kw = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                "high_freq_factor": 4.0, "original_max_position_embeddings": 32},
                  rope_theta=10000.0)
    hf_cfg = transformers.LlamaConfig(**cfg_kw)
    cfg = ModelConfig.from_hf({**hf_cfg.to_dict(), "architectures": ["LlamaForCausalLM"]})
    pos = torch.tensor([0, 3, 17, 100, 255])
    q, k = torch.randn(5, 4, 16), torch.randn(5, 2, 16)
    rot = hf.LlamaRotaryEmbedding(hf_cfg)
    cos, sin = rot(q, pos[None])
    q_ref, k_ref = hf.apply_rotary_pos_emb(q.transpose(0, 1)[None], k.transpose(0, 1)[None], cos, sin)
    ref.rope(q, k, pos, cos_sin_table(cfg, 256, torch.device("cpu")))
    torch.testing.assert_close(q, q_ref[0].transpose(0, 1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(k, k_ref[0].transpose(0, 1), atol=1e-5, rtol=1e-5)
    norm = hf.LlamaRMSNorm(64, eps=1e-6)
    norm.weight.data.normal_()
    x = torch.randn(7, 64)
    torch.testing.assert_close(ref.rms_norm(x, norm.weight.data, 1e-6), norm(x))


def test_attention_metadata_clips_sequences_to_a_range():
    b = ForwardBatch(torch.zeros(10), torch.zeros(10), torch.zeros(10), [0, 1, 2, 6, 10], [7, 3, 4, 12],
                     [[0, 1], [2, 3], [4, 5], [6, 7]], num_decode=2, logits_rows=torch.zeros(1))
    d = b.build_attention(DECODE, 1, 8)  # the second decode row only
    assert d.q_start.tolist() == [1] and d.q_len.tolist() == [1] and d.seq_lens.tolist() == [3]
    p = b.build_attention(PREFILL, 1, 8, capacity=4)  # all of seq 2, the first two rows of seq 3, padding
    assert p.q_start.tolist() == [2, 6, 0, 0] and p.q_len.tolist() == [4, 2, 0, 0]
    assert p.seq_lens.tolist() == [4, 10, 0, 0] and p.block_tables.tolist()[:2] == [[4, 5], [6, 7]]


@pytest.mark.skipif(not (shutil.which("c++") or shutil.which("g++")), reason="inductor on the CPU needs a C++ compiler")
def test_compiled_fusions_keep_widths_static():
    """gpu._compile (the GPU backend's fusions of these functions) compiles each new width anew, with the rows
    dynamic: dynamo would make the width dynamic on its second value, and the activation then ran 1.7x slower on
    an H100 (BENCHMARKS.md, #10 session 12). Here on the CPU: widths 8, 16, 32 give three graphs (two if the
    width turned dynamic), each serving several row counts; the results equal the reference's."""
    from torch._dynamo.utils import counters

    from nanoflow.kernels import gpu
    torch._dynamo.reset()  # dynamo caches graphs on the function's code, whatever torch.compile wrapped it
    silu_mul = gpu._compile(ref.silu_mul)
    before = counters["stats"]["unique_graphs"]
    for width in (8, 16, 32, 16):
        for rows in (3, 5):
            x = torch.randn(rows, 2 * width)
            got = silu_mul(x, out=torch.empty(rows, width))
            torch.testing.assert_close(got, ref.silu_mul(x, torch.empty(rows, width)))
    assert counters["stats"]["unique_graphs"] - before == 3


@pytest.mark.parametrize("pad", [1, 4, 128])
def test_moe_route_pads_each_experts_pairs(pad):
    """moe_route's slots with pad: each expert's pairs start at a multiple of pad, in the packed order (pad 1),
    the gaps hold -1 and moe_gather makes them zero rows; experts_mlp over them and the combine give the packed
    layout's output. Expert 2 is never picked, expert 0 by one row only."""
    g = torch.Generator().manual_seed(pad)
    m, e, k, h, i = 37, 5, 2, 8, 12
    logits = torch.randn(m, e, generator=g)
    logits[:, 2] = float("-inf")
    logits[:, 0] = -30.0
    logits[7, 0] = 30.0
    rows, where, weights, offs = ref.moe_route(logits, k, True, pad=pad)
    p_rows, p_where, p_weights, p_offs = ref.moe_route(logits, k, True)
    assert len(rows) == ref.moe_slots(m, k, e, pad) and torch.equal(weights, p_weights)
    counts = torch.diff(p_offs, prepend=p_offs.new_zeros(1)).tolist()
    assert counts[0] == 1 and counts[2] == 0
    held = torch.zeros(len(rows), dtype=torch.bool)
    start = p_start = 0
    for x, c in enumerate(counts):
        start = -(-start // pad) * pad
        assert offs[x] == start + c
        assert torch.equal(rows[start:start + c], p_rows[p_start:p_start + c]), f"expert {x}"
        held[start:start + c] = True
        start, p_start = start + c, p_start + c
    assert (rows[~held] == -1).all()
    assert torch.equal(rows[where], torch.arange(m)[:, None].expand(m, k))
    x = torch.randn(m, h, generator=g)
    xs = ref.moe_gather(x, rows)
    assert not xs[~held].any() and torch.equal(xs[held], x[p_rows])
    gate_up, down = torch.randn(e, 2 * i, h, generator=g), torch.randn(e, h, i, generator=g)
    y = ref.experts_mlp(xs, gate_up, down, offs, pad)
    p_y = ref.experts_mlp(x[p_rows], gate_up, down, p_offs)
    out, p_out = torch.empty(m, h), torch.empty(m, h)
    torch.testing.assert_close(ref.moe_combine(y, where, weights, out), ref.moe_combine(p_y, p_where, p_weights, p_out))


def test_moe_pad_only_where_experts_average_two_tiles(monkeypatch):
    """The CPU packs the pairs; the GPU pads to its 128 tile rows where the experts average two tiles of pairs or
    more (Mixtral's large batches), not below (Qwen3-30B-A3B's 2,048 rows: 128 pairs an expert). The scratch that
    Workspace.bytes_for counts at the token budget holds every smaller batch's slots."""
    from nanoflow.config import ModelConfig
    from nanoflow.kernels import gpu
    from nanoflow.models.llama import Workspace
    assert {ref.moe_pad(r, 2, 8) for r in (1, 1024, 4096)} == {1}
    assert [gpu.moe_pad(r, 2, 8) for r in (1023, 1024, 2710)] == [1, 128, 128]
    assert [gpu.moe_pad(r, 8, 128) for r in (2048, 4095, 4096)] == [1, 1, 128]
    for k, e, budget in ((2, 8, 4096), (8, 128, 8192), (2, 8, 1000)):
        most = ref.moe_slots(budget, k, e, gpu.moe_pad(budget, k, e))
        assert all(ref.moe_slots(r, k, e, gpu.moe_pad(r, k, e)) <= most for r in range(1, budget + 1))
    cfg = ModelConfig("mixtral", vocab_size=32, hidden_size=16, intermediate_size=24, num_layers=1, num_heads=2,
                      num_kv_heads=1, head_dim=8, num_experts=8, num_experts_per_tok=2)
    padded = types.SimpleNamespace(moe_pad=gpu.moe_pad, experts_scratch=ref.experts_scratch)
    extra = [Workspace.bytes_for(cfg, rows, torch.bfloat16, kernels=padded) - Workspace.bytes_for(
        cfg, rows, torch.bfloat16) for rows in (1000, 1024)]
    assert extra == [0, 8 * 127 * (2 * 16 + 5 * 24) * 2]  # each expert's gap of up to 127 slots of its 4 rows
    # Triton's experts (16-bit) never write gate|up's [slots, 2 I] product nor temporaries; they take split-K pieces
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(gpu.sm_share, "total_sms", lambda device: 132)
    slots = ref.moe_slots(1024, 2, 8, 128)
    for dtype, saved in ((torch.bfloat16, slots * 4 * 24 * 2 - 2 * 132 * (128 * 256 * 4 + 4)), (torch.float32, 0)):
        assert Workspace.bytes_for(cfg, 1024, dtype, kernels=padded) - Workspace.bytes_for(
            cfg, 1024, dtype, kernels=gpu) == saved
