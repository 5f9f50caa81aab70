"""The sparse index: one format that every pattern produces and one attention consumes.

Attention is causal over absolute positions. The keys sit at positions ``0..N-1``; the queries
are the last ``Nq <= N`` of them, at positions ``P..N-1`` with ``P = N - Nq`` (``P = 0`` for a
whole prompt, ``P > 0`` for a chunk that continues a cached prefix: chunked prefill, a prompt
continued after a cache, several draft tokens). Query ``i`` of the chunk (tensor row ``i``) is
at position ``P + i`` and sees keys ``<= P + i``. Queries are cut into blocks of ``BLOCK``
*absolute* rows (block ``m`` holds positions ``[m*BLOCK, (m+1)*BLOCK)``), so an index depends
on ``N`` only, never on where the chunk starts; the blocks that hold no query (``m < P // BLOCK``)
are simply never read. For each batch element ``b`` and query head ``h`` the index keeps three
kinds of key sets; the kept keys of a query are their union, intersected with ``key <= query``
(positions) and the key padding mask (``(B, N)``, over all keys, cached ones included).

1. **Diagonal runs** ``runs[b, h, r] = (d_lo, d_hi)``, ``r < run_count[b, h]``: sorted, disjoint
   ranges of diagonals (``d = query - key``). Query block ``m`` computes the key tile
   ``[m*BLOCK - d_hi, (m+1)*BLOCK - d_lo)`` of every run: a contiguous band, the same for all
   rows of the block. Runs are stored once per head, not per query block, because a slash
   set is shift-invariant: the index costs O(budget), not O(N x budget). Neighbouring runs are
   at least ``BLOCK`` diagonals apart, which makes their tiles disjoint in every block.
   A-shape's local window is one run ``(0, local-1)``; a dense head is ``(0, N-1)``.
2. **Columns** ``columns[b, h, c]``, distinct, sorted ascending, padded with ``SENTINEL``;
   ``column_count[b, h, m]`` is how many are ``< (m+1)*BLOCK``. Vertical lines and A-shape's
   sink. A column that falls inside a run's tile of block ``m`` is computed by that tile;
   ``diag_prefix`` lets a kernel skip it: ``diag_prefix[b, h, x]`` is the number of diagonals
   ``< x`` covered by runs, so column ``j`` is inside a tile of block ``m`` iff
   ``diag_prefix[min(hi, N-1) + 1] - diag_prefix[max(lo, 0)] > 0`` with
   ``lo = m*BLOCK - j`` and ``hi = (m+1)*BLOCK - 1 - j``.
3. **Key blocks** ``blocks[b, h, m, i]``, ``i < block_count[b, h, m]``: sorted key-block numbers
   (keys ``[n*BLOCK, (n+1)*BLOCK)``) for query block ``m``. Block-sparse heads use these and
   no runs or columns, so the three sets never overlap within a head.

Sizes: every per-block tensor has ``index_rows(N) = num_blocks(N) + 1`` rows (a spare row past
the last block, so that no index dimension is ever 1 and tracing adds no guard on N), and
``diag_prefix`` has ``N + 1`` entries. All of it is a function of the key length N alone.

Worked example, N = 8 and BLOCK = 4 (two query blocks), runs = [(0, 1)], columns = [0]::

    block 0 (rows 0-3): run tile keys [0-1, 4-0) = [-1, 4) -> [0, 4)
    block 1 (rows 4-7): run tile keys [4-1, 8-0) = [3, 8); column 0 is outside it
                      k0 k1 k2 k3 k4 k5 k6 k7
        q0 (block 0)   x
        q1             x  x
        q2             x  x  x
        q3             x  x  x  x
        q4 (block 1)   c  .  .  x  x                 x: run tile, c: column
        q5             c  .  .  x  x  x
        q6             c  .  .  x  x  x  x
        q7             c  .  .  x  x  x  x  x

Cached prefix, the same index with N = 8, BLOCK = 4 and a chunk of Nq = 3 queries (P = 5):
only block 1 holds queries, and its rows 5-7 are the chunk's rows 0-2::

                      k0 k1 k2 k3 k4 k5 k6 k7
        q5 (row 0)     c  .  .  x  x  x
        q6 (row 1)     c  .  .  x  x  x  x
        q7 (row 2)     c  .  .  x  x  x  x  x

The kernels run only the blocks that hold queries (``m >= P // BLOCK``) and read query row
``position - P``; estimation scores the chunk's last ``min(LAST_Q, Nq)`` queries against all N
keys (kernels/estimate.py), so a chunk's index is that of the whole sequence's last queries.

Every query sees itself as long as some run contains diagonal 0, which every pattern
guarantees (vertical-slash always keeps the nearest diagonals, block-sparse the diagonal
block); a query whose keys are all padded gets a zero output, like PyTorch's SDPA.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

BLOCK = 64  # query rows per block and key tile width of the index (MInference's 64x64 tiles)
SENTINEL = 2**31 - 1  # pads sorted int32 lists; larger than any position
KEPT_ROWS = 4096  # query rows per step of kept_fraction (a multiple of BLOCK)


class SparseIndex(NamedTuple):
    """Per (batch, query head) sparse index; see the module docstring for the meaning."""

    runs: torch.Tensor  # (B, H, R, 2) int32, diagonal ranges [d_lo, d_hi], SENTINEL-padded
    run_count: torch.Tensor  # (B, H) int32
    diag_prefix: torch.Tensor  # (B, H, N + 1) int32, covered diagonals below x
    columns: torch.Tensor  # (B, H, C) int32, sorted, SENTINEL-padded
    column_count: torch.Tensor  # (B, H, NB + 1) int32, columns < (m + 1) * BLOCK
    blocks: torch.Tensor  # (B, H, NB + 1, KB) int32, sorted key blocks, SENTINEL-padded
    block_count: torch.Tensor  # (B, H, NB + 1) int32 (the last row is spare, always 0)


def num_blocks(n):
    """Query blocks of a sequence of ``n`` tokens (works on SymInts)."""
    return (n + BLOCK - 1) // BLOCK


def index_rows(n):
    """Rows of the per-block index tensors: one spare row past the last block, so that no index
    dimension is ever 1 and tracing the ops adds no guard on the length."""
    return num_blocks(n) + 1


def runs_to_diag_prefix(runs: torch.Tensor, run_count: torch.Tensor, n: int) -> torch.Tensor:
    """Exclusive prefix count of diagonals covered by runs: (B, H, R, 2) -> (B, H, n + 1).

    Each run adds +1 at its first diagonal and -1 past its last; a running sum of those marks
    the covered diagonals, a second one counts them: two scans over n (``_scan``) and a
    scatter of 2R entries, with no int64 (B, H, n) temporaries (a binary search per diagonal
    was slower at long lengths). Overlapping runs count each diagonal once."""
    b, h, r, _ = runs.shape
    prefix = torch.zeros(b, h, n + 1, dtype=torch.int32, device=runs.device)
    if r == 0 or n == 0:
        return prefix
    valid = torch.arange(r, device=runs.device) < run_count[..., None]  # (B, H, R)
    lo = torch.where(valid, runs[..., 0], n).clamp(min=0, max=n).long()
    end = torch.where(valid, runs[..., 1] + 1, n).clamp(min=0, max=n).long()  # exclusive
    one = valid.to(torch.int32)
    delta = torch.zeros(b, h, n + 1, dtype=torch.int32, device=runs.device)
    delta.scatter_add_(-1, lo, one).scatter_add_(-1, end, -one)
    covered = _scan(delta[..., :n]) > 0
    prefix[..., 1:] = _scan(covered)
    return prefix


SCAN_CHUNK = 1024


def _scan(x: torch.Tensor) -> torch.Tensor:
    """Inclusive int32 running sum over the last dim, in chunks of ``SCAN_CHUNK``: a scan of
    a few long rows runs one row per thread block on CUDA (slow); chunks
    make many short rows, then each chunk adds the total of the chunks before it."""
    *lead, n = x.shape
    chunks = -(-n // SCAN_CHUNK)
    xs = torch.nn.functional.pad(x.to(torch.int32), (0, chunks * SCAN_CHUNK - n))
    inner = xs.view(*lead, chunks, SCAN_CHUNK).cumsum(-1, dtype=torch.int32)
    totals = inner[..., -1]
    before = totals.cumsum(-1, dtype=torch.int32) - totals
    return (inner + before[..., None]).view(*lead, chunks * SCAN_CHUNK)[..., :n]


def column_counts(columns: torch.Tensor, n: int) -> torch.Tensor:
    """Columns below each query block's end: (B, H, C) sorted -> (B, H, NB + 1) int32."""
    b, h, _ = columns.shape
    ends = (torch.arange(index_rows(n), device=columns.device, dtype=torch.int64) + 1) * BLOCK
    ends = ends.expand(b, h, -1).contiguous()
    return torch.searchsorted(columns.long().contiguous(), ends).to(torch.int32)


