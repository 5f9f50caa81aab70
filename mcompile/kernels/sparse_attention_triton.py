"""Sparse causal FlashAttention forward over a SparseIndex (Triton; format in mcompile/index.py).

Math (per batch b, query head h, with G = H // Hk query heads per KV head)::

    out[b, h, i] = sum_j softmax_j(scale * q[b, h, i] . k[b, h // G, j]) v[b, h // G, j]

over the keys j the index keeps for query i, intersected with ``j <= i`` and
``key_padding[b, j]``. Softmax is online (FlashAttention-2) in fp32 and base 2
(``exp2(x * log2 e)``). A query with no kept key gets zeros (``l == 0 -> 0``), as SDPA does.

Layout: q (B, H, Nq, D), k (B, Hk, N, D), v (B, Hk, N, Dv), Nq <= N, any strides (K/V are
never repeated for GQA); key_padding (B, N) bool; out (B, H, Nq, Dv) contiguous in q's dtype.
Query row i sits at position ``P + i`` with ``P = N - Nq`` (a chunk after a cached prefix;
``P = 0`` for a whole prompt), bottom-right aligned::

        P = 5, N = 8        k0 k1 k2 k3 k4 k5 k6 k7
        q row 0 (pos 5)      x  x  x  x  x  x  .  .
        q row 2 (pos 7)      x  x  x  x  x  x  x  x

Grid: ``(NB - P // BLOCK, B * H)``, one program per query block of ``BLOCK`` = 64 absolute
positions that holds a query (index.py). Programs take query blocks from the last one down,
so the blocks with the most keys start first. The offset enters only the q loads and output
stores (row ``position - P``, masked to ``[P, N)``); everything else works on positions. Each
program walks the three key sets of its block (which the format keeps disjoint)::

    (a) key blocks   blocks[b, h, m, :block_count]   64-key tiles [n*64, n*64 + 64)
    (b) runs         runs[b, h, :run_count]          keys [m*64 - d_hi, (m+1)*64 - d_lo)
                                                      in contiguous BLOCK_N-key tiles
    (c) columns      columns[b, h, :column_count[m]] gathered BLOCK_N at a time; a column
                                                      inside a run tile of this block is
                                                      masked (that tile computed it)

Masks are built only where needed: a contiguous tile whose last key is <= the block's first
query and < the interval end needs none; for a tile crossing the diagonal::

                 keys ->            x: computed unmasked   /: causal mask (key <= query)
        q m*64   x x x x / . . .
                 x x x x x / . .
        q +63    x x x x x x x /

A head with more than ``FLAT_RUNS`` runs walks the tiles of all its runs in one loop instead,
masking only the tiles that cross a run's end or the diagonal: one software pipeline instead of
one per run (real vertical-slash heads have dozens of runs of 2-3 tiles).

Columns below ``m*64`` need only their per-column mask (inside a run tile, padding); the
columns ``column_count[m-1] .. column_count[m]`` of the block's own range get the causal one.
Columns left of every run tile of the block (below ``m*64 - d_hi`` of the last run) need no
mask at all: whole chunks of them skip the coverage loads, which fed only a mask and were not
pipelined (A-shape 500/3048 at 128K: 21.4 -> 20.0 ms; a 1000-column sink: 13.1 -> 8.8 ms).

Head dims: the kernel is built for 16, 32, 64 and 128. Other head dims up to 128 (80 and 96
in real models) are zero-padded to the next one by the launcher: zero columns of q and k
leave every q . k unchanged, and zero columns of v are sliced off the output; the copy costs
O(N x D) memory and is logged once. Head dim 256 (up to it, padded) runs 8 warps on 64-key
tiles with two pipeline stages. Larger head dims are outside ``capability`` and the dispatcher
runs the PyTorch reference, with the reason logged.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import triton
import triton.language as tl
from torch.fx.experimental.symbolic_shapes import statically_known_true

from ..index import BLOCK, SparseIndex, index_rows, num_blocks
from .sparse_attention import sparse_attention_ref  # noqa: F401  (the reference this kernel matches)
from .triton_common import HEAD_DIMS as ESTIMATE_HEAD_DIMS
from .triton_common import LOG2E, NEG_INIT, interpreting, pad_head_dim  # noqa: F401  (re-exported)

# Head dims the attention kernel is built for: the estimation kernels' and 256 (Gemma 2 and 3),
# which runs 8 warps on a 64-key tile so that the 64 x 256 fp32 accumulator fits the registers.
HEAD_DIMS = ESTIMATE_HEAD_DIMS + (256,)
MAX_HEAD_DIM = HEAD_DIMS[-1]
WIDE_HEAD_DIM = 256  # at and above: 8 warps


def padded_head_dim(d: int) -> int:
    """The kernel head dim that serves head dim ``d`` (<= MAX_HEAD_DIM): the smallest in HEAD_DIMS >= d."""
    return next(x for x in HEAD_DIMS if x >= d)


DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MIN_CAPABILITY = (8, 0)  # tensor-core tl.dot on fp16/bf16 needs Ampere or newer
# Bytes of pipelined K/V tiles a config may keep in shared memory (H100/H200 have 227 KiB per
# block; the rest holds Q, the P tile and layout conversions).
SMEM_BUDGET = 160 * 1024
INTERPRET_BLOCK_N = 64  # key tile width under TRITON_INTERPRET, where autotuning is skipped
# Above this many runs in a head, a program walks the tiles of all its runs in one loop (one
# software pipeline) instead of one loop per run: short runs (vertical-slash on real heads,
# 40+ runs of 2-3 tiles) otherwise pay a pipeline fill and drain per run. A-shape (one run) and
# heads of a few long runs keep the per-run loops, whose interior tiles are never masked.
FLAT_RUNS = tl.constexpr(8)  # an index of at most this many runs compiles without the walk
RUN_CHUNK = tl.constexpr(64)  # runs read at once when counting a block's run tiles


# Autotuning is keyed on the head dims and on N rounded up to a power of two within these
# bounds: tile costs shift with length (more runs, longer columns lists), yet a model sees only
# a handful of buckets, so each is tuned once.
MIN_BUCKET, MAX_BUCKET = 1 << 12, 1 << 20


def _length_bucket(n: int) -> int:
    return min(max(triton.next_power_of_2(n), MIN_BUCKET), MAX_BUCKET)


# ----------------------------------------------------------------------------------------------
# Autotune configs
# ----------------------------------------------------------------------------------------------

def _configs():
    return [triton.Config({"BLOCK_N": bn}, num_warps=w, num_stages=s)
            for bn in (64, 128) for w in (4, 8) for s in (2, 3)]


def fixed_config(d: int, dv: int, dtype: torch.dtype, block_n: int = 64) -> dict:
    """Launch options of an untuned launch (the inlined one, a pinned ``block_n``): 4 warps and
    the most pipeline stages, up to 3, whose K/V tiles fit ``SMEM_BUDGET`` (3 for bf16/fp16 at
    head dim 128): 3 stages beat 2 on every index measured, most with the one-loop walk of many
    short runs (docs/BENCHMARKS.md, "Launch configurations")."""
    elem = 4 if dtype == torch.float32 else 2
    stages = next((s for s in (3, 2) if _kv_fits(s, block_n, d, dv, elem)), 1)
    return {"BLOCK_N": block_n, "num_warps": 8 if max(d, dv) >= WIDE_HEAD_DIM else 4, "num_stages": stages}


def _kv_fits(stages: int, block_n: int, d: int, dv: int, elem: int) -> bool:
    """Whether ``stages`` pipelined K/V tiles of ``block_n`` keys fit ``SMEM_BUDGET``."""
    return stages * block_n * (d + dv) * elem <= SMEM_BUDGET


def _prune_configs(configs, named_args, **kwargs):
    """Drop configs whose K/V pipeline overflows shared memory at this head dim, and 8 warps
    on a 64x64 tile (two warpgroups on one 64-row wgmma leave each half idle) except at head dim
    256, where 4 warps would spill the accumulator."""
    args = {**named_args, **kwargs}
    d, dv = args["HEAD_DIM"], args["HEAD_DV"]
    elem = 4 if args.get("DOT_PRECISION") == "ieee" else 2
    kept = []
    for c in configs:
        bn = c.kwargs["BLOCK_N"]
        if not _kv_fits(c.num_stages, bn, d, dv, elem):
            continue
        if bn == 64 and c.num_warps == 8 and max(d, dv) < WIDE_HEAD_DIM:
            continue
        if max(d, dv) >= WIDE_HEAD_DIM and c.num_warps == 4:  # the accumulator would spill
            continue
        kept.append(c)
    return kept or configs[:1]


# ----------------------------------------------------------------------------------------------
# Kernel
# ----------------------------------------------------------------------------------------------

@triton.jit
def _online_update(acc, l_i, m_i, qk, v, qk_scale, DOT_PRECISION: tl.constexpr):
    """Fold one tile of raw scores (-inf where masked) into the running max, sum and output.
    The base-2 scale (> 0) is applied inside the exp2 argument, where it fuses into one FMA."""
    m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
    alpha = tl.math.exp2(m_i - m_new)
    p = tl.math.exp2(qk * qk_scale - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return acc, l_i, m_new


@triton.jit
def _contiguous_tile(acc, l_i, m_i, q, k_base, v_base, kp_base, start, end, rows,
                     stride_kn, stride_kd, stride_vn, stride_vd, stride_kpn, qk_scale, window,
                     HEAD_DIM: tl.constexpr, HEAD_DV: tl.constexpr, TILE: tl.constexpr,
                     MASKED: tl.constexpr, HAS_PADDING: tl.constexpr, HAS_WINDOW: tl.constexpr,
                     DOT_PRECISION: tl.constexpr, crosses=True):
    """Keys [start, start + TILE). MASKED: keys at or past ``end`` (> start) load row ``end - 1``
    instead (an unpredicated load: predicated ones held registers for every pipeline stage),
    and when the tile ``crosses`` the interval end or the diagonal (a run-time flag; True where
    the caller knows it does), the scores keep key < end and key <= row. Not MASKED: the
    caller proved the whole tile is below the diagonal and before ``end`` (<= N). HAS_WINDOW:
    keys more than ``window - 1`` behind a row are masked too (a sliding window), on every tile."""
    offs = tl.arange(0, TILE)
    offs_d = tl.arange(0, HEAD_DIM)
    offs_dv = tl.arange(0, HEAD_DV)
    keys = start + offs
    if MASKED:
        in_range = keys < end
        keys64 = tl.minimum(keys, end - 1).to(tl.int64)  # the rows loaded
    else:
        keys64 = keys.to(tl.int64)  # row offsets can pass 2**31 at N = 1M with strided layouts
    k = tl.load(k_base + keys64[:, None] * stride_kn + offs_d[None, :] * stride_kd)
    v = tl.load(v_base + keys64[:, None] * stride_vn + offs_dv[None, :] * stride_vd)
    qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
    if MASKED:
        if crosses:
            qk = tl.where(in_range[None, :] & (keys[None, :] <= rows[:, None]), qk, float("-inf"))
        if HAS_PADDING:
            pad = tl.load(kp_base + keys64 * stride_kpn, mask=in_range, other=0)
            qk = tl.where((pad != 0)[None, :], qk, float("-inf"))
    elif HAS_PADDING:
        pad = tl.load(kp_base + keys64 * stride_kpn)
        qk = tl.where((pad != 0)[None, :], qk, float("-inf"))
    if HAS_WINDOW:
        qk = tl.where(keys[None, :] > rows[:, None] - window, qk, float("-inf"))
    return _online_update(acc, l_i, m_i, qk, v, qk_scale, DOT_PRECISION)


@triton.jit
def _column_tile(acc, l_i, m_i, q, k_base, v_base, kp_base, col_base, pre_base, c0, c_end,
                 row0, rows, N, stride_kn, stride_kd, stride_vn, stride_vd, stride_kpn, qk_scale, window,
                 BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DV: tl.constexpr,
                 BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, COVER: tl.constexpr,
                 HAS_PADDING: tl.constexpr, HAS_WINDOW: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Columns[c0 : min(c0 + BLOCK_N, c_end)], K/V rows gathered by index. A column inside a
    run tile of this block is dropped (the run tile computed it). CAUSAL: the chunk may hold
    columns >= the block's first row. The gather is masked by the list's length alone, and run
    coverage and padding act on the scores, so that the K/V addresses depend on one load (the
    column numbers), not on the coverage loads after it (measured: equal or up to 5% faster).
    COVER=False: the caller proved that no run tile of this block reaches the chunk's columns
    and that the chunk is full: no coverage loads and no mask (the loads that feed only a mask
    are not pipelined, so their latency is paid on every chunk)."""
    idx = c0 + tl.arange(0, BLOCK_N)
    listed = idx < c_end
    j = tl.load(col_base + idx, mask=listed, other=0)
    j64 = j.to(tl.int64)
    offs_d = tl.arange(0, HEAD_DIM)
    offs_dv = tl.arange(0, HEAD_DV)
    k_ptrs = k_base + j64[:, None] * stride_kn + offs_d[None, :] * stride_kd
    v_ptrs = v_base + j64[:, None] * stride_vn + offs_dv[None, :] * stride_vd
    if COVER:
        valid = listed & (j < N)
        # Covered by a run tile iff a run diagonal lies in [lo, hi] (index.py).
        lo = tl.maximum(row0 - j, 0)
        hi = row0 + BLOCK_M - 1 - j
        span_ok = valid & (hi >= lo)
        hi_c = tl.minimum(hi, N - 1)
        covered = (tl.load(pre_base + hi_c + 1, mask=span_ok, other=0)
                   - tl.load(pre_base + lo, mask=span_ok, other=0)) > 0
        keep = valid & ~covered
        if HAS_PADDING:
            keep = keep & (tl.load(kp_base + j64 * stride_kpn, mask=valid, other=0) != 0)
        k = tl.load(k_ptrs, mask=valid[:, None], other=0.0)
        v = tl.load(v_ptrs, mask=valid[:, None], other=0.0)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
        mask = keep[None, :]
        if CAUSAL:
            mask = mask & (j[None, :] <= rows[:, None])
        qk = tl.where(mask, qk, float("-inf"))
    else:
        k = tl.load(k_ptrs)
        v = tl.load(v_ptrs)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
        if HAS_PADDING:
            pad = tl.load(kp_base + j64 * stride_kpn)
            qk = tl.where((pad != 0)[None, :], qk, float("-inf"))
    if HAS_WINDOW:
        qk = tl.where(j[None, :] > rows[:, None] - window, qk, float("-inf"))
    return _online_update(acc, l_i, m_i, qk, v, qk_scale, DOT_PRECISION)


