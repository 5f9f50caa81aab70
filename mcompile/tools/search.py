"""The offline pattern search: MInference's Algorithm 1, kernel-aware.

For every layer of a model run on calibration text, and every query head:

1. Each candidate (A-shape, vertical-slash and block-sparse, with a few splits of the budget
   between their two parameters, ``CANDIDATES``) gets the budget at which the sparse kernel's
   work on that head equals a target number of (query, key) pairs: a start from the closed-form
   cost (``cost.solve_budget``), then a safeguarded secant on the exact work of the head's
   estimated index (``cost.kernel_pairs``). A-shape and block-sparse costs depend on the length
   only; vertical-slash costs depend on where the estimated lines fall, hence the per-head fit.
2. Each candidate's index is built as the compiled model builds it (``assemble_index``, the
   estimation of ``mcompile::estimate_index``) and scored on sampled query blocks: the relative
   L2 error of the head's attention output against dense (``objective="output"``, the paper's
   choice) or attention recall (``objective="recall"``, what MInference's released code uses).
3. The best-scoring candidate within budget wins.

Memory stays bounded: layers are processed one at a time as the forward computes them
(``capture_qkv(on_layer=...)``), and no head's N x N scores are ever held (vertical-slash scores
come from the last 64 queries; metrics walk sampled 64-row blocks).

The target (``Target``) defaults to the paper's: the cost of A-shape with 1K sink + 4K local
at its 30K calibration length, scaled to the calibration length as the project scales budgets
(``patterns.scaled_budgets``: by ``(L / 30720) ** 0.7``). The searched database records the
calibration length as its ``budget_length``: the budgets are the ones that met the target there.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch

from .capture import capture_qkv
from ..index import SENTINEL, SparseIndex, num_blocks
from ..kernels.estimate import assemble_index, vertical_slash_scores
from ..patterns import (
    DEFAULT_BUDGET_EXPONENT,
    MIN_BLOCKS,
    MIN_SLASH,
    MIN_VERTICAL,
    Pattern,
    PatternKind,
    encode,
)
from ..pattern_db import HeadEntry, ModelFingerprint, PatternDB
from ..pattern_db.cost import causal_pairs, kernel_pairs, pattern_pairs, solve_budget
from .metrics import attention_recall, dense_rows, output_error, sample_blocks

log = logging.getLogger(__name__)

OBJECTIVES = ("output", "recall")  # what the search scores a head's candidates by (allocate.py adds "loss")

# The paper's target: A-shape with a 1K sink and a 4K local window at its 30K calibration length.
PAPER_SINK, PAPER_LOCAL, PAPER_LENGTH = 1000, 4096, 30720
# Query blocks of 64 rows sampled per head to score candidates: 32 blocks are 1/4 of the rows
# at 8K (1/2 at 4K) and keep the standard error of a head's mean recall near 0.01 on SmolLM2.
SEARCH_BLOCKS = 32
FIT_TOLERANCE = 0.005  # a fitted budget's kernel work is within 0.5% of the target (or one budget step)
FIT_STEPS = 24  # secant / bisection steps per fit; the search logs any head left outside the tolerance
OVER_BUDGET = 0.02  # a candidate whose smallest budget costs more than 2% over the target is left out


@dataclass(frozen=True)
class Candidate:
    """One pattern kind and how its total budget ``B`` is split: ``share`` is the sink's part
    (A-shape) or the verticals' part (vertical-slash); block-sparse has one parameter."""

    kind: PatternKind
    share: float = 0.0

    @property
    def label(self) -> str:
        return self.kind.label if self.kind == PatternKind.BLOCK_SPARSE else f"{self.kind.label}/{self.share:g}"

    def bounds(self, n: int) -> tuple[int, int]:
        """Smallest and largest total budget that mean something at length ``n``."""
        if self.kind == PatternKind.BLOCK_SPARSE:
            return MIN_BLOCKS, max(MIN_BLOCKS, num_blocks(n))
        if self.kind == PatternKind.VERTICAL_SLASH:
            return MIN_VERTICAL + MIN_SLASH, 2 * n
        return 1, 2 * n

    def pattern(self, budget: int) -> Pattern:
        if self.kind == PatternKind.BLOCK_SPARSE:
            return Pattern(self.kind, max(MIN_BLOCKS, budget))
        if self.kind == PatternKind.VERTICAL_SLASH:
            vertical = max(MIN_VERTICAL, round(self.share * budget))
            return Pattern(self.kind, vertical, max(MIN_SLASH, budget - vertical))
        sink = round(self.share * budget)
        return Pattern(self.kind, sink, max(1, budget - sink))

    def initial_budget(self, n: int, target: float) -> int:
        b = solve_budget(self.kind, n, target, share=self.share)
        lo, hi = self.bounds(n)
        return min(hi, max(lo, round(b)))


