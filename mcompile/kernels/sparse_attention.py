"""Sparse causal attention over a SparseIndex (the format is documented in mcompile/index.py).

    out[b, h, i] = sum_j softmax_j(scale * q[b, h, i] . k[b, h // G, j]) v[b, h // G, j]

over the keys j the index keeps for query i (G = query heads per KV head; K/V are never
repeated). Queries whose kept keys are all padded get zeros, as PyTorch's SDPA does.

``sparse_attention_ref`` is the pure-PyTorch implementation: the CPU path of the graph op and
the reference of the GPU kernel. It walks the queries in chunks of whole blocks, computing the
chunk's scores against all keys and masking them with ``index.block_mask_rows``; memory is
O(chunk x N), never O(N^2).
"""

from __future__ import annotations

import torch

from ..index import BLOCK, SparseIndex, block_mask_rows

CHUNK_BYTES = 256 << 20  # cap on one query chunk's fp32 score tensor


def _chunk_rows(b: int, h: int, n: int) -> int:
    rows = CHUNK_BYTES // max(1, b * h * n * 4)
    return max(BLOCK, rows // BLOCK * BLOCK)


def sparse_attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, index: SparseIndex,
                         scale: float, key_padding: torch.Tensor | None = None) -> torch.Tensor:
    """q (B, H, N, D), k/v (B, Hk, N, D), key_padding (B, N) bool -> (B, H, N, D) in q's dtype."""
    b, h, n, d = q.shape
    hk = k.shape[1]
    group = h // hk
    out = torch.empty(b, h, n, v.shape[-1], dtype=q.dtype, device=q.device)
    kt = k.transpose(-1, -2)
    step = _chunk_rows(b, h, n)
    for r0 in range(0, n, step):
        r1 = min(n, r0 + step)
        qs = q[:, :, r0:r1].reshape(b, hk, group * (r1 - r0), d)
        s = torch.matmul(qs.float(), kt.float()).view(b, h, r1 - r0, n) * scale
        keep = block_mask_rows(index, r0, r1, n, key_padding)
        s = s.masked_fill(~keep, float("-inf"))
        p = torch.softmax(s, dim=-1).nan_to_num_(0.0)  # rows with no kept key -> zeros
        o = torch.matmul(p.view(b, hk, group * (r1 - r0), n), v.float())
        out[:, :, r0:r1] = o.view(b, h, r1 - r0, -1).to(q.dtype)
    return out