def block_mask_rows(index: SparseIndex, row_start: int, row_end: int, n: int,
                    key_padding: torch.Tensor | None = None) -> torch.Tensor:
    """Kept (query, key) pairs for the queries at positions ``[row_start, row_end)`` over the
    keys ``[0, n)``: (B, H, rows, n) bool. Any ``row_start`` (a chunk after a cached prefix
    starts anywhere); ``n`` may stop short of the index's length (keys past the last row are
    in every row's future). This is the definition of the format; the attention kernels must
    compute exactly these entries.
    """
    device = index.runs.device
    b, h = index.run_count.shape
    m0, m1 = row_start // BLOCK, num_blocks(row_end)
    blk = torch.arange(m0, m1, device=device)  # (M,)
    keys = torch.arange(n, device=device)  # (n,)
    # Runs: column j is in a run tile of block m iff a covered diagonal lies in [lo, hi].
    lo = (blk[:, None] * BLOCK - keys[None, :]).clamp(min=0)  # (M, n)
    hi = ((blk[:, None] + 1) * BLOCK - 1 - keys[None, :]).clamp(max=n - 1)
    prefix = index.diag_prefix.long()
    span = prefix[..., (hi + 1).clamp(min=0).flatten()] - prefix[..., lo.flatten()]
    keep = (span > 0).view(b, h, m1 - m0, n) & (hi >= lo)
    # Columns.
    col = torch.zeros(b, h, n + 1, dtype=torch.bool, device=device)
    col.scatter_(2, index.columns.long().clamp(max=n), True)
    keep = keep | col[..., None, :n]
    # Key blocks.
    if index.blocks.shape[-1] > 0:
        nb = num_blocks(n)
        kb = torch.zeros(b, h, m1 - m0, nb + 1, dtype=torch.bool, device=device)
        kb.scatter_(3, index.blocks[:, :, m0:m1].long().clamp(max=nb), True)
        keep = keep | kb[..., keys // BLOCK]
    # Rows of each block, then causality and padding.
    rows = torch.arange(row_start, row_end, device=device)
    keep = keep[:, :, rows // BLOCK - m0]  # (B, H, rows, n)
    keep = keep & (keys[None, :] <= rows[:, None])
    if key_padding is not None:
        keep = keep & key_padding[:, None, None, :n].bool()
    return keep


def index_to_mask(index: SparseIndex, n: int, key_padding: torch.Tensor | None = None,
                  queries: int | None = None) -> torch.Tensor:
    """The whole (B, H, Nq, n) boolean mask an index stands for, for the last ``queries`` (Nq,
    default n) positions (tests and plots; O(Nq x n))."""
    nq = n if queries is None else queries
    return block_mask_rows(index, n - nq, n, n, key_padding)


def kept_fraction(index: SparseIndex, n: int, key_padding: torch.Tensor | None = None,
                  queries: int | None = None) -> torch.Tensor:
    """Fraction of causal (query, key) pairs the index keeps for the last ``queries`` positions
    (default n), per (batch, head); O(n^2) memory is avoided by walking query blocks."""
    b, h = index.run_count.shape
    p = n - (n if queries is None else queries)
    kept = torch.zeros(b, h, dtype=torch.float64, device=index.runs.device)
    for start in range(p, n, KEPT_ROWS):
        kept += block_mask_rows(index, start, min(n, start + KEPT_ROWS), n, key_padding).sum((-1, -2))
    return kept / ((n * (n + 1) - p * (p + 1)) / 2)


def computed_fraction(index: SparseIndex, n: int) -> torch.Tensor:
    """Approximate share of the causal (query, key) pairs a kernel computes for ``index``,
    averaged over (batch, head): a 0-dim float tensor, computed in O(B x H x (R + NB)) on the
    index's device (a run tile of width ``BLOCK + d_hi - d_lo`` over the rows from ``d_lo``
    on, clipped at key 0, each column over the rows of the blocks that list it, each key block a full tile).
    Cheap enough to decide at run time whether the sparse path is worth it."""
    b, h = index.run_count.shape
    nb = num_blocks(n)
    r = index.runs.shape[2]
    valid = torch.arange(r, device=index.runs.device) < index.run_count[..., None].long()  # (B, H, R)
    lo = index.runs[..., 0].double().clamp(max=n)
    width = (index.runs[..., 1].double() - lo + BLOCK).clamp(max=n)
    span = (n - lo).clamp(min=0)
    # Rows within ``width`` of the run's start see its tile clipped at key 0: a triangle less.
    pairs = ((width * span - torch.minimum(width, span) ** 2 / 2) * valid).sum()
    pairs = pairs + index.column_count[..., :nb].double().sum() * BLOCK
    pairs = pairs + index.block_count[..., :nb].double().sum() * BLOCK * BLOCK
    return pairs / (b * h * n * (n + 1) / 2)
