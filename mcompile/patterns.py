"""Sparse attention patterns: what a head keeps, and how each is encoded for the graph ops.

A head's pattern is one of four kinds (MInference's three shapes plus dense). In the graph a
layer's patterns travel as three int lists (kind, first parameter, second parameter), one
entry per query head, so they are part of the graph and of its cache key.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

# MInference's run-time constants for vertical-slash estimation.
LAST_Q = 64  # queries at the end of the prompt whose attention estimates the pattern
SINK_COLUMNS = 30  # first key columns always kept as verticals (attention sinks)
LOCAL_DIAGONALS = 100  # nearest diagonals always kept as slashes (local window)
MIN_VERTICAL = SINK_COLUMNS  # a vertical budget never drops below the forced columns
MIN_SLASH = LOCAL_DIAGONALS  # a slash budget never drops below the forced diagonals
# Block-sparse: the diagonal block and the first block (sink) are always kept.
MIN_BLOCKS = 2
# Budgets count keys, diagonals or blocks, which the index stores as int32.
MAX_BUDGET = 2 ** 31 - 1


class PatternKind(enum.IntEnum):
    DENSE = 0
    A_SHAPE = 1
    VERTICAL_SLASH = 2
    BLOCK_SPARSE = 3
    BLOCK_MASS = 4  # per query block, the fewest key tiles reaching a share of the estimated mass

    @property
    def label(self) -> str:
        return self.name.lower()


_PARAMS = {
    PatternKind.DENSE: (),
    PatternKind.A_SHAPE: ("sink", "local"),
    PatternKind.VERTICAL_SLASH: ("vertical", "slash"),
    PatternKind.BLOCK_SPARSE: ("blocks",),
    PatternKind.BLOCK_MASS: ("recall", "samples", "score", "neighbours"),
}


def budget_names(kind: PatternKind) -> tuple:
    """The budgets a kind takes, in order (``{"kind": ..., name: value}``)."""
    return _PARAMS[kind]


_MINIMUM = {"sink": 0, "local": 1, "vertical": MIN_VERTICAL, "slash": MIN_SLASH, "blocks": MIN_BLOCKS,
            "recall": 1, "samples": 1}
# Block-mass's recall target travels in the op's int lists in thousandths (0.95 -> 950).
RECALL_SCALE = 1000
# Block-mass samples this many rows of each 64-query block by default: at a 0.98 target, 8 rows
# gave mean recall 0.97 (worst head 0.93) on SmolLM2 + YaRN at 8K and 16K, 4 rows 0.96 (0.87-0.89),
# at a third more of the tiles than the oracle's (docs/ACCURACY.md, "Block mass").
DEFAULT_SAMPLES = 8
_MAXIMUM = {"recall": RECALL_SCALE, "samples": 64}  # at most every row of a 64-query block
# How a sampled row scores a key tile (kernels/block_mass.py): "mass", the softmax mass the row
# puts on the tile's keys; "max", a softmax over the tiles of the row's largest logit in each
# (one maximum per logit instead of an exponential and its sums). The op's int lists carry
# "max" as a flag above the sample count (p1 = samples | SCORE_MAX).
SCORES = ("mass", "max")
SCORE_MAX = 128
# ``neighbours``: 1 makes a block's estimate the mean of its own and its two neighbouring blocks'
# (each renormalised over the block's causal tiles), never below its own: the rows of three blocks
# for the sampling of one (docs/ACCURACY.md, "Rows shared with the neighbouring blocks"). A flag
# above the score's.
NEIGHBOURS = 256
_FLAGS = SCORE_MAX | NEIGHBOURS


@dataclass(frozen=True)
class Pattern:
    """One head's pattern: ``kind`` and up to two budgets (tokens, or blocks for block-sparse)."""

    kind: PatternKind
    p0: int = 0
    p1: int = 0

    def __post_init__(self):
        names = _PARAMS[self.kind]
        values = (self.p0, self.p1)
        if self.kind == PatternKind.BLOCK_MASS and isinstance(self.p1, int) and not isinstance(self.p1, bool):
            if self.p1 < 0 or self.p1 & ~(_FLAGS | (SCORE_MAX - 1)):
                raise ValueError(f"block_mass's encoded samples, score and neighbours must be in [0, {2 * NEIGHBOURS}), "
                                 f"got {self.p1}")
            values = (self.p0, self.p1 & (SCORE_MAX - 1))
        for name, value in zip(names, values):
            if not isinstance(value, int) or isinstance(value, bool):
                raise ValueError(f"{self.kind.label}.{name} must be an int, got {value!r}")
            if value < _MINIMUM[name]:
                raise ValueError(f"{self.kind.label}.{name} must be >= {_MINIMUM[name]}, got {value}")
            if value > _MAXIMUM.get(name, MAX_BUDGET):
                if name in _MAXIMUM:
                    raise ValueError(f"{self.kind.label}.{name} must be <= {_MAXIMUM[name]}, got {value}")
                raise ValueError(f"{self.kind.label}.{name} must be <= 2**31 - 1 (the index stores int32), got {value}")

        if self.kind == PatternKind.BLOCK_MASS and values[1] & (values[1] - 1):
            raise ValueError(f"block_mass.samples must be a power of two (1, 2, 4, ... 64), got {values[1]}")

    @property
    def recall(self) -> float:
        """Block-mass's target share of the estimated attention mass (0, 1]."""
        return self.p0 / RECALL_SCALE

    def __getattr__(self, name: str):
        """The budgets by name (``pattern.vertical``, ``.slash``, ``.sink``, ``.local``, ``.blocks``,
        ``.samples``, ``.score``, ``.neighbours``), for the kind that has them; ``p0``/``p1`` are only their encoding in the
        graph ops' int lists (``encode``)."""
        params = _PARAMS.get(self.__dict__.get("kind"), ())
        if name in params:
            return self._values()[params.index(name)]
        raise AttributeError(f"{type(self).__name__} of kind {getattr(self.__dict__.get('kind'), 'label', '?')} "
                             f"has no {name!r} (its budgets: {list(params)})")

    @classmethod
    def from_dict(cls, spec: Mapping[str, Any]) -> "Pattern":
        """Parse ``{"kind": "vertical_slash", "vertical": 1000, "slash": 6096}`` and friends."""
        if isinstance(spec, Pattern):
            return spec
        if not isinstance(spec, Mapping) or "kind" not in spec:
            raise ValueError(f"a pattern is a dict with a 'kind' key, got {spec!r}")
        kinds = {k.label: k for k in PatternKind}
        kind = kinds.get(str(spec["kind"]))
        if kind is None:
            raise ValueError(f"unknown pattern kind {spec['kind']!r}; valid kinds: {sorted(kinds)}")
        names = _PARAMS[kind]
        unknown = set(spec) - {"kind", *names}
        if unknown:
            raise ValueError(f"unknown keys {sorted(unknown)} for {kind.label}; valid keys: {list(names)}")
        if kind == PatternKind.BLOCK_MASS:
            return cls._block_mass(spec)
        missing = [n for n in names if n not in spec]
        if missing:
            raise ValueError(f"{kind.label} needs {missing}")
        values = [spec[n] for n in names] + [0] * (2 - len(names))
        return cls(kind, *values)

    @classmethod
    def _block_mass(cls, spec: Mapping[str, Any]) -> "Pattern":
        """``{"kind": "block_mass", "recall": 0.98, "samples": 8, "score": "max", "neighbours": 1}``;
        samples (8), score ("mass") and neighbours (0) may be left out."""
        recall = spec.get("recall")
        if isinstance(recall, bool) or not isinstance(recall, (int, float)) or not 0.0 < recall <= 1.0:
            raise ValueError(f"block_mass.recall must be a number in (0, 1], got {recall!r}")
        per_mille = round(recall * RECALL_SCALE)
        if abs(per_mille - recall * RECALL_SCALE) > 1e-6:
            raise ValueError(f"block_mass.recall is kept to 1/{RECALL_SCALE}, got {recall!r}")
        samples = spec.get("samples", DEFAULT_SAMPLES)
        if isinstance(samples, int) and not isinstance(samples, bool) and samples > _MAXIMUM["samples"]:
            raise ValueError(f"block_mass.samples must be <= {_MAXIMUM['samples']}, got {samples}")
        cls(PatternKind.BLOCK_MASS, per_mille, samples)  # the samples' own checks, before the score joins them
        score = spec.get("score", "mass")
        if score not in SCORES:
            raise ValueError(f"block_mass.score must be one of {list(SCORES)}, got {score!r}")
        neighbours = spec.get("neighbours", 0)
        if isinstance(neighbours, bool) or neighbours not in (0, 1):
            raise ValueError(f"block_mass.neighbours must be 0 or 1, got {neighbours!r}")
        return cls(PatternKind.BLOCK_MASS, per_mille,
                   samples | (SCORE_MAX if score == "max" else 0) | (NEIGHBOURS if neighbours else 0))

    def _values(self) -> tuple:
        if self.kind == PatternKind.BLOCK_MASS:
            return (self.recall, self.p1 & (SCORE_MAX - 1), "max" if self.p1 & SCORE_MAX else "mass",
                    int(bool(self.p1 & NEIGHBOURS)))
        return self.p0, self.p1

    def _named(self) -> dict:
        """The budgets by name; block-mass's ``neighbours`` only when set (it came later)."""
        named = dict(zip(_PARAMS[self.kind], self._values()))
        if named.get("neighbours") == 0:
            del named["neighbours"]
        return named

    def to_dict(self) -> dict:
        return {"kind": self.kind.label, **self._named()}

    def describe(self) -> str:
        args = ", ".join(f"{n}={v:g}" if isinstance(v, float) else f"{n}={v}" for n, v in self._named().items())
        return f"{self.kind.label}({args})" if args else self.kind.label


