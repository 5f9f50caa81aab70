"""A KV cache in float8 for generation after a long sparse prefill.

A sparse prefill makes a 1M-token prompt affordable in time; its KV cache is then the limit in
memory: Llama-3-8B keeps 128 KiB per token in bf16 (128 GiB at 1M), more than one GPU holds.
``FP8Cache`` is a transformers ``DynamicCache`` whose full-attention layers store K and V in
``float8_e4m3fn`` (64 KiB per token for that shape), with one scale per KV head and channel
(``amax / 448`` of the first update, frozen after it so later tokens are appended as they come;
values past the range are clamped). Sliding-window layers keep transformers' own bf16 window.

What each step attends to:

- the first update (the prefill) returns its own K and V unchanged: the prefill's attention,
  sparse or dense, is exactly what it would be without the cache;
- later updates (decode steps, later chunks) return the whole cache dequantized to the model's
  dtype: decoding reads FP8-rounded keys and values (relative error about 2^-4 per element).

It is plain tensor code (a cast, a concatenation), so Dynamo traces it inside the compiled
prefill and decode graphs; transformers' offloaded cache does not compile (docs/BENCHMARKS.md).

    from mcompile.kv_cache import FP8Cache
    model.compile(backend="minference", dynamic=True)
    out = model.generate(ids, past_key_values=FP8Cache(model.config), max_new_tokens=32)
"""

from __future__ import annotations

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max  # 448


def fp8_scale(x: torch.Tensor) -> torch.Tensor:
    """One scale per KV head and channel of ``x`` (B, H, N, D): amax over batch and positions / 448,
    shape (1, H, 1, D), float32; never zero."""
    amax = x.detach().abs().amax(dim=(0, 2), keepdim=True).float()
    return (amax / FP8_MAX).clamp(min=torch.finfo(torch.float32).tiny)


def quantize(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``x / scale`` in float8 e4m3, clamped to its range (e4m3fn has no infinity: an overflow would
    be NaN), laid out contiguously: a prefill's K/V are transposed views, and a cache whose layout
    changed between the prefill and the first concatenation would make the compiled decode step
    recompile on its strides."""
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8, memory_format=torch.contiguous_format)


def dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (q.float() * scale).to(dtype)


class FP8Layer(DynamicLayer):
    """One full-attention layer's K/V in float8: ``keys`` and ``values`` hold the float8 tensors
    (B, H_kv, N, D), so the sequence length, cropping and beam reordering of ``DynamicLayer``
    apply unchanged; ``key_scale`` / ``value_scale`` are (1, H_kv, 1, D) float32."""

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        self.dtype = key_states.dtype
        self.key_scale = fp8_scale(key_states)
        self.value_scale = fp8_scale(value_states)
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
            self.keys = quantize(key_states, self.key_scale)
            self.values = quantize(value_states, self.value_scale)
            return key_states, value_states
        self.keys = torch.cat([self.keys, quantize(key_states, self.key_scale)], dim=-2)
        self.values = torch.cat([self.values, quantize(value_states, self.value_scale)], dim=-2)
        return dequantize(self.keys, self.key_scale, self.dtype), dequantize(self.values, self.value_scale, self.dtype)

    def reset(self) -> None:
        self.keys = self.values = None
        self.is_initialized = False


class FP8Cache(DynamicCache):
    """``DynamicCache(config=config)`` with every full-attention layer in float8 (``FP8Layer``);
    sliding-window and other layer kinds as transformers builds them. Without a config, layers are
    created as they are first updated."""

    def __init__(self, config=None):
        super().__init__(config=config)
        if config is None:
            self.layer_class_to_replicate = FP8Layer
            return
        self.layers = [FP8Layer() if type(layer) is DynamicLayer else layer for layer in self.layers]


def cache_bytes(cache) -> int:
    """Bytes a transformers cache holds in its layers' keys and values (and FP8Layer's scales)."""
    total = 0
    for layer in cache.layers:
        for name in ("keys", "values", "key_scale", "value_scale"):
            t = getattr(layer, name, None)
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total
