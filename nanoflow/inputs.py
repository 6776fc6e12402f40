"""The prompt dicts' types, under vLLM's names (`from vllm import TextPrompt, TokensPrompt` ports as is)."""
from typing import TypedDict


class TextPrompt(TypedDict):
    prompt: str


class TokensPrompt(TypedDict, total=False):
    prompt_token_ids: list[int]  # (required)
    prompt: str  # the text they stand for, the output's prompt (a rendered chat's)
