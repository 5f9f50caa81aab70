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

Where the cache lives:

- ``FP8Cache(config)`` grows by concatenation: each update allocates the layer's new K/V and
  frees the old. Inside one compiled graph (a chunk of a prefill in chunks: every layer's update
  is in that graph) every layer's old tensors stay alive until the graph returns, so the peak
  holds the cache twice (a prompt of 512K tokens with the Llama-3-8B shape ran out of memory on an
  80 GB GPU that way; docs/BENCHMARKS.md).
- ``FP8Cache(config, max_length=N, device=...)`` allocates each layer's store of ``N`` tokens
  once, outside any graph, and writes every update into it in place; ``keys`` / ``values`` are
  views of the filled part. The peak holds the cache once. Updates past ``N`` tokens are an error.

It is plain tensor code (a cast, a concatenation or a copy into a slice), so Dynamo traces it
inside the compiled prefill and decode graphs; transformers' offloaded cache does not compile
(docs/BENCHMARKS.md).

    from mcompile.kv_cache import FP8Cache
    model.compile(backend="minference", dynamic=True)
    out = model.generate(ids, past_key_values=FP8Cache(model.config), max_new_tokens=32)
    cache = FP8Cache(model.config, max_length=ids.shape[1] + 32, device="cuda")  # preallocated
"""

from __future__ import annotations

from typing import Optional

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
    apply unchanged; ``key_scale`` / ``value_scale`` are (1, H_kv, 1, D) float32.
    ``allocate`` gives the layer a store of a fixed number of tokens, written in place (module
    docstring); ``keys`` / ``values`` are then (B, H_kv, N, D) views of its filled part. The store
    is laid out (B, tokens, H_kv, D), as the projections give K and V: with batch 1 the filled
    part is then contiguous at every length (a (B, H_kv, tokens, D) store's is not, and the
    compiled decode step would guard on it and compile again when the cache is one token short
    of full)."""

    key_store: Optional[torch.Tensor] = None
    value_store: Optional[torch.Tensor] = None

    def allocate(self, batch_size: int, heads: int, max_length: int, head_dim: int, value_dim: int,
                 device) -> None:
        """The layer's store: (batch_size, max_length, heads, head_dim) float8 for K and V."""
        self.key_store = torch.empty(batch_size, max_length, heads, head_dim, dtype=FP8, device=device)
        self.value_store = torch.empty(batch_size, max_length, heads, value_dim, dtype=FP8, device=device)

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        self.dtype = key_states.dtype
        self.key_scale = fp8_scale(key_states)
        self.value_scale = fp8_scale(value_states)
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        first = not self.is_initialized
        if first:
            self.lazy_initialization(key_states, value_states)
        if self.key_store is None:
            k8, v8 = quantize(key_states, self.key_scale), quantize(value_states, self.value_scale)
            self.keys = k8 if first else torch.cat([self.keys, k8], dim=-2)
            self.values = v8 if first else torch.cat([self.values, v8], dim=-2)
        else:
            self._write(key_states, value_states, 0 if first else self.keys.shape[-2])
        if first:  # the prefill attends to its own K/V, unrounded
            return key_states, value_states
        return dequantize(self.keys, self.key_scale, self.dtype), dequantize(self.values, self.value_scale, self.dtype)

    def _write(self, k: torch.Tensor, v: torch.Tensor, start) -> None:
        """K/V (B, H_kv, n, D), quantized (or already float8), into the store's tokens [start, start + n)."""
        store = self.key_store
        end = start + k.shape[-2]
        if k.shape[0] != store.shape[0] or k.shape[1] != store.shape[2] or k.shape[3] != store.shape[3] \
                or v.shape[:3] != k.shape[:3] or v.shape[3] != self.value_store.shape[3]:
            raise ValueError(f"FP8Cache: K/V of shape {tuple(k.shape)} / {tuple(v.shape)} (batch, KV heads, tokens, "
                             f"head dim) do not fit the layer's store {tuple(store.shape)} / "
                             f"{tuple(self.value_store.shape)} (batch, tokens, KV heads, head dim)")
        if end > store.shape[1]:
            raise ValueError(f"FP8Cache holds max_length={store.shape[1]} tokens per layer; this update needs {end} "
                             f"({start} cached + {k.shape[-2]} new): give the cache a larger max_length")
        if k.dtype != FP8:
            k, v = quantize(k, self.key_scale), quantize(v, self.value_scale)
        self.key_store[:, start:end].copy_(k.transpose(1, 2))
        self.value_store[:, start:end].copy_(v.transpose(1, 2))
        self.keys = self.key_store[:, :end].transpose(1, 2)
        self.values = self.value_store[:, :end].transpose(1, 2)

    def _restore(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """A store of the layer's new batch (beam reordering, batch selection or repetition), filled
        with ``keys`` / ``values``, which ``keys`` / ``values`` then view."""
        self.allocate(keys.shape[0], keys.shape[1], self.key_store.shape[1], keys.shape[3], values.shape[3],
                      keys.device)
        self._write(keys, values, 0)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        if self.key_store is not None and self.get_seq_length() > 0:
            self._restore(self.keys, self.values)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        if self.key_store is not None and self.get_seq_length() > 0:
            self._restore(self.keys, self.values)

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        if self.key_store is not None and self.get_seq_length() > 0:
            self._restore(self.keys, self.values)

    def offload(self):
        if self.key_store is not None:
            raise NotImplementedError("FP8Cache with max_length: its store stays on its device (no offloading)")
        super().offload()

    def reset(self) -> None:
        self.keys = self.values = None
        self.is_initialized = False


class FP8Cache(DynamicCache):
    """``DynamicCache(config=config)`` with every full-attention layer in float8 (``FP8Layer``);
    sliding-window and other layer kinds as transformers builds them. Without a config, layers are
    created as they are first updated.

    ``max_length``: each float8 layer's store of that many tokens, allocated here (with
    ``batch_size`` and ``device``; needs ``config`` for the KV heads and head dims) and written in
    place (module docstring). None: the layers grow by concatenation."""

    def __init__(self, config=None, max_length: Optional[int] = None, batch_size: int = 1, device=None):
        super().__init__(config=config)
        if config is None:
            if max_length is not None:
                raise ValueError("FP8Cache(max_length=...) needs the model's config (KV heads and head dims)")
            self.layer_class_to_replicate = FP8Layer
            return
        self.layers = [FP8Layer() if type(layer) is DynamicLayer else layer for layer in self.layers]
        if max_length is None:
            return
        for name, value in (("max_length", max_length), ("batch_size", batch_size)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"FP8Cache: {name} must be a positive int, got {value!r}")
        text = config.get_text_config(decoder=True)
        heads = text.num_key_value_heads or text.num_attention_heads
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        value_dim = getattr(text, "v_head_dim", None) or head_dim
        for layer in self.layers:
            if isinstance(layer, FP8Layer):
                layer.allocate(batch_size, heads, max_length, head_dim, value_dim, device)


def cache_bytes(cache) -> int:
    """Bytes a transformers cache holds in its layers' keys and values (and FP8Layer's scales; a
    preallocated FP8Layer's whole store)."""
    total = 0
    for layer in cache.layers:
        stored = getattr(layer, "key_store", None) is not None
        for name in (("key_store", "value_store") if stored else ("keys", "values")) + ("key_scale", "value_scale"):
            t = getattr(layer, name, None)
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total