# Budgets that scale with length. A pattern's budgets hold at its reference length L; at a
# shorter prompt of N tokens each becomes ``round(budget * (N / L) ** exponent)`` (never below
# the floors below, never above the budget itself); at N >= L it stays as given. The exponent
# 0.7 follows how the keys a head needs grow with length on real text: SmolLM2 + YaRN keeps 95%
# of its attention mass in 3.8% of 8K causal keys and 1.8% of 128K ones, 311 -> 2360 keys, N^0.73.
# At and past L the budgets stay fixed, as MInference's do (density falls as 1/N).
DEFAULT_BUDGET_LENGTH = 131072  # MInference's default budgets (1000, 6096) are for 128K prompts
DEFAULT_BUDGET_EXPONENT = 0.7
_SCALED_FLOOR = {"vertical": 64, "slash": 128, "local": 128, "blocks": 4}  # sink is never scaled


def scaled_budgets(pattern: "Pattern", n: int, length: int, exponent: float = DEFAULT_BUDGET_EXPONENT) -> "Pattern":
    """``pattern`` with its budgets scaled to a prompt of ``n`` tokens (see above);
    ``length`` <= 0 means the budgets are absolute and are returned as they are."""
    if length <= 0 or n >= length or pattern.kind in (PatternKind.DENSE, PatternKind.BLOCK_MASS):
        return pattern  # block-mass has no budget: its tiles follow the input at every length
    ratio = (max(n, 1) / length) ** exponent
    values = []
    for name, value in zip(_PARAMS[pattern.kind], (pattern.p0, pattern.p1)):
        if name == "sink":
            values.append(value)
        else:
            values.append(min(value, max(round(value * ratio), _SCALED_FLOOR[name], _MINIMUM[name])))
    return Pattern(pattern.kind, *values)


