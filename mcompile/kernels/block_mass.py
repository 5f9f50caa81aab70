"""Block-mass estimation: per query block, the fewest key tiles whose estimated mass reaches a target.

For every 64-query block ``m`` that holds queries, ``samples`` of its rows (spread over the
block, its last row first) attend exactly: softmax over their causal keys, in fp32. The mean,
over those rows, of the mass each 64-key tile receives estimates the block's tile masses
``e[m, t]``. The block keeps tile 0 (the sink), its diagonal tile ``m`` and the ``LOCAL_TILES``
before it (a row early in the block has its nearest keys there), then tiles in decreasing ``e``
until the kept estimate reaches ``recall`` of the block's estimated total::

    e[m] = mean_{sampled rows r of block m} (sum_{keys j in tile t} softmax(q_r . K / sqrt(d))_j)
    keep(m) = {0, m - 1, m} + the fewest largest t with sum_{t kept} e[m, t] >= recall * sum_t e[m, t]

The index is the block-sparse part of index.py (``blocks`` / ``block_count``): the kernel
computes exactly the kept tiles, so the computed share equals the kept share. A head that needs
more tiles than the index holds (``capacity``) in some block runs dense instead (its mass is
diffuse: the kernel would compute nearly every tile anyway).

The tile score of a sampled row is its softmax mass on the tile's keys ("mass"), or, with
``score="max"``, a softmax over the tiles of the row's largest logit in each::

    e_max[m, t] = mean_{sampled rows r of block m} softmax_t(max_{keys j in tile t} q_r . k_j / sqrt(d))

which weighs a tile by its strongest key alone (a tile of 64 equal keys scores as one of them).
On the GPU it costs one maximum per logit where the mass costs a scale, a subtraction, an
exponential and a sum: the estimate's loop is bound by that per-logit arithmetic
(block_mass_triton.py), so "max" can sample more rows at the same cost. On real heads it loses
no recall at equal computed share and raises the worst head (docs/ACCURACY.md, "Tile scores").

Why sampled rows (measured on SmolLM2 + YaRN x16, real text, 10 layers, docs/ACCURACY.md): the
last 64 queries (vertical-slash's estimate) miss what earlier queries look at (the default's
worst head recalls 0.54-0.64 at 8K-16K); strided antidiagonal sums (XAttention) and mean-pooled
blocks average the logits of several queries and keys before the softmax, so one strong key (a
sink, a slash) is under-weighted (recall 0.76-0.86 on layers whose mass lies on lines). Exact
rows keep the peaks, and sampling every block keeps what each block looks at.

Cost: ``samples / 64`` of dense attention's query-key products (no value products), plus a
selection per block (a sort here; a bisection on the GPU, block_mass_triton.py). This is the pure-PyTorch implementation (the CPU path and
the reference of a fused kernel); it walks chunks of query blocks so that the fp32 score tensor
stays under ``SCORE_BYTES``.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..index import BLOCK, SENTINEL, num_blocks
from ..patterns import SCORES

SCORE_BYTES = 1 << 30  # cap on one chunk's fp32 score tensor
LOCAL_TILES = 1  # tiles before the diagonal every block keeps: each row sees at least 64 keys before it


def sample_offsets(samples: int, device=None) -> torch.Tensor:
    """Row offsets within a block, the last row (63) first, spread over the block."""
    offs = sorted({BLOCK - 1 - (i * BLOCK) // samples for i in range(samples)}, reverse=True)
    return torch.tensor(offs, dtype=torch.long, device=device)


def finish_index(block_count: torch.Tensor, m0: int, capacity: int, runs: torch.Tensor, run_count: torch.Tensor,
                 diag_prefix: torch.Tensor) -> None:
    """The end of an index whose heads are all block-mass, in place: ``block_count`` (B, H, M) holds
    the selection's counts from query block ``m0`` on, not clamped (0 before). A head with a block
    over ``capacity`` tiles is dense: its counts become 0, its one run (``runs`` (B, H, R, 2),
    SENTINEL-filled) covers every diagonal, ``run_count`` (B, H) is 1 and ``diag_prefix``
    (B, H, N + 1) counts the diagonals (index.runs_to_diag_prefix of that run); other heads keep
    their counts, no run, a zero prefix."""
    n = diag_prefix.shape[-1] - 1
    counts = block_count[:, :, m0:]
    dense = (counts > capacity).any(-1)
    counts.copy_(torch.where(dense[..., None], 0, counts.clamp(max=capacity)))
    runs[:, :, 0, 0] = torch.where(dense, 0, SENTINEL)
    runs[:, :, 0, 1] = torch.where(dense, n - 1, SENTINEL)
    run_count.copy_(dense)
    diag = torch.arange(n + 1, dtype=torch.int32, device=diag_prefix.device)
    diag_prefix.copy_(torch.where(dense[..., None], diag, 0))


def tile_mass(q: torch.Tensor, k: torch.Tensor, key_padding: Optional[torch.Tensor], scale: float,
              heads: torch.Tensor, samples: int, score: str = "mass") -> torch.Tensor:
    """Estimated tile masses (B, Hm, M, NB) fp32 of query heads ``heads`` for the M query blocks
    that hold queries (``m0 = (N - Nq) // BLOCK`` on); q (B, H, Nq, D) may be a chunk after a
    cached prefix (positions N - Nq .. N - 1), k (B, Hk, N, D), key_padding (B, N).
    ``score`` "max": each sampled row's softmax over the tiles of its largest logit in each
    (module docstring) instead of its softmax mass on each tile."""
    if score not in SCORES:
        raise ValueError(f"score must be one of {list(SCORES)}, got {score!r}")
    b, h, nq, d = q.shape
    hk, n = k.shape[1], k.shape[2]
    group = h // hk
    nb = num_blocks(n)
    p = n - nq
    m0 = p // BLOCK
    dev = q.device
    blocks = torch.arange(m0, nb, device=dev)
    offs = sample_offsets(samples, dev)
    lo = torch.clamp(blocks * BLOCK, min=p)[:, None]
    hi = torch.clamp((blocks + 1) * BLOCK, max=n)[:, None] - 1
    pos = torch.minimum(torch.maximum(blocks[:, None] * BLOCK + offs[None, :], lo), hi)  # (M, S) positions
    heads = heads.long()
    hm = heads.numel()
    ks = k[:, heads // group].float()  # (B, Hm, N, D)
    keys = torch.arange(n, device=dev)
    allowed_keys = key_padding.bool()[:, None, None, :] if key_padding is not None else None
    out = torch.zeros(b, hm, blocks.numel(), nb, dtype=torch.float32, device=dev)
    s_rows = offs.numel()
    per_block = max(1, b * hm * s_rows * n * 4)
    step = max(1, SCORE_BYTES // per_block)
    for c0 in range(0, blocks.numel(), step):
        c1 = min(blocks.numel(), c0 + step)
        rp = pos[c0:c1].flatten()  # (R,) absolute positions of the chunk's sampled rows
        qs = q[:, heads][:, :, rp - p].float()  # (B, Hm, R, D)
        s = torch.matmul(qs, ks.transpose(-1, -2)) * scale  # (B, Hm, R, N)
        allowed = (keys[None, :] <= rp[:, None])[None, None]
        if allowed_keys is not None:
            allowed = allowed & allowed_keys
        s = s.masked_fill(~allowed, float("-inf"))
        if score == "max":
            s = torch.nn.functional.pad(s, (0, nb * BLOCK - n), value=float("-inf"))
            top = s.view(b, hm, c1 - c0, s_rows, nb, BLOCK).amax(-1)
            out[:, :, c0:c1] = torch.softmax(top, -1).nan_to_num_(0.0).mean(3)
            continue
        prob = torch.softmax(s, -1).nan_to_num_(0.0)
        prob = torch.nn.functional.pad(prob, (0, nb * BLOCK - n))
        out[:, :, c0:c1] = prob.view(b, hm, c1 - c0, s_rows, nb, BLOCK).sum(-1).mean(3)
    return out


def share_neighbours(est: torch.Tensor, m0: int) -> torch.Tensor:
    """Block-mass's ``neighbours=1``: each query block's estimate (B, Hm, M, NB) of blocks m0.. becomes
    the mean of its own and its neighbours' (blocks m-1 and m+1 where they hold queries), each first
    restricted to block m's causal tiles and renormalised to sum 1 there, so that every block's
    sampled rows weigh alike; and no tile falls below the block's own (renormalised) estimate.
    A row's far attention (sinks, columns, retrieved spans) is mostly shared with the next block's
    rows, which the mean adds; what only this block looks at (a question's rows on the passage it
    asks about, while the block before is the passage's own text) the mean would halve, and the
    maximum keeps (docs/ACCURACY.md: the mean alone lost a needle at recall 0.98)."""
    b, hm, m_rows, nb = est.shape
    dev = est.device
    rows = torch.arange(m0, m0 + m_rows, device=dev)
    causal = torch.arange(nb, device=dev)[None, :] <= rows[:, None]  # (M, NB) block m's causal tiles

    def norm(x: torch.Tensor) -> torch.Tensor:
        x = x.masked_fill(~causal, 0.0)
        return x / x.sum(-1, keepdim=True).clamp(min=torch.finfo(x.dtype).tiny)

    own = norm(est)
    total, count = own.clone(), torch.ones(m_rows, 1, device=dev)
    if m_rows > 1:
        total[:, :, 1:] += norm(torch.cat([est[:, :, :1], est[:, :, :-1]], 2))[:, :, 1:]  # block m-1's rows
        total[:, :, :-1] += norm(torch.cat([est[:, :, 1:], est[:, :, -1:]], 2))[:, :, :-1]  # block m+1's rows
        count = count + (rows > m0).float()[:, None] + (rows < m0 + m_rows - 1).float()[:, None]
    return torch.maximum(total / count, own)


def select_tiles(est: torch.Tensor, recall: torch.Tensor, m0: int, capacity: int, out: Optional[tuple] = None,
                 shared: Optional[torch.Tensor] = None, flags: bool = True) -> tuple:
    """From estimates (B, Hm, M, NB) of query blocks m0.., the kept tiles per block:
    (tiles (B, Hm, M, capacity) int32 ascending SENTINEL-padded, counts (B, Hm, M) int32,
    dense (B, Hm) bool: heads with a block needing more than ``capacity`` tiles).
    ``recall`` (Hm,) fp32: each head's target share. ``out``: (tiles, counts) tensors to write
    into and return instead, the counts not clamped to the capacity.

    The forced tiles (0 and the diagonal) count towards the target; the rest is reached by the
    free tiles at or above a threshold, the largest free estimate ``tau`` such that the free
    estimates ``>= tau`` sum to what the forced tiles leave (the fewest largest tiles, ties at
    ``tau`` kept together). Tiles whose estimate is 0 are never chosen, except at recall 1,
    which keeps every causal tile. ``shared`` (Hm,) bool: heads whose estimate is first
    ``share_neighbours``'d (block-mass's ``neighbours=1``). ``flags=False``: None in place of the
    dense flags (``finish_index`` finds them in the counts).
    """
    if shared is not None:
        est = torch.where(shared.view(1, -1, 1, 1), share_neighbours(est, m0), est)
    b, hm, m_rows, nb = est.shape
    dev = est.device
    rows = torch.arange(m0, m0 + m_rows, device=dev)  # query block of each estimate row
    cols = torch.arange(nb, device=dev)
    causal = cols[None, :] <= rows[:, None]  # (M, NB)
    forced = (cols[None, :] == 0) | ((cols[None, :] >= rows[:, None] - LOCAL_TILES) & (cols[None, :] <= rows[:, None]))
    free = causal & ~forced
    est = est.masked_fill(~causal, 0.0)
    rest = recall.view(1, -1, 1) * est.sum(-1) - est.masked_fill(~forced, 0.0).sum(-1)  # (B, Hm, M)
    srt = est.masked_fill(~free, 0.0).sort(-1, descending=True).values
    first = (srt.cumsum(-1) < rest[..., None]).sum(-1, keepdim=True)  # sorted position that reaches rest
    tau = srt.gather(-1, first.clamp(max=nb - 1))
    tau = torch.where(first >= nb, 0.0, tau)  # never reached (rounding): every free tile with mass
    chosen = free & (est >= tau) & (est > 0) & (rest > 0)[..., None]
    every = (recall >= 1.0).view(1, -1, 1, 1)
    keep = causal & (forced | chosen | every)
    counts = keep.sum(-1, dtype=torch.int32)
    dense = (counts > capacity).any(-1) if flags else None
    ids = torch.where(keep, cols.to(torch.int32), SENTINEL).sort(-1).values[..., :capacity]
    tiles = torch.nn.functional.pad(ids, (0, capacity - ids.shape[-1]), value=SENTINEL)
    if out is not None:
        out[0].copy_(tiles)
        out[1].copy_(counts)
        return out[0], out[1], dense
    return tiles, counts.clamp(max=capacity), dense
