"""Sliding-window attention computed exactly by the sparse path, with no N x N mask.

A mask ``key <= query & key > query - W`` (transformers' sliding layers: Mistral, Gemma 3, Qwen2's
sliding layers) is proven a window of W keys (passes/mask_proof.py); the rewrite gives every head
the window's band as its pattern (A-shape with no sink and local W) and the ops mask each tile to
the window (kernels: ``window``), so the result equals the model's own attention. The Triton
kernel's window is checked against the reference in tests/test_triton_kernels.py."""

import functools

import pytest
import torch
import torch.nn.functional as F
from transformers import DynamicCache

import mcompile
from mcompile import ops
from mcompile.index import SparseIndex
from mcompile.kernels.sparse_attention import sparse_attention_ref
from mcompile.patterns import PatternKind
from mcompile.tools.models import tiny_llama

from .helpers import padding_mask, qkv

SPARSE = {"dense_below": 0, "pattern_db": None, "default_pattern": {"kind": "vertical_slash", "vertical": 30,
                                                                     "slash": 100}}


def windowed(q, k, v, window, scale, key_padding=None):
    """fp32 SDPA with the bottom-right causal window mask (and padding) materialised; rows with
    no kept key are zeros."""
    nq, n = q.shape[2], k.shape[2]
    pos = torch.arange(n - nq, n)[:, None]
    keys = torch.arange(n)[None, :]
    mask = (keys <= pos) & (keys > pos - window)
    mask = mask[None, None] if key_padding is None else mask[None, None] & key_padding[:, None, None, :]
    g = q.shape[1] // k.shape[1]
    out = F.scaled_dot_product_attention(q.float(), k.float().repeat_interleave(g, 1),
                                         v.float().repeat_interleave(g, 1), attn_mask=mask, scale=scale)
    return torch.where(mask.any(-1, keepdim=True), out, 0.0)


CASES = [  # b, h, hk, n, nq, window
    (1, 2, 2, 200, 200, 16), (2, 4, 2, 300, 300, 70), (2, 6, 2, 257, 100, 64), (1, 4, 1, 130, 3, 40),
    (1, 2, 1, 90, 90, 500),
]


@pytest.mark.parametrize("b, h, hk, n, nq, window", CASES)
@pytest.mark.parametrize("padded", [False, True], ids=["nopad", "pad"])
def test_ops_with_a_window_equal_masked_dense(b, h, hk, n, nq, window, padded):
    """The band index (A-shape 0 / W) with the ops' window, and the dense op with the window,
    against SDPA over the materialised mask: whole prompts, chunks after a prefix, GQA, batch > 1,
    a window wider than the prompt."""
    q, k, v = qkv(b, h, hk, n, 16, seed=n + window)
    q = q[:, :, n - nq:]
    kp = padding_mask(b, n, left=[5] * b, right=[0, 7][:b]) if padded else None
    want = windowed(q, k, v, window, 0.25, kp)
    index = ops.estimate_index(q, k, kp, [PatternKind.A_SHAPE] * h, [0] * h, [window] * h, 0.25)
    sparse = ops.sparse_attention(q, k, v, *index, kp, 0.25, window)
    torch.testing.assert_close(sparse, want, atol=2e-5, rtol=2e-5)
    ref = sparse_attention_ref(q, k, v, SparseIndex(*index), 0.25, kp, window=window)
    torch.testing.assert_close(ref, want, atol=2e-5, rtol=2e-5)
    dense = ops.dense_attention(q, k, v, kp, 0.25, window)
    torch.testing.assert_close(dense, want, atol=2e-5, rtol=2e-5)


def test_negative_window_is_a_clear_error():
    q, k, v = qkv(1, 2, 2, 64, 16)
    with pytest.raises(ValueError, match="window must be >= 0"):
        ops.dense_attention(q, k, v, None, 0.25, -1)


def _mistral(window=70, layers=2):
    return tiny_llama("sdpa", model_type="mistral", layers=layers, sliding_window=window)


def _ids(b, n, seed=0):
    return torch.randint(0, 128, (b, n), generator=torch.Generator().manual_seed(seed))


