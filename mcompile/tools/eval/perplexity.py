"""Perplexity on real long text over sliding windows at the model's full context.

Windows of ``window`` tokens start every ``stride`` tokens; the first window scores all of its
tokens, every later one only its last ``stride`` (new) tokens, so each token is scored once with
at least ``window - stride`` tokens of context (the usual sliding-window protocol). Only the
decoder (``model.get_decoder()``) runs compiled: the prefill attention is what minference
rewrites, and the vocabulary projection and cross-entropy are done here in chunks of
``LOGIT_ROWS`` positions, so an 8K window never holds an 8K x vocabulary logit tensor.

The text is the standard-library documentation of ``mcompile.tools.data`` (real technical English
that ships with Python; nothing can be downloaded here).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..data import _tokenized, haystack  # the tokenized text, cached

log = logging.getLogger(__name__)

LOGIT_ROWS = 1024  # positions per chunk of the vocabulary projection (1024 x 49152 fp32 = 200 MB)


@dataclass(frozen=True)
class Window:
    start: int  # first token of the window in the text
    scored: int  # tokens scored in it
    nll: float  # their summed negative log-likelihood (nats)


def windows(total: int, window: int, stride: int) -> list[tuple[int, int]]:
    """(start, first scored position within the window) of each window over ``total`` tokens."""
    if not 0 < stride <= window:
        raise ValueError(f"need 0 < stride <= window, got stride {stride}, window {window}")
    if total < window:
        raise ValueError(f"the text has {total} tokens, fewer than one window of {window}")
    out = [(0, 1)]  # position 0 has no prediction
    start = stride
    while start + window <= total:
        out.append((start, window - stride))
        start += stride
    return out


def text_tokens(tokenizer, tokens: int = 0) -> list[int]:
    """The first ``tokens`` tokens of the text (0: all of it); never repeats the text."""
    available = len(_tokenized(tokenizer))
    if tokens > available:
        log.warning("perplexity: the text has %d tokens, fewer than the %d asked for; scoring all of it",
                    available, tokens)
    return haystack(tokenizer, min(tokens, available) if tokens > 0 else available)


def window_nll(decoder, head, ids: torch.Tensor, first: int) -> tuple[float, int]:
    """Summed NLL of ``ids[0, first:]`` given everything before, and the count."""
    with torch.no_grad():
        hidden = decoder(input_ids=ids, use_cache=False).last_hidden_state  # (1, W, hidden)
        total = torch.zeros((), dtype=torch.float64, device=ids.device)
        for r0 in range(first - 1, ids.shape[1] - 1, LOGIT_ROWS):
            r1 = min(ids.shape[1] - 1, r0 + LOGIT_ROWS)
            logits = head(hidden[:, r0:r1]).float()  # (1, rows, vocab), predicting tokens r0+1 .. r1
            total += F.cross_entropy(logits[0], ids[0, r0 + 1:r1 + 1], reduction="sum").double()
    return total.item(), ids.shape[1] - first  # one host read per window


def perplexity(model, tokens: list[int], window: int, stride: int, device: str = "cpu",
               decoder: torch.nn.Module | None = None,
               on_window: Callable[[Window], None] | None = None) -> dict:
    """Sliding-window perplexity of ``tokens``; ``decoder`` is the (compiled) decoder to run,
    by default ``model.get_decoder()``."""
    decoder = decoder if decoder is not None else model.get_decoder()
    head = model.get_output_embeddings()
    results = []
    for start, first in windows(len(tokens), window, stride):
        ids = torch.tensor([tokens[start:start + window]], device=device)
        nll, count = window_nll(decoder, head, ids, first)
        w = Window(start, count, nll)
        results.append(w)
        if on_window is not None:
            on_window(w)
    nll = sum(w.nll for w in results)
    count = sum(w.scored for w in results)
    return {"window": window, "stride": stride, "tokens": len(tokens), "scored": count,
            "perplexity": math.exp(nll / count),
            "windows": [{"start": w.start, "scored": w.scored, "perplexity": math.exp(w.nll / w.scored)}
                        for w in results]}