def scale_lists(kinds: Sequence[int], p0: Sequence[int], p1: Sequence[int], n: int, length: int,
                exponent: float) -> tuple[list[int], list[int]]:
    """``scaled_budgets`` over the op's per-head int lists."""
    if length <= 0 or n >= length:
        return list(p0), list(p1)
    scaled = [scaled_budgets(p, n, length, exponent) for p in decode(kinds, p0, p1)]
    return [p.p0 for p in scaled], [p.p1 for p in scaled]


DENSE = Pattern(PatternKind.DENSE)
DEFAULT_VERTICAL_SLASH = Pattern(PatternKind.VERTICAL_SLASH, 1000, 6096)  # MInference's default
# The default for heads no database covers: per query block, the fewest key tiles holding 98.5%
# of the "max" score that 8 exact rows of the block give them, each block's scores shared with its
# two neighbours' (their mean, never below its own). docs/ACCURACY.md, "Tile scores", "Rows shared
# with the neighbouring blocks" and "The default's target": the lowest target measured whose worst
# sampled real head stays at 0.90 or above from 32K to 128K (0.98's falls to 0.89 at 128K); it keeps
# a superset of 0.98's tiles, about 10% more.
DEFAULT_BLOCK_MASS = Pattern(PatternKind.BLOCK_MASS, 985, 8 | SCORE_MAX | NEIGHBOURS)


def encode(patterns: Sequence[Pattern]) -> tuple[list[int], list[int], list[int]]:
    """Per-head patterns -> (kinds, p0, p1) int lists, the form the graph ops take."""
    return [int(p.kind) for p in patterns], [p.p0 for p in patterns], [p.p1 for p in patterns]


def decode(kinds: Sequence[int], p0: Sequence[int], p1: Sequence[int]) -> list[Pattern]:
    return [Pattern(PatternKind(k), a, b) for k, a, b in zip(kinds, p0, p1)]


def max_density(pattern: Pattern, n: int) -> float:
    """Upper bound of the fraction of the n(n+1)/2 causal (query, key) pairs on a pattern's own
    lines at length ``n``: every vertical or slash line holds at most n pairs, a 64x64 block
    64*64. Not a bound on what the kernel computes: a slash is computed as a 64-key-wide tile
    per query block, so stray slashes cost up to 64x more (``pattern_db.cost`` models that)."""
    causal = n * (n + 1) / 2
    if pattern.kind in (PatternKind.DENSE, PatternKind.BLOCK_MASS):
        return 1.0  # block-mass: whatever the input needs
    if pattern.kind == PatternKind.A_SHAPE:
        kept = min(pattern.p0, n) * n + min(pattern.p1, n) * n
    elif pattern.kind == PatternKind.VERTICAL_SLASH:
        kept = min(pattern.p0, n) * n + min(pattern.p1, n) * n
    else:
        blocks = (n + 63) // 64
        kept = min(pattern.p0, blocks) * blocks * 64 * 64
    return min(1.0, kept / causal)
