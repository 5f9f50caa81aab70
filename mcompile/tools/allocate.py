"""Loss-aware budget allocation: per-layer budgets that spend a kept-fraction budget where the
model's predictions need it.

The pattern search (search.py) gives every head the same kernel cost and picks the pattern
that best reproduces that head's attention output. Heads are not equally important: on SmolLM2
one global policy that keeps 30% of the causal keys at 4K costs 1.4-2.6% perplexity, while the
attention recall of half the layers barely moves between 25% and 45% kept
(docs/ACCURACY.md). Allocation measures what each layer's sparsity costs the *model*, and
solves for the cheapest assignment:

1. Calibration inputs, from a text the evaluation never scores (``data.calibration_docs``,
   PyTorch's documentation): sliding text windows at the model's context, scored by next-token
   loss, and needle prompts (a number hidden at several depths, asked for at the end) scored by
   the loss of the answer's tokens, teacher-forced.
2. A ladder of options per layer (``default_options``): vertical-slash budgets at a reference
   length, scaled to shorter prompts as the backend scales them (``patterns.scaled_budgets``),
   and dense.
3. Sensitivity: every (layer, option) is run with that layer sparse and every other layer
   dense (an attention function registered through transformers' ``AttentionInterface``; the
   same estimation and kernels as the compiled backend). Recorded: the change of the text loss
   and of the needle answers' loss against dense, and the layer's kept fraction of causal
   pairs (``index.kept_fraction``) and attention recall at each calibration length.
4. Allocation (``allocate``): a multiple-choice knapsack, solved exactly by dynamic
   programming over a discretised cost, that minimises the summed loss change
   (text + ``needle_weight`` x needle) subject to the mean kept fraction at each calibration
   length staying under its target, and the mean recall over a floor (a Lagrange multiplier on
   recall, found by bisection).
5. Check: the allocation is run with all layers sparse at once, and the measured loss change is
   reported beside the sum the knapsack predicted (layer effects are not exactly additive).

Every head of a layer gets the layer's option (per-head sensitivities are below the noise of a
few calibration windows). The result is a pattern database (``objective: "loss"``), read by the
backend like any other.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from .. import ops  # noqa: F401  (registers torch.ops.mcompile.*)
from .capture import attention_recall
from .eval.perplexity import window_nll
from ..index import SparseIndex, kept_fraction
from ..patterns import DEFAULT_BUDGET_EXPONENT, DENSE, Pattern, PatternKind, encode
from ..pattern_db import HeadEntry, ModelFingerprint, PatternDB

ALLOCATE_IMPL = "mcompile_allocate"  # name registered with transformers' AttentionInterface
# The ladder: vertical-slash budgets at REFERENCE_LENGTH. A vertical costs at most one key per
# query, a slash run a 64-key tile per query block, so the ladder moves mostly along slashes.
VERTICALS = (1200,)
SLASHES = (100, 200, 350, 600, 1000, 1700)
REFERENCE_LENGTH = 8192
BUDGET_EXPONENT = DEFAULT_BUDGET_EXPONENT  # the backend's scaling of budgets with length
# A lost needle moves the answer's loss by several nats; at 0.05 one lost answer among nine
# prompts outweighs a 1% perplexity change of the text.
NEEDLE_WEIGHT = 0.05
RECALL_BLOCKS = 16  # sampled 64-query blocks per layer for the recall measurement
COST_STEPS = 400  # discretisation of one layer's cost in the knapsack (cost 1.0 = the target)


def default_options(verticals: Sequence[int] = VERTICALS, slashes: Sequence[int] = SLASHES) -> list[Pattern]:
    """Vertical-slash budgets (every vertical x slash pair), then dense."""
    return [Pattern(PatternKind.VERTICAL_SLASH, v, s) for v in verticals for s in slashes] + [DENSE]


@dataclass
class Calibration:
    """Scored inputs: text windows (all positions from ``first`` on) and needle prompts with
    their answers appended (the answer's positions are scored)."""

    texts: list  # (1, W) token ids
    first: int
    needles: list  # (ids (1, N + answer), answer start, N: the nominal length)
    description: str = ""


def calibration_inputs(tokenizer, window: int, texts: int = 1, needle_lengths: Sequence[int] = (4096, 8192),
                       depths: Sequence[float] = (0.1, 0.9), offset: int = 0) -> Calibration:
    """Calibration inputs from ``data.calibration_docs``: ``texts`` windows of ``window`` tokens
    (scored from ``window // 4`` on) and needle prompts at every length x depth, each with its own
    number."""
    from .data import haystack
    from .needle import needle_prompt

    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    windows = [torch.tensor([bos + haystack(tokenizer, window - len(bos), offset + i * window, "calibration")])
               for i in range(texts)]
    needles = []
    for i, n in enumerate(needle_lengths):
        for j, depth in enumerate(depths):
            value = str(10007 + 7919 * (i * len(depths) + j) % 89989)
            prompt = needle_prompt(tokenizer, n, depth, value=value, offset=offset + texts * window + 997 * i,
                                   source="calibration")
            answer = tokenizer(f" {value}.", add_special_tokens=False)["input_ids"]
            ids = torch.cat([prompt.input_ids, torch.tensor([answer])], 1)
            needles.append((ids, prompt.input_ids.shape[1], n))
    desc = (f"mcompile.tools.data.calibration_docs (PyTorch documentation): {texts} windows of {window} tokens from "
            f"token {offset}; needles at {list(needle_lengths)} x depths {list(depths)}")
    return Calibration(windows, window // 4, needles, desc)


class _Attention:
    """The attention function the calibration runs use: SDPA for dense layers, the backend's own
    ops (``mcompile::estimate_index``, budgets scaled to the length, and
    ``mcompile::sparse_attention``) for layers in ``patterns``."""

    def __init__(self, reference_length: int, exponent: float):
        self.patterns: dict = {}  # layer -> Pattern; absent or dense: SDPA
        self.reference_length = reference_length
        self.exponent = exponent
        self.measure = False
        self.kept: dict = {}  # (layer, nominal length) -> [mean kept fraction over heads, one per input]
        self.recall: dict = {}
        self.length = 0  # nominal length of the input being run (needle prompts carry their answer)

    def __call__(self, module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        pattern = self.patterns.get(module.layer_idx)
        if pattern is None or pattern.kind == PatternKind.DENSE:
            return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                          scaling=scaling, **kwargs)
        if query.shape[0] != 1 or query.shape[2] != key.shape[2]:
            raise ValueError("allocation runs whole prompts of batch 1")
        n, h = key.shape[2], query.shape[1]
        scale = float(scaling) if scaling is not None else query.shape[-1] ** -0.5
        kinds, p0, p1 = encode([pattern] * h)
        parts = torch.ops.mcompile.estimate_index(query, key, None, kinds, p0, p1, scale, self.reference_length,
                                                  self.exponent)
        out = torch.ops.mcompile.sparse_attention(query, key, value, *parts, None, scale)
        if self.measure:
            index = SparseIndex(*parts)
            from .eval.attention import sample_rows

            at = (module.layer_idx, self.length or n)
            self.kept.setdefault(at, []).append(float(kept_fraction(index, n).mean()))
            rows = sample_rows(n, RECALL_BLOCKS)
            self.recall.setdefault(at, []).append(float(attention_recall(query, key, index, scale, rows).mean()))
        return out.transpose(1, 2).contiguous(), None


@dataclass
class Losses:
    text: float  # mean next-token loss over the scored text positions (nats)
    needle: float  # mean over needle prompts of the answer's summed loss (nats)
    needles: list = field(default_factory=list)  # per prompt


def losses(model, cal: Calibration, device, on_input: Callable[[int], None] | None = None) -> Losses:
    """Losses of ``model`` on the calibration inputs; ``on_input(nominal length)`` before each."""
    decoder, head = model.get_decoder(), model.get_output_embeddings()
    on_input = on_input or (lambda n: None)
    text, needles = [], []
    with torch.inference_mode():
        for t in cal.texts:
            on_input(t.shape[1])
            text.append(window_nll(decoder, head, t.to(device), cal.first))
        for ids, start, n in cal.needles:
            on_input(n)
            needles.append(window_nll(decoder, head, ids.to(device), start)[0])
    return Losses(sum(a for a, _ in text) / sum(c for _, c in text), sum(needles) / max(1, len(needles)), needles)


@dataclass
class Entry:
    """One (layer, option): loss changes against dense, and kept fraction / recall by length."""

    text: float
    needle: float
    kept: dict  # length -> mean kept fraction
    recall: dict  # length -> mean recall

    def to_json(self) -> dict:
        return {"text": self.text, "needle": self.needle, "kept": {str(k): v for k, v in self.kept.items()},
                "recall": {str(k): v for k, v in self.recall.items()}}

    @classmethod
    def from_json(cls, data: dict) -> Entry:
        return cls(data["text"], data["needle"], {int(k): v for k, v in data["kept"].items()},
                   {int(k): v for k, v in data["recall"].items()})


class Session:
    """A model with the allocation attention function installed (a context manager)."""

    def __init__(self, model, reference_length: int = REFERENCE_LENGTH, exponent: float = BUDGET_EXPONENT):
        self.model = model
        self.attn = _Attention(reference_length, exponent)

    def __enter__(self):
        from transformers import AttentionInterface

        AttentionInterface.register(ALLOCATE_IMPL, self.attn)
        self._old = self.model.config._attn_implementation
        self.model.set_attn_implementation(ALLOCATE_IMPL)
        return self

    def __exit__(self, *exc):
        self.model.set_attn_implementation(self._old)

    def run(self, cal: Calibration, patterns: dict, measure: bool = False) -> tuple[Losses, dict, dict]:
        """Losses with ``patterns`` ({layer: Pattern}), and (when ``measure``) kept fraction and
        recall per (layer, length), averaged over inputs; dense layers are not measured (see
        ``model_means``)."""
        self.attn.patterns = dict(patterns)
        self.attn.measure = measure
        self.attn.kept, self.attn.recall = {}, {}
        device = next(self.model.parameters()).device
        result = losses(self.model, cal, device, on_input=lambda n: setattr(self.attn, "length", n))
        kept = {key: sum(v) / len(v) for key, v in self.attn.kept.items()}
        recall = {key: sum(v) / len(v) for key, v in self.attn.recall.items()}
        return result, kept, recall


def model_means(per_layer: dict, layers: int) -> dict:
    """{length: mean over all ``layers``} of ``Session.run``'s {(layer, length): value}; a layer
    with no value ran dense attention, which keeps every causal key (kept fraction and recall 1)."""
    lengths = sorted({n for _, n in per_layer})
    return {n: sum(per_layer.get((layer, n), 1.0) for layer in range(layers)) / layers for n in lengths}


def sensitivity(session: Session, cal: Calibration, options: Sequence[Pattern], layers: int,
                on_step: Callable[[], None] | None = None, base: Losses | None = None, table: list | None = None,
                on_layer: Callable[[Losses, list], None] | None = None) -> tuple[Losses, list]:
    """(dense losses, table[layer][option] of Entry); the dense option gets zeros and kept 1.

    ``base`` and a partial ``table`` (the first layers of an interrupted run) resume it;
    ``on_layer(base, table)`` after every layer (to save progress)."""
    base = base if base is not None else session.run(cal, {})[0]
    table = list(table or [])
    for layer in range(len(table), layers):
        row = []
        for option in options:
            if option.kind == PatternKind.DENSE:
                row.append(None)
                continue
            res, kept, recall = session.run(cal, {layer: option}, measure=True)
            row.append(Entry(res.text - base.text, res.needle - base.needle,
                             {n: v for (_, n), v in sorted(kept.items())},
                             {n: v for (_, n), v in sorted(recall.items())}))
            if on_step is not None:
                on_step()
        lengths = sorted({n for e in row if e is not None for n in e.kept})
        table.append([e if e is not None else Entry(0.0, 0.0, {n: 1.0 for n in lengths}, {n: 1.0 for n in lengths})
                      for e in row])
        if on_layer is not None:
            on_layer(base, table)
    return base, table


@dataclass
class Allocation:
    choice: list  # option index per layer
    predicted_text: float
    predicted_needle: float
    kept: dict  # length -> predicted mean kept fraction
    recall: dict  # length -> predicted mean recall
    multiplier: float  # the recall multiplier the bisection settled on

    def patterns(self, options: Sequence[Pattern]) -> list[Pattern]:
        return [options[j] for j in self.choice]


def _knapsack(values: torch.Tensor, costs: torch.Tensor, capacity: int) -> list[int] | None:
    """Exact multiple-choice knapsack: one option per layer, minimising the summed value with the
    summed (integer) cost <= capacity. values, costs (L, J). None if nothing fits."""
    inf = float("inf")
    layers, options = values.shape
    best = torch.full((capacity + 1,), inf, dtype=torch.float64)
    best[0] = 0.0
    picks = []
    for layer in range(layers):
        cand = torch.full((options, capacity + 1), inf, dtype=torch.float64)
        for j in range(options):
            c = int(costs[layer, j])
            if c <= capacity:
                cand[j, c:] = best[:capacity + 1 - c] + float(values[layer, j])
        best, pick = cand.min(0)
        picks.append(pick)
    if not math.isfinite(float(best.min())):
        return None
    c = int(best.argmin())
    choice = []
    for layer in reversed(range(layers)):
        j = int(picks[layer][c])
        choice.append(j)
        c -= int(costs[layer, j])
    return choice[::-1]


def allocate(table: list, kept_targets: dict, min_recall: float = 0.0,
             needle_weight: float = NEEDLE_WEIGHT) -> Allocation | None:
    """The cheapest choice per layer (summed text + ``needle_weight`` x needle loss change) with
    the mean kept fraction at every length in ``kept_targets`` ({length: target}) at most its
    target and the mean recall (at every measured length) at least ``min_recall``.

    One cost per (layer, option): the largest of kept(n) / target(n) over the targeted lengths,
    so a sum within the layers' count keeps every length's mean within its target. None when
    even the cheapest options exceed the targets or no multiplier reaches the recall floor."""
    layers = len(table)
    lengths = sorted(kept_targets)
    measured = set(table[0][0].kept)
    if not set(lengths) <= measured:
        raise ValueError(f"kept targets at {sorted(set(lengths) - measured)} tokens, but the table measured "
                         f"{sorted(measured)}")
    ratio = torch.tensor([[max(e.kept[n] / kept_targets[n] for n in lengths) for e in row] for row in table])
    costs = torch.ceil(ratio * COST_STEPS - 1e-9).long()
    loss = torch.tensor([[e.text + needle_weight * e.needle for e in row] for row in table], dtype=torch.float64)
    rec_lengths = sorted({n for row in table for e in row for n in e.recall})
    low_recall = torch.tensor([[1.0 - min(e.recall[n] for n in rec_lengths) for e in row] for row in table],
                              dtype=torch.float64)

    def solve(mu: float):
        choice = _knapsack(loss + mu * low_recall, costs, layers * COST_STEPS)
        if choice is None:
            return None
        picked = [table[i][j] for i, j in enumerate(choice)]
        recall = {n: sum(e.recall[n] for e in picked) / layers for n in rec_lengths}
        kept = {n: sum(e.kept[n] for e in picked) / layers for n in sorted(picked[0].kept)}
        return Allocation(choice, sum(e.text for e in picked), sum(e.needle for e in picked), kept, recall, mu)

    best = solve(0.0)
    if best is None or min(best.recall.values(), default=1.0) >= min_recall:
        return best
    lo, hi = 0.0, 1.0
    while True:  # grow the multiplier until the floor is met (or give up)
        found = solve(hi)
        if found is not None and min(found.recall.values()) >= min_recall:
            break
        hi *= 4
        if hi > 1e6:
            return None
    for _ in range(30):
        mid = (lo + hi) / 2
        found_mid = solve(mid)
        if found_mid is not None and min(found_mid.recall.values()) >= min_recall:
            hi, found = mid, found_mid
        else:
            lo = mid
    return found


def database(model_fp: ModelFingerprint, options: Sequence[Pattern], alloc: Allocation, table: list,
             calibration: dict, needle_weight: float = NEEDLE_WEIGHT) -> PatternDB:
    """The allocation as a pattern database: each head gets its layer's option, scored by the
    layer's loss change (text + ``needle_weight`` x needle) on the calibration inputs."""
    layers = []
    for i, j in enumerate(alloc.choice):
        e = table[i][j]
        score = round(e.text + needle_weight * e.needle, 6)
        layers.append(tuple(HeadEntry(options[j], score) for _ in range(model_fp.num_heads)))
    return PatternDB(model_fp, tuple(layers), calibration)


__all__ = [
    "BUDGET_EXPONENT",
    "NEEDLE_WEIGHT",
    "REFERENCE_LENGTH",
    "Allocation",
    "Calibration",
    "Entry",
    "Session",
    "allocate",
    "calibration_inputs",
    "database",
    "default_options",
    "model_means",
    "sensitivity",
]
