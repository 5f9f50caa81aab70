"""The two graph ops the rewrite inserts, registered in the ``mcompile`` library namespace.

``mcompile::estimate_index`` builds a layer's SparseIndex (all heads at once) and
``mcompile::sparse_attention`` consumes it. Both are opaque to the compiler: their fake
implementations use symbolic arithmetic only, so one compiled graph serves every length, and
the choice between the dense path (prompts shorter than ``dense_below``) and the sparse path is
a free branch at run time rather than a guard. On CUDA the bodies run the Triton kernels where
``kernels.capability`` allows, and the pure-PyTorch implementations otherwise.
"""

from __future__ import annotations

import logging
from typing import Optional

import torch
import torch.nn.functional as F

from .index import SparseIndex, index_rows
from .kernels import dispatch
from .kernels.estimate import estimate_index_ref, index_capacity
from .kernels.sparse_attention import sparse_attention_ref
from .patterns import DEFAULT_BUDGET_EXPONENT, decode, scale_lists

log = logging.getLogger(__name__)


def _check_inputs(q: torch.Tensor, k: torch.Tensor, v: Optional[torch.Tensor], kinds, p0, p1):
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(f"mcompile attention expects (B, H, N, D) tensors, got q {tuple(q.shape)}, k {tuple(k.shape)}")
    h, hk = q.shape[1], k.shape[1]
    if h % hk:
        raise ValueError(f"query heads ({h}) must be a multiple of key/value heads ({hk})")
    if q.shape[2] != k.shape[2]:
        raise ValueError(f"sparse prefill needs query length == key length, got {q.shape[2]} and {k.shape[2]}")
    if v is not None and v.shape[:3] != k.shape[:3]:
        raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} disagree")
    if not (len(kinds) == len(p0) == len(p1) == h):
        raise ValueError(f"need one pattern per query head ({h}), got {len(kinds)}")
    decode(kinds, p0, p1)  # validates kinds and budgets, with a message naming the bad field


@torch.library.custom_op("mcompile::estimate_index", mutates_args=())
def estimate_index(q: torch.Tensor, k: torch.Tensor, key_padding: Optional[torch.Tensor],
                   kinds: list[int], p0: list[int], p1: list[int], scale: float,
                   dense_below: int, budget_length: int = 0,
                   budget_exponent: float = DEFAULT_BUDGET_EXPONENT) -> tuple[
                       torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                       torch.Tensor]:
    """SparseIndex of every head of a layer; the dense index when N < dense_below. Budgets are
    scaled to the prompt length when ``budget_length`` > 0 (``patterns.scaled_budgets``); the
    scaled budgets never exceed the given ones, so the index capacity does not change."""
    _check_inputs(q, k, None, kinds, p0, p1)
    n = q.shape[2]
    dense = n < dense_below
    capacity = index_capacity(n, kinds, p0, p1)  # what the fake promises, from the unscaled budgets
    if not dense:
        p0, p1 = scale_lists(kinds, p0, p1, n, budget_length, budget_exponent)
    impl = dispatch.estimate_impl(q) if not dense else estimate_index_ref
    return tuple(impl(q, k, key_padding, kinds, p0, p1, scale, dense=dense, capacity=capacity))


@estimate_index.register_fake
def _(q, k, key_padding, kinds, p0, p1, scale, dense_below, budget_length=0,
      budget_exponent=DEFAULT_BUDGET_EXPONENT):
    b, h, n, _ = q.shape
    r, c, kb = index_capacity(n, kinds, p0, p1)
    nb = index_rows(n)
    i32 = dict(dtype=torch.int32, device=q.device)
    return (q.new_empty(b, h, r, 2, **i32), q.new_empty(b, h, **i32), q.new_empty(b, h, n + 1, **i32),
            q.new_empty(b, h, c, **i32), q.new_empty(b, h, nb, **i32), q.new_empty(b, h, nb, kb, **i32),
            q.new_empty(b, h, nb, **i32))


def dense_attention(q, k, v, scale: float, key_padding: Optional[torch.Tensor]) -> torch.Tensor:
    """Causal attention through PyTorch's SDPA (cuDNN or flash on GPU), GQA without copies."""
    gqa = q.shape[1] != k.shape[1]
    if key_padding is None:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
        return out.contiguous()
    n = q.shape[2]
    pad = key_padding.bool()
    causal = torch.ones(n, n, dtype=torch.bool, device=q.device).tril()
    mask = causal[None, None] & pad[:, None, None, :]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)
    has_key = pad.cumsum(-1) > 0  # (B, N): some key <= i is not padded
    return torch.where(has_key[:, None, :, None], out, 0).contiguous()


@torch.library.custom_op("mcompile::sparse_attention", mutates_args=())
def sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, runs: torch.Tensor,
                     run_count: torch.Tensor, diag_prefix: torch.Tensor, columns: torch.Tensor,
                     column_count: torch.Tensor, blocks: torch.Tensor, block_count: torch.Tensor,
                     key_padding: Optional[torch.Tensor], scale: float, dense_below: int) -> torch.Tensor:
    """Causal attention of q (B, H, N, D) over k/v (B, Hk, N, D), keeping what the index keeps."""
    if q.shape[2] < dense_below:
        return dense_attention(q, k, v, scale, key_padding)
    index = SparseIndex(runs, run_count, diag_prefix, columns, column_count, blocks, block_count)
    return dispatch.attention_impl(q)(q, k, v, index, scale, key_padding)


@sparse_attention.register_fake
def _(q, k, v, runs, run_count, diag_prefix, columns, column_count, blocks, block_count,
      key_padding, scale, dense_below):
    return q.new_empty(*q.shape[:3], v.shape[-1])


__all__ = ["estimate_index", "sparse_attention", "dense_attention", "estimate_index_ref", "sparse_attention_ref"]
