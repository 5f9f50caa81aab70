"""Index estimation: from a layer's Q and K, build the sparse index of every head at once.

- vertical-slash: softmax of the last ``LAST_Q`` queries against all keys (fp32, causal);
  column sums score the verticals, sums along diagonals (``d = query - key``) score the
  slashes; the first ``SINK_COLUMNS`` columns and ``LOCAL_DIAGONALS`` diagonals are forced;
  top-k of each, then the chosen diagonals are merged into runs (index.py).
- block-sparse: mean-pool Q and K over ``BLOCK`` tokens, score pooled blocks (block-causal),
  keep the top-k key blocks per query block; the diagonal block and block 0 are forced.
- block-mass: per query block, the fewest key tiles reaching ``recall`` of the mass that
  sampled rows of the block put on them (kernels/block_mass.py); a diffuse head: dense.
- A-shape: static, ``sink`` columns and one run of ``local`` diagonals. Dense: one run
  covering every diagonal.

Queries may be a chunk after a cached prefix (q (B, H, Nq, D) over k (B, Hk, N, D), Nq <= N,
queries at positions ``P..N-1`` with ``P = N - Nq``; index.py): vertical-slash scores the
chunk's last ``min(LAST_Q, Nq)`` queries at their positions against all N keys, block-sparse
pools the chunk's queries into the absolute 64-position blocks they fall in, and the index is
built over N either way.

This is the pure-PyTorch implementation (the CPU path and the reference of the GPU kernels).
Work is vectorised over heads; the only loop is over chunks of KV heads, sized so that the
fp32 score tensors stay under ``SCORE_BYTES``.
"""

from __future__ import annotations

import functools
from typing import Callable, Optional, Sequence

import torch

from ..index import BLOCK, SENTINEL, SparseIndex, column_counts, index_rows, num_blocks, runs_to_diag_prefix
from ..patterns import LAST_Q, LOCAL_DIAGONALS, NEIGHBOURS, RECALL_SCALE, SCORE_MAX, SINK_COLUMNS, PatternKind
from .block_mass import finish_index, select_tiles, tile_mass

SCORE_BYTES = 1 << 30  # cap on one chunk's fp32 score tensor during estimation


def _sym_min(a, b):
    return torch.sym_min(a, b) if isinstance(a, torch.SymInt) or isinstance(b, torch.SymInt) else min(a, b)


# Block budgets up to this many blocks give the index a static width KB (the Triton kernel
# sizes its per-row block list at compile time); a larger budget is clipped to the rows of the
# index at run time, so that a budget beyond the prompt's blocks allocates no more than the
# prompt has (1e6 blocks would be tens of GB).
STATIC_BLOCK_BUDGET = 1024
# Block-mass keeps up to this many tiles per query block (128K keys): its index is
# (B, H, N / 64, min(N / 64, 2048)) int32 (150 MB for 9 heads at 128K). A head that needs more in
# some block runs dense (kernels/block_mass.py).
MASS_TILE_CAP = 2048


