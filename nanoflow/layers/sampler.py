"""Sampling in torch ops, batched over rows with per-row parameters.

Order (as vLLM): allowed_token_ids and logit_bias, penalties, min_tokens bans, temperature, min_p, top_k /
top_p, then an exponential race (argmax of p / q, q ~ Exp(1)), which samples from p without normalizing it; with
no filter it runs on the scaled logits in log space and never computes p (the backend's `exponential_race`: one
fused pass on the GPU). A seeded row draws its q from its own generator, so its result does not depend on the
rest of the batch. Logprobs are of the model's raw distribution (before bias, penalties and temperature), as
vLLM's by default.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from nanoflow.kernels import backend


@dataclass(slots=True)
class SamplingMetadata:
    temperature: torch.Tensor  # [R] float32, 0 = greedy
    top_k: torch.Tensor  # [R] long, 0 = off
    top_p: torch.Tensor  # [R] float32
    min_p: torch.Tensor  # [R] float32
    generators: list[torch.Generator | None]
    logit_bias: torch.Tensor | None = None  # [R, V] float: added to the logits (-inf outside allowed_token_ids)
    repetition_penalty: torch.Tensor | None = None  # [R]; None when no row uses penalties
    presence_penalty: torch.Tensor | None = None
    frequency_penalty: torch.Tensor | None = None
    prompt_mask: torch.Tensor | None = None  # [R, V] bool: token occurs in the prompt
    output_counts: torch.Tensor | None = None  # [R, V] float: occurrences in the output so far
    banned: torch.Tensor | None = None  # [R, V] bool: tokens not allowed yet (min_tokens), unless they alone are
    # known on the host, so that sampling never waits for the GPU to answer a question
    all_greedy: bool = False
    any_greedy: bool = True
    use_min_p: bool = True
    use_top_k_p: bool = True


@dataclass(slots=True)
class LogprobRows:
    """For each row: the logprob and rank of its target token, and the top-k alternatives.

    Tensors while on the device; `tolist()` gives the host lists once the iteration is done."""
    logprob: torch.Tensor | list[float]
    rank: torch.Tensor | list[int]
    top_ids: torch.Tensor | list[list[int]]
    top_logprobs: torch.Tensor | list[list[float]]

    def to(self, device, non_blocking: bool = True) -> "LogprobRows":
        return LogprobRows(*(t.to(device, non_blocking=non_blocking) for t in
                             (self.logprob, self.rank, self.top_ids, self.top_logprobs)))

    def tolist(self) -> "LogprobRows":
        return LogprobRows(self.logprob.tolist(), self.rank.tolist(), self.top_ids.tolist(),
                           self.top_logprobs.tolist())


def apply_penalties(logits: torch.Tensor, md: SamplingMetadata) -> torch.Tensor:
    if md.repetition_penalty is None:
        return logits
    counts = md.output_counts
    seen = md.prompt_mask | (counts > 0)
    rp = md.repetition_penalty[:, None]
    logits = torch.where(seen, torch.where(logits > 0, logits / rp, logits * rp), logits)
    return logits - md.frequency_penalty[:, None] * counts - md.presence_penalty[:, None] * (counts > 0)


def filter_probs(probs: torch.Tensor, md: SamplingMetadata) -> torch.Tensor:
    """Zero the tokens that min_p, top_k and top_p exclude, each on what the one before left (as vLLM: top_p
    takes the nucleus of the distribution renormalized after min_p and top_k)."""
    if md.use_min_p:
        probs = probs.masked_fill(probs < md.min_p[:, None] * probs.amax(-1, keepdim=True), 0.0)
    if md.use_top_k_p:
        sorted_p, order = probs.sort(-1, descending=True)
        kth = sorted_p.gather(-1, (md.top_k[:, None] - 1).clamp(min=0))
        drop = (md.top_k[:, None] > 0) & (sorted_p < kth)  # (the k-th's ties stay, as vLLM's)
        kept = sorted_p.masked_fill(drop, 0.0)
        # a token goes when the mass kept before it already reaches p of all kept (top_p = 1 drops nothing, whatever
        # the rounding)
        p = md.top_p[:, None]
        drop |= ((kept.cumsum(-1) - kept) >= p * kept.sum(-1, keepdim=True)) & (p < 1)
        drop[:, 0] = False
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p.masked_fill(drop, 0.0))
    return probs


def sample(logits: torch.Tensor, md: SamplingMetadata) -> torch.Tensor:
    """logits [R, V] float32 -> token ids [R]."""
    if md.logit_bias is not None:
        logits = logits + md.logit_bias
    logits = apply_penalties(logits, md)
    if md.banned is not None:
        kept = logits.masked_fill(md.banned, float("-inf"))
        # a row the ban would leave no token (a grammar that allows only its end there): the ban yields
        logits = torch.where((kept == float("-inf")).all(-1, keepdim=True), logits, kept)
    if md.all_greedy:
        return logits.argmax(-1)
    filtered = md.use_min_p or md.use_top_k_p
    scores, temp = logits, md.temperature  # unfiltered, the race gives a greedy row (temperature 0) its argmax
    if filtered:
        t = torch.where(md.temperature > 0, md.temperature, 1.0)[:, None]
        scores, temp = filter_probs((logits / t).softmax(-1), md).log(), torch.ones_like(md.temperature)
    q = torch.empty_like(scores).exponential_()
    for i, gen in enumerate(md.generators):
        if gen is not None:
            q[i].exponential_(generator=gen)
    sampled = backend(logits.device).exponential_race(scores, temp, q)[1]
    # filtered, a greedy row takes the logits' argmax (its filtered log-probs may round to ties the logits lack)
    return torch.where(md.temperature > 0, sampled, logits.argmax(-1)) if filtered and md.any_greedy else sampled


def logprob_rows(logprobs: torch.Tensor, targets: torch.Tensor, k: int) -> LogprobRows:
    """logprobs [R, V] (log-softmaxed), targets [R] -> tensors on the same device. A target among the top k takes
    its place there as its rank (the engine's _position), as vLLM's."""
    target_lp = logprobs.gather(-1, targets[:, None])
    rank = (logprobs >= target_lp).sum(-1)  # (among ties the last place, as vLLM's)
    top_lp, top_ids = logprobs.topk(k, dim=-1) if k > 0 else (logprobs[:, :0], targets[:, None][:, :0])
    return LogprobRows(target_lp[:, 0], rank, top_ids, top_lp)
