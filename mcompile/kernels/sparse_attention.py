"""Sparse causal attention over a SparseIndex (the format is documented in mcompile/index.py).

    out[b, h, i] = sum_j softmax_j(scale * q[b, h, i] . k[b, h // G, j]) v[b, h // G, j]

over the keys j the index keeps for query i (G = query heads per KV head; K/V are never
repeated). The queries may be a chunk after a cached prefix: q (B, H, Nq, D) over k/v
(B, Hk, N, D) with Nq <= N puts query row i at position ``P + i``, ``P = N - Nq``, and it sees
keys ``<= P + i`` (bottom-right aligned, as a KV cache needs). Queries whose kept keys are all
padded get zeros, as PyTorch's SDPA does.

``sparse_attention_ref`` is the pure-PyTorch implementation: the CPU path of the graph op and
the reference of the GPU kernel. It walks the queries in chunks of ``CHUNK_ROWS``, builds the
chunk's kept-pair mask from the index (``index.block_mask_rows``, the definition of the
format) over the chunk's causal key prefix only, and runs PyTorch's fused SDPA on it: memory
is O(chunk x N) with chunks shrinking as N grows (``CHUNK_ENTRIES``), never O(N^2), and the
work is that of dense attention over the prefix.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..index import BLOCK, SparseIndex, block_mask_rows

CHUNK_ROWS = 512  # query rows per chunk at most (fastest on CPU among 256-2048 at 4K tokens)
# (rows x keys) entries per chunk and batch x head: bounds the mask and score temporaries
# (about 20 bytes per entry) at ~40 MiB, so memory grows linearly in N (512 rows up to 4K keys).
CHUNK_ENTRIES = 1 << 21


def chunk_rows(n: int) -> int:
    """Query rows per chunk at key length n: CHUNK_ROWS, fewer past 4K keys, a multiple of BLOCK."""
    return max(BLOCK, min(CHUNK_ROWS, CHUNK_ENTRIES // max(1, n)) // BLOCK * BLOCK)


def sparse_attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, index: SparseIndex,
                         scale: float, key_padding: torch.Tensor | None = None, window: int = 0) -> torch.Tensor:
    """q (B, H, Nq, D), k/v (B, Hk, N, D), Nq <= N, key_padding (B, N) bool -> (B, H, Nq, Dv)
    in q's dtype. ``window`` > 0: only keys less than ``window`` positions behind the query
    (a sliding window) are kept, on top of what the index keeps."""
    b, h, nq, _ = q.shape
    n = k.shape[2]
    p = n - nq  # position of query row 0
    gqa = h != k.shape[1]
    out = torch.empty(b, h, nq, v.shape[-1], dtype=q.dtype, device=q.device)
    step = chunk_rows(n)
    for r0 in range(p, n, step):
        r1 = min(n, r0 + step)  # keys past r1 - 1 are in every row's future
        kp = key_padding[:, :r1] if key_padding is not None else None
        keep = block_mask_rows(index, r0, r1, r1, kp)  # (B, H, rows, r1)
        if window > 0:
            rows, keys = torch.arange(r0, r1, device=q.device), torch.arange(r1, device=q.device)
            keep = keep & (keys[None, :] > rows[:, None] - window)
        o = F.scaled_dot_product_attention(q[:, :, r0 - p:r1 - p], k[:, :, :r1], v[:, :, :r1], attn_mask=keep,
                                           scale=scale, enable_gqa=gqa)
        out[:, :, r0 - p:r1 - p] = torch.where(keep.any(-1, keepdim=True), o, 0)  # no kept key -> zeros
    return out
