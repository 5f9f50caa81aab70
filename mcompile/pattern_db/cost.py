"""What a pattern costs in the sparse attention kernel: a formula of the length and the budgets.

The kernel (mcompile/kernels/sparse_attention_triton.py) computes query blocks of ``BLOCK`` = 64
rows. For block ``m`` it computes, for every row of the block:

- one contiguous key tile per diagonal run ``(d_lo, d_hi)``: ``BLOCK + d_hi - d_lo`` keys
  (clipped to ``[0, (m+1) * BLOCK)``),
- one key per column left of the block's end (columns are gathered; a column that a run tile
  already covers is masked, but still gathered and computed),
- ``BLOCK`` keys per listed key block.

``kernel_pairs`` counts exactly these (query, key) pairs for an index: the kernel's work
(FLOPs are ``4 * D`` per pair). The formulas below are the same count in closed form, as sympy
expressions of the length ``N`` and the budgets, for ``N`` a multiple of ``BLOCK`` and budgets
no larger than ``N``:

- block-sparse, ``b`` blocks per query block (the first blocks have fewer to choose from)::

      sum_m BLOCK^2 * min(b, m + 1) = BLOCK * N * b - BLOCK^2 * b * (b - 1) / 2        (exact)

- A-shape, ``s`` sink columns and a local run of ``w`` diagonals ``(0, w - 1)``::

      N * (s + w + BLOCK - 1) - (w - 1)^2 / 2 - BLOCK (w - 1) / 2 - s^2 / 2 + BLOCK s / 2

  The run's tile is ``BLOCK + w - 1`` keys wide; the first query blocks lose the part of the
  tile left of key 0 (a staircase of about ``(w - 1)^2 / 2 + BLOCK (w - 1) / 2`` pairs) and
  see only the sink columns left of their end (``s^2 / 2 - BLOCK s / 2`` fewer). The two
  staircases are summed to their first Euler-Maclaurin term: exact when the budgets are
  multiples of ``BLOCK``, within ``BLOCK^2`` pairs otherwise (tested).

- vertical-slash, ``v`` columns and ``s`` diagonals, nominal::

      N * (v + s + (BLOCK - 1) * r) - (s - 1)^2 / 2 - BLOCK (s - 1) / 2 - v^2 / 2 + BLOCK v / 2,  r = 1

  Its real cost depends on where the estimated lines fall: a column at key ``j`` costs only the
  ``N - j`` rows after it, a slash far from the main diagonal only the rows past its offset, and
  diagonals closer than ``BLOCK`` merge into runs (each run pays ``BLOCK - 1`` extra keys per row,
  so ``r`` scattered runs cost ``(BLOCK - 1) * r`` more than one band). The nominal formula is the
  case of the first ``v`` columns and one band of ``s`` diagonals. The search therefore uses it
  only as a starting point and adjusts each vertical-slash head's budget until ``kernel_pairs`` of
  its estimated index meets the target; explain's expected density uses the nominal formula.

Densities are pairs over the ``N (N + 1) / 2`` causal pairs (at most 1).
"""

from __future__ import annotations

import functools
from typing import Callable, Optional

import torch

from ..index import BLOCK, SparseIndex, num_blocks
from ..patterns import Pattern, PatternKind

NOMINAL_RUNS = 1  # runs assumed by the nominal vertical-slash formula (one band of diagonals)


@functools.lru_cache(maxsize=1)
def formulas() -> dict:
    """{kind: (sympy expression, its symbols in parameter order)} with ``N`` the first symbol."""
    import sympy as sp

    n, s, w, v, sl, b, r = sp.symbols("N s w v s_slash b r", positive=True)
    blk = sp.Integer(BLOCK)
    a_shape = n * (s + w + blk - 1) - (w - 1) ** 2 / 2 - blk * (w - 1) / 2 - s**2 / 2 + blk * s / 2
    vertical_slash = (n * (v + sl + (blk - 1) * r) - (sl - 1) ** 2 / 2 - blk * (sl - 1) / 2
                      - v**2 / 2 + blk * v / 2)
    block_sparse = blk * n * b - blk**2 * b * (b - 1) / 2
    return {
        PatternKind.A_SHAPE: (a_shape, (n, s, w)),
        PatternKind.VERTICAL_SLASH: (vertical_slash.subs(r, NOMINAL_RUNS), (n, v, sl)),
        PatternKind.BLOCK_SPARSE: (block_sparse, (n, b)),
    }


@functools.lru_cache(maxsize=None)
def _compiled(kind: PatternKind) -> Callable:
    import sympy as sp

    expr, symbols = formulas()[kind]
    return sp.lambdify(symbols, expr, "math")


