"""Context parallelism for prefill: the sequence split across ranks, sparse attention per rank.

A prompt too long for one device (or too slow on one) is split along the sequence over the ranks
of a process group: every rank runs the model's per-token work (embeddings, norms, MLP, RoPE
with its own positions) on its share only, and attention is the one place ranks meet. Each
rank all-gathers the K/V shards (``torch.distributed.all_gather``: NCCL on GPUs, gloo on CPU),
puts them back in sequence order, and answers its own queries over the keys before them:
for each of its position ranges ``[s, e)``, ``serving.request_attention`` of those queries over
keys ``[0, e)`` (a chunk after a prefix, bottom-right causal: the index is estimated over every
key the chunk sees; dense when the whole prompt is below ``dense_below``, budgets scaled to the
whole prompt). For block-mass (the default), A-shape and block-sparse heads the result is one
process's sparse attention (each block of 64 queries estimates its own tiles, and shard
boundaries are multiples of 64); vertical-slash estimates each range from its own last queries,
as chunked prefill does.

Layouts (``shard_ranges``): ``zigzag`` (default) gives rank r chunks r and 2P-1-r of 2P equal
chunks, so every rank has about the same causal work; ``contiguous`` gives rank r the r-th of P.

Communication: each rank receives every other rank's K/V shard once per layer,
``(P - 1)/P x N x 2 Hk D`` elements, as ring attention moves (docs/CONTEXT_PARALLEL.md: the
index's kept tiles, united over a rank's query blocks, cover 93-99% of the remote tiles on real
heads, so fetching only kept tiles would save little). Memory: one layer's whole K/V is held
while its attention runs, then freed; the rest of the model holds only the rank's share.
Prefill only: no KV cache is kept (``use_cache=False``), no gradients.

    group = torch.distributed.new_group(...)  # or the default group
    logits = mcompile.context_parallel.prefill(model, input_ids, options={"dense_below": 0})
"""

from __future__ import annotations

import contextlib
import functools
from typing import Iterator, Optional

import torch
import torch.distributed as dist
from torch._dynamo.utils import counters

from .config import MInferenceConfig
from .index import BLOCK
from .serving import request_attention

LAYOUTS = ("zigzag", "contiguous")
ATTENTION_NAME = "mcompile_context_parallel"


def shard_ranges(n: int, world: int, rank: int, layout: str = "zigzag") -> list[tuple[int, int]]:
    """The position ranges ``[start, end)`` rank ``rank`` of ``world`` holds of a sequence of ``n``,
    in the order its shard concatenates them. ``n`` must split into equal chunks that are whole
    query blocks (``world * 64`` for contiguous, ``2 * world * 64`` for zigzag): equal shards for
    the collectives, and block boundaries where one process would have them."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {list(LAYOUTS)}, got {layout!r}")
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"rank {rank} of world {world}: need 0 <= rank < world")
    parts = 2 * world if layout == "zigzag" else world
    if n % (parts * BLOCK):
        raise ValueError(f"context parallelism ({layout}, {world} ranks) needs a length divisible by "
                         f"{parts * BLOCK} ({parts} chunks of whole {BLOCK}-query blocks), got {n}: pad the prompt")
    size = n // parts
    chunks = [rank, parts - 1 - rank] if layout == "zigzag" else [rank]
    return [(c * size, (c + 1) * size) for c in chunks]


def shard(x: torch.Tensor, dim: int, world: int, rank: int, layout: str = "zigzag") -> torch.Tensor:
    """Rank ``rank``'s share of ``x`` along ``dim`` (``shard_ranges`` of its size there)."""
    ranges = shard_ranges(x.shape[dim], world, rank, layout)
    return torch.cat([x.narrow(dim, s, e - s) for s, e in ranges], dim)


def unshard(parts: list[torch.Tensor], dim: int, layout: str = "zigzag") -> torch.Tensor:
    """The whole sequence from every rank's share (rank order), inverse of ``shard``."""
    world = len(parts)
    n = sum(p.shape[dim] for p in parts)
    pieces = {}
    for rank, part in enumerate(parts):
        offset = 0
        for s, e in shard_ranges(n, world, rank, layout):
            pieces[s] = part.narrow(dim, offset, e - s)
            offset += e - s
    return torch.cat([pieces[s] for s in sorted(pieces)], dim)


def _world(group) -> tuple[int, int]:
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("mcompile.context_parallel needs torch.distributed initialised "
                           "(torch.distributed.init_process_group) before the call")
    return dist.get_world_size(group), dist.get_rank(group)


