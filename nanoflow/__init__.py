"""nanoflow: a throughput-oriented LLM serving engine (NanoFlow's nano-batched pipeline)."""
from nanoflow.beam_search import BeamSearchOutput, BeamSearchParams, BeamSearchSequence
from nanoflow.entrypoints.llm import LLM
from nanoflow.inputs import TextPrompt, TokensPrompt
from nanoflow.outputs import CompletionOutput, Logprob, RequestOutput
from nanoflow.sampling_params import SamplingParams

__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput", "Logprob", "BeamSearchParams",
           "BeamSearchOutput", "BeamSearchSequence", "TextPrompt", "TokensPrompt"]
__version__ = "0.1.0"