def index_capacity(n, kinds: Sequence[int], p0: Sequence[int], p1: Sequence[int]):
    """Sizes (R runs, C columns, KB blocks) of a layer's index at length ``n``; KB is the largest
    block budget itself (static) up to ``STATIC_BLOCK_BUDGET``, clipped to the index rows above.

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
        elif kind == PatternKind.BLOCK_MASS:
            blks = max(blks, MASS_TILE_CAP)
    if blks > STATIC_BLOCK_BUDGET:
        blks = _sym_min(blks, index_rows(n))
    return _sym_min(runs, n), _sym_min(cols, n), blks


def _kv_chunk(b: int, group: int, rows: int, n: int, hk: int) -> int:
    """KV heads per chunk so that a (b, chunk * group, rows, n) fp32 tensor fits SCORE_BYTES."""
    per_head = max(1, b * group * rows * n * 4)
    return max(1, min(hk, SCORE_BYTES // per_head))


def diagonals_to_runs(diags: torch.Tensor):
    """Sorted diagonals (B, H, S), SENTINEL-padded -> runs (B, H, S, 2), run_count (B, H).

    Diagonals closer than ``BLOCK`` are merged into one run, so that run tiles never overlap.
    Run starts and ends are compacted in order by their running count (no sort).
    """
    s = diags.shape[-1]
    valid = diags != SENTINEL
    prev_gap = torch.diff(diags, dim=-1, prepend=torch.full_like(diags[..., :1], -BLOCK))
    starts = valid & (prev_gap >= BLOCK)
    next_valid = torch.cat([valid[..., 1:], torch.zeros_like(valid[..., :1])], -1)
    next_gap = torch.diff(diags, dim=-1, append=torch.full_like(diags[..., :1], SENTINEL))
    ends = valid & (~next_valid | (next_gap >= BLOCK))

    def compact(flags):  # flagged diagonals first, in order; the rest go to a spare slot s
        slot = torch.where(flags, flags.cumsum(-1) - 1, s)
        out = torch.full((*diags.shape[:-1], s + 1), SENTINEL, dtype=diags.dtype, device=diags.device)
        return out.scatter_(-1, slot, diags)[..., :s]

    return torch.stack([compact(starts), compact(ends)], -1), starts.sum(-1, dtype=torch.int32)


def _topk_sorted(scores: torch.Tensor, budgets: torch.Tensor, k: int) -> torch.Tensor:
    """Top ``budgets[h]`` indices per row (k = max budget), ascending, SENTINEL-padded."""
    idx = scores.topk(k, dim=-1).indices.to(torch.int32)
    keep = torch.arange(k, device=scores.device) < budgets.view(1, -1, *([1] * (scores.dim() - 2)))
    return torch.where(keep, idx, SENTINEL).sort(-1).values


def vertical_slash_scores(q, k, key_padding, scale: float, heads: torch.Tensor):
    """Column and diagonal scores (B, Hs, N) fp32 of query heads ``heads``, from the last LAST_Q
    queries (logits in fp32); q may be a chunk (Nq <= N, positions N - Nq .. N - 1)."""
    b, h, nq, _ = q.shape
    hk, n = k.shape[1], k.shape[2]
    group = h // hk
    lq = min(LAST_Q, nq)
    pos = torch.arange(n - lq, n, device=q.device)  # (lq,) absolute positions
    keys = torch.arange(n, device=q.device)
    allowed = (keys[None, :] <= pos[:, None])[None, None]  # (1, 1, lq, n)
    if key_padding is not None:
        allowed = allowed & key_padding[:, None, None, :].bool()
    diag = (pos[:, None] - keys[None, :]).clamp(min=0).flatten()  # (lq * n,)
    vertical = torch.empty(b, h, n, dtype=torch.float32, device=q.device)
    slash = torch.empty_like(vertical)
    step = _kv_chunk(b, group, lq, n, hk)
    for g0 in range(0, hk, step):
        g1 = min(hk, g0 + step)
        hc = (g1 - g0) * group
        qs = q[:, g0 * group:g1 * group, nq - lq:].float().reshape(b, g1 - g0, group * lq, -1)
        s = torch.matmul(qs, k[:, g0:g1].float().transpose(-1, -2)) * scale
        s = s.view(b, hc, lq, n).masked_fill(~allowed, float("-inf"))
        p = torch.softmax(s, dim=-1).nan_to_num_(0.0)  # (B, Hc, lq, n)
        vertical[:, g0 * group:g1 * group] = p.sum(2)
        sl = torch.zeros(b, hc, n, dtype=torch.float32, device=q.device)
        sl.scatter_add_(2, diag.expand(b, hc, -1), p.flatten(2))
        slash[:, g0 * group:g1 * group] = sl
    heads = heads.long()
    return vertical[:, heads], slash[:, heads]


def _pool(x: torch.Tensor, weight: Optional[torch.Tensor] = None, start: int = 0) -> torch.Tensor:
    """(B, X, L, D) -> (B, X, NB, D) fp32 means over each block's tokens, for tokens at positions
    ``start .. start + L - 1`` (blocks ``start // BLOCK`` on; ``weight`` (B, L) leaves padded
    tokens out)."""
    b, xh, n, d = x.shape
    front = start % BLOCK  # positions of the first block before the first token
    nb = num_blocks(front + n)
    pad = nb * BLOCK - n - front
    w = torch.ones(b, n, device=x.device) if weight is None else weight.float()
    xs = torch.nn.functional.pad(x.float() * w[:, None, :, None], (0, 0, front, pad)).view(b, xh, nb, BLOCK, d)
    counts = torch.nn.functional.pad(w, (front, pad)).view(b, nb, BLOCK).sum(-1).clamp(min=1)  # (B, NB)
    return xs.sum(3) / counts[:, None, :, None]


def block_topk(q, k, key_padding, scale: float, heads: torch.Tensor, budgets: torch.Tensor, kmax: int):
    """Top ``budgets[i]`` key blocks per query block of head ``heads[i]``: (B, Hb, NB, kmax)
    int32, ascending, SENTINEL-padded (rows of blocks before the chunk's first query, which
    the kernels never read, are all SENTINEL). Pooled scores are block-causal, with the
    diagonal block and block 0 forced; they are scored one chunk of heads and rows at a time."""
    b, h, nq, d = q.shape
    group = h // k.shape[1]
    n = k.shape[2]
    nb = num_blocks(n)
    m0 = (n - nq) // BLOCK  # first query block of the chunk
    heads = heads.long()
    pq = _pool(q[:, heads], start=n - nq)  # (B, Hb, NB - m0, D)
    pk = _pool(k, key_padding)[:, heads // group]  # (B, Hb, NB, D)
    hb = heads.numel()
    rows_per = max(1, SCORE_BYTES // max(1, b * hb * nb * 4))
    out = torch.full((b, hb, nb, kmax), SENTINEL, dtype=torch.int32, device=q.device)
    cols = torch.arange(nb, device=q.device)
    for r0 in range(m0, nb, rows_per):
        r1 = min(nb, r0 + rows_per)
        rows = torch.arange(r0, r1, device=q.device)
        s = torch.matmul(pq[:, :, r0 - m0:r1 - m0], pk.transpose(-1, -2)) * scale  # (B, Hb, R, NB)
        s = s.masked_fill(cols[None, :] > rows[:, None], float("-inf"))
        s[..., 0] = float("inf")
        s.scatter_(3, rows.view(1, 1, -1, 1).expand(b, hb, -1, 1), float("inf"))
        picked = _topk_sorted(s, budgets, kmax)
        # topk returns the (block-causal) valid entries first; drop the rest.
        out[:, :, r0:r1] = torch.where(picked <= rows[:, None], picked, SENTINEL).sort(-1).values
    return out


def _device_ints(values: Sequence[int], device: torch.device) -> torch.Tensor:
    """A small per-call table on ``device`` without a blocking copy: for tables that depend on
    the input's length (budgets clipped to it), which ``_device_table`` would make again, with a
    host sync, at every new length."""
    t = torch.tensor(list(values), dtype=torch.int32)
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


@functools.lru_cache(maxsize=256)
def _device_table(values: tuple, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A small per-head table (``values`` as ``dtype``) on ``device`` that does not depend on the
    input's length (heads, targets, flags), made once per layer's patterns and shared by every
    later call, so never written to: building and copying it at every call is host work on the
    estimate's path, which at 32K costs more than its kernels (docs/BENCHMARKS.md)."""
    with torch.inference_mode(False):  # a table made under inference mode serves later calls outside it
        # a blocking copy, once: a later call on another stream must not read it before it lands
        return torch.tensor(values, dtype=dtype).to(device)