def causal_pairs(n: int) -> float:
    return n * (n + 1) / 2


def pattern_pairs(pattern: Pattern, n: int) -> float:
    """Pairs the kernel computes for ``pattern`` at length ``n`` (the formulas above; budgets
    larger than the sequence are clipped to it)."""
    if pattern.kind == PatternKind.DENSE:
        return causal_pairs(n)
    if pattern.kind == PatternKind.BLOCK_SPARSE:
        return _compiled(pattern.kind)(n, min(pattern.blocks, num_blocks(n)))
    if pattern.kind == PatternKind.A_SHAPE:
        return _compiled(pattern.kind)(n, min(pattern.sink, n), min(pattern.local, n))
    if pattern.kind == PatternKind.VERTICAL_SLASH:
        return _compiled(pattern.kind)(n, min(pattern.vertical, n), min(pattern.slash, n))
    raise ValueError(f"{pattern.kind.label} has no pair count ahead of its input (its tiles depend on the input)")


def expected_density(pattern: Pattern, n: int) -> Optional[float]:
    """Fraction of the causal pairs the kernel computes for ``pattern`` at length ``n`` (nominal
    for vertical-slash; see the module docstring), at most 1; None for block-mass, whose tiles
    depend on the input alone."""
    if pattern.kind == PatternKind.BLOCK_MASS:
        return None
    if n <= 0:
        return 0.0
    return min(1.0, pattern_pairs(pattern, n) / causal_pairs(n))


def solve_budget(kind: PatternKind, n: int, target: float, share: float = 0.0) -> float:
    """The total budget (tokens; blocks for block-sparse) whose formula cost at length ``n`` is
    ``target`` pairs: ``sink = share * B, local = (1 - share) * B`` for A-shape,
    ``vertical = share * B, slash = (1 - share) * B`` for vertical-slash. Real-valued; the
    smallest root in the formula's range (``0 < B <= 2 N``, blocks ``<= N / BLOCK``)."""
    import sympy as sp

    expr, symbols = formulas()[kind]
    budget = sp.Symbol("B", positive=True)
    if kind == PatternKind.BLOCK_SPARSE:
        params = {symbols[1]: budget}
        upper = num_blocks(n)
    else:
        params = {symbols[1]: share * budget, symbols[2]: (1 - share) * budget}
        upper = 2 * n
    equation = sp.expand(expr.subs(params).subs(symbols[0], n) - target)
    roots = [complex(x) for x in sp.Poly(equation, budget).nroots()]
    real = sorted(x.real for x in roots if abs(x.imag) < 1e-6 and 0 < x.real <= upper)
    if not real:
        return float(upper)  # the target is beyond what this kind can cost at this length
    return real[0]


def kernel_pairs(index: SparseIndex, n: int) -> torch.Tensor:
    """Exact (query, key) pairs the kernel computes for ``index`` at length ``n``: (B, H) float64.

    Counts every key of every run tile (clipped to keys ``[0, min((m+1) * BLOCK, n))``), every
    gathered column left of the block's end and every listed key block, times the block's rows.
    Key tiles are not rounded up to the kernel's ``BLOCK_N`` (64 by default, 128 where pinned).
    """
    nb = num_blocks(n)
    dev = index.runs.device
    m = torch.arange(nb, device=dev, dtype=torch.int64)  # (NB,)
    rows = torch.clamp(n - m * BLOCK, max=BLOCK).double()  # (NB,)
    end = torch.clamp((m + 1) * BLOCK, max=n)  # (NB,)
    r = index.runs.shape[2]
    valid = torch.arange(r, device=dev) < index.run_count[..., None].long()  # (B, H, R)
    lo = index.runs[..., 0].long().clamp(max=n)[..., None]  # (B, H, R, 1)
    hi = index.runs[..., 1].long().clamp(max=n)[..., None]
    start = (m * BLOCK - hi).clamp(min=0)  # (B, H, R, NB)
    stop = torch.minimum((m + 1) * BLOCK - lo, end)
    width = (stop - start).clamp(min=0) * valid[..., None]
    keys = width.sum(2).double()  # (B, H, NB)
    keys += index.column_count[..., :nb].double()
    keys += index.block_count[..., :nb].double() * BLOCK
    return (keys * rows).sum(-1)


def kernel_density(index: SparseIndex, n: int) -> torch.Tensor:
    """``kernel_pairs`` over the causal pairs: (B, H) float64 (above 1 when tiles overlap the
    future half of the diagonal blocks more than a pattern saves)."""
    return kernel_pairs(index, n) / causal_pairs(n)
