"""How close a sparse index comes to dense attention, on sampled query blocks.

Two measures per (batch, head), both over the same sampled query rows:

- ``output_error``: relative L2 error of the sparse attention output against dense causal
  attention, ``||O_sparse - O_dense|| / ||O_dense||`` (the paper's search objective);
- attention recall (``mcompile.tools.capture.attention_recall``): the softmax mass on kept keys.

Rows are sampled as whole query blocks spread evenly over the sequence (``sample_blocks``), so
a measure costs ``blocks x BLOCK x N`` work and memory per head instead of ``N^2``. The sparse
output of a row block is computed as ``sparse_attention_ref`` computes it: the block's kept-pair
mask from ``index.block_mask_rows`` (the definition of the index format) over its causal prefix,
then PyTorch's SDPA.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from .capture import attention_recall
from ..index import BLOCK, SparseIndex, block_mask_rows, num_blocks

__all__ = ["sample_blocks", "dense_rows", "sparse_rows", "output_error", "attention_recall"]


def sample_blocks(n: int, count: int) -> list[int]:
    """Start rows of ``count`` query blocks spread evenly over ``n`` tokens (the centres of
    ``count`` equal strata), all of them when ``count`` reaches the number of blocks. The last
    block, whose queries estimate vertical-slash indices, is sampled only in that case."""
    nb = num_blocks(n)
    if count >= nb:
        return [m * BLOCK for m in range(nb)]
    return sorted({int((i + 0.5) * nb / count) * BLOCK for i in range(count)})


def _block_attention(q, k, v, scale, starts, keep_of) -> list[torch.Tensor]:
    """fp32 attention of each sampled block over its causal prefix, keeping ``keep_of(r0, r1)``
    ((B or 1, H or 1, rows, r1) bool); rows with no kept key are 0, as in the sparse kernel."""
    n = q.shape[2]
    gqa = q.shape[1] != k.shape[1]
    out = []
    for r0 in starts:
        r1 = min(n, r0 + BLOCK)
        keep = keep_of(r0, r1)
        o = F.scaled_dot_product_attention(q[:, :, r0:r1].float(), k[:, :, :r1].float(), v[:, :, :r1].float(),
                                           attn_mask=keep, scale=scale, enable_gqa=gqa)
        out.append(torch.where(keep.any(-1, keepdim=True), o, 0))
    return out


def dense_rows(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
               starts: Sequence[int]) -> list[torch.Tensor]:
    """Dense causal attention output of each sampled block: [(B, H, rows, Dv)] in fp32."""
    def causal(r0, r1):
        return torch.arange(r1, device=q.device)[None, :] <= torch.arange(r0, r1, device=q.device)[:, None]
    return _block_attention(q, k, v, scale, starts, causal)


def sparse_rows(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, index: SparseIndex, scale: float,
                starts: Sequence[int]) -> list[torch.Tensor]:
    """Sparse attention output of each sampled block, as ``sparse_attention_ref``: [(B, H, rows, Dv)]."""
    return _block_attention(q, k, v, scale, starts, lambda r0, r1: block_mask_rows(index, r0, r1, r1))


def output_error(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, index: SparseIndex, scale: float,
                 starts: Sequence[int], dense: Sequence[torch.Tensor] | None = None) -> torch.Tensor:
    """Relative L2 error of the sparse output over the sampled blocks, per (batch, head): (B, H).

    ``dense``: the blocks' dense outputs (``dense_rows``), when already computed."""
    dense = dense_rows(q, k, v, scale, starts) if dense is None else dense
    sparse = sparse_rows(q, k, v, index, scale, starts)
    err = sum(((s - d) ** 2).sum((-1, -2)) for s, d in zip(sparse, dense))
    ref = sum((d ** 2).sum((-1, -2)) for d in dense)
    return (err / ref.clamp(min=torch.finfo(torch.float32).tiny)).sqrt()