@functools.lru_cache(maxsize=256)
def _mass_plan(heads: tuple, p0: tuple, p1: tuple, device: torch.device) -> tuple:
    """What block-mass heads ``heads`` take from the layer's encoded patterns ``p0``/``p1``, read
    once per layer's patterns (no loop over heads at every call): (targets (Hm,) fp32 as the
    selection takes them, samples, parts, shared (Hm,) bool or None). ``parts``: per tile score,
    (score, its heads' table, their positions among ``heads``, None when every head has it)."""
    targets = (torch.tensor([p0[i] for i in heads], dtype=torch.float32) / RECALL_SCALE).tolist()
    samples = max(p1[i] & (SCORE_MAX - 1) for i in heads)
    scores = ["max" if p1[i] & SCORE_MAX else "mass" for i in heads]
    if len(set(scores)) == 1:
        parts = ((scores[0], _device_table(heads, torch.long, device), None),)
    else:  # heads of both scores in one layer: each score's heads estimated apart
        pos = {sc: tuple(j for j, x in enumerate(scores) if x == sc) for sc in sorted(set(scores))}
        parts = tuple((sc, _device_table(tuple(heads[j] for j in at), torch.long, device),
                       _device_table(at, torch.long, device)) for sc, at in pos.items())
    shared = tuple(bool(p1[i] & NEIGHBOURS) for i in heads)
    return (_device_table(tuple(targets), torch.float32, device), samples, parts,
            _device_table(shared, torch.bool, device) if any(shared) else None)