def _compiled(model, reports, dynamic=False, **options):
    backend = functools.partial(mcompile.minference_backend, options={**SPARSE, **options}, report_sink=reports.append)
    return torch.compile(model, backend=backend, dynamic=dynamic)


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
def test_mistral_sliding_layers_are_exact(dynamic):
    """Every sliding layer rewritten with its window as the pattern; logits equal the model's at
    two lengths past the window (one graph under dynamic shapes), and with a padded batch."""
    model = _mistral()
    reports = []
    compiled = _compiled(model, reports, dynamic=dynamic)
    with torch.no_grad():
        for n in (300, 211):
            ids = _ids(2, n, seed=n)
            torch.testing.assert_close(compiled(ids).logits, model(ids).logits, atol=1e-4, rtol=1e-4)
        mask = torch.ones(2, 211, dtype=torch.long)
        mask[0, :9] = 0
        ids = _ids(2, 211, seed=3)
        out = compiled(ids, attention_mask=mask).logits
        ref = model(ids, attention_mask=mask).logits
    torch.testing.assert_close(out[1], ref[1], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out[0, 9:], ref[0, 9:], atol=1e-4, rtol=1e-4)
    sites = [s for r in reports for s in r.sites]
    assert sites and all(s.rewritten and "sliding window of 70 keys" in s.pattern_source for s in sites)
    assert all(p.kind == PatternKind.A_SHAPE and p.sink == 0 and p.local == 70 for s in sites for p in s.patterns)


def test_no_quadratic_mask_in_the_rewritten_graph():
    model = _mistral(layers=1)
    ids = _ids(1, 300)
    e = mcompile.explain(model, ids, options=SPARSE)
    code = "\n".join(line for line in e.graph_code().splitlines() if not line.strip().startswith("#"))
    assert e.rewritten == 1 and "300, 300]" not in code


def test_chunk_after_a_cached_prefix_is_exact():
    """Prefill 200 tokens, then a chunk of 100 with the cache: the window reaches back into the
    cached keys, bottom-right aligned."""
    model = _mistral()
    ids = _ids(1, 300, seed=7)

    def prefilled():
        cache = DynamicCache(config=model.config)
        with torch.no_grad():
            model(ids[:, :200], past_key_values=cache, use_cache=True)
        return cache

    with torch.no_grad():
        ref = model(ids[:, 200:], past_key_values=prefilled(), use_cache=True).logits
        reports = []
        out = _compiled(model, reports)(ids[:, 200:], past_key_values=prefilled(), use_cache=True).logits
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    assert all(s.rewritten and "sliding window" in s.pattern_source for r in reports for s in r.sites)


def test_gemma3_mixes_sliding_and_global_layers():
    """Gemma 3's layers alternate: the sliding ones get their window, the global one the default
    pattern (here covering every key), and the logits equal the model's."""
    model = tiny_llama("sdpa", model_type="gemma3_text", layers=4, sliding_window=64,
                       layer_types=["sliding_attention"] * 3 + ["full_attention"])
    ids = _ids(2, 300)
    reports = []
    cover = {"default_pattern": {"kind": "vertical_slash", "vertical": 1000, "slash": 1000}}
    with torch.no_grad():
        out = _compiled(model, reports, **cover)(ids).logits
        ref = model(ids).logits
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    sources = [s.pattern_source for r in reports for s in r.sites]
    assert sources[:3] == ["sliding window of 64 keys, exact"] * 3 and sources[3] == "default pattern"
    # Neither the sliding masks nor the global one survive as an (N, N) tensor.
    e = mcompile.explain(model, ids, options={**SPARSE, **cover})
    code = "\n".join(line for line in e.graph_code().splitlines() if not line.strip().startswith("#"))
    assert e.rewritten == 4 and "300, 300]" not in code


class _SymbolicWindow(torch.nn.Module):
    """A window whose width depends on the length: not a constant, so not proven."""

    def forward(self, q, k, v):
        n = q.shape[2]
        i = torch.arange(n)
        key, query = i[None, None, None, :], i[None, None, :, None]
        mask = (key <= query) & (key > query - n // 4)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def test_window_of_symbolic_width_stays_dense_with_reason():
    q, k, v = qkv(1, 2, 2, 80, 16)
    torch._dynamo.mark_dynamic(q, 2)
    torch._dynamo.mark_dynamic(k, 2)
    torch._dynamo.mark_dynamic(v, 2)
    e = mcompile.explain(_SymbolicWindow(), q, k, v, options=SPARSE)
    (site,) = e.sites
    assert not site.rewritten and "not a constant" in site.reason, site.reason


class _NoKey(torch.nn.Module):
    """A lower bound past the causal one: no key satisfies both."""

    def forward(self, q, k, v):
        i = torch.arange(q.shape[2])
        key, query = i[None, None, None, :], i[None, None, :, None]
        return F.scaled_dot_product_attention(q, k, v, attn_mask=(key <= query) & (key > query + 2))


def test_window_that_keeps_no_key_stays_dense_with_reason():
    q, k, v = qkv(1, 2, 2, 80, 16)
    (site,) = mcompile.explain(_NoKey(), q, k, v, options=SPARSE).sites
    assert not site.rewritten and "keeps no key" in site.reason, site.reason
