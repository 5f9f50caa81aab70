"""Per layer and head, against dense attention on the same inputs: attention recall, output
error, and the kept fraction of causal keys of the index the backend would build.

The dense model runs once uncompiled with its Q/K/V captured (``capture.capture_qkv``). For each
layer the patterns are the ones the minference backend chose for it (read from
``mcompile.explain``'s report, so a pattern database is honoured exactly as in a compiled run),
scaled to the prompt length as the op scales them; the index comes from ``estimate_index_ref``
on the captured Q/K. Then, per head:

- recall: the mean, over sampled query rows, of the dense softmax mass on the kept keys;
- output error: ``||o_sparse - o_dense|| / ||o_dense||`` over the same rows, where ``o_sparse``
  is attention restricted to the kept keys (softmax renormalised over them, as the sparse
  kernel computes it);
- kept fraction: ``index.kept_fraction`` (all rows, exact).

Rows are sampled as ``BLOCK``-row blocks spread evenly over the prompt plus the last block (whose
queries estimate the pattern and ask the needle question): O(rows x N) work per layer instead of
O(N^2). Layer inputs are dense Q/K/V, so errors do not compound across layers here; the needle and
perplexity runs measure the compounded effect.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from ..capture import attention_recall, capture_qkv
from ...explain import explain
from ...index import BLOCK, SparseIndex, kept_fraction
from ...kernels.estimate import estimate_index_ref
from ..metrics import output_error
from ...patterns import encode, scaled_budgets

DEFAULT_ROW_BLOCKS = 32  # sampled 64-row query blocks per layer (2048 rows: recall to about +-0.01)
EXPLAIN_TOKENS = 128  # input length of the explain pass that reads the per-layer patterns


def sample_rows(n: int, blocks: int) -> list[int]:
    """Starts of ``blocks`` query blocks spread evenly over ``[0, n)``, the last block included."""
    last = (n - 1) // BLOCK
    if blocks >= last + 1:
        return [b * BLOCK for b in range(last + 1)]
    picks = {round(i * last / max(blocks - 1, 1)) for i in range(blocks)}
    return sorted(p * BLOCK for p in picks | {last})


def recall_and_error(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, index: SparseIndex, scale: float,
                     rows: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(recall, relative output error), each (B, H) fp32, over the query blocks starting at ``rows``.

    q (B, H, N, D), k/v (B, Hk, N, D), causal, no padding.
    """
    return attention_recall(q, k, index, scale, rows=rows), output_error(q, k, v, index, scale, rows).float()


def layer_patterns(model, options: dict) -> dict:
    """{layer: (patterns per head, (reference length, exponent))} as the backend chooses them."""
    ids = torch.zeros(1, EXPLAIN_TOKENS, dtype=torch.long, device=next(model.parameters()).device)
    torch._dynamo.reset()
    try:
        e = explain(model, ids, options={k: v for k, v in options.items() if k != "compiler"}, use_cache=False)
    finally:
        torch._dynamo.reset()
    return {s.layer: (s.patterns, s.budget_scaling) for s in e.sites if s.rewritten and s.layer is not None}


def _scalings(model) -> dict:
    """{layer index: softmax scale} of the model's attention modules."""
    return {m.layer_idx: float(m.scaling) for m in model.modules()
            if hasattr(m, "layer_idx") and hasattr(m, "scaling")}


def measure(model, input_ids: torch.Tensor, patterns: dict, row_blocks: int = DEFAULT_ROW_BLOCKS,
            on_layer: Callable[[int], None] | None = None) -> list[dict]:
    """Per layer: recall, output error and kept fraction of each head at ``input_ids``' length."""
    n = input_ids.shape[1]
    scales = _scalings(model)
    rows = sample_rows(n, row_blocks)
    out = []

    def one_layer(layer, q, k, v):
        if layer not in patterns:  # kept dense by the backend: nothing to measure
            out.append({"layer": layer, "rewritten": False})
            return
        pats, (length, exponent) = patterns[layer]
        scaled = [scaled_budgets(p, n, length, exponent) for p in pats]
        kinds, p0, p1 = encode(scaled)
        scale = scales.get(layer, q.shape[-1] ** -0.5)
        index = estimate_index_ref(q, k, None, kinds, p0, p1, scale)
        recall, error = recall_and_error(q, k, v, index, scale, rows)
        out.append({"layer": layer, "rewritten": True, "patterns": [p.describe() for p in scaled],
                    "recall": recall[0].tolist(), "output_error": error[0].tolist(),
                    "kept_fraction": kept_fraction(index, n)[0].tolist()})
        if on_layer is not None:
            on_layer(layer)

    capture_qkv(model, input_ids, on_layer=one_layer)
    return sorted(out, key=lambda r: r["layer"])


def summarize(layers: list[dict]) -> dict:
    """Means and minima over the measured heads."""
    done = [r for r in layers if r["rewritten"]]
    if not done:
        return {"layers": 0}
    flat = lambda key: [x for r in done for x in r[key]]
    recall, error, kept = flat("recall"), flat("output_error"), flat("kept_fraction")
    per_layer = [sum(r["recall"]) / len(r["recall"]) for r in done]
    return {"layers": len(done), "heads": len(recall), "recall_mean": sum(recall) / len(recall),
            "recall_min": min(recall), "recall_min_layer_mean": min(per_layer),
            "weakest_layer": done[per_layer.index(min(per_layer))]["layer"],
            "output_error_mean": sum(error) / len(error), "output_error_max": max(error),
            "kept_fraction_mean": sum(kept) / len(kept), "kept_fraction_max": max(kept)}