def _forced_columns(key_padding: Optional[torch.Tensor], n: int, device) -> tuple:
    """(forced, allowed) key masks for vertical scores: the first SINK_COLUMNS unpadded keys are
    always kept (attention sinks sit at the first real tokens, also under left padding)."""
    if key_padding is None:
        forced = torch.arange(n, device=device) < SINK_COLUMNS
        return forced[None, None], None
    kp = key_padding.bool()
    forced = kp & (kp.cumsum(-1) <= SINK_COLUMNS)
    return forced[:, None], kp[:, None]


def assemble_index(q: torch.Tensor, k: torch.Tensor, key_padding: Optional[torch.Tensor],
                   kinds: Sequence[int], p0: Sequence[int], p1: Sequence[int], scale: float,
                   vs_scores: Callable = vertical_slash_scores,
                   capacity: Optional[tuple] = None, mass_scores: Callable = tile_mass,
                   mass_select: Callable = select_tiles, mass_finish: Callable = finish_index) -> SparseIndex:
    """Sparse index of every head of a layer. q (B, H, Nq, D), k (B, Hk, N, D), key_padding (B, N);
    Nq <= N (a chunk after a cached prefix; the index is over N, index.py).

    ``vs_scores(q, k, key_padding, scale, heads)`` computes the vertical-slash scores and
    ``mass_scores(q, k, key_padding, scale, heads, samples, score)`` block-mass's tile estimates and
    ``mass_select`` its selection (block_mass.select_tiles's contract), ``mass_finish`` the end of
    an all-block-mass index (block_mass.finish_index's contract); the rest
    is shared by every implementation. Per-head tables are built on the host from the pattern
    lists: no host sync, no loop over heads. ``capacity`` (R, C, KB) sizes the index when the
    budgets were scaled down from larger ones (ops.estimate_index); by default it is
    ``index_capacity`` of the budgets themselves.
    """
    b, h = q.shape[:2]
    n = k.shape[2]
    dev = q.device
    r_cap, c_cap, kb_cap = capacity if capacity is not None else index_capacity(n, kinds, p0, p1)
    nb = num_blocks(n)
    kinds_l = [int(x) for x in kinds]
    if all(x == PatternKind.BLOCK_MASS for x in kinds_l):
        return block_mass_index(q, k, key_padding, p0, p1, scale, (r_cap, c_cap, kb_cap), mass_scores, mass_select,
                                mass_finish)
    heads_of = {kd: [i for i, x in enumerate(kinds_l) if x == kd] for kd in PatternKind}

    # Dense: one run over every diagonal. A-shape: ``sink`` columns and one run of ``local`` diagonals.
    static = [int(x in (PatternKind.DENSE, PatternKind.A_SHAPE)) for x in kinds_l]
    local = [n if x == PatternKind.DENSE else min(p1[i], n) for i, x in enumerate(kinds_l)]
    sink = [min(p0[i], n) if x == PatternKind.A_SHAPE else 0 for i, x in enumerate(kinds_l)]
    static_t, local_t, sink_t = _device_ints(static + local + sink, dev).view(3, h)
    static_t = static_t.bool()
    runs = torch.full((b, h, r_cap, 2), SENTINEL, dtype=torch.int32, device=dev)
    runs[:, :, 0, 0] = torch.where(static_t, 0, SENTINEL)
    runs[:, :, 0, 1] = torch.where(static_t, local_t - 1, SENTINEL)
    run_count = static_t.to(torch.int32).expand(b, h).contiguous()
    slot = torch.arange(c_cap, dtype=torch.int32, device=dev)
    columns = torch.where(slot < sink_t[:, None], slot, SENTINEL).expand(b, h, c_cap).contiguous()
    blocks = torch.full((b, h, index_rows(n), kb_cap), SENTINEL, dtype=torch.int32, device=dev)
    block_count = torch.zeros(b, h, index_rows(n), dtype=torch.int32, device=dev)

    vs = heads_of[PatternKind.VERTICAL_SLASH]
    if vs:
        nv_l = [min(p0[i], n) for i in vs]
        ns_l = [min(p1[i], n) for i in vs]
        sel, nv, ns = _device_ints(vs + nv_l + ns_l, dev).view(3, len(vs)).long()
        vertical, slash = vs_scores(q, k, key_padding, scale, sel)
        forced, allowed = _forced_columns(key_padding, n, dev)
        if allowed is not None:
            vertical.masked_fill_(~allowed, float("-inf"))
        vertical.masked_fill_(forced, float("inf"))
        slash[..., :LOCAL_DIAGONALS] = float("inf")
        cols = _topk_sorted(vertical, nv, max(nv_l))
        r, rc = diagonals_to_runs(_topk_sorted(slash, ns, max(ns_l)))
        columns[:, sel, :cols.shape[-1]] = cols
        runs[:, sel, :r.shape[-2]] = r
        run_count[:, sel] = rc

    bs = heads_of[PatternKind.BLOCK_SPARSE]
    if bs:
        budget_l = [min(p0[i], nb) for i in bs]
        sel, budget = _device_ints(bs + budget_l, dev).view(2, len(bs)).long()
        picked = block_topk(q, k, key_padding, scale, sel, budget, max(budget_l))
        blocks[:, sel, :nb, :picked.shape[-1]] = picked
        rows = torch.arange(nb, device=dev)
        counts = torch.minimum(budget[:, None], rows[None, :] + 1)
        counts = torch.where(rows >= (n - q.shape[2]) // BLOCK, counts, 0)  # blocks before the chunk: none
        block_count[:, sel, :nb] = counts.to(torch.int32).expand(b, -1, -1)

    bm = heads_of[PatternKind.BLOCK_MASS]
    if bm:
        _block_mass_into(q, k, key_padding, scale, bm, p0, p1, (runs, run_count, blocks, block_count), mass_scores,
                         mass_select)

    return SparseIndex(runs, run_count, runs_to_diag_prefix(runs, run_count, n), columns,
                       column_counts(columns, n), blocks, block_count)


def _mass_tiles(q, k, key_padding, scale: float, heads: Sequence[int], p0, p1, capacity: int, out: Optional[tuple],
                mass_scores: Callable, mass_select: Callable, flags: bool = True) -> tuple:
    """Block-mass heads ``heads``'s tile estimates and selection: (tiles, counts, dense) of the
    query blocks that hold queries (``mass_select``'s contract; ``flags=False``: no dense flags)."""
    m0 = (k.shape[2] - q.shape[2]) // BLOCK
    recall, samples, parts, shared = _mass_plan(tuple(heads), tuple(p0), tuple(p1), q.device)
    if len(parts) == 1:
        est = mass_scores(q, k, key_padding, scale, parts[0][1], samples, score=parts[0][0])
    else:
        est = None
        for score, part_heads, at in parts:
            part = mass_scores(q, k, key_padding, scale, part_heads, samples, score=score)
            if est is None:
                est = part.new_zeros(part.shape[0], len(heads), *part.shape[2:])
            est[:, at] = part
    return mass_select(est, recall, m0, capacity, out=out, shared=shared, flags=flags)


def _block_mass_into(q, k, key_padding, scale: float, heads: Sequence[int], p0, p1, index: tuple,
                     mass_scores: Callable, mass_select: Callable) -> None:
    """Block-mass heads ``heads`` of a layer (some of its heads) written into (runs, run_count,
    blocks, block_count): their tiles for the query blocks that hold queries, and for a diffuse
    head (more tiles in some block than the index holds) one run of every diagonal instead."""
    runs, run_count, blocks, block_count = index
    n = k.shape[2]
    nb, kb_cap = num_blocks(n), blocks.shape[-1]
    m0 = (n - q.shape[2]) // BLOCK
    sel = _device_table(tuple(heads), torch.long, q.device)
    tiles, counts, dense = _mass_tiles(q, k, key_padding, scale, heads, p0, p1, kb_cap, None, mass_scores,
                                       mass_select)
    blocks[:, sel, m0:nb] = tiles
    block_count[:, sel, m0:nb] = torch.where(dense[..., None], 0, counts.clamp(max=kb_cap))
    runs[:, sel, 0, 0] = torch.where(dense, 0, SENTINEL).to(torch.int32)
    runs[:, sel, 0, 1] = torch.where(dense, n - 1, SENTINEL).to(torch.int32)
    run_count[:, sel] = dense.to(torch.int32)


def block_mass_index(q, k, key_padding, p0, p1, scale: float, capacity: tuple, mass_scores: Callable = tile_mass,
                     mass_select: Callable = select_tiles, mass_finish: Callable = finish_index) -> SparseIndex:
    """``assemble_index`` of a layer whose heads are all block-mass (the default): no columns,
    no static runs; the selection writes into the index and ``mass_finish`` (block_mass.finish_index's
    contract) turns diffuse heads dense and writes the runs and the diagonal prefix: a handful of
    launches (the general assembly's small ops cost about as much as the estimate itself at 32K:
    docs/BENCHMARKS.md)."""
    b, h = q.shape[:2]
    n = k.shape[2]
    r_cap, c_cap, kb_cap = capacity
    nb = num_blocks(n)
    m0 = (n - q.shape[2]) // BLOCK
    i32 = dict(dtype=torch.int32, device=q.device)
    runs, run_count = torch.full((b, h, r_cap, 2), SENTINEL, **i32), torch.empty(b, h, **i32)
    blocks = torch.full((b, h, index_rows(n), kb_cap), SENTINEL, **i32)
    block_count = torch.zeros(b, h, index_rows(n), **i32)
    diag_prefix = torch.empty(b, h, n + 1, **i32)
    _mass_tiles(q, k, key_padding, scale, range(h), p0, p1, kb_cap, (blocks[:, :, m0:nb], block_count[:, :, m0:nb]),
                mass_scores, mass_select, flags=False)
    mass_finish(block_count[:, :, :nb], m0, kb_cap, runs, run_count, diag_prefix)
    return SparseIndex(runs, run_count, diag_prefix, torch.full((b, h, c_cap), SENTINEL, **i32),
                       torch.zeros(b, h, index_rows(n), **i32), blocks, block_count)


def estimate_index_ref(q, k, key_padding, kinds, p0, p1, scale: float,
                       capacity: Optional[tuple] = None) -> SparseIndex:
    """The pure-PyTorch estimation (CPU path and reference)."""
    return assemble_index(q, k, key_padding, kinds, p0, p1, scale, vertical_slash_scores, capacity)
