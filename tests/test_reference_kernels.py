"""The plain-torch kernels against independent formulations (dense attention, HF's rope and norm)."""
import pytest
import torch
import torch.nn.functional as F

from nanoflow.config import ModelConfig
from nanoflow.kernels import reference as ref
from nanoflow.layers.rotary import cos_sin_table
from nanoflow.models.batch import ForwardBatch


def paged_cache(kv: list[torch.Tensor], block_size: int, num_blocks: int):
    """Scatter each sequence's [L, H, D] keys into shuffled blocks; return the cache and block tables."""
    h, d = kv[0].shape[1:]
    cache = torch.randn(num_blocks, block_size, h, d)  # garbage elsewhere: must never be read
    free = torch.randperm(num_blocks).tolist()
    tables = []
    for x in kv:
        n = -(-x.shape[0] // block_size)
        blocks = [free.pop() for _ in range(n)]
        tables.append(blocks)
        for i in range(x.shape[0]):
            cache[blocks[i // block_size], i % block_size] = x[i]
    width = max(map(len, tables))
    return cache, torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32)


@pytest.mark.parametrize("window", [None, 5])
def test_paged_attention_matches_dense_causal(window):
    torch.manual_seed(0)
    hq, hkv, d, bs = 8, 2, 16, 4
    seq_lens, q_lens = [1, 13, 9, 1], [1, 6, 9, 1]  # decode, chunked prefill, whole prefill, decode
    ks = [torch.randn(n, hkv, d) for n in seq_lens]
    vs = [torch.randn(n, hkv, d) for n in seq_lens]
    qs = [torch.randn(n, hq, d) for n in q_lens]
    kc, tables = paged_cache(ks, bs, 32)
    vc, _ = paged_cache(vs, bs, 32)
    # the value cache must use the same blocks: rebuild it through the key tables
    vc = torch.randn_like(vc)
    for t, v in zip(tables.tolist(), vs):
        for i in range(v.shape[0]):
            vc[t[i // bs], i % bs] = v[i]
    q = torch.cat(qs)
    out = torch.full_like(q, float("nan"))
    starts = [0]
    for n in q_lens:
        starts.append(starts[-1] + n)
    ref.paged_attention(q, kc, vc, starts, seq_lens, tables, d ** -0.5, out, window)
    for i, (L, n) in enumerate(zip(seq_lens, q_lens)):
        pos_q = torch.arange(L - n, L)[:, None]
        pos_k = torch.arange(L)[None]
        mask = (pos_k <= pos_q) & ((pos_q - pos_k < window) if window else True)
        expect = F.scaled_dot_product_attention(
            qs[i].transpose(0, 1), ks[i].repeat_interleave(hq // hkv, 1).transpose(0, 1),
            vs[i].repeat_interleave(hq // hkv, 1).transpose(0, 1), attn_mask=mask).transpose(0, 1)
        torch.testing.assert_close(out[starts[i]: starts[i + 1]], expect, atol=1e-5, rtol=1e-5)


def test_append_kv_writes_only_its_slots():
    kc, vc = torch.zeros(4, 4, 2, 8), torch.zeros(4, 4, 2, 8)
    k, v = torch.randn(3, 2, 8), torch.randn(3, 2, 8)
    ref.append_kv(k, v, kc, vc, torch.tensor([5, -1, 14]))
    assert torch.equal(kc[1, 1], k[0]) and torch.equal(vc[3, 2], v[2])
    assert int((kc.abs().sum(-1).sum(-1) > 0).sum()) == 2  # the padded row (-1) wrote nothing


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


def test_batch_span_clips_sequences():
    b = ForwardBatch(torch.zeros(10), torch.zeros(10), torch.zeros(10), [0, 1, 2, 6, 10], [7, 3, 4, 12],
                     torch.arange(8).view(4, 2), num_decode=2, logits_rows=torch.zeros(1))
    s = b.span(1, 8)  # second decode row, all of seq 2, the first two rows of seq 3
    assert s.query_start == [0, 1, 5, 7] and s.seq_lens == [3, 4, 10]
    assert s.block_tables.tolist() == [[2, 3], [4, 5], [6, 7]]
