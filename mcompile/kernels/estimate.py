"""Index estimation: from a layer's Q and K, build the sparse index of every head at once.

- vertical-slash: softmax of the last ``LAST_Q`` queries against all keys (fp32, causal);
  column sums score the verticals, sums along diagonals (``d = query - key``) score the
  slashes; the first ``SINK_COLUMNS`` columns and ``LOCAL_DIAGONALS`` diagonals are forced;
  top-k of each, then the chosen diagonals are merged into runs (index.py).
- block-sparse: mean-pool Q and K over ``BLOCK`` tokens, score pooled blocks (block-causal),
  keep the top-k key blocks per query block; the diagonal block and block 0 are forced.
- A-shape: static, ``sink`` columns and one run of ``local`` diagonals. Dense: one run
  covering every diagonal.

This is the pure-PyTorch implementation (the CPU path and the reference of the GPU kernels).
Work is vectorised over heads; the only loop is over chunks of KV heads, sized so that the
fp32 score tensors stay under ``SCORE_BYTES``.
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..index import BLOCK, SENTINEL, SparseIndex, column_counts, num_blocks, runs_to_diag_prefix
from ..patterns import LAST_Q, LOCAL_DIAGONALS, SINK_COLUMNS, PatternKind

SCORE_BYTES = 1 << 30  # cap on one chunk's fp32 score tensor during estimation


def _sym_min(a, b):
    return torch.sym_min(a, b) if isinstance(a, torch.SymInt) or isinstance(b, torch.SymInt) else min(a, b)


def index_capacity(n, kinds: Sequence[int], p0: Sequence[int], p1: Sequence[int]):
    """Static sizes (R runs, C columns, KB blocks) of a layer's index at length ``n``.

    Uses only symbolic arithmetic so that fake tensors built from it need no guards.
    """
    runs, cols, blks = 1, 0, 0
    for kind, a, b in zip(kinds, p0, p1):
        if kind == PatternKind.VERTICAL_SLASH:
            runs, cols = max(runs, b), max(cols, a)
        elif kind == PatternKind.A_SHAPE:
            cols = max(cols, a)
        elif kind == PatternKind.BLOCK_SPARSE:
            blks = max(blks, a)
    kb = _sym_min(blks, num_blocks(n)) if blks else 0
    return _sym_min(runs, n), _sym_min(cols, n), kb


def _kv_chunk(b: int, group: int, rows: int, n: int, hk: int) -> int:
    """KV heads per chunk so that a (b, chunk * group, rows, n) fp32 tensor fits SCORE_BYTES."""
    per_head = max(1, b * group * rows * n * 4)
    return max(1, min(hk, SCORE_BYTES // per_head))


def diagonals_to_runs(diags: torch.Tensor):
    """Sorted diagonals (B, H, S), SENTINEL-padded -> runs (B, H, S, 2), run_count (B, H).

    Diagonals closer than ``BLOCK`` are merged into one run, so that run tiles never overlap.
    """
    valid = diags != SENTINEL
    prev_gap = torch.diff(diags, dim=-1, prepend=torch.full_like(diags[..., :1], -BLOCK))
    starts = valid & (prev_gap >= BLOCK)
    next_valid = torch.cat([valid[..., 1:], torch.zeros_like(valid[..., :1])], -1)
    next_gap = torch.diff(diags, dim=-1, append=torch.full_like(diags[..., :1], SENTINEL))
    ends = valid & (~next_valid | (next_gap >= BLOCK))
    lo = torch.where(starts, diags, SENTINEL).sort(-1).values
    hi = torch.where(ends, diags, SENTINEL).sort(-1).values
    return torch.stack([lo, hi], -1), starts.sum(-1, dtype=torch.int32)


def _topk_sorted(scores: torch.Tensor, budgets: torch.Tensor, k: int) -> torch.Tensor:
    """Top ``budgets[h]`` indices per row (k = max budget), ascending, SENTINEL-padded."""
    idx = scores.topk(k, dim=-1).indices.to(torch.int32)
    keep = torch.arange(k, device=scores.device) < budgets.view(1, -1, *([1] * (scores.dim() - 2)))
    return torch.where(keep, idx, SENTINEL).sort(-1).values


def vertical_slash_scores(q, k, key_padding, scale: float):
    """Column and diagonal scores (B, H, N) fp32 from the last LAST_Q queries of every head."""
    b, h, n, _ = q.shape
    hk = k.shape[1]
    group = h // hk
    lq = min(LAST_Q, n)
    pos = torch.arange(n - lq, n, device=q.device)  # (lq,)
    keys = torch.arange(n, device=q.device)
    causal = keys[None, :] <= pos[:, None]  # (lq, n)
    if key_padding is not None:
        allowed = causal[None, None] & key_padding[:, None, None, :].bool()  # (B, 1, lq, n)
    else:
        allowed = causal[None, None]
    diag = (pos[:, None] - keys[None, :]).clamp(min=0).flatten()  # (lq * n,)
    vertical = torch.empty(b, h, n, dtype=torch.float32, device=q.device)
    slash = torch.empty_like(vertical)
    step = _kv_chunk(b, group, lq, n, hk)
    for g0 in range(0, hk, step):
        g1 = min(hk, g0 + step)
        qs = q[:, g0 * group:g1 * group, n - lq:].reshape(b, g1 - g0, group * lq, -1)
        s = torch.matmul(qs, k[:, g0:g1].transpose(-1, -2)).float() * scale
        s = s.view(b, (g1 - g0) * group, lq, n).masked_fill(~allowed, float("-inf"))
        p = torch.softmax(s, dim=-1).nan_to_num_(0.0)  # (B, Hc, lq, n)
        hs = slice(g0 * group, g1 * group)
        vertical[:, hs] = p.sum(2)
        sl = torch.zeros(b, (g1 - g0) * group, n, dtype=torch.float32, device=q.device)
        sl.scatter_add_(2, diag.expand(b, (g1 - g0) * group, -1), p.flatten(2))
        slash[:, hs] = sl
    return vertical, slash


def block_scores(q, k, scale: float):
    """Pooled block scores (B, H, NB, NB) fp32, block-causal, diagonal and block 0 forced."""
    b, h, n, d = q.shape
    hk = k.shape[1]
    group = h // hk
    nb = num_blocks(n)

    def pool(x):  # (B, X, N, D) -> (B, X, NB, D) fp32 means over each block's tokens
        pad = nb * BLOCK - n
        xs = torch.nn.functional.pad(x.float(), (0, 0, 0, pad)).view(x.shape[0], x.shape[1], nb, BLOCK, d)
        counts = torch.full((nb,), BLOCK, device=x.device, dtype=torch.float32)
        counts[-1] = n - (nb - 1) * BLOCK
        return xs.sum(3) / counts[:, None]

    pq, pk = pool(q), pool(k)
    out = torch.empty(b, h, nb, nb, dtype=torch.float32, device=q.device)
    step = _kv_chunk(b, group, nb, nb, hk)
    for g0 in range(0, hk, step):
        g1 = min(hk, g0 + step)
        s = torch.matmul(pq[:, g0 * group:g1 * group].reshape(b, g1 - g0, group * nb, d),
                         pk[:, g0:g1].transpose(-1, -2)) * scale
        out[:, g0 * group:g1 * group] = s.view(b, (g1 - g0) * group, nb, nb)
    qb = torch.arange(nb, device=q.device)
    out.masked_fill_(qb[None, :] > qb[:, None], float("-inf"))
    out[..., 0] = float("inf")
    out.diagonal(dim1=-2, dim2=-1).fill_(float("inf"))
    return out


def estimate_index_ref(q: torch.Tensor, k: torch.Tensor, key_padding: torch.Tensor | None,
                       kinds: Sequence[int], p0: Sequence[int], p1: Sequence[int],
                       scale: float, dense: bool = False) -> SparseIndex:
    """Sparse index of every head of a layer. q (B, H, N, D), k (B, Hk, N, D), key_padding (B, N).

    ``dense=True`` returns the dense index (every head one run over all diagonals).
    """
    b, h, n, _ = q.shape
    dev = q.device
    r_cap, c_cap, kb_cap = index_capacity(n, kinds, p0, p1)
    nb = num_blocks(n)
    kinds_t = torch.tensor(list(kinds), device=dev)
    if dense:
        kinds_t = torch.full_like(kinds_t, int(PatternKind.DENSE))
    runs = torch.full((b, h, r_cap, 2), SENTINEL, dtype=torch.int32, device=dev)
    run_count = torch.zeros(b, h, dtype=torch.int32, device=dev)
    columns = torch.full((b, h, c_cap), SENTINEL, dtype=torch.int32, device=dev)
    blocks = torch.full((b, h, nb, kb_cap), SENTINEL, dtype=torch.int32, device=dev)
    block_count = torch.zeros(b, h, nb, dtype=torch.int32, device=dev)

    def heads_of(kind):
        return (kinds_t == int(kind)).nonzero().flatten().tolist()

    # Dense: one run over every diagonal. A-shape: sink columns, one run of local diagonals.
    for kind in (PatternKind.DENSE, PatternKind.A_SHAPE):
        for hh in heads_of(kind):
            local = n if kind == PatternKind.DENSE else min(p1[hh], n)
            runs[:, hh, 0] = torch.tensor([0, local - 1], dtype=torch.int32, device=dev)
            run_count[:, hh] = 1
            if kind == PatternKind.A_SHAPE:
                sink = min(p0[hh], n)
                columns[:, hh, :sink] = torch.arange(sink, dtype=torch.int32, device=dev)

    vs = heads_of(PatternKind.VERTICAL_SLASH)
    if vs:
        vertical, slash = vertical_slash_scores(q, k, key_padding, scale)
        sel = torch.tensor(vs, device=dev)
        vertical, slash = vertical[:, sel], slash[:, sel]
        vertical[..., :SINK_COLUMNS] = float("inf")
        slash[..., :LOCAL_DIAGONALS] = float("inf")
        nv = torch.tensor([min(p0[i], n) for i in vs], device=dev)
        ns = torch.tensor([min(p1[i], n) for i in vs], device=dev)
        cols = _topk_sorted(vertical, nv, int(nv.max()))
        diags = _topk_sorted(slash, ns, int(ns.max()))
        r, rc = diagonals_to_runs(diags)
        columns[:, sel, :cols.shape[-1]] = cols
        runs[:, sel, :r.shape[-2]] = r
        run_count[:, sel] = rc

    bs = heads_of(PatternKind.BLOCK_SPARSE)
    if bs:
        sel = torch.tensor(bs, device=dev)
        scores = block_scores(q, k, scale)[:, sel]  # (B, Hb, NB, NB)
        budget = torch.tensor([min(p0[i], nb) for i in bs], device=dev)
        picked = _topk_sorted(scores, budget, int(budget.max()))  # (B, Hb, NB, kmax)
        rows = torch.arange(nb, device=dev)
        count = torch.minimum(budget[:, None], rows[None, :] + 1).to(torch.int32)  # (Hb, NB)
        # topk returns the valid (block-causal) entries first; drop the rest.
        picked = torch.where(picked <= rows[:, None], picked, SENTINEL).sort(-1).values
        blocks[:, sel, :, :picked.shape[-1]] = picked
        block_count[:, sel] = count.expand(b, -1, -1)

    return SparseIndex(runs, run_count, runs_to_diag_prefix(runs, run_count, n), columns,
                       column_counts(columns, n), blocks, block_count)
