"""Sparse causal attention over a SparseIndex (the format is documented in mcompile/index.py).

    out[b, h, i] = sum_j softmax_j(scale * q[b, h, i] . k[b, h // G, j]) v[b, h // G, j]

over the keys j the index keeps for query i (G = query heads per KV head; K/V are never
repeated). Queries whose kept keys are all padded get zeros, as PyTorch's SDPA does.

``sparse_attention_ref`` is the pure-PyTorch implementation: the CPU path of the graph op and
the reference of the GPU kernel. It walks the queries in chunks of ``CHUNK_ROWS``, builds the
chunk's kept-pair mask from the index (``index.block_mask_rows``, the definition of the
format) over the chunk's causal key prefix only, and runs PyTorch's fused SDPA on it: memory
is O(chunk x N), never O(N^2), and the work is that of dense attention over the prefix.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..index import SparseIndex, block_mask_rows

CHUNK_ROWS = 512  # query rows per chunk (fastest on CPU among 256-2048 at 4K tokens)


def sparse_attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, index: SparseIndex,
                         scale: float, key_padding: torch.Tensor | None = None) -> torch.Tensor:
    """q (B, H, N, D), k/v (B, Hk, N, D), key_padding (B, N) bool -> (B, H, N, Dv) in q's dtype."""
    b, h, n, _ = q.shape
    gqa = h != k.shape[1]
    out = torch.empty(b, h, n, v.shape[-1], dtype=q.dtype, device=q.device)
    for r0 in range(0, n, CHUNK_ROWS):
        r1 = min(n, r0 + CHUNK_ROWS)  # keys past r1 - 1 are in every row's future
        kp = key_padding[:, :r1] if key_padding is not None else None
        keep = block_mask_rows(index, r0, r1, r1, kp)  # (B, H, rows, r1)
        o = F.scaled_dot_product_attention(q[:, :, r0:r1], k[:, :, :r1], v[:, :, :r1], attn_mask=keep,
                                           scale=scale, enable_gqa=gqa)
        out[:, :, r0:r1] = torch.where(keep.any(-1, keepdim=True), o, 0)  # no kept key -> zeros
    return out