CANDIDATES = (
    Candidate(PatternKind.A_SHAPE, 0.05),  # almost all local: the sink is a few tokens in real heads
    Candidate(PatternKind.A_SHAPE, 0.2),  # the paper's split (1000 sink / 5096)
    Candidate(PatternKind.VERTICAL_SLASH, 0.125),  # about MInference's default split (1000 / 7096)
    Candidate(PatternKind.VERTICAL_SLASH, 0.25),
    Candidate(PatternKind.VERTICAL_SLASH, 0.5),  # heads that live on a few key columns
    Candidate(PatternKind.BLOCK_SPARSE),
)


@dataclass(frozen=True)
class Target:
    """The kernel work every candidate must match at the calibration length ``n``.

    ``density``: a fraction of the causal pairs. Otherwise the cost of A-shape ``(sink, local)``
    at ``length``, both budgets scaled to ``n`` by ``(n / length) ** exponent`` when ``n`` is
    shorter (the project's length scaling; the paper's default)."""

    density: Optional[float] = None
    sink: int = PAPER_SINK
    local: int = PAPER_LOCAL
    length: int = PAPER_LENGTH
    exponent: float = DEFAULT_BUDGET_EXPONENT

    def __post_init__(self):
        if self.density is not None and not 0.0 < self.density < 1.0:
            raise ValueError(f"target density must be in (0, 1), got {self.density!r}")
        if self.length < 1 or self.local < 1 or self.sink < 0:
            raise ValueError(f"target needs sink >= 0, local >= 1 and length >= 1, got {self}")

    def reference(self, n: int) -> Pattern:
        ratio = min(1.0, n / self.length) ** self.exponent
        return Pattern(PatternKind.A_SHAPE, round(self.sink * ratio), max(1, round(self.local * ratio)))

    def pairs(self, n: int) -> float:
        if self.density is not None:
            return self.density * causal_pairs(n)
        return pattern_pairs(self.reference(n), n)

    def to_dict(self, n: int) -> dict:
        rule = (f"density {self.density:g}" if self.density is not None else
                f"a_shape(sink={self.sink}, local={self.local}) at {self.length} tokens, scaled by "
                f"(L / {self.length}) ** {self.exponent:g}: {self.reference(n).describe()} at L = {n}")
        return {"rule": rule, "pairs": round(self.pairs(n)), "density": round(self.pairs(n) / causal_pairs(n), 4)}


@dataclass(frozen=True)
class Scored:
    """One candidate fitted to one head: its pattern, kernel work, score, and whether it fits."""

    candidate: Candidate
    pattern: Pattern
    pairs: float
    score: float
    within_budget: bool


def _better(objective: str) -> Callable[[float, float], bool]:
    return (lambda a, b: a < b) if objective == "output" else (lambda a, b: a > b)


def fit_candidate(candidate: Candidate, q: torch.Tensor, k: torch.Tensor, scale: float, target: float,
                  vs_scores: Callable = vertical_slash_scores):
    """Per-head budgets at which the kernel's work meets ``target`` pairs:
    (patterns [H], pairs (H,) float64, index). q (1, H, N, D), k (1, Hk, N, D)."""
    h, n = q.shape[1], q.shape[2]
    if candidate.kind != PatternKind.VERTICAL_SLASH and h > 1:  # cost depends on the length only: fit one head
        patterns, pairs, _ = fit_candidate(candidate, q[:, :1], k[:, :1], scale, target, vs_scores)
        patterns = patterns * h
        index = assemble_index(q, k, None, *encode(patterns), scale, vs_scores=vs_scores)
        return patterns, pairs.expand(h), index
    lo, hi = candidate.bounds(n)
    budget = torch.full((h,), candidate.initial_budget(n, target), dtype=torch.long)
    below = torch.full((h,), lo - 1, dtype=torch.long)  # largest budget seen at or under the target
    above = torch.full((h,), hi + 1, dtype=torch.long)  # smallest budget seen over it
    best = budget.clone()
    best_err = torch.full((h,), math.inf, dtype=torch.float64)
    for _ in range(FIT_STEPS):
        patterns = [candidate.pattern(int(b)) for b in budget]
        index = assemble_index(q, k, None, *encode(patterns), scale, vs_scores=vs_scores)
        cost = kernel_pairs(index, n)[0].cpu()  # the fit's state lives on the host, whatever q's device
        err = (cost - target).abs()
        improved = err < best_err
        best, best_err = torch.where(improved, budget, best), torch.where(improved, err, best_err)
        below = torch.where(cost <= target, torch.maximum(below, budget), below)
        above = torch.where(cost > target, torch.minimum(above, budget), above)
        done = (best_err <= FIT_TOLERANCE * target) | (above - below <= 1)
        if bool(done.all()):
            break
        secant = (budget.double() * target / cost.clamp(min=1)).round().long()
        mid = (below.clamp(min=lo) + above.clamp(max=hi) + 1) // 2
        step = torch.where((secant > below) & (secant < above), secant, mid)
        budget = torch.where(done, best, step.clamp(lo, hi))
    else:
        log.info("%s: %d heads within %.1f%% of the target after %d steps", candidate.label,
                 int((best_err <= FIT_TOLERANCE * target).sum()), 100 * FIT_TOLERANCE, FIT_STEPS)
    patterns = [candidate.pattern(int(b)) for b in best]
    index = assemble_index(q, k, None, *encode(patterns), scale, vs_scores=vs_scores)
    return patterns, kernel_pairs(index, n)[0], index