@triton.jit
def _run_tile_count(run_base, run_count, row0, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Number of BLOCK_N-key tiles of all runs of query block ``row0 // BLOCK_M`` (clipped to [0, N))."""
    n_tiles = 0
    for r0 in range(0, run_count, RUN_CHUNK):
        r = r0 + tl.arange(0, RUN_CHUNK)
        listed = r < run_count
        d_lo = tl.load(run_base + 2 * r, mask=listed, other=0)
        d_hi = tl.load(run_base + 2 * r + 1, mask=listed, other=0)
        lo = tl.maximum(row0 - d_hi, 0)
        hi = tl.minimum(row0 + BLOCK_M - d_lo, N)
        n_tiles += tl.sum(tl.where(listed & (hi > lo), (hi - lo + BLOCK_N - 1) // BLOCK_N, 0), 0)
    return n_tiles


@triton.jit
def _flat_run_tiles(acc, l_i, m_i, q, k_base, v_base, kp_base, run_base, n_tiles, row0, rows, N,
                    stride_kn, stride_kd, stride_vn, stride_vd, stride_kpn, qk_scale, window,
                    BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DV: tl.constexpr,
                    BLOCK_N: tl.constexpr, HAS_PADDING: tl.constexpr, HAS_WINDOW: tl.constexpr,
                    DOT_PRECISION: tl.constexpr):
    """The ``n_tiles`` run tiles of a block in one loop: run ``r`` and tile ``i`` within it are
    carried, and a tile is masked only when it crosses its interval's end or the diagonal.
    Runs are sorted by diagonal: those that reach the block (``d_lo < row0 + BLOCK_M``) come
    first and have at least one tile each, so the walk never meets an empty run."""
    r = 0
    i = 0
    for _ in range(0, n_tiles):
        d_lo = tl.load(run_base + 2 * r)
        d_hi = tl.load(run_base + 2 * r + 1)
        lo = tl.maximum(row0 - d_hi, 0)
        hi = tl.minimum(row0 + BLOCK_M - d_lo, N)
        start = lo + i * BLOCK_N
        crosses = (start + BLOCK_N > hi) | (start + BLOCK_N - 1 > row0)
        acc, l_i, m_i = _contiguous_tile(
            acc, l_i, m_i, q, k_base, v_base, kp_base, start, hi, rows,
            stride_kn, stride_kd, stride_vn, stride_vd, stride_kpn, qk_scale, window,
            HEAD_DIM, HEAD_DV, BLOCK_N, True, HAS_PADDING, HAS_WINDOW, DOT_PRECISION, crosses)
        last = start + BLOCK_N >= hi
        r = tl.where(last, r + 1, r)
        i = tl.where(last, 0, i + 1)
    return acc, l_i, m_i


@triton.jit
def _sparse_attention_kernel(
        Q, K, V, Out, KP,
        Runs, RunCount, DiagPrefix, Columns, ColumnCount, Blocks, BlockCount,
        stride_qb, stride_qh, stride_qn, stride_qd,
        stride_kb, stride_kh, stride_kn, stride_kd,
        stride_vb, stride_vh, stride_vn, stride_vd,
        stride_ob, stride_oh, stride_on, stride_od,
        stride_kpb, stride_kpn,
        N, Q_START, H, GROUP, NB, ROWS, R, C, KB, qk_scale, N_BUCKET, WINDOW,
        HEAD_DIM: tl.constexpr, HEAD_DV: tl.constexpr, BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr, HAS_PADDING: tl.constexpr,
        HAS_COLUMNS: tl.constexpr, HAS_BLOCKS: tl.constexpr, HAS_WINDOW: tl.constexpr,
        FLAT_WALK: tl.constexpr, DOT_PRECISION: tl.constexpr):
    qk_scale = tl.cast(qk_scale, tl.float32)  # Inductor's launcher passes Python floats as fp64
    m = NB - 1 - tl.program_id(0)  # heaviest query blocks first
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    hk = h // GROUP
    row0 = m * BLOCK_M
    rows = row0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    offs_dv = tl.arange(0, HEAD_DV)

    b64 = b.to(tl.int64)
    # Query row of position ``rows`` is rows - Q_START (Q_START = N - Nq; 0 for a whole prompt).
    row_ok = (rows >= Q_START) & (rows < N)
    q_ptrs = (Q + b64 * stride_qb + h.to(tl.int64) * stride_qh + (row0 - Q_START).to(tl.int64) * stride_qn
              + tl.arange(0, BLOCK_M)[:, None] * stride_qn + offs_d[None, :] * stride_qd)
    q = tl.load(q_ptrs, mask=row_ok[:, None], other=0.0)
    k_base = K + b64 * stride_kb + hk.to(tl.int64) * stride_kh
    v_base = V + b64 * stride_vb + hk.to(tl.int64) * stride_vh
    kp_base = KP + b64 * stride_kpb

    acc = tl.zeros([BLOCK_M, HEAD_DV], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], NEG_INIT, dtype=tl.float32)
    bh64 = bh.to(tl.int64)

    # (a) Key blocks in one loop (one software pipeline): a tile before block m is below the
    # diagonal and inside [0, N), unmasked; tile m (and any later one, which masks to nothing)
    # gets the causal mask, a run-time flag inside the loop (no vector of the whole list to
    # split it in two loops: registers, docs/BENCHMARKS.md).
    if HAS_BLOCKS:
        blk_base = Blocks + (bh64 * ROWS + m) * KB
        cnt = tl.load(BlockCount + bh64 * ROWS + m)
        for i in range(0, cnt):
            t = tl.load(blk_base + i)
            start = t * BLOCK_M
            acc, l_i, m_i = _contiguous_tile(
                acc, l_i, m_i, q, k_base, v_base, kp_base, start, tl.minimum(start + BLOCK_M, N),
                rows, stride_kn, stride_kd, stride_vn, stride_vd, stride_kpn, qk_scale, WINDOW,
                HEAD_DIM, HEAD_DV, BLOCK_M, True, HAS_PADDING, HAS_WINDOW, DOT_PRECISION, t >= m)

    # (b) Runs: one contiguous key interval each; full tiles ending at or before the block's
    # first query (and the interval end) go unmasked, the last one or two tiles are masked.
    # Past FLAT_RUNS runs, all run tiles go through one loop instead (``_flat_run_tiles``).
    # FLAT_WALK (constexpr): the index can hold more than FLAT_RUNS runs. When it cannot (the
    # default's block-mass index holds one, a diffuse head's), the flat walk is not compiled: it
    # alone holds about 25 registers per thread more than the rest of the kernel.
    run_count = tl.load(RunCount + bh64)
    run_base = Runs + bh64 * R * 2
    n_runs = run_count
    if FLAT_WALK:
        n_flat = 0
        if run_count > FLAT_RUNS:
            n_flat = _run_tile_count(run_base, run_count, row0, N, BLOCK_M, BLOCK_N)
            n_runs = 0
        acc, l_i, m_i = _flat_run_tiles(
            acc, l_i, m_i, q, k_base, v_base, kp_base, run_base, n_flat, row0, rows, N,
            stride_kn, stride_kd, stride_vn, stride_vd, stride_kpn, qk_scale, WINDOW,
            BLOCK_M, HEAD_DIM, HEAD_DV, BLOCK_N, HAS_PADDING, HAS_WINDOW, DOT_PRECISION)
    for r in range(0, n_runs):
        d_lo = tl.load(run_base + 2 * r)
        d_hi = tl.load(run_base + 2 * r + 1)
        lo = tl.maximum(row0 - d_hi, 0)
        hi = tl.minimum(row0 + BLOCK_M - d_lo, N)
        n_free = tl.maximum(tl.minimum(hi, row0 + 1) - lo, 0) // BLOCK_N
        for t in range(0, n_free):
            acc, l_i, m_i = _contiguous_tile(
                acc, l_i, m_i, q, k_base, v_base, kp_base, lo + t * BLOCK_N, hi, rows,
                stride_kn, stride_kd, stride_vn, stride_vd, stride_kpn, qk_scale, WINDOW,
                HEAD_DIM, HEAD_DV, BLOCK_N, False, HAS_PADDING, HAS_WINDOW, DOT_PRECISION)
        for start in range(lo + n_free * BLOCK_N, hi, BLOCK_N):
            acc, l_i, m_i = _contiguous_tile(
                acc, l_i, m_i, q, k_base, v_base, kp_base, start, hi, rows,
                stride_kn, stride_kd, stride_vn, stride_vd, stride_kpn, qk_scale, WINDOW,
                HEAD_DIM, HEAD_DV, BLOCK_N, True, HAS_PADDING, HAS_WINDOW, DOT_PRECISION)

    # (c) Columns below (m+1)*64; those below m*64 (column_count[m-1] of them) need no
    # causal mask, so chunks wholly among them skip it. Columns left of every run tile of the
    # block (below ``row0 - d_hi`` of the last run, which has the largest diagonals) need no
    # coverage test either: the first ``column_count[far - 1]`` columns, with
    # ``far = (row0 - d_hi) // BLOCK_M``, are below ``far * BLOCK_M``, so whole chunks among
    # them run unmasked.
    if HAS_COLUMNS:
        c_end = tl.load(ColumnCount + bh64 * ROWS + m)
        c_prev = tl.load(ColumnCount + bh64 * ROWS + m - 1, mask=m > 0, other=0)
        col_base = Columns + bh64 * C
        pre_base = DiagPrefix + bh64 * (N + 1)
        n_free = c_prev // BLOCK_N
        d_far = tl.load(run_base + 2 * run_count - 1, mask=run_count > 0, other=0)
        far = tl.where(run_count > 0, (row0 - d_far) // BLOCK_M, m)  # no runs: nothing is covered
        n_plain = tl.load(ColumnCount + bh64 * ROWS + far - 1, mask=far > 0, other=0) // BLOCK_N
        for t in range(0, n_plain):
            acc, l_i, m_i = _column_tile(
                acc, l_i, m_i, q, k_base, v_base, kp_base, col_base, pre_base, t * BLOCK_N, c_end,
                row0, rows, N, stride_kn, stride_kd, stride_vn, stride_vd, stride_kpn, qk_scale, WINDOW,
                BLOCK_M, HEAD_DIM, HEAD_DV, BLOCK_N, False, False, HAS_PADDING, HAS_WINDOW, DOT_PRECISION)
        for t in range(n_plain, n_free):
            acc, l_i, m_i = _column_tile(
                acc, l_i, m_i, q, k_base, v_base, kp_base, col_base, pre_base, t * BLOCK_N, c_end,
                row0, rows, N, stride_kn, stride_kd, stride_vn, stride_vd, stride_kpn, qk_scale, WINDOW,
                BLOCK_M, HEAD_DIM, HEAD_DV, BLOCK_N, False, True, HAS_PADDING, HAS_WINDOW, DOT_PRECISION)
        for c0 in range(n_free * BLOCK_N, c_end, BLOCK_N):
            acc, l_i, m_i = _column_tile(
                acc, l_i, m_i, q, k_base, v_base, kp_base, col_base, pre_base, c0, c_end,
                row0, rows, N, stride_kn, stride_kd, stride_vn, stride_vd, stride_kpn, qk_scale, WINDOW,
                BLOCK_M, HEAD_DIM, HEAD_DV, BLOCK_N, True, True, HAS_PADDING, HAS_WINDOW, DOT_PRECISION)

    l_safe = tl.where(l_i == 0.0, 1.0, l_i)  # no kept key: acc is 0, output 0
    out = acc / l_safe[:, None]
    o_ptrs = (Out + b64 * stride_ob + h.to(tl.int64) * stride_oh + (row0 - Q_START).to(tl.int64) * stride_on
              + tl.arange(0, BLOCK_M)[:, None] * stride_on + offs_dv[None, :] * stride_od)
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=row_ok[:, None])


_sparse_attention_tuned = triton.autotune(
    configs=_configs(), key=["HEAD_DIM", "HEAD_DV", "N_BUCKET"],
    prune_configs_by={"early_config_prune": _prune_configs},
)(_sparse_attention_kernel)


# ----------------------------------------------------------------------------------------------
# Capability and launcher
# ----------------------------------------------------------------------------------------------

def capability(q: torch.Tensor) -> Optional[str]:
    """None when the kernel can run on q (B, H, N, D); otherwise a short reason."""
    if q.device.type != "cuda" and not (q.device.type == "cpu" and interpreting()):
        return f"device {q.device.type} (the Triton kernel runs on CUDA)"
    if q.dtype not in DTYPES:
        return f"dtype {q.dtype} (supported: fp16, bf16, fp32)"
    if q.dim() != 4:
        return f"q must be (B, H, N, D), got {q.dim()} dims"
    if q.shape[-1] > MAX_HEAD_DIM:
        return f"head dim {q.shape[-1]} (the kernel supports up to {MAX_HEAD_DIM})"
    if q.shape[-1] > ESTIMATE_HEAD_DIMS[-1] and q.dtype == torch.float32:
        return f"head dim {q.shape[-1]} in fp32 (its tiles exceed shared memory; fp16 and bf16 run it)"
    if q.device.type == "cuda" and torch.cuda.get_device_capability(q.device) < MIN_CAPABILITY:
        major, minor = torch.cuda.get_device_capability(q.device)
        return f"compute capability {major}.{minor} (needs >= {MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]})"
    return None


def _check_contract(q, k, v, index: SparseIndex, key_padding):
    reason = capability(q)
    if reason is not None:
        raise ValueError(f"sparse_attention_triton cannot run: {reason}")
    if k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"k and v must be (B, Hk, N, D), got {tuple(k.shape)} and {tuple(v.shape)}")
    b, h, nq, d = q.shape
    hk, n = k.shape[1], k.shape[2]
    if k.shape != (b, hk, n, d):
        raise ValueError(f"k must be (B={b}, Hk, N, D={d}), got {tuple(k.shape)}")
    if nq > n:
        raise ValueError(f"query length {nq} exceeds key length {n} (queries are the last Nq of the N positions)")
    if v.shape[:3] != k.shape[:3]:
        raise ValueError(f"v {tuple(v.shape)} must match k {tuple(k.shape)} in (B, Hk, N)")
    if v.shape[-1] > MAX_HEAD_DIM:
        raise ValueError(f"value head dim {v.shape[-1]} unsupported (the kernel supports up to {MAX_HEAD_DIM})")
    if hk == 0 or h % hk:
        raise ValueError(f"query heads ({h}) must be a multiple of key/value heads ({hk})")
    if k.dtype != q.dtype or v.dtype != q.dtype or k.device != q.device or v.device != q.device:
        raise ValueError(f"q, k, v must share dtype and device, got {q.dtype}/{k.dtype}/{v.dtype} "
                         f"on {q.device}/{k.device}/{v.device}")
    rows = index_rows(n)
    expected = {
        "runs": (b, h, None, 2), "run_count": (b, h), "diag_prefix": (b, h, n + 1),
        "columns": (b, h, None), "column_count": (b, h, rows), "blocks": (b, h, rows, None),
        "block_count": (b, h, rows),
    }
    for name, shape in expected.items():
        t = getattr(index, name)
        if t.dtype != torch.int32 or t.device != q.device:
            raise ValueError(f"index.{name} must be int32 on {q.device}, got {t.dtype} on {t.device}")
        if t.dim() != len(shape) or any(e is not None and e != s for e, s in zip(shape, t.shape)):
            want = tuple("*" if e is None else e for e in shape)
            raise ValueError(f"index.{name} must have shape {want} for q {tuple(q.shape)}, got {tuple(t.shape)}")
    if key_padding is not None and (tuple(key_padding.shape) != (b, n) or key_padding.device != q.device):
        raise ValueError(f"key_padding must be (B={b}, N={n}) on {q.device}, got "
                         f"{tuple(key_padding.shape)} on {key_padding.device}")


def sparse_attention_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, index: SparseIndex,
                            scale: float, key_padding: Optional[torch.Tensor] = None,
                            block_n: Optional[int] = None, window: int = 0, autotune: bool = False) -> torch.Tensor:
    """q (B, H, Nq, D), k/v (B, Hk, N, D), Nq <= N, key_padding (B, N) bool -> (B, H, Nq, Dv) in
    q's dtype. Query row i is at position N - Nq + i (a chunk after a cached prefix).

    Same contract as ``sparse_attention_ref``, with ``scale > 0`` (it is folded into the base-2
    exponent, where a sign flip would turn the running max into a min). ``block_n``: the key tile
    width (64 or 128; by default 64, under TRITON_INTERPRET ``INTERPRET_BLOCK_N``), launched with
    ``fixed_config``, as the inlined launch is. ``autotune=True`` (without ``block_n``) tunes the
    launch per head dim, dtype and length bucket instead: every config compiles at the first call
    and each new bucket is timed, seconds at long lengths that would land in a request's latency
    (the fixed config is within noise of the tuned one on every index measured, docs/BENCHMARKS.md). Head
    dims outside HEAD_DIMS (up to MAX_HEAD_DIM) are zero-padded (module docstring). ``window`` > 0
    keeps only keys less than ``window`` positions behind their query (a sliding window).
    """
    _check_contract(q, k, v, index, key_padding)
    if window < 0:
        raise ValueError(f"window must be >= 0 (0: none), got {window}")
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale must be a positive finite number, got {scale}")
    if block_n is not None and block_n not in (64, 128):
        raise ValueError(f"block_n must be 64 or 128, got {block_n}")
    b, h, nq, d = q.shape
    n, dv = k.shape[2], v.shape[-1]
    dp, dvp = padded_head_dim(d), padded_head_dim(dv)
    if dp != d or dvp != dv:
        out = sparse_attention_triton(pad_head_dim(q, dp), pad_head_dim(k, dp), pad_head_dim(v, dvp), index,
                                      scale, key_padding, block_n, window, autotune)
        return out[..., :dv].contiguous()
    out = torch.empty(b, h, nq, dv, dtype=q.dtype, device=q.device)
    if nq == 0 or b * h == 0:
        return out
    grid, args, meta = launch_args(q, k, v, out, index, scale, key_padding, _length_bucket(n), window)
    if block_n is None and interpreting():
        block_n = INTERPRET_BLOCK_N
    if block_n is None and autotune:
        _sparse_attention_tuned[grid](*args, **meta)
    else:
        _sparse_attention_kernel[grid](*args, **meta, **fixed_config(d, dv, q.dtype, block_n or 64))
    return out


