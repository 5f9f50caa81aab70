"""Needle in a haystack: a fact hidden at a given depth of real text, asked for at the end."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .data import haystack

NEEDLE = "\nRemember: the password is {value}.\n"
QUESTION = "\n\nQuestion: What is the password? Answer: The password is"
DEFAULT_VALUE = "73914"


@dataclass(frozen=True)
class NeedlePrompt:
    input_ids: torch.Tensor  # (1, N)
    value: str
    depth: float

    def passed(self, answer: str) -> bool:
        return self.value in answer


def needle_prompt(tokenizer, length: int, depth: float, value: str = DEFAULT_VALUE, offset: int = 0,
                  source: str = "stdlib") -> NeedlePrompt:
    """A prompt of about ``length`` tokens: real text (``data.haystack``'s ``source``) with the
    needle at ``depth`` (0..1)."""
    needle = tokenizer(NEEDLE.format(value=value), add_special_tokens=False)["input_ids"]
    question = tokenizer(QUESTION, add_special_tokens=False)["input_ids"]
    body = haystack(tokenizer, max(1, length - len(needle) - len(question) - 1), offset, source)
    pos = int(round(len(body) * depth))
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    ids = bos + body[:pos] + needle + body[pos:] + question
    return NeedlePrompt(torch.tensor([ids]), value, depth)


def answer(model, prompt: NeedlePrompt, max_new_tokens: int = 8) -> str:
    """Greedy continuation of the prompt, decoded."""
    with torch.no_grad():
        out = model.generate(prompt.input_ids, attention_mask=torch.ones_like(prompt.input_ids),
                             max_new_tokens=max_new_tokens, do_sample=False)
    return out[0, prompt.input_ids.shape[1]:]