def _pad_last(t: torch.Tensor, size: int, dim: int) -> torch.Tensor:
    """``t`` padded with SENTINEL along ``dim`` to ``size``."""
    if t.shape[dim] == size:
        return t
    shape = list(t.shape)
    shape[dim] = size - shape[dim]
    return torch.cat([t, torch.full(shape, SENTINEL, dtype=t.dtype, device=t.device)], dim)


def stack_heads(indexes: Sequence[SparseIndex]) -> SparseIndex:
    """Indexes of the same batch and length side by side along the head dimension (lists padded
    with SENTINEL), so that every candidate of a layer is scored in one pass."""
    runs = max(i.runs.shape[2] for i in indexes)
    cols = max(i.columns.shape[2] for i in indexes)
    blks = max(i.blocks.shape[3] for i in indexes)
    return SparseIndex(torch.cat([_pad_last(i.runs, runs, 2) for i in indexes], 1),
                       torch.cat([i.run_count for i in indexes], 1),
                       torch.cat([i.diag_prefix for i in indexes], 1),
                       torch.cat([_pad_last(i.columns, cols, 2) for i in indexes], 1),
                       torch.cat([i.column_count for i in indexes], 1),
                       torch.cat([_pad_last(i.blocks, blks, 3) for i in indexes], 1),
                       torch.cat([i.block_count for i in indexes], 1))


def score_candidates(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, indexes: Sequence[SparseIndex],
                     scale: float, objective: str, starts: Sequence[int]) -> torch.Tensor:
    """Objective of every candidate index on every head: (C, H). The C indexes are stacked along
    the heads and q/k/v repeated to match (K/V per query head), so each sampled block is one
    mask and one SDPA call for all candidates."""
    c, h = len(indexes), q.shape[1]
    group = h // k.shape[1]
    index = stack_heads(indexes)
    qc = q.repeat(1, c, 1, 1)  # (1, C*H, N, D), candidate-major
    kc = k.repeat_interleave(group, 1).repeat(1, c, 1, 1)
    if objective == "output":
        vc = v.repeat_interleave(group, 1).repeat(1, c, 1, 1)
        dense = [d.repeat(1, c, 1, 1) for d in dense_rows(q, k, v, scale, starts)]
        score = output_error(qc, kc, vc, index, scale, starts, dense)
    else:
        score = attention_recall(qc, kc, index, scale, rows=starts)
    return score.view(c, h)


def search_layer(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, target: float,
                 objective: str = "output", candidates: Sequence[Candidate] = CANDIDATES,
                 blocks: int = SEARCH_BLOCKS) -> list[list[Scored]]:
    """Fit and score every candidate on every head of one layer: [head][candidate] -> Scored.
    q (1, H, N, D), k/v (1, Hk, N, D); ``target`` in kernel pairs."""
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {list(OBJECTIVES)}, got {objective!r}")
    if q.shape[0] != 1:
        raise ValueError(f"the search takes one calibration sequence (batch 1), got batch {q.shape[0]}")
    h, n = q.shape[1], q.shape[2]
    vertical, slash = vertical_slash_scores(q, k, None, scale, torch.arange(h))  # once per layer

    def cached(_q, _k, _kp, _scale, heads):
        return vertical[:, heads.long()], slash[:, heads.long()]

    fits = [fit_candidate(c, q, k, scale, target, cached) for c in candidates]
    score = score_candidates(q, k, v, [f[2] for f in fits], scale, objective, sample_blocks(n, blocks))
    return [[Scored(cand, patterns[j], float(pairs[j]), float(score[i, j]),
                    float(pairs[j]) <= (1 + OVER_BUDGET) * target)
             for i, (cand, (patterns, pairs, _)) in enumerate(zip(candidates, fits))] for j in range(h)]