def launch_args(q, k, v, out, index: SparseIndex, scale: float, key_padding, n_bucket, window: int = 0) -> tuple:
    """(grid, positional args, constexpr meta) of ``_sparse_attention_kernel`` for contiguous
    ``out``; ``n_bucket`` is the autotuning key (any int for an untuned launch); ``window`` > 0
    a sliding window (``sparse_attention_triton``). Only symbolic
    arithmetic on sizes, so a traced launch (passes/lowering.py) adds no guards."""
    b, h, nq, d = q.shape
    hk, n, dv = k.shape[1], k.shape[2], v.shape[-1]
    q_start = n - nq  # position of query row 0
    nb, rows = num_blocks(n), index_rows(n)  # rows: per-block tensors carry a spare row
    runs, run_count, diag_prefix, columns, column_count, blocks, block_count = (
        t.contiguous() for t in index)
    r, c, kb = runs.shape[2], columns.shape[2], blocks.shape[3]
    if key_padding is None:
        kp, kp_strides, has_padding = run_count, (0, 0), False  # never read
    else:
        kp = (key_padding if key_padding.dtype == torch.bool else key_padding != 0).view(torch.uint8)
        kp_strides, has_padding = kp.stride(), True
    # Empty index tensors are never read (HAS_COLUMNS / HAS_BLOCKS); pass a real allocation.
    if c == 0:
        columns = run_count
    if kb == 0:
        blocks = run_count
    args = (q, k, v, out, kp, runs, run_count, diag_prefix, columns, column_count, blocks, block_count,
            *q.stride(), *k.stride(), *v.stride(), *out.stride(), *kp_strides,
            n, q_start, h, h // hk, nb, rows, r, c, kb, float(scale) * LOG2E, n_bucket, window)
    meta = dict(HEAD_DIM=d, HEAD_DV=dv, BLOCK_M=BLOCK,
                HAS_PADDING=has_padding, HAS_COLUMNS=c > 0, HAS_BLOCKS=kb > 0, HAS_WINDOW=window > 0,
                FLAT_WALK=not statically_known_true(r <= FLAT_RUNS.value),  # no guard on a symbolic R
                DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32")
    grid = (nb - q_start // BLOCK, b * h)  # the blocks that hold a query: the last ones
    return grid, args, meta


def tuned_block_n(q: torch.Tensor, v: torch.Tensor) -> Optional[int]:
    """BLOCK_N the autotuner chose for q's head dim, length bucket and dtype (None before a run)."""
    want = (padded_head_dim(q.shape[-1]), padded_head_dim(v.shape[-1]), _length_bucket(v.shape[2]))
    for key, config in _sparse_attention_tuned.cache.items():
        if tuple(key[:3]) == want and str(q.dtype) in key:
            return config.kwargs["BLOCK_N"]
    return None
