"""Block-mass estimation on the GPU: tile estimates without the sampled rows' probabilities in
memory, and the per-block selection without a sort.

Math (kernels/block_mass.py; per batch b and block-mass head h, for query block m its sampled
rows r at positions ``pos[m, s]``, a key j allowed for row r iff ``j <= pos`` and
``key_padding[b, j]``)::

    p[r, j]  = softmax_j(scale * q[pos_r] . k[j])             (0 where not allowed)
    e[m, t]  = mean_{s} sum_{j in [64 t, 64 t + 64)} p[(m, s), j]

Three kernels:

1. ``_tile_sums_kernel``, grid ``(row groups, key splits, B * Hm)``: a row group is ROWS sampled
   rows (``ROWS / S`` query blocks of S rows), a key split ``SPLIT`` consecutive key tiles. One
   pass over its tiles with a running row max ``m`` and sum of exp ``l`` (base 2, as flash
   attention keeps them); for every tile it stores ``log2(sum_j exp2(s_j - m)) + m``, the log of
   the tile's unnormalised mass, which does not depend on the max at the time; at the end the
   split's ``m`` and ``l``. With ``SCORE_MAX`` (block_mass's "max" score) it stores the tile's
   largest logit and keeps ``m`` and ``l`` over those: one maximum per logit and one exponential
   per row and tile. One exponential per logit (a first pass for the row statistics would
   double them), and no mask on the tiles that lie wholly before the group's first sampled row:
   the per-logit mask arithmetic, not the exponentials, bounds this loop (packed half-precision
   exponentials did not speed it up; dropping the mask took 27% off at 128K). Splitting the keys
   keeps the GPU busy: one program per row group walking every key tile leaves the latest groups
   (the longest walks) running alone.
2. ``_tile_mass_kernel``, grid ``(query blocks, B * Hm)``: combines each sampled row's split
   statistics into its log-normaliser, then ``e[m, t]`` = the mean over the block's S rows of
   ``exp2(log tile sum - log normaliser)``. The (B, H, N / 64 * S, N) probabilities never
   exist; the log tile sums (one fp32 per sampled row and key tile) are kept for at most
   ``TILE_SUM_BYTES`` at a time, the row groups taken in chunks beyond that.
3. ``_select_kernel``, grid ``(M, B * Hm)``: the selection of ``block_mass.select_tiles`` per
   query block by a search on the bits of the threshold (estimates are non-negative, so their
   int32 bit patterns are ordered like their values), then the kept tiles written in ascending
   order by a running prefix sum. No sort, no (B, Hm, M, NB) temporaries. The search is a
   bisection (31 passes over the block's estimates, each ending in a block-wide sum) or, with
   ``arity``, ``arity - 1`` thresholds a pass (16: 8 passes; 64: 6): the same threshold in
   fewer dependent reductions, but each pass sums against ``arity - 1`` thresholds, and the
   bisection is the faster (``SELECT_ARITY``; benchmarks/block_mass_kernel.py times both).

Head dims outside HEAD_DIMS (up to 128) are zero-padded, as in sparse_attention_triton.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ..index import BLOCK, SENTINEL, num_blocks
from ..patterns import SCORES
from .block_mass import LOCAL_TILES
from .triton_common import HEAD_DIMS, LOG2E, MAX_HEAD_DIM, NEG_INIT, interpreting, pad_head_dim, padded_head_dim

# Sampled rows per program and the tile-sums launch: 128 rows on 4 warps edge out 64 rows by
# 2-3% at 64K-128K, 8 warps lose (docs/BENCHMARKS.md, "The estimate's kernels")
ROWS = 128
TILE_SUM_WARPS = 4  # one warpgroup
TILE_SUM_STAGES = 2
SPLIT = 32  # key tiles per program (2048 keys); see benchmarks/block_mass_kernel.py
SELECT_CHUNK = 1024  # estimates the selection holds at a time
MASS_CHUNK = 256  # key tiles the averaging kernel holds at a time
TILE_SUM_BYTES = 1 << 29  # bound on the per-row tile sums kept between the two kernels
FINISH_CHUNK = 1024  # entries of the diagonal prefix per program of the finishing kernel
SENTINEL_I = tl.constexpr(SENTINEL)  # index.SENTINEL inside the kernels
SELECT_ARITY = 2  # the selection's threshold search: bisection, faster than 16- or 64-ary (docs/BENCHMARKS.md)

def search_steps(arity: int) -> int:
    """Passes of an ``arity``-ary search that pin any non-negative fp32 bit pattern (31 bits):
    each leaves at most ceil(span / arity) of the span."""
    span, steps = (1 << 31), 0
    while span > 1:
        span, steps = -(-span // arity), steps + 1
    return steps


@triton.jit
def _rows(Q, b64, h, pid, M, M0, N, P, stride_qb, stride_qh, stride_qn, stride_qd,
          HEAD_DIM: tl.constexpr, SAMPLES: tl.constexpr, GROUPS: tl.constexpr):
    """The program's GROUPS * SAMPLES sampled query rows: (q, absolute positions, valid). Block m's rows sit
    at offsets 63, 63 - 64 / S, ... (block_mass.sample_offsets), clamped to the block's queries."""
    r = tl.arange(0, GROUPS * SAMPLES)
    blk = pid * GROUPS + r // SAMPLES  # estimate row of each sampled row
    row_ok = blk < M
    start = (M0 + blk) * 64
    pos = start + 63 - (r % SAMPLES) * (64 // SAMPLES)
    pos = tl.minimum(tl.maximum(pos, tl.maximum(start, P)), tl.minimum(start + 63, N - 1))
    pos = tl.where(row_ok, pos, P)
    offs_d = tl.arange(0, HEAD_DIM)
    q = tl.load(Q + b64 * stride_qb + h.to(tl.int64) * stride_qh + (pos - P).to(tl.int64)[:, None] * stride_qn
                + offs_d[None, :] * stride_qd, mask=row_ok[:, None], other=0.0)
    return q, pos, row_ok


@triton.jit
def _logits(q, k_base, kp_base, keys, pos, row_ok, N, stride_kn, stride_kd, stride_kpn, qk_scale,
            HEAD_DIM: tl.constexpr, HAS_PADDING: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Base-2 logits of the rows against ``keys``, -inf where a key is not allowed."""
    offs_d = tl.arange(0, HEAD_DIM)
    in_seq = keys < N
    k = tl.load(k_base + keys.to(tl.int64)[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                mask=in_seq[:, None], other=0.0)
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
    allowed = in_seq[None, :] & (keys[None, :] <= pos[:, None]) & row_ok[:, None]
    if HAS_PADDING:
        allowed = allowed & (tl.load(kp_base + keys.to(tl.int64) * stride_kpn, mask=in_seq, other=0) != 0)[None, :]
    return tl.where(allowed, s, float("-inf"))


@triton.jit
def _tile_sums_kernel(Q, K, KP, Heads, V, Mx, Lx,
                      stride_qb, stride_qh, stride_qn, stride_qd,
                      stride_kb, stride_kh, stride_kn, stride_kd, stride_kpb, stride_kpn,
                      N, P, M, M0, NB, GROUP, HM, SPLITS, RG, G0, RC, qk_scale,
                      HEAD_DIM: tl.constexpr, SAMPLES: tl.constexpr, GROUPS: tl.constexpr, SPLIT_TILES: tl.constexpr,
                      HAS_PADDING: tl.constexpr, DOT_PRECISION: tl.constexpr, SCORE_MAX: tl.constexpr):
    ROWS_: tl.constexpr = GROUPS * SAMPLES
    local = tl.program_id(0)  # row group within the launch's chunk
    pid = G0 + local
    split = tl.program_id(1)
    bh = tl.program_id(2)
    last_tile = tl.minimum(M0 + tl.minimum((pid + 1) * GROUPS, M), NB)  # the group needs tiles [0, last_tile)
    t0 = split * SPLIT_TILES
    if t0 < last_tile:
        b64 = (bh // HM).to(tl.int64)
        h = tl.load(Heads + bh % HM)
        q, pos, row_ok = _rows(Q, b64, h, pid, M, M0, N, P, stride_qb, stride_qh, stride_qn, stride_qd,
                               HEAD_DIM, SAMPLES, GROUPS)
        k_base = K + b64 * stride_kb + (h // GROUP).to(tl.int64) * stride_kh
        kp_base = KP + b64 * stride_kpb
        c = tl.arange(0, 64)
        offs_d = tl.arange(0, HEAD_DIM)
        r = tl.arange(0, ROWS_)
        v_base = V + bh.to(tl.int64) * NB * RC + local * ROWS_ + r
        m_i = tl.full([ROWS_], NEG_INIT, dtype=tl.float32)
        l_i = tl.zeros([ROWS_], dtype=tl.float32)
        # tiles every valid row may see whole: no mask to build (rows past M hold zeros, never read)
        full_end = tl.minimum((tl.maximum((M0 + pid * GROUPS) * 64, P) + 1) // 64, N // 64)
        if HAS_PADDING:
            full_end = full_end * 0
        for t in range(t0, tl.minimum(t0 + SPLIT_TILES, last_tile)):
            if t >= full_end:
                s = _logits(q, k_base, kp_base, t * 64 + c, pos, row_ok, N, stride_kn, stride_kd, stride_kpn,
                            qk_scale, HEAD_DIM, HAS_PADDING, DOT_PRECISION)
                if SCORE_MAX:
                    top = tl.max(s, 1)
            else:  # t * 64 + 63 below every valid row's position, the tile inside the sequence
                k = tl.load(k_base + (t * 64 + c).to(tl.int64)[:, None] * stride_kn + offs_d[None, :] * stride_kd)
                s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
                if SCORE_MAX:
                    top = tl.max(s, 1) * qk_scale  # the scale is positive: one product per row, not per logit
                else:
                    s = s * qk_scale
            if SCORE_MAX:
                # the tile's log2 score is its largest logit; the row statistics run over tiles
                m_new = tl.maximum(m_i, top)
                l_i = l_i * tl.math.exp2(m_i - m_new) + tl.math.exp2(top - m_new)
                m_i = m_new
                tl.store(v_base + t * RC, top)
            else:
                m_new = tl.maximum(m_i, tl.max(s, 1))
                tile_sum = tl.sum(tl.math.exp2(s - m_new[:, None]), 1)
                l_i = l_i * tl.math.exp2(m_i - m_new) + tile_sum
                m_i = m_new
                # log2 of the tile's unnormalised mass: exact whatever the row max turns out to be
                tl.store(v_base + t * RC, tl.math.log2(tile_sum) + m_new)  # t * RC < NB * RC: int32
        out = (bh.to(tl.int64) * SPLITS + split) * RG * ROWS_ + pid * ROWS_ + r
        tl.store(Mx + out, m_i)
        tl.store(Lx + out, l_i)


@triton.jit
def _tile_mass_kernel(V, Mx, Lx, Est, M, M0, NB, SPLITS, RG, G0, RC,
                      SAMPLES: tl.constexpr, GROUPS: tl.constexpr, SPLIT_TILES: tl.constexpr, CHUNK: tl.constexpr):
    ROWS_: tl.constexpr = GROUPS * SAMPLES
    blk = G0 * GROUPS + tl.program_id(0)  # estimate row (query block M0 + blk)
    bh = tl.program_id(1)
    if blk < M:
        pid = blk // GROUPS
        s = tl.arange(0, SAMPLES)
        # each sampled row's max and sum over every split its group walked
        stats = bh.to(tl.int64) * SPLITS * RG * ROWS_ + blk * SAMPLES + s
        group_last = tl.minimum(M0 + tl.minimum((pid + 1) * GROUPS, M), NB)
        m_r = tl.full([SAMPLES], NEG_INIT, dtype=tl.float32)
        l_r = tl.zeros([SAMPLES], dtype=tl.float32)
        for sp in range(0, tl.cdiv(group_last, SPLIT_TILES)):
            m_s = tl.load(Mx + stats + sp * RG * ROWS_)
            l_s = tl.load(Lx + stats + sp * RG * ROWS_)
            m_new = tl.maximum(m_r, m_s)
            l_r = l_r * tl.math.exp2(m_r - m_new) + l_s * tl.math.exp2(m_s - m_new)
            m_r = m_new
        # rows with no allowed key contribute 0
        shift = tl.where(l_r > 0, m_r + tl.math.log2(tl.where(l_r > 0, l_r, 1.0)), float("inf"))
        ncausal = tl.minimum(M0 + blk + 1, NB)
        v_rows = V + bh.to(tl.int64) * NB * RC + (blk * SAMPLES - G0 * ROWS_) + s
        est = Est + (bh.to(tl.int64) * M + blk) * NB
        c = tl.arange(0, CHUNK)
        for c0 in range(0, ncausal, CHUNK):
            t = c0 + c
            inside = t < ncausal
            v = tl.load(v_rows[:, None] + t.to(tl.int64)[None, :] * RC, mask=inside[None, :], other=float("-inf"))
            mass = tl.sum(tl.math.exp2(v - shift[:, None]), 0) / SAMPLES
            tl.store(est + t, mass, mask=inside)


@triton.jit
def _select_kernel(Est, Recall, Tiles, Counts, M, M0, NB, HM, CAP, stride_tb, stride_th, stride_tm,
                   stride_cb, stride_ch,
                   LOCAL: tl.constexpr, CHUNK: tl.constexpr, STEPS: tl.constexpr, ARITY: tl.constexpr = 2):
    row = tl.program_id(0)
    bh = tl.program_id(1)
    blk = M0 + row  # the query block; its causal tiles are [0, blk]
    ncausal = tl.minimum(blk + 1, NB)
    recall = tl.load(Recall + bh % HM)
    est = Est + (bh.to(tl.int64) * M + row) * NB
    c = tl.arange(0, CHUNK)

    total = 0.0
    forced_mass = 0.0
    top = 0  # largest bit pattern among the free (not forced) tiles
    for c0 in range(0, ncausal, CHUNK):
        t = c0 + c
        e = tl.load(est + t, mask=t < ncausal, other=0.0)
        forced = (t == 0) | ((t >= blk - LOCAL) & (t <= blk))
        total += tl.sum(e, 0)
        forced_mass += tl.sum(tl.where(forced, e, 0.0), 0)
        top = tl.maximum(top, tl.max(tl.where(forced, 0, e.to(tl.int32, bitcast=True)), 0))
    rest = recall * total - forced_mass  # what the free tiles must add

    # the largest threshold whose free tiles at or above it still reach ``rest``
    lo = 0
    hi = top
    if ARITY == 2:  # bisection: one threshold per pass over the estimates
        for _ in range(STEPS):
            mid = lo + (hi - lo + 1) // 2
            above = 0.0
            for c0 in range(0, ncausal, CHUNK):
                t = c0 + c
                e = tl.load(est + t, mask=t < ncausal, other=0.0)
                free = (t != 0) & ((t < blk - LOCAL) | (t > blk))
                above += tl.sum(tl.where(free & (e.to(tl.int32, bitcast=True) >= mid), e, 0.0), 0)
            reached = above >= rest
            lo = tl.where(reached, mid, lo)
            hi = tl.where(reached, hi, mid - 1)
    else:  # ARITY - 1 thresholds per pass (the first is lo): log2(ARITY) bits a pass, as many passes fewer
        SEARCH: tl.constexpr = 4096 // ARITY  # estimates per (ARITY, SEARCH) step: 32 values a thread at 4 warps
        j = tl.arange(0, ARITY)
        cs = tl.arange(0, SEARCH)
        for _ in range(STEPS):
            span = tl.maximum(hi - lo + 1, 1).to(tl.int64)
            mids = (lo + (span * j) // ARITY).to(tl.int32)  # non-decreasing, mids[0] = lo
            above = tl.zeros([ARITY], dtype=tl.float32)
            for c0 in range(0, ncausal, SEARCH):
                t = c0 + cs
                e = tl.load(est + t, mask=t < ncausal, other=0.0)
                free = (t != 0) & ((t < blk - LOCAL) | (t > blk))
                take = free[None, :] & (e.to(tl.int32, bitcast=True)[None, :] >= mids[:, None])
                above += tl.sum(tl.where(take, e[None, :], 0.0), 1)
            # a higher threshold keeps a subset, so the reached ones are a prefix; lo counts as
            # reached, as in the bisection (it is 0 until a threshold is reached)
            cnt = tl.sum(((above >= rest) | (j == 0)).to(tl.int32), 0)
            new_hi = tl.where(cnt < ARITY, tl.sum(tl.where(j == cnt, mids, 0), 0) - 1, hi)
            lo = tl.sum(tl.where(j == cnt - 1, mids, 0), 0)
            hi = new_hi
    lo = tl.where(rest > 0.0, lo, 0x7F800001)  # nothing left to reach: the forced tiles alone (above +inf)
    # recall 1: every causal tile, also those the samples gave no mass; otherwise positive ones
    lo = tl.where(recall >= 1.0, 0, lo)
    floor = tl.where(recall >= 1.0, -1.0, 0.0)

    kept = 0
    out = Tiles + (bh // HM).to(tl.int64) * stride_tb + (bh % HM) * stride_th + row.to(tl.int64) * stride_tm
    for c0 in range(0, ncausal, CHUNK):
        t = c0 + c
        inside = t < ncausal
        e = tl.load(est + t, mask=inside, other=0.0)
        forced = (t == 0) | ((t >= blk - LOCAL) & (t <= blk))
        chosen = (e.to(tl.int32, bitcast=True) >= lo) & (e > floor)
        keep = inside & (forced | chosen)
        slot = kept + tl.cumsum(keep.to(tl.int32), 0) - 1
        tl.store(out + slot, t, mask=keep & (slot < CAP))
        kept += tl.sum(keep.to(tl.int32), 0)
    tl.store(Counts + (bh // HM).to(tl.int64) * stride_cb + (bh % HM) * stride_ch + row, kept)


@triton.jit
def _share_kernel(Est, Out, Shared, M, M0, NB, HM, CHUNK: tl.constexpr):
    """``block_mass.share_neighbours`` for one estimate row of a head in ``Shared``: the mean of
    its own and its neighbouring rows' estimates, each restricted to this row's causal tiles and
    normalised to sum 1 there, and never below its own normalised estimate. Rows of other heads
    are copied."""
    row = tl.program_id(0)
    bh = tl.program_id(1)
    ncausal = tl.minimum(M0 + row + 1, NB)  # the row's causal tiles are [0, ncausal)
    base = Est + bh.to(tl.int64) * M * NB
    own = base + row.to(tl.int64) * NB
    out = Out + (bh.to(tl.int64) * M + row) * NB
    c = tl.arange(0, CHUNK)
    if tl.load(Shared + bh % HM) != 0:
        # a neighbour's tiles within this row's causal ones; none where it does not exist
        n_prev = tl.where(row > 0, ncausal, 0)
        n_next = tl.where(row < M - 1, ncausal, 0)
        prev = base + tl.maximum(row - 1, 0).to(tl.int64) * NB
        nxt = base + tl.minimum(row + 1, M - 1).to(tl.int64) * NB
        s_own = 0.0
        s_prev = 0.0
        s_next = 0.0
        for c0 in range(0, ncausal, CHUNK):
            t = c0 + c
            inside = t < ncausal
            s_own += tl.sum(tl.load(own + t, mask=inside, other=0.0), 0)
            s_prev += tl.sum(tl.load(prev + t, mask=t < n_prev, other=0.0), 0)
            s_next += tl.sum(tl.load(nxt + t, mask=t < n_next, other=0.0), 0)
        tiny = 1.1754943508222875e-38  # the reference's clamp (fp32's smallest normal)
        w_own = 1.0 / tl.maximum(s_own, tiny)
        w_prev = 1.0 / tl.maximum(s_prev, tiny)
        w_next = 1.0 / tl.maximum(s_next, tiny)
        count = 1.0 + (n_prev > 0).to(tl.float32) + (n_next > 0).to(tl.float32)
        for c0 in range(0, NB, CHUNK):
            t = c0 + c
            inside = t < ncausal
            e_own = tl.load(own + t, mask=inside, other=0.0) * w_own
            e = e_own + tl.load(prev + t, mask=t < n_prev, other=0.0) * w_prev
            e += tl.load(nxt + t, mask=t < n_next, other=0.0) * w_next
            tl.store(out + t, tl.maximum(e / count, e_own), mask=t < NB)
    else:
        for c0 in range(0, NB, CHUNK):
            t = c0 + c
            tl.store(out + t, tl.load(own + t, mask=t < NB, other=0.0), mask=t < NB)


@triton.jit
def _finish_kernel(BlockCount, Runs, RunCount, DiagPrefix, M0, M, N, CAP, HM,
                   stride_cb, stride_ch, stride_rb, stride_rh, stride_pb, stride_ph,
                   CHUNK: tl.constexpr):
    """``block_mass.finish_index`` for one head (program_id 0) and one slice of its diagonal
    prefix (program_id 1): the head is dense when some query block needs more than CAP tiles;
    then its block counts are 0, its one run covers every diagonal and its prefix counts them."""
    bh = tl.program_id(0)
    part = tl.program_id(1)
    b = (bh // HM).to(tl.int64)
    h = bh % HM
    counts = BlockCount + b * stride_cb + h * stride_ch
    c = tl.arange(0, CHUNK)
    over = 0
    for c0 in range(M0, M, CHUNK):
        t = c0 + c
        over += tl.sum((tl.load(counts + t, mask=t < M, other=0) > CAP).to(tl.int32), 0)
    dense = over > 0
    if part == 0:
        for c0 in range(M0, M, CHUNK):
            t = c0 + c
            kept = tl.load(counts + t, mask=t < M, other=0)
            tl.store(counts + t, tl.where(dense, 0, tl.minimum(kept, CAP)), mask=t < M)
        runs = Runs + b * stride_rb + h * stride_rh
        tl.store(runs, tl.where(dense, 0, SENTINEL_I))
        tl.store(runs + 1, tl.where(dense, N - 1, SENTINEL_I))
        tl.store(RunCount + bh, dense.to(tl.int32))
    prefix = DiagPrefix + b * stride_pb + h * stride_ph
    i = part * CHUNK + c
    tl.store(prefix + i, tl.where(dense, i, 0), mask=i < N + 1)


def finish_index_triton(block_count: torch.Tensor, m0: int, capacity: int, runs: torch.Tensor,
                        run_count: torch.Tensor, diag_prefix: torch.Tensor) -> None:
    """``block_mass.finish_index`` in one launch (in place): block_count (B, H, M) int32 with the
    selection's unclamped counts from row ``m0`` on (rows before it 0), runs (B, H, R, 2) and
    run_count (B, H) contiguous int32, diag_prefix (B, H, N + 1) int32, all written."""
    b, h, m_rows = block_count.shape
    n = diag_prefix.shape[-1] - 1
    if b * h == 0:
        return
    launch = {} if interpreting() else dict(num_warps=4)
    _finish_kernel[(b * h, triton.cdiv(n + 1, FINISH_CHUNK))](
        block_count, runs, run_count, diag_prefix, m0, m_rows, n, capacity, h,
        block_count.stride(0), block_count.stride(1), runs.stride(0), runs.stride(1),
        diag_prefix.stride(0), diag_prefix.stride(1), CHUNK=FINISH_CHUNK, **launch)


def tile_mass_triton(q: torch.Tensor, k: torch.Tensor, key_padding: Optional[torch.Tensor], scale: float,
                     heads: torch.Tensor, samples: int, split: int = SPLIT, *, score: str = "mass",
                     rows: Optional[int] = None, num_warps: Optional[int] = None,
                     num_stages: Optional[int] = None) -> torch.Tensor:
    """Same contract and result as ``block_mass.tile_mass`` (up to fp32 rounding); ``samples`` a
    power of two up to ``rows``; ``split`` key tiles per program; ``rows`` sampled rows per
    program (64 or 128), ``num_warps`` and ``num_stages`` the tile-sums launch (None: ROWS,
    TILE_SUM_WARPS, TILE_SUM_STAGES)."""
    rows = rows or ROWS
    b, h, nq, d = q.shape
    hk, n = k.shape[1], k.shape[2]
    if rows not in (64, 128):
        raise ValueError(f"rows must be 64 or 128, got {rows}")
    if score not in SCORES:
        raise ValueError(f"score must be one of {list(SCORES)}, got {score!r}")
    if samples < 1 or samples > rows or samples & (samples - 1):
        raise ValueError(f"samples must be a power of two in [1, {rows}], got {samples}")
    if d > MAX_HEAD_DIM or k.shape[-1] != d:
        raise ValueError(f"block-mass kernels support head dims up to {MAX_HEAD_DIM}, got q {d}, k {k.shape[-1]}")
    if d not in HEAD_DIMS:
        dp = padded_head_dim(d)
        return tile_mass_triton(pad_head_dim(q, dp), pad_head_dim(k, dp), key_padding, scale, heads, samples, split,
                                score=score, rows=rows, num_warps=num_warps, num_stages=num_stages)
    nb = num_blocks(n)
    p = n - nq
    m0 = p // BLOCK
    m = nb - m0
    hm = heads.numel()
    est = torch.zeros(b, hm, m, nb, dtype=torch.float32, device=q.device)
    if b * hm == 0 or m == 0:
        return est
    dev = q.device
    if key_padding is None:
        kp, kp_strides, has_padding = q, (0, 0), False  # never read
    else:
        kp = (key_padding if key_padding.dtype == torch.bool else key_padding != 0).view(torch.uint8)
        kp_strides, has_padding = kp.stride(), True
    groups = rows // samples
    row_groups = triton.cdiv(m, groups)
    splits = triton.cdiv(nb, split)
    mx = torch.empty(b * hm, splits, row_groups, rows, dtype=torch.float32, device=dev)
    lx = torch.empty_like(mx)
    # log2 tile sums of the sampled rows, (B * Hm, NB, rows of a chunk of row groups): bounded by
    # TILE_SUM_BYTES, the row groups go in chunks
    chunk = max(1, min(row_groups, TILE_SUM_BYTES // (b * hm * nb * rows * 4)))
    v = torch.empty(b * hm, nb, chunk * rows, dtype=torch.float32, device=dev)
    heads32 = heads.to(torch.int32).contiguous()
    meta = dict(SAMPLES=samples, GROUPS=groups, SPLIT_TILES=split)
    warps = num_warps or TILE_SUM_WARPS
    launch = {} if interpreting() else dict(num_warps=warps, num_stages=num_stages or TILE_SUM_STAGES)
    for g0 in range(0, row_groups, chunk):
        g1 = min(row_groups, g0 + chunk)
        _tile_sums_kernel[(g1 - g0, splits, b * hm)](
            q, k, kp, heads32, v, mx, lx, *q.stride(), *k.stride(), *kp_strides, n, p, m, m0, nb, h // hk, hm,
            splits, row_groups, g0, chunk * rows, float(scale) * LOG2E, HEAD_DIM=d, HAS_PADDING=has_padding,
            DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32", SCORE_MAX=score == "max", **meta, **launch)
        _tile_mass_kernel[((g1 - g0) * groups, b * hm)](v, mx, lx, est, m, m0, nb, splits, row_groups, g0, chunk * rows,
                                                        CHUNK=MASS_CHUNK, **meta,
                                                        **({} if interpreting() else dict(num_warps=4)))
    return est


def share_neighbours_triton(est: torch.Tensor, m0: int, shared: torch.Tensor, chunk: int = SELECT_CHUNK
                            ) -> torch.Tensor:
    """``block_mass.share_neighbours`` of the heads where ``shared`` (Hm,) is true, the other
    heads' rows copied: a new (B, Hm, M, NB) fp32 tensor (one pass over three rows for the
    sums, one for the result; the PyTorch form's masks and copies cost 2.6 ms at 128K)."""
    b, hm, m_rows, nb = est.shape
    est = est.contiguous()
    res = torch.empty_like(est)
    if b * hm * m_rows:
        launch = {} if interpreting() else dict(num_warps=4)
        _share_kernel[(m_rows, b * hm)](est, res, shared.to(torch.int32).contiguous(), m_rows, m0, nb, hm,
                                        CHUNK=chunk, **launch)
    return res


def select_tiles_triton(est: torch.Tensor, recall: torch.Tensor, m0: int, capacity: int,
                        chunk: int = SELECT_CHUNK, out: Optional[tuple] = None,
                        shared: Optional[torch.Tensor] = None, arity: Optional[int] = None,
                        flags: bool = True) -> tuple:
    """Same contract and result as ``block_mass.select_tiles`` (up to fp32 summation order at
    the threshold); ``chunk`` (a power of two) estimates held at a time. ``out``: (tiles, counts)
    to write into, (B, Hm, M, capacity) SENTINEL-filled and (B, Hm, M) int32 with unit strides
    in their last dimension (views of the index's blocks and block_count); the counts written
    are not clamped to the capacity. ``shared`` (Hm,) bool: heads whose estimate is first
    shared with the neighbouring blocks' (``share_neighbours_triton``). ``arity``: the threshold
    search's branching, 2 (bisection, 31 passes over a block's estimates) or a power of two up
    to 64 (``arity - 1`` thresholds a pass, ``search_steps(arity)`` passes): the same threshold;
    ``SELECT_ARITY`` when not given. ``flags=False``: no dense flags (None in their place; the
    caller finishes the index with ``finish_index_triton``)."""
    arity = SELECT_ARITY if arity is None else arity
    if arity < 2 or arity > 64 or arity & (arity - 1):
        raise ValueError(f"arity must be a power of two in [2, 64], got {arity}")
    if shared is not None:
        est = share_neighbours_triton(est, m0, shared, chunk)
    b, hm, m_rows, nb = est.shape
    dev = est.device
    if out is None:
        tiles = torch.full((b, hm, m_rows, capacity), SENTINEL, dtype=torch.int32, device=dev)
        counts = torch.empty(b, hm, m_rows, dtype=torch.int32, device=dev)
    else:
        tiles, counts = out
    if b * hm * m_rows:
        est = est.contiguous()
        launch = {} if interpreting() else dict(num_warps=4)
        _select_kernel[(m_rows, b * hm)](est, recall.float().contiguous(), tiles, counts, m_rows, m0, nb, hm, capacity,
                                         tiles.stride(0), tiles.stride(1), tiles.stride(2), counts.stride(0),
                                         counts.stride(1), LOCAL=LOCAL_TILES, CHUNK=chunk, STEPS=search_steps(arity),
                                         ARITY=arity,
                                         **launch)
    dense = (counts > capacity).any(-1) if flags else None
    return tiles, counts if out is not None else counts.clamp(max=capacity), dense