def choose(scored: Sequence[Scored], objective: str,
           kinds: Optional[Sequence[PatternKind]] = None) -> Scored:
    """The best candidate within budget (of ``kinds`` if given); the cheapest if none fits."""
    pool = [s for s in scored if kinds is None or s.candidate.kind in kinds]
    if not pool:
        raise ValueError(f"no candidate of kinds {kinds}")
    fitting = [s for s in pool if s.within_budget]
    if not fitting:
        return min(pool, key=lambda s: s.pairs)
    better = _better(objective)
    best = fitting[0]
    for s in fitting[1:]:
        if better(s.score, best.score):
            best = s
    return best


@dataclass
class SearchResult:
    """Every head's scored candidates, and the databases made from them."""

    model: ModelFingerprint
    objective: str
    length: int
    target_pairs: float
    table: list = field(default_factory=list)  # [layer][head][candidate] -> Scored
    calibration: dict = field(default_factory=dict)

    def database(self, kinds: Optional[Sequence[PatternKind]] = None) -> PatternDB:
        """The searched database; ``kinds`` restricts the choice (e.g. only vertical-slash: the
        all-vertical-slash database at the same budget)."""
        layers = tuple(tuple(HeadEntry(c.pattern, round(c.score, 5)) for c in
                             (choose(head, self.objective, kinds) for head in layer)) for layer in self.table)
        cal = dict(self.calibration)
        if kinds is not None:
            cal["kinds"] = [k.label for k in kinds]
        return PatternDB(self.model, layers, cal)

    def details(self) -> dict:
        """Every candidate of every head (JSON-ready), for plots and reports."""
        return {"objective": self.objective, "length": self.length, "target_pairs": self.target_pairs,
                "layers": [[[{"candidate": s.candidate.label, **s.pattern.to_dict(), "pairs": s.pairs,
                               "score": s.score, "within_budget": s.within_budget} for s in head]
                             for head in layer] for layer in self.table]}


def attention_scale(model, layer: int, head_dim: int) -> float:
    """The softmax scale of a transformers decoder layer (``self_attn.scaling``), else 1/sqrt(D)."""
    try:
        return float(model.model.layers[layer].self_attn.scaling)
    except AttributeError:
        return head_dim ** -0.5


def search_model(model, input_ids: torch.Tensor, target: Target = Target(), objective: str = "output",
                 candidates: Sequence[Candidate] = CANDIDATES, blocks: int = SEARCH_BLOCKS,
                 name: str = "", calibration: Optional[dict] = None, progress: bool = True) -> SearchResult:
    """Run ``model`` once on ``input_ids`` (1, N) and search every layer's heads as the forward
    reaches them. ``calibration`` adds fields to the database's calibration block (the data, the
    command line)."""
    from tqdm.auto import tqdm

    fingerprint = ModelFingerprint.from_config(model.config, name)
    n = int(input_ids.shape[-1])
    pairs = target.pairs(n)
    if pairs >= causal_pairs(n):
        raise ValueError(f"the target ({target.to_dict(n)['rule']}) costs {pairs / causal_pairs(n):.0%} of the causal "
                         f"pairs at {n} tokens: nothing to search; calibrate on a longer text or pass a target density")
    table: list = [None] * fingerprint.num_layers
    bar = tqdm(total=fingerprint.num_layers, desc=f"pattern search at {n} tokens", unit="layer", disable=not progress)

    def on_layer(layer, q, k, v):
        table[layer] = search_layer(q, k, v, attention_scale(model, layer, q.shape[-1]), pairs, objective,
                                    candidates, blocks)
        bar.update(1)

    try:
        capture_qkv(model, input_ids, on_layer=on_layer)
    finally:
        bar.close()
    missing = [i for i, t in enumerate(table) if t is None]
    if missing:
        raise RuntimeError(f"layers {missing} were not reached by the forward pass")
    cal = {"length": n, "budget_length": n, "budget_exponent": DEFAULT_BUDGET_EXPONENT, "objective": objective,
           "target": target.to_dict(n), "candidates": [c.label for c in candidates],
           "sampled_blocks": len(sample_blocks(n, blocks)), **(calibration or {})}
    return SearchResult(fingerprint, objective, n, pairs, table, cal)
