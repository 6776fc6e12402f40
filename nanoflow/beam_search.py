"""Beam search, as vLLM's `LLM.beam_search`: each prompt's `beam_width` likeliest continuations, grown one token a
step through the engine. Every live beam is a one-token request for its 2 * beam_width likeliest next tokens (so
that beam_width of them remain after those that end at an end-of-sequence token); of all the beams' candidates the
beam_width highest-scoring go on. The prefix cache serves what the beams share (the prompt, earlier tokens), so a
step mostly computes each beam's newest tokens. A beam's score is its summed logprob over its length (the prompt's
tokens counted, a final end-of-sequence token not) to the power length_penalty, as vLLM's and HF's."""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

from tqdm import tqdm

from nanoflow.outputs import PositionLogprobs, RequestOutput
from nanoflow.sampling_params import MAX_LOGPROBS, SamplingParams, finite_number, natural


@dataclass(slots=True)
class BeamSearchParams:
    beam_width: int
    max_tokens: int
    ignore_eos: bool = False  # an end-of-sequence token is then a token like any other
    # vLLM's: its beams are ranked by the model's raw logprobs, which a temperature does not change (nor here)
    temperature: float = 0.0
    length_penalty: float = 1.0  # > 1 favours longer beams, < 1 shorter ones (with ends before max_tokens)
    include_stop_str_in_output: bool = False  # a beam's final end-of-sequence token in its text too

    def __post_init__(self):
        def check(ok, name, rule):
            if not ok:
                raise ValueError(f"invalid beam search parameter {name}={getattr(self, name)!r}: {rule}")
        width = MAX_LOGPROBS // 2  # each beam asks for 2 * beam_width logprobs
        check(natural(self.beam_width) and 1 <= self.beam_width <= width, "beam_width",
              f"must be an integer in [1, {width}]")
        check(natural(self.max_tokens) and self.max_tokens >= 1, "max_tokens", "must be an integer >= 1")
        check(isinstance(self.ignore_eos, bool), "ignore_eos", "must be true or false")
        check(finite_number(self.temperature) and self.temperature >= 0, "temperature", "must be a finite number >= 0")
        check(finite_number(self.length_penalty), "length_penalty", "must be a finite number")
        check(isinstance(self.include_stop_str_in_output, bool), "include_stop_str_in_output", "must be true or false")


@dataclass(slots=True)
class BeamSearchSequence:
    tokens: list[int]  # the prompt's, then the beam's
    logprobs: list[PositionLogprobs] = field(default_factory=list)  # per beam token: the candidates it was among
    cum_logprob: float = 0.0  # the beam's tokens' logprobs, summed
    # the beam's tokens decoded (not the prompt's, nor a final end-of-sequence token unless
    # include_stop_str_in_output); LLM.beam_search's, as vLLM's: every token's, the prompt's too
    text: str | None = None
    finish_reason: str | None = None  # "stop": an end-of-sequence token; "length": max_tokens or the context;
    # "abort": its step was aborted (the server's shutdown)
    stop_reason: int | None = None  # the end-of-sequence token that ended it


@dataclass(slots=True)
class BeamSearchOutput:
    sequences: list[BeamSearchSequence]  # the beam_width best (fewer if the vocabulary allows fewer), best first


def rank_key(seq: BeamSearchSequence, length_penalty: float) -> float:
    """A key that orders beams as cum_logprob / length ** length_penalty does, without computing the power (which
    overflows a float at large penalties): logprobs are <= 0, so the larger score has the smaller log magnitude."""
    if seq.cum_logprob == 0:
        return math.inf
    return length_penalty * math.log(len(seq.tokens) - (seq.finish_reason == "stop")) - math.log(-seq.cum_logprob)


