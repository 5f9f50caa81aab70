"""Compare pattern policies on a model and real text: attention recall, output error, density.

A policy gives every head of a layer its pattern at a prompt length, as the backend would:

- a database: its patterns, budgets scaled by ``scaled_budgets(p, N, budget_length, exponent)``;
- ``default``: what the backend does without a database (``MInferenceConfig()``'s default
  pattern, MInference's vertical-slash (1000, 6096) at reference length 131072, scaled below).

For each layer (captured one at a time) and policy, the index is estimated as the compiled
model estimates it (``estimate_index_ref``) and measured on sampled query blocks against dense
attention; ``density`` is the kernel's work (``cost.kernel_pairs``) over the causal pairs.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from .capture import attention_recall, capture_qkv
from ..kernels.estimate import estimate_index_ref
from ..patterns import Pattern, encode, scaled_budgets
from ..pattern_db.cost import kernel_density
from .metrics import dense_rows, output_error, sample_blocks

Policy = Callable[[int, int], list]  # (layer, length) -> [Pattern] per query head, budgets scaled


def database_policy(db) -> Policy:
    def patterns(layer: int, n: int) -> list[Pattern]:
        return [scaled_budgets(p, n, db.budget_length, db.budget_exponent) for p in db.patterns_for(layer)]
    return patterns


def default_policy(num_heads: int) -> Policy:
    from ..config import MInferenceConfig

    config = MInferenceConfig(pattern_db=None)

    def patterns(layer: int, n: int) -> list[Pattern]:
        p = scaled_budgets(config.default_pattern, n, config.budget_length, config.budget_exponent)
        return [p] * num_heads
    return patterns


def parse_policy(spec: str) -> tuple[str, str]:
    """``NAME=SPEC`` -> (name, spec); SPEC is ``default`` or a database path or shipped name."""
    name, sep, what = spec.partition("=")
    if not sep or not name or not what:
        raise ValueError(f"a policy is NAME=SPEC (SPEC: 'default' or a database), got {spec!r}")
    return name, what


def _resolve(spec: str, model) -> Policy:
    from ..pattern_db import ModelFingerprint, load

    if spec == "default":
        return default_policy(model.config.num_attention_heads)
    return database_policy(load(spec, model=ModelFingerprint.from_config(model.config)))


def evaluate_policies(model, input_ids: torch.Tensor, policies: dict, blocks: int = 64) -> list[dict]:
    """One row per policy: mean (over layers and heads) attention recall, output error and
    kernel density at this length, and the worst head's recall. ``policies``: {name: spec or
    Policy}."""
    from .search import attention_scale

    n = int(input_ids.shape[-1])
    resolved = {name: (p if callable(p) else _resolve(p, model)) for name, p in policies.items()}
    starts = sample_blocks(n, blocks)
    sums: dict = {name: {"recall": [], "error": [], "density": []} for name in resolved}

    def on_layer(layer, q, k, v):
        scale = attention_scale(model, layer, q.shape[-1])
        dense = dense_rows(q, k, v, scale, starts)
        for name, policy in resolved.items():
            index = estimate_index_ref(q, k, None, *encode(policy(layer, n)), scale)
            sums[name]["recall"].append(attention_recall(q, k, index, scale, rows=starts)[0])
            sums[name]["error"].append(output_error(q, k, v, index, scale, starts, dense)[0])
            sums[name]["density"].append(kernel_density(index, n)[0].float())

    capture_qkv(model, input_ids, on_layer=on_layer)
    rows = []
    for name, m in sums.items():
        recall, error, density = (torch.stack(m[key]) for key in ("recall", "error", "density"))  # (L, H)
        rows.append({"policy": name, "length": n, "recall": round(float(recall.mean()), 4),
                     "min_recall": round(float(recall.min()), 4), "error": round(float(error.mean()), 4),
                     "max_error": round(float(error.max()), 4), "density": round(float(density.mean()), 4),
                     "sampled_blocks": len(starts)})
    return rows


def format_table(rows: Sequence[dict]) -> str:
    head = f"{'policy':<14} {'length':>6} {'recall':>7} {'min':>7} {'out err':>8} {'max':>7} {'density':>8}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['policy']:<14} {r['length']:>6} {r['recall']:>7.4f} {r['min_recall']:>7.4f} "
                     f"{r['error']:>8.4f} {r['max_error']:>7.4f} {100 * r['density']:>7.1f}%")
    return "\n".join(lines)
