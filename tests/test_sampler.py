"""The sampler's filters and penalties, on synthetic logits."""
import pytest
import torch

from nanoflow.kernels import reference as ref
from nanoflow.layers.sampler import SamplingMetadata, apply_penalties, filter_probs, logprob_rows, sample

V = 50


def md(rows, **kw):
    cols = dict(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0)
    cols.update(kw)
    return SamplingMetadata(torch.full((rows,), float(cols["temperature"])), torch.full((rows,), cols["top_k"]),
                            torch.full((rows,), float(cols["top_p"])), torch.full((rows,), float(cols["min_p"])),
                            [None] * rows, all_greedy=cols["temperature"] == 0)


def draws(logits, m, n=4000):
    torch.manual_seed(0)
    return torch.stack([sample(logits, m) for _ in range(n // logits.shape[0])]).flatten().unique().tolist()


@pytest.fixture
def logits():
    g = torch.Generator().manual_seed(1)
    return torch.randn(1, V, generator=g) * 2


def test_greedy_is_argmax(logits):
    assert sample(logits, md(1, temperature=0)).item() == logits.argmax().item()


def test_top_k_restricts_support(logits):
    support = set(draws(logits, md(1, top_k=3)))
    assert support == set(logits[0].topk(3).indices.tolist())


def test_top_k_keeps_the_kths_ties():
    """(as vLLM's: bf16 logits tie often; the tokens tied with the k-th all stay)"""
    logits = torch.tensor([[2.0, 1.0, 1.0, 1.0, 0.0]])
    assert set(draws(logits, md(1, top_k=2))) == {0, 1, 2, 3}
    assert set(draws(logits, md(1, top_k=1))) == {0}


def test_top_p_restricts_support_to_the_nucleus(logits):
    probs = logits[0].softmax(-1)
    p_sorted, order = probs.sort(descending=True)
    k = int((p_sorted.cumsum(0) < 0.6).sum()) + 1  # smallest prefix reaching 0.6
    support = set(draws(logits, md(1, top_p=0.6)))
    assert support == set(order[:k].tolist())


def test_min_p_restricts_support(logits):
    probs = logits[0].softmax(-1)
    allowed = set(torch.nonzero(probs >= 0.2 * probs.max()).flatten().tolist())
    assert set(draws(logits, md(1, min_p=0.2))) == allowed


def test_filters_compose_per_row():
    logits = torch.randn(2, V)
    m = md(2)
    m.top_k = torch.tensor([1, 0])
    probs = filter_probs(logits.softmax(-1), m)
    assert (probs[0] > 0).sum() == 1 and (probs[1] > 0).sum() == V


def _vllm_support(probs: torch.Tensor, top_k: int, top_p: float, min_p: float) -> set[int]:
    """The tokens vLLM may sample: min_p, then top_k, then top_p on what is left, renormalized."""
    keep = probs >= min_p * probs.max()
    if top_k:
        keep &= probs >= probs[keep].topk(min(top_k, int(keep.sum()))).values[-1]
    left = torch.where(keep, probs, 0.0)
    left = left / left.sum()
    p_sorted, order = left.sort(descending=True)
    nucleus = order[:int(((p_sorted.cumsum(0) - p_sorted) < top_p).sum())]
    return set(nucleus.tolist()) & set(torch.nonzero(keep).flatten().tolist())


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a GPU"))])
@pytest.mark.parametrize("top_k, top_p, min_p", [(5, 0.5, 0.0), (0, 0.4, 0.3), (8, 0.7, 0.1), (3, 1.0, 0.0)])
def test_filters_compose_as_vllm(logits, top_k, top_p, min_p, device):
    """top_p takes the nucleus of what min_p and top_k left, renormalized (not of the raw distribution)."""
    allowed = _vllm_support(logits[0].softmax(-1), top_k, top_p, min_p)
    m = md(1, top_k=top_k, top_p=top_p, min_p=min_p)
    for name in ("temperature", "top_k", "top_p", "min_p"):
        setattr(m, name, getattr(m, name).to(device))
    logits = logits.to(device)
    probs = filter_probs(logits.softmax(-1), m)
    assert set(torch.nonzero(probs[0]).flatten().tolist()) == allowed
    assert set(draws(logits, m)) == allowed


def test_temperature_sharpens(logits):
    torch.manual_seed(0)
    cold = [sample(logits, md(1, temperature=0.05)).item() for _ in range(200)]
    assert cold.count(logits.argmax().item()) > 190


def test_sampling_follows_the_distribution():
    logits = torch.tensor([[0.0, 1.0, 2.0]]).log_softmax(-1)
    torch.manual_seed(0)
    counts = torch.bincount(torch.stack([sample(logits.expand(1000, 3), md(1000)) for _ in range(10)]).flatten(),
                            minlength=3).float()
    assert torch.allclose(counts / counts.sum(), logits.exp()[0], atol=0.02)


def test_temperature_scales_the_distribution():
    """The unfiltered race runs on logits / T in log space: its draws follow softmax(logits / T)."""
    logits = torch.tensor([[0.0, 1.0, 2.0]])
    torch.manual_seed(0)
    m = md(1000, temperature=2.0)
    m.any_greedy = False
    counts = torch.bincount(torch.stack([sample(logits.expand(1000, 3), m) for _ in range(10)]).flatten(),
                            minlength=3).float()
    assert torch.allclose(counts / counts.sum(), (logits / 2).softmax(-1)[0], atol=0.02)


def test_greedy_and_sampled_rows_mix():
    logits = torch.randn(4, V) * 3
    m = md(4)
    m.temperature = torch.tensor([0.0, 1.0, 0.0, 1.0])
    got = sample(logits, m)
    assert got[0] == logits[0].argmax() and got[2] == logits[2].argmax()
    m.use_min_p = m.use_top_k_p = False  # unfiltered: the race itself gives the greedy rows their argmax
    for _ in range(20):
        got = sample(logits, m)
        assert got[0] == logits[0].argmax() and got[2] == logits[2].argmax()


def test_race_never_picks_an_excluded_token():
    """q of exactly 0 (an Exp(1) draw can round to it) must not let a -inf score win."""
    scores = torch.tensor([[float("-inf"), 0.5, float("-inf"), -1.0]])
    assert ref.exponential_race(scores, torch.ones(1), torch.zeros_like(scores))[1].item() == 1
    q = torch.tensor([[0.0, 1.0, 0.0, 1e-3]])
    assert ref.exponential_race(scores, torch.ones(1), q)[1].item() == 3


def test_penalties_as_specified():
    logits = torch.tensor([[2.0, -2.0, 1.0, 0.5]])
    m = md(1)
    m.repetition_penalty = torch.tensor([2.0])
    m.presence_penalty = torch.tensor([0.5])
    m.frequency_penalty = torch.tensor([0.25])
    m.prompt_mask = torch.tensor([[True, False, False, False]])
    m.output_counts = torch.tensor([[0.0, 1.0, 3.0, 0.0]])
    out = apply_penalties(logits, m)
    # token 0: prompt only -> 2 / 2; token 1: negative, seen once -> -2 * 2 - 0.25 - 0.5
    # token 2: seen 3 times -> 1 / 2 - 0.75 - 0.5; token 3: unseen
    assert out[0].tolist() == pytest.approx([1.0, -4.75, -0.75, 0.5])


def test_logit_bias_comes_before_the_penalties():
    """vLLM's order: the bias is added to the raw logits, then a repetition penalty divides the biased logit.
    Biased first, token 2 is (0.5 + 3) / 2 = 1.75 < 2 and token 0 wins; penalized first it would be 3.25."""
    m = md(1, temperature=0)
    m.logit_bias = torch.tensor([[0.0, 0.0, 3.0, 0.0]])
    m.repetition_penalty, m.presence_penalty, m.frequency_penalty = (torch.tensor([v]) for v in (2.0, 0.0, 0.0))
    m.prompt_mask = torch.tensor([[False, False, True, False]])
    m.output_counts = torch.zeros(1, 4)
    assert sample(torch.tensor([[2.0, 1.0, 0.5, -1.0]]), m).item() == 0
    m.repetition_penalty = torch.tensor([1.0])
    assert sample(torch.tensor([[2.0, 1.0, 0.5, -1.0]]), m).item() == 2


@pytest.mark.parametrize("kw", [dict(), dict(top_k=5)])
def test_allowed_tokens_alone_are_drawn(logits, kw):
    """allowed_token_ids: the others' logits are -inf (unfiltered, through the race; filtered, through the probs)."""
    m = md(1, **kw)
    m.logit_bias = torch.full((1, V), float("-inf"))
    m.logit_bias[0, [3, 7, 40]] = 0.0
    drawn = set(draws(logits, m, 600))
    assert drawn <= {3, 7, 40} and len(drawn) >= 2


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_the_min_tokens_ban_yields_where_it_would_leave_no_token(temperature):
    """Row 0: the ban takes token 3 of {3, 7}: 7. Row 1: a grammar allows only its end (token 3), which the ban
    takes too: 3, not a token outside the grammar (-inf everywhere drew any)."""
    logits = torch.full((2, V), float("-inf"))
    logits[0, [3, 7]] = 1.0
    logits[1, 3] = 1.0
    m = md(2, temperature=temperature)
    m.banned = torch.zeros(2, V, dtype=torch.bool)
    m.banned[:, 3] = True
    assert sample(logits, m).tolist() == [7, 3]


def test_seeded_rows_are_reproducible(logits):
    m = md(3)
    m.generators = [torch.Generator().manual_seed(5), None, torch.Generator().manual_seed(5)]
    a = sample(logits.expand(3, V), m)
    m.generators = [torch.Generator().manual_seed(5), None, torch.Generator().manual_seed(5)]
    b = sample(logits.expand(3, V), m)
    assert a[0] == b[0] == a[2] == b[2]


def test_logprob_rows_rank_and_topk(logits):
    lp = logits.log_softmax(-1)
    target = lp[0].argsort()[-3]  # third most likely
    rows = logprob_rows(lp, target[None], 4).tolist()
    assert rows.rank == [3] and rows.logprob[0] == pytest.approx(lp[0, target].item())
    assert rows.top_ids[0] == lp[0].topk(4).indices.tolist()
    # ties: the target's rank is the last place among them (vLLM's count of logprobs >= its own)
    tied = torch.tensor([[1.0, 1.0, 0.0]]).log_softmax(-1)
    assert logprob_rows(tied, torch.tensor([1]), 0).tolist().rank == [2]
    # and one among the top k takes its place there: each rank once in an entry (the engine's, as vLLM's)
    from types import SimpleNamespace

    from nanoflow.engine.llm_engine import LLMEngine
    for target, ranks in ((1, {1: 2, 0: 1}), (0, {0: 1, 1: 2})):
        rows = logprob_rows(tied, torch.tensor([target]), 2).tolist()
        entry = LLMEngine._position(SimpleNamespace(tokenizer=None), rows, 0, target, 2, False)
        assert {t: lp.rank for t, lp in entry.items()} == ranks and next(iter(entry)) == target