class Beams:
    """A search's state over a batch of prompts (token ids): each prompt's live beams and those that ended. A step
    runs requests() (one one-token request each, with step_params) and hands their outputs to advance()."""

    def __init__(self, prompts: list[list[int]], params: BeamSearchParams, eos_token_ids: set[int],
                 max_model_len: int, logprobs: int = 0):
        """logprobs: how many top logprobs each beam token should carry (the candidates are the top 2 * beam_width
        whatever it is)."""
        self.params, self.eos_token_ids, self.max_model_len = params, eos_token_ids, max_model_len
        self.prompts = [list(p) for p in prompts]
        self.live = [[BeamSearchSequence(list(p))] for p in prompts]
        self.ended: list[list[BeamSearchSequence]] = [[] for _ in prompts]
        self.steps = 0
        self.step_params = SamplingParams(temperature=0.0, max_tokens=1, logprobs=max(2 * params.beam_width, logprobs),
                                          ignore_eos=True)

    @property
    def done(self) -> bool:
        return not any(self.live)

    def requests(self) -> list[list[int]]:
        """The live beams' tokens, one request each."""
        return [b.tokens for beams in self.live for b in beams]

    def advance(self, outputs: list[RequestOutput]) -> None:
        """Each live beam's one-token output, in requests()' order: every candidate grows a beam; those at an
        end-of-sequence token end, the beam_width best of the others go on (or end at max_tokens or the context)."""
        p = self.params
        outputs = iter(outputs)
        self.steps += 1
        for i, beams in enumerate(self.live):
            grown = []
            for beam in beams:
                out = next(outputs).outputs[0]
                if out.finish_reason == "abort":  # (no token, no logprobs)
                    beam.finish_reason = "abort"
                    self.ended[i].append(beam)
                    continue
                candidates = out.logprobs[0]
                for token, lp in candidates.items():
                    if lp.rank > 2 * p.beam_width:  # (carried for the logprobs asked, not a candidate)
                        continue
                    seq = BeamSearchSequence(beam.tokens + [token], beam.logprobs + [candidates],
                                             beam.cum_logprob + lp.logprob)
                    if token in self.eos_token_ids and not p.ignore_eos:
                        seq.finish_reason, seq.stop_reason = "stop", token
                        self.ended[i].append(seq)
                    else:
                        grown.append(seq)
            grown = sorted(grown, key=lambda s: rank_key(s, p.length_penalty), reverse=True)[:p.beam_width]
            for seq in grown:
                if self.steps == p.max_tokens or len(seq.tokens) >= self.max_model_len:
                    seq.finish_reason = "length"
            self.ended[i] += [s for s in grown if s.finish_reason]
            self.live[i] = [s for s in grown if not s.finish_reason]

    def abort(self) -> None:
        """End the live beams now, aborted (as a step whose requests were aborted ends them)."""
        for ended, live in zip(self.ended, self.live):
            for beam in live:
                beam.finish_reason = "abort"
            ended += live
        self.live = [[] for _ in self.live]

    def results(self, decode: Callable[[list[int]], str] | None = None) -> list[BeamSearchOutput]:
        """Each prompt's beam_width best ended beams, best first; decode: token ids to text (None: no text)."""
        results = []
        for prompt, ended in zip(self.prompts, self.ended):
            best = sorted(ended, key=lambda s: rank_key(s, self.params.length_penalty),
                          reverse=True)[:self.params.beam_width]
            for s in best:
                if decode is not None:
                    end = s.finish_reason == "stop" and not self.params.include_stop_str_in_output
                    s.text = decode(s.tokens[len(prompt):len(s.tokens) - end])
            results.append(BeamSearchOutput(best))
        return results


def beam_search(generate: Callable[[list[dict], SamplingParams], list[RequestOutput]], prompts: list[list[int]],
                params: BeamSearchParams, eos_token_ids: set[int], max_model_len: int,
                decode: Callable[[list[int]], str] | None = None, use_tqdm: bool = False) -> list[BeamSearchOutput]:
    """The search run to its end through generate(prompts, params): one output per prompt dict (LLM.generate)."""
    beams = Beams(prompts, params, eos_token_ids, max_model_len)
    with tqdm(total=params.max_tokens, desc="beam search", disable=not use_tqdm) as bar:
        while not beams.done:
            beams.advance(generate([{"prompt_token_ids": t} for t in beams.requests()], beams.step_params))
            bar.update(1)
    return beams.results(decode)