def gather_sequence(x: torch.Tensor, dim: int, group=None, layout: str = "zigzag") -> torch.Tensor:
    """Every rank's share of ``x`` along ``dim`` gathered and put back in sequence order."""
    world, _ = _world(group)
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x.contiguous(), group=group)
    return unshard(parts, dim, layout)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: Optional[float] = None,
              options: Optional[dict] = None, group=None, layout: str = "zigzag", window: int = 0) -> torch.Tensor:
    """Causal attention of this rank's share of a sequence: q (B, H, n, D), k/v (B, Hk, n, D),
    the positions ``shard_ranges(n * world, world, rank, layout)`` in that order. Returns
    (B, H, n, Dv), each range answered over every key before its end (module docstring)."""
    world, rank = _world(group)
    config = MInferenceConfig.from_options(options)
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        raise RuntimeError("mcompile.context_parallel is for inference: run it under torch.no_grad()")
    if k.shape[2] != q.shape[2] or v.shape[2] != q.shape[2]:
        raise ValueError(f"mcompile.context_parallel: q, k and v must be the same share of the sequence "
                         f"(no KV cache: prefill with use_cache=False), got {q.shape[2]}, {k.shape[2]}, {v.shape[2]}")
    n = q.shape[2] * world
    ranges = shard_ranges(n, world, rank, layout)
    scale = float(scale) if scale is not None else q.shape[-1] ** -0.5
    k_all, v_all = (gather_sequence(t, 2, group, layout) for t in (k, v))
    out = torch.empty(*q.shape[:3], v.shape[-1], dtype=q.dtype, device=q.device)
    offset = 0
    for s, e in ranges:
        rows = slice(offset, offset + e - s)
        out[:, :, rows] = request_attention(q[:, :, rows], k_all[:, :, :e], v_all[:, :, :e], scale, config, window,
                                            prompt_length=n)
        offset += e - s
    counters["mcompile"]["context_parallel_attention"] += 1
    return out


@torch.compiler.disable  # collectives and per-rank ranges: eager, as serving's attention function
def _attention_function(module, query, key, value, attention_mask, dropout: float = 0.0,
                        scaling: Optional[float] = None, *, options, group, layout, **kwargs):
    """transformers' attention-function signature over the rank's share: ((B, n, H, Dv), None)."""
    if dropout:
        raise ValueError("mcompile.context_parallel: attention dropout is not supported (inference only)")
    if getattr(module, "is_causal", True) is False:
        raise ValueError("mcompile.context_parallel: the attention module is not causal")
    for name in ("softcap", "s_aux", "sinks"):
        if kwargs.get(name) is not None:
            raise ValueError(f"mcompile.context_parallel: attention argument {name!r} is not supported")
    window = int(kwargs.get("sliding_window") or getattr(module, "sliding_window", None) or 0)
    out = attention(query, key, value, scaling, options, group, layout, window)
    return out.transpose(1, 2).contiguous(), None


@contextlib.contextmanager
def _attention_implementation(model, options, group, layout) -> Iterator[None]:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    fn = functools.partial(_attention_function, options=options, group=group, layout=layout)
    AttentionInterface.register(ATTENTION_NAME, fn)
    AttentionMaskInterface.register(ATTENTION_NAME, lambda *args, **kwargs: None)  # positions decide
    before = model.config._attn_implementation
    model.set_attn_implementation(ATTENTION_NAME)
    try:
        yield
    finally:
        model.set_attn_implementation(before)


def prefill(model, input_ids: torch.Tensor, options: Optional[dict] = None, group=None, layout: str = "zigzag",
            attention_mask: Optional[torch.Tensor] = None, gather: bool = True) -> torch.Tensor:
    """The logits of a transformers causal LM over ``input_ids`` (B, N), every rank of ``group``
    computing its share (``shard_ranges``) with context-parallel attention. Every rank passes
    the same ``input_ids``; returns the whole (B, N, vocab) logits on every rank (``gather``)
    or the rank's share. ``attention_mask``: all ones or None (padding would need per-key flags
    across ranks: pad on the right and drop the padded positions' logits instead)."""
    if attention_mask is not None and not bool(attention_mask.bool().all()):
        raise ValueError("mcompile.context_parallel.prefill: padded positions are not supported; "
                         "give unpadded prompts (batch rows of equal length)")
    world, rank = _world(group)
    n = input_ids.shape[1]
    ids = shard(input_ids, 1, world, rank, layout)
    positions = shard(torch.arange(n, device=input_ids.device), 0, world, rank, layout)
    positions = positions[None].expand(input_ids.shape[0], -1)
    with torch.no_grad(), _attention_implementation(model, options, group, layout):
        logits = model(input_ids=ids, position_ids=positions, use_cache=False).logits
    return gather_sequence(logits, 1, group, layout) if gather else logits


__all__ = ["LAYOUTS", "attention", "gather_sequence", "prefill", "shard", "shard_ranges", "unshard"]
