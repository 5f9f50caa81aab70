"""Capture a model's per-layer attention inputs, and measure a sparse index against them.

``capture_qkv`` runs one uncompiled forward with an attention function registered through
transformers' ``AttentionInterface`` that records Q (after RoPE), K and V of the chosen layers
(K/V as the model keeps them: KV heads, not repeated) and then runs SDPA as usual. The model's
attention implementation is restored afterwards. This is an offline tool (pattern search,
evaluation, benchmarks); the backend itself never patches the model.

``attention_recall`` measures how much of a head's softmax attention mass falls on the keys an
index keeps, walking query blocks so memory stays O(rows x N).
"""

from __future__ import annotations

from typing import Callable, Iterable, Optional

import torch

from ..index import BLOCK, SparseIndex, block_mask_rows

CAPTURE_IMPL = "mcompile_capture"  # name registered with transformers' AttentionInterface
RECALL_ROWS = 256  # query rows per step of attention_recall (a multiple of BLOCK)


def capture_qkv(model, input_ids: torch.Tensor, layers: Optional[Iterable[int]] = None,
                on_layer: Optional[Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], None]] = None,
                **forward_kwargs) -> dict:
    """{layer: (q (B, H, N, D), k (B, Hk, N, D), v (B, Hk, N, Dv))} of ``layers`` (all if None).

    With ``on_layer(layer, q, k, v)`` nothing is stored: each layer is handed over as it is
    computed (bounded memory for long inputs and many layers); the call returns {}.
    """
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    wanted = None if layers is None else set(layers)
    store: dict = {}

    def capture(module, query, key, value, attention_mask, **kwargs):
        layer = module.layer_idx
        if wanted is None or layer in wanted:
            q, k, v = query.detach(), key.detach(), value.detach()
            if on_layer is not None:
                on_layer(layer, q, k, v)
            else:
                store[layer] = (q.clone(), k.clone(), v.clone())
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register(CAPTURE_IMPL, capture)
    old = model.config._attn_implementation
    model.set_attn_implementation(CAPTURE_IMPL)
    try:
        with torch.inference_mode():
            model(input_ids, use_cache=False, logits_to_keep=1, **forward_kwargs)
    finally:
        model.set_attn_implementation(old)
    return store


def attention_recall(q: torch.Tensor, k: torch.Tensor, index: SparseIndex, scale: float,
                     rows: Optional[Iterable[int]] = None) -> torch.Tensor:
    """Mean (over query rows) attention mass on kept keys, per (batch, head): (B, H) fp32.

    q (B, H, N, D), k (B, Hk, N, D), causal. ``rows``: query-block starts (multiples of BLOCK) to
    sample, each contributing its BLOCK rows; None = every row (O(N^2) work, O(RECALL_ROWS x N)
    memory).
    """
    b, h, n, _ = q.shape
    group = h // k.shape[1]
    starts = list(range(0, n, RECALL_ROWS)) if rows is None else sorted(set(rows))
    step = RECALL_ROWS if rows is None else BLOCK
    total = torch.zeros(b, h, dtype=torch.float64, device=q.device)
    count = 0
    keys = torch.arange(n, device=q.device)
    for r0 in starts:
        if r0 % BLOCK or not 0 <= r0 < n:
            raise ValueError(f"row starts must be multiples of {BLOCK} in [0, {n}), got {r0}")
        r1 = min(n, r0 + step)
        kk = k[:, :, :r1].float().repeat_interleave(group, 1)  # (B, H, r1, D)
        s = torch.matmul(q[:, :, r0:r1].float(), kk.transpose(-1, -2)) * scale  # (B, H, R, r1)
        causal = keys[None, :r1] <= torch.arange(r0, r1, device=q.device)[:, None]
        p = torch.softmax(s.masked_fill(~causal, float("-inf")), -1)
        keep = block_mask_rows(index, r0, r1, n)[..., :r1]
        total += (p * keep).sum(-1).double().sum(-1)
        count += r1 - r0
    return (total / max(count, 1)).float()
