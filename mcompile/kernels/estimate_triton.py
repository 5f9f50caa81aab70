"""Index estimation on the GPU: vertical-slash scores without the (B, H, 64, N) score tensor
(block-mass's tile estimates: block_mass_triton.py).

Math (per batch b and vertical-slash head h; the last ``lq = min(LAST_Q, Nq)`` queries of q
(B, H, Nq, D) sit at positions ``P + i``, ``P = N - lq``, also when q is a chunk after a
cached prefix (Nq < N: they are q's rows ``Nq - lq + i``); a key j is allowed for row i iff
``j <= P + i`` and ``key_padding[b, j]``)::

    p[i, j]      = softmax_j(scale * q[P + i] . k[j])   over allowed j (0 elsewhere; all-padded rows 0)
    vertical[j]  = sum_i p[i, j]
    slash[d]     = sum_i p[i, P + i - d]                (d = query - key)

Two passes over the keys, both in 64-query x 64-key tiles on tensor cores, both base 2;
tile t holds the keys ``[P - 64 t, P - 64 t + 64)``:

1. ``_vs_stats_kernel``: each program walks its share of the tiles keeping a running row max
   and sum of exp; the per-program partials (B * Hs, SPLITS, 64) are merged in PyTorch.
2. ``_vs_scores_kernel``: the normalised probabilities of a tile give the vertical scores of
   its 64 keys (column sums, no other tile writes them). Entry (row i, column c) lies on
   diagonal ``64 t + i - c``: diagonal tile t (``u = i - c >= 0``) or t - 1 (``u = i - c + 64``).
   ``tl.gather`` reads column ``(i - u) mod 64`` for each (row i, offset u), so one 64 x 64
   gather serves both: the entries with ``i >= u`` sum to tile t's diagonals (carried to the
   next iteration), the others complete tile t - 1's, which is then stored. A program owning
   tiles ``[t0, t1)`` also reads key tile t1, whose upper part completes diagonal tile
   t1 - 1. No atomics, no scratch. (A 128-key window per diagonal tile, which needs no carry,
   computes twice the logits and exponentials per tile: slower, docs/BENCHMARKS.md.)

Interior tiles (all keys before the first estimation query, no padding, 64 real rows) skip
the mask.

Grid of both: ``(SPLITS, B * Hs)`` over the Hs vertical-slash heads, each program taking a
contiguous range of tiles. Head dims outside HEAD_DIMS (up to 128) are zero-padded, as in
sparse_attention_triton (only the lq estimation rows of q are copied). The index is then
assembled as ``estimate_index_ref`` does, with its PyTorch top-k and run-merging helpers,
vectorised over heads and without host syncs.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import triton
import triton.language as tl

from ..index import SparseIndex
from ..patterns import LAST_Q
from .block_mass_triton import finish_index_triton, select_tiles_triton, tile_mass_triton
from .estimate import assemble_index
from .triton_common import HEAD_DIMS, LOG2E, MAX_HEAD_DIM, NEG_INIT, interpreting, pad_head_dim, padded_head_dim
from .estimate import estimate_index_ref  # noqa: F401  (the reference this module matches)

TILE = 64  # keys per tile (and diagonals per diagonal tile); equals LAST_Q rows
# Programs to aim for per launch (several waves on a 132-SM H100); each takes a contiguous
# range of tiles of one head, so partials stay (B * Hs, SPLITS, 64).
TARGET_PROGRAMS = 1024
NUM_WARPS = 4  # one warpgroup per 64-row tile
NUM_STAGES = 2

assert LAST_Q == TILE, "the kernels hold the LAST_Q estimation queries in one 64-row tile"


@triton.jit
def _load_rows(Q, b64, h64, Q_ROW0, LQ, stride_qb, stride_qh, stride_qn, stride_qd,
               HEAD_DIM: tl.constexpr, ROWS: tl.constexpr):
    i = tl.arange(0, ROWS)
    offs_d = tl.arange(0, HEAD_DIM)
    ptrs = (Q + b64 * stride_qb + h64 * stride_qh + (Q_ROW0 + i).to(tl.int64)[:, None] * stride_qn
            + offs_d[None, :] * stride_qd)
    return tl.load(ptrs, mask=(i < LQ)[:, None], other=0.0)


@triton.jit
def _masked_logits(q, k_base, kp_base, keys, pos, row_ok, N, stride_kn, stride_kd, stride_kpn,
                   qk_scale, HEAD_DIM: tl.constexpr, HAS_PADDING: tl.constexpr,
                   DOT_PRECISION: tl.constexpr):
    """Base-2 logits of the rows against ``keys``, -inf where a key is not allowed."""
    offs_d = tl.arange(0, HEAD_DIM)
    in_seq = (keys >= 0) & (keys < N)
    keys64 = keys.to(tl.int64)
    k = tl.load(k_base + keys64[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                mask=in_seq[:, None], other=0.0)
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
    allowed = in_seq[None, :] & (keys[None, :] <= pos[:, None]) & row_ok[:, None]
    if HAS_PADDING:
        allowed = allowed & (tl.load(kp_base + keys64 * stride_kpn, mask=in_seq, other=0) != 0)[None, :]
    return tl.where(allowed, s, float("-inf"))


@triton.jit
def _tile_logits(q, k_base, kp_base, keys, pos, row_ok, t, P, LQ, N, stride_kn, stride_kd, stride_kpn,
                 qk_scale, HEAD_DIM: tl.constexpr, ROWS: tl.constexpr, HAS_PADDING: tl.constexpr,
                 DOT_PRECISION: tl.constexpr):
    """``_masked_logits`` of key tile t (keys ``P - 64 t + c``). Interior tiles (keys in
    ``[0, P)``, every row a real query, no padding) skip the mask: every entry is allowed."""
    if HAS_PADDING:
        s = _masked_logits(q, k_base, kp_base, keys, pos, row_ok, N, stride_kn, stride_kd, stride_kpn,
                           qk_scale, HEAD_DIM, HAS_PADDING, DOT_PRECISION)
    elif (t >= 1) & (P - t * ROWS >= 0) & (LQ == ROWS):
        offs_d = tl.arange(0, HEAD_DIM)
        k = tl.load(k_base + keys.to(tl.int64)[:, None] * stride_kn + offs_d[None, :] * stride_kd)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
    else:
        s = _masked_logits(q, k_base, kp_base, keys, pos, row_ok, N, stride_kn, stride_kd, stride_kpn,
                           qk_scale, HEAD_DIM, HAS_PADDING, DOT_PRECISION)
    return s


@triton.jit
def _vs_stats_kernel(Q, K, KP, Heads, MPart, LPart,
                     stride_qb, stride_qh, stride_qn, stride_qd,
                     stride_kb, stride_kh, stride_kn, stride_kd, stride_kpb, stride_kpn,
                     N, P, Q_ROW0, LQ, GROUP, HS, NUM_TILES, TILES_PER_PROG, SPLITS, qk_scale,
                     HEAD_DIM: tl.constexpr, ROWS: tl.constexpr, HAS_PADDING: tl.constexpr,
                     DOT_PRECISION: tl.constexpr):
    split = tl.program_id(0)
    bs = tl.program_id(1)
    b64 = (bs // HS).to(tl.int64)
    h = tl.load(Heads + bs % HS)
    q = _load_rows(Q, b64, h.to(tl.int64), Q_ROW0, LQ, stride_qb, stride_qh, stride_qn, stride_qd,
                   HEAD_DIM, ROWS)
    k_base = K + b64 * stride_kb + (h // GROUP).to(tl.int64) * stride_kh
    kp_base = KP + b64 * stride_kpb
    i = tl.arange(0, ROWS)
    pos = P + i
    row_ok = i < LQ
    m_i = tl.full([ROWS], NEG_INIT, dtype=tl.float32)
    l_i = tl.zeros([ROWS], dtype=tl.float32)
    t0 = split * TILES_PER_PROG
    t1 = tl.minimum(t0 + TILES_PER_PROG, NUM_TILES)
    for t in range(t0, t1):
        keys = P - t * ROWS + tl.arange(0, ROWS)
        s = _tile_logits(q, k_base, kp_base, keys, pos, row_ok, t, P, LQ, N, stride_kn, stride_kd,
                         stride_kpn, qk_scale, HEAD_DIM, ROWS, HAS_PADDING, DOT_PRECISION)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        l_i = l_i * tl.math.exp2(m_i - m_new) + tl.sum(tl.math.exp2(s - m_new[:, None]), 1)
        m_i = m_new
    out = (bs * SPLITS + split).to(tl.int64) * ROWS + i
    tl.store(MPart + out, m_i)
    tl.store(LPart + out, l_i)


@triton.jit
def _vs_scores_kernel(Q, K, KP, Heads, RowMax, RowInv, Vertical, Slash,
                      stride_qb, stride_qh, stride_qn, stride_qd,
                      stride_kb, stride_kh, stride_kn, stride_kd, stride_kpb, stride_kpn,
                      N, P, Q_ROW0, LQ, GROUP, HS, NUM_TILES, TILES_PER_PROG, qk_scale,
                      HEAD_DIM: tl.constexpr, ROWS: tl.constexpr,
                      HAS_PADDING: tl.constexpr, DOT_PRECISION: tl.constexpr):
    split = tl.program_id(0)
    bs = tl.program_id(1)
    b64 = (bs // HS).to(tl.int64)
    h = tl.load(Heads + bs % HS)
    q = _load_rows(Q, b64, h.to(tl.int64), Q_ROW0, LQ, stride_qb, stride_qh, stride_qn, stride_qd,
                   HEAD_DIM, ROWS)
    k_base = K + b64 * stride_kb + (h // GROUP).to(tl.int64) * stride_kh
    kp_base = KP + b64 * stride_kpb
    i = tl.arange(0, ROWS)
    pos = P + i
    row_ok = i < LQ
    row_max = tl.load(RowMax + bs.to(tl.int64) * ROWS + i)
    row_inv = tl.load(RowInv + bs.to(tl.int64) * ROWS + i)  # 1 / sum, 0 for rows with no key
    c = tl.arange(0, ROWS)
    u = tl.arange(0, ROWS)
    skew = (i[:, None] - u[None, :]) & (ROWS - 1)  # tile column of (row i, diagonal offset u mod 64)
    lower = i[:, None] >= u[None, :]  # column i - u: diagonal 64 t + u; else i - u + 64: 64 (t - 1) + u
    out_base = bs.to(tl.int64) * N
    t0 = split * TILES_PER_PROG
    t1 = tl.minimum(t0 + TILES_PER_PROG, NUM_TILES)
    carry = tl.zeros([ROWS], dtype=tl.float32)  # diagonal tile t - 1 from key tile t - 1
    for t in range(t0, t1 + 1):  # key tile t1 only completes diagonal tile t1 - 1
        keys = P - t * ROWS + c
        s = _tile_logits(q, k_base, kp_base, keys, pos, row_ok, t, P, LQ, N, stride_kn, stride_kd,
                         stride_kpn, qk_scale, HEAD_DIM, ROWS, HAS_PADDING, DOT_PRECISION)
        p = tl.math.exp2(s - row_max[:, None]) * row_inv[:, None]  # masked entries: exp2(-inf) = 0
        owned = (keys >= 0) & (keys < N) & (keys >= P - (t1 - 1) * ROWS)  # key tiles t < t1
        tl.store(Vertical + out_base + keys, tl.sum(p, 0), mask=owned)
        g = tl.gather(p, skew, 1)
        diag = (t - 1) * ROWS + u
        tl.store(Slash + out_base + diag, carry + tl.sum(tl.where(lower, 0.0, g), 0),
                 mask=(diag >= t0 * ROWS) & (diag < N))  # t > t0
        carry = tl.sum(tl.where(lower, g, 0.0), 0)


def _num_splits(num_tiles: int, rows_of_programs: int) -> int:
    return max(1, min(num_tiles, triton.cdiv(TARGET_PROGRAMS, max(1, rows_of_programs))))


def vertical_slash_scores_triton(q: torch.Tensor, k: torch.Tensor, key_padding: Optional[torch.Tensor],
                                 scale: float, heads: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Column and diagonal scores (B, Hs, N) fp32 of the query heads ``heads`` (int32, (Hs,)).
    q (B, H, Nq, D) may be a chunk after a cached prefix over k (B, Hk, N, D), Nq <= N.

    Equals ``vertical_slash_scores(q, k, key_padding, scale)[:, heads]`` up to fp32 rounding.
    """
    b, h, nq, d = q.shape
    hk, n = k.shape[1], k.shape[2]
    if d > MAX_HEAD_DIM or k.shape[-1] != d:
        raise ValueError(f"estimate kernels support head dims up to {MAX_HEAD_DIM}, got q {d}, k {k.shape[-1]}")
    if d not in HEAD_DIMS:  # zero-pad: only the estimation rows of q, and k
        dp = padded_head_dim(d)
        lq = min(LAST_Q, nq)
        return vertical_slash_scores_triton(pad_head_dim(q[:, :, nq - lq:], dp), pad_head_dim(k, dp),
                                            key_padding, scale, heads)
    hs = heads.numel()
    vertical = torch.empty(b, hs, n, dtype=torch.float32, device=q.device)
    slash = torch.empty_like(vertical)
    if b * hs == 0 or n == 0:
        return vertical, slash
    lq = min(LAST_Q, nq)
    p0, q_row0 = n - lq, nq - lq
    # Tile t covers keys [p0 - 64 t, p0 - 64 t + 64) and diagonals [64 t, 64 t + 64): reach key 0
    # (and with it diagonal N - 1) even when fewer than 64 queries put p0 past N - 64.
    num_tiles = triton.cdiv(p0, TILE) + 1
    splits = _num_splits(num_tiles, b * hs)
    per_prog = triton.cdiv(num_tiles, splits)
    splits = triton.cdiv(num_tiles, per_prog)  # no idle programs
    if key_padding is None:
        kp, kp_strides, has_padding = heads, (0, 0), False  # never read
    else:
        kp = (key_padding if key_padding.dtype == torch.bool else key_padding != 0).view(torch.uint8)
        kp_strides, has_padding = kp.stride(), True
    common = (*q.stride(), *k.stride(), *kp_strides)
    meta = dict(HEAD_DIM=d, ROWS=TILE, HAS_PADDING=has_padding,
                DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32")
    launch = {} if interpreting() else dict(num_warps=NUM_WARPS, num_stages=NUM_STAGES)
    qk_scale = float(scale) * LOG2E
    heads = heads.to(torch.int32).contiguous()

    m_part = torch.empty(b * hs, splits, TILE, dtype=torch.float32, device=q.device)
    l_part = torch.empty_like(m_part)
    _vs_stats_kernel[(splits, b * hs)](
        q, k, kp, heads, m_part, l_part, *common,
        n, p0, q_row0, lq, h // hk, hs, num_tiles, per_prog, splits, qk_scale, **meta, **launch)
    row_max = m_part.max(1).values  # (B * Hs, 64)
    row_sum = (l_part * torch.exp2(m_part - row_max[:, None])).sum(1)
    row_inv = torch.where(row_sum > 0, 1.0 / row_sum, 0.0).contiguous()
    _vs_scores_kernel[(splits, b * hs)](
        q, k, kp, heads, row_max.contiguous(), row_inv, vertical, slash, *common,
        n, p0, q_row0, lq, h // hk, hs, num_tiles, per_prog, qk_scale, **meta, **launch)
    return vertical, slash


def _check(q, k, key_padding, kinds, p0, p1):
    if q.dim() != 4 or k.dim() != 4 or k.shape[0] != q.shape[0] or k.shape[3] != q.shape[3] \
            or q.shape[2] > k.shape[2]:
        raise ValueError(f"q (B, H, Nq, D) and k (B, Hk, N, D) with Nq <= N expected, got {tuple(q.shape)} "
                         f"and {tuple(k.shape)}")
    if k.shape[1] == 0 or q.shape[1] % k.shape[1]:
        raise ValueError(f"query heads ({q.shape[1]}) must be a multiple of key heads ({k.shape[1]})")
    if not (len(kinds) == len(p0) == len(p1) == q.shape[1]):
        raise ValueError(f"need one pattern per query head ({q.shape[1]}), got {len(kinds)}/{len(p0)}/{len(p1)}")
    if key_padding is not None and tuple(key_padding.shape) != (k.shape[0], k.shape[2]):
        raise ValueError(f"key_padding must be (B, N) = {(k.shape[0], k.shape[2])}, got {tuple(key_padding.shape)}")


def estimate_index_triton(q: torch.Tensor, k: torch.Tensor, key_padding: Optional[torch.Tensor],
                          kinds: Sequence[int], p0: Sequence[int], p1: Sequence[int],
                          scale: float, capacity: Optional[tuple] = None) -> SparseIndex:
    """Same contract and result as ``estimate_index_ref``; vertical-slash scores come from the
    fused kernels above, the index assembly is the shared one."""
    _check(q, k, key_padding, kinds, p0, p1)
    return assemble_index(q, k, key_padding, kinds, p0, p1, scale, vertical_slash_scores_triton, capacity,
                          tile_mass_triton, select_tiles_triton, finish_index_triton)
