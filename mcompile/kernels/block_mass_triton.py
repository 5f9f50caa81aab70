"""Block-mass tile estimates on the GPU, without the sampled rows' probabilities in memory.

Math (kernels/block_mass.py; per batch b and block-mass head h, for query block m its sampled
rows r at positions ``pos[m, s]``, a key j allowed for row r iff ``j <= pos`` and
``key_padding[b, j]``)::

    p[r, j]  = softmax_j(scale * q[pos_r] . k[j])             (0 where not allowed)
    e[m, t]  = mean_{s} sum_{j in [64 t, 64 t + 64)} p[(m, s), j]

One program holds ``64 / S`` query blocks of S sampled rows each (64 rows: one tensor-core
tile) and walks the key tiles up to its last block twice, base 2: first the running row max
and sum of exp, then the normalised probabilities, summed per key tile and averaged over each
block's S rows, stored as ``e``. The (B, H, N / 64 * S, N) probabilities never exist; the
output is (B, Hm, M, N / 64) fp32. Grid: ``(cdiv(M, 64 / S), B * Hm)``.

Head dims outside HEAD_DIMS (up to 128) are zero-padded, as in sparse_attention_triton.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ..index import BLOCK, num_blocks
from .block_mass import sample_offsets
from .estimate_triton import HEAD_DIMS, LOG2E, NEG_INIT, NUM_STAGES, NUM_WARPS, _interpreting
from .sparse_attention_triton import MAX_HEAD_DIM, pad_head_dim, padded_head_dim

ROWS = 64  # sampled rows per program: one 64-row tile


@triton.jit
def _tile_mass_kernel(Q, K, KP, Heads, Pos, Est,
                      stride_qb, stride_qh, stride_qn, stride_qd,
                      stride_kb, stride_kh, stride_kn, stride_kd, stride_kpb, stride_kpn,
                      N, P, M, M0, NB, GROUP, HM, qk_scale,
                      HEAD_DIM: tl.constexpr, SAMPLES: tl.constexpr, GROUPS: tl.constexpr,
                      HAS_PADDING: tl.constexpr, DOT_PRECISION: tl.constexpr):
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    b64 = (bh // HM).to(tl.int64)
    h = tl.load(Heads + bh % HM)
    r = tl.arange(0, GROUPS * SAMPLES)
    blk = pid * GROUPS + r // SAMPLES  # estimate row of each sampled row (query block M0 + blk)
    row_ok = blk < M
    pos = tl.load(Pos + blk * SAMPLES + r % SAMPLES, mask=row_ok, other=0)  # absolute positions
    offs_d = tl.arange(0, HEAD_DIM)
    q = tl.load(Q + b64 * stride_qb + h.to(tl.int64) * stride_qh + (pos - P).to(tl.int64)[:, None] * stride_qn
                + offs_d[None, :] * stride_qd, mask=row_ok[:, None], other=0.0)
    k_base = K + b64 * stride_kb + (h // GROUP).to(tl.int64) * stride_kh
    kp_base = KP + b64 * stride_kpb
    last_tile = tl.minimum(M0 + tl.minimum((pid + 1) * GROUPS, M), NB)  # tiles [0, last_tile)
    c = tl.arange(0, 64)

    m_i = tl.full([GROUPS * SAMPLES], NEG_INIT, dtype=tl.float32)
    l_i = tl.zeros([GROUPS * SAMPLES], dtype=tl.float32)
    for t in range(0, last_tile):
        s = _logits(q, k_base, kp_base, t * 64 + c, pos, row_ok, N, stride_kn, stride_kd, stride_kpn, qk_scale,
                    HEAD_DIM, HAS_PADDING, DOT_PRECISION)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        l_i = l_i * tl.math.exp2(m_i - m_new) + tl.sum(tl.math.exp2(s - m_new[:, None]), 1)
        m_i = m_new
    inv = tl.where(l_i > 0, 1.0 / l_i, 0.0)  # rows with no allowed key contribute 0

    g = tl.arange(0, GROUPS)
    est_row = pid * GROUPS + g
    est_base = Est + bh.to(tl.int64) * M * NB + est_row.to(tl.int64) * NB
    for t in range(0, last_tile):
        s = _logits(q, k_base, kp_base, t * 64 + c, pos, row_ok, N, stride_kn, stride_kd, stride_kpn, qk_scale,
                    HEAD_DIM, HAS_PADDING, DOT_PRECISION)
        mass = tl.sum(tl.math.exp2(s - m_i[:, None]), 1) * inv  # (rows,) mass of tile t per row
        per_block = tl.sum(tl.reshape(mass, (GROUPS, SAMPLES)), 1) / SAMPLES
        tl.store(est_base + t, per_block, mask=est_row < M)


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


def tile_mass_triton(q: torch.Tensor, k: torch.Tensor, key_padding: Optional[torch.Tensor], scale: float,
                     heads: torch.Tensor, samples: int) -> torch.Tensor:
    """Same contract and result as ``block_mass.tile_mass`` (up to fp32 rounding); ``samples`` a
    power of two up to 64."""
    b, h, nq, d = q.shape
    hk, n = k.shape[1], k.shape[2]
    if samples < 1 or samples > ROWS or samples & (samples - 1):
        raise ValueError(f"samples must be a power of two in [1, {ROWS}], got {samples}")
    if d > MAX_HEAD_DIM or k.shape[-1] != d:
        raise ValueError(f"block-mass kernels support head dims up to {MAX_HEAD_DIM}, got q {d}, k {k.shape[-1]}")
    if d not in HEAD_DIMS:
        dp = padded_head_dim(d)
        return tile_mass_triton(pad_head_dim(q, dp), pad_head_dim(k, dp), key_padding, scale, heads, samples)
    nb = num_blocks(n)
    p = n - nq
    m0 = p // BLOCK
    m = nb - m0
    hm = heads.numel()
    est = torch.zeros(b, hm, m, nb, dtype=torch.float32, device=q.device)
    if b * hm == 0 or m == 0:
        return est
    dev = q.device
    blocks = torch.arange(m0, nb, device=dev)
    lo = torch.clamp(blocks * BLOCK, min=p)[:, None]
    hi = torch.clamp((blocks + 1) * BLOCK, max=n)[:, None] - 1
    pos = torch.minimum(torch.maximum(blocks[:, None] * BLOCK + sample_offsets(samples, dev)[None, :], lo), hi)
    pos = pos.to(torch.int32).contiguous()
    if key_padding is None:
        kp, kp_strides, has_padding = pos, (0, 0), False  # never read
    else:
        kp = (key_padding if key_padding.dtype == torch.bool else key_padding != 0).view(torch.uint8)
        kp_strides, has_padding = kp.stride(), True
    groups = ROWS // samples
    meta = dict(HEAD_DIM=d, SAMPLES=samples, GROUPS=groups, HAS_PADDING=has_padding,
                DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32")
    launch = {} if _interpreting() else dict(num_warps=NUM_WARPS, num_stages=NUM_STAGES)
    _tile_mass_kernel[(triton.cdiv(m, groups), b * hm)](
        q, k, kp, heads.to(torch.int32).contiguous(), pos, est, *q.stride(), *k.stride(), *kp_strides,
        n, p, m, m0, nb, h // hk, hm, float(scale) * LOG2E, **meta, **launch)
    return est
