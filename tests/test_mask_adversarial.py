"""Masks that look causal and are not: each must stay dense (with its reason) and equal eager.

Every case builds a mask the way custom attention code could, then uses it in SDPA or in the
eager softmax chain. The rewrite may only happen where the proof understands everything the
mask went through; the compiled module must equal the module run eagerly, at lengths on both
sides of ``dense_below`` (the dense branch of a rewritten attention is causal too, so a wrong
proof is wrong at every length)."""

import pytest
import torch
import torch.nn.functional as F

import mcompile
from mcompile.tools.models import tiny_llama

OPTIONS = {"dense_below": 0, "compiler": "aot_eager"}
N = 80  # whole prompt; every case also runs as a 50-query chunk after a 30-token prefix


def _attend(q, k, v, mask, eager):
    if not eager:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    scores = torch.matmul(q, k.transpose(2, 3)) * q.shape[-1] ** -0.5
    if mask.dtype == torch.bool:
        mask = torch.where(mask, 0.0, torch.finfo(q.dtype).min)
    return torch.matmul(torch.softmax(scores + mask, dim=-1, dtype=torch.float32).to(q.dtype), v)


def _positions(q, k):
    nq, n = q.shape[2], k.shape[2]
    return torch.arange(n - nq, n), torch.arange(n)  # query positions, key positions


def causal(q, k):
    qi, ki = _positions(q, k)
    return ki[None, None, None, :] <= qi[None, None, :, None]


# Each case: (name, mask builder, words the reason must contain); None: provably causal.
def setitem_prefix(q, k):
    mask = causal(q, k)
    mask[..., :16] = True  # a bidirectional prefix written into the causal mask
    return mask


def masked_fill_(q, k):
    mask = causal(q, k)
    mask.masked_fill_(torch.arange(k.shape[2]) < 8, True)
    return mask


def ior(q, k):
    mask = causal(q, k)
    mask |= torch.ones_like(mask)
    return mask


def add_into_source(q, k):
    qi, ki = _positions(q, k)
    mask = ki[None, None, None, :] <= qi[None, None, :, None]
    qi.add_(5)  # the positions it was built from change afterwards: mask already computed, but the
    return mask  # proof cannot tell an alias from a copy, so nothing built from a changed tensor counts


def index_put_view(q, k):
    mask = causal(q, k)
    view = mask[0, 0]
    view.index_put_((torch.tensor([0]), torch.tensor([5])), torch.tensor(True))
    return mask


def copy_into_view(q, k):
    mask = causal(q, k)
    mask[..., :4].copy_(torch.ones(1, 1, q.shape[2], 4, dtype=torch.bool))
    return mask


def inplace_before_compare(q, k):
    nq, n = q.shape[2], k.shape[2]
    ki = torch.arange(n)
    qi = ki[n - nq:]  # a view of the key positions
    ki += 0  # changes (in place) what both are views of
    return ki[None, None, None, :] <= qi[None, None, :, None]


def arange_keywords(q, k):
    nq, n = q.shape[2], k.shape[2]
    qi = torch.arange(start=n - nq + 3, end=n + 3)  # shifted by 3, given by keyword
    ki = torch.arange(end=n)
    return ki[None, None, None, :] <= qi[None, None, :, None]


def arange_step(q, k):
    nq, n = q.shape[2], k.shape[2]
    qi = torch.arange(0, 2 * nq, step=2) + (n - nq)  # every other position
    ki = torch.arange(n)
    return ki[None, None, None, :] <= qi[None, None, :, None]


def arange_keywords_causal(q, k):
    nq, n = q.shape[2], k.shape[2]
    qi = torch.arange(start=n - nq, end=n, step=1)
    ki = torch.arange(end=n)
    return ki[None, None, None, :] <= qi[None, None, :, None]


def positions_fp16(q, k):
    qi, ki = _positions(q, k)
    qi, ki = (qi + 2000).half(), (ki + 2000).half()  # past 2048 fp16 rounds 2049 to 2048: a future key
    return ki[None, None, None, :] <= qi[None, None, :, None]


def positions_int8(q, k):
    qi, ki = _positions(q, k)
    qi, ki = (qi + 100).to(torch.int8), (ki + 100).to(torch.int8)  # wraps past 127
    return ki[None, None, None, :] <= qi[None, None, :, None]


def arange_dtype_int8(q, k):
    nq, n = q.shape[2], k.shape[2]
    qi = torch.arange(n - nq, n, dtype=torch.int8) + 100  # int8 arithmetic wraps past 127
    ki = torch.arange(n, dtype=torch.int8) + 100
    return ki[None, None, None, :] <= qi[None, None, :, None]


def positions_fp32_small(q, k):
    qi, ki = _positions(q, k)
    return ki.float()[None, None, None, :] <= qi.float()[None, None, :, None]  # exact: fine


def one_query_row(q, k):
    nq, n = q.shape[2], k.shape[2]
    qi = torch.arange(n - nq, n - nq + 1)  # the first query's position, broadcast over every query
    ki = torch.arange(n)
    return (ki[None, None, None, :] <= qi[None, None, :, None]) & causal(q, k)


def tril_one_row(q, k):
    row = torch.ones(1, k.shape[2], dtype=torch.bool).tril(k.shape[2] - q.shape[2])  # (1, N): broadcast
    return row[None, None] & causal(q, k)


def sliced_mask(q, k):
    full = causal(q, k)
    return full[..., :1]  # one key column broadcast over every key


def two_dims(q, k):
    qi, ki = _positions(q, k)
    return ki[None, :] <= qi[:, None]  # (Nq, N): broadcast over batch and heads from the right


def three_dims(q, k):
    qi, ki = _positions(q, k)
    return ki[None, None, :] <= qi[None, :, None]


def two_dims_future(q, k):
    qi, ki = _positions(q, k)
    return ki[None, :] >= qi[:, None]  # every query sees itself and the keys after it


CASES = [
    ("setitem_prefix", setitem_prefix, "changed in place"),
    ("masked_fill_", masked_fill_, "changed in place"),
    ("ior", ior, "changed in place"),
    ("add_into_source", add_into_source, "changed in place"),
    ("index_put_view", index_put_view, "changed in place"),
    ("copy_into_view", copy_into_view, "changed in place"),
    ("inplace_before_compare", inplace_before_compare, "changed in place"),
    ("arange_keywords", arange_keywords, "shifted"),
    ("arange_step", arange_step, "step"),
    ("arange_keywords_causal", arange_keywords_causal, None),
    ("positions_fp16", positions_fp16, "float16"),
    ("positions_int8", positions_int8, "int8"),
    ("arange_dtype_int8", arange_dtype_int8, "int8"),
    ("positions_fp32_small", positions_fp32_small, None),
    ("one_query_row", one_query_row, "broadcast"),
    ("tril_one_row", tril_one_row, "square"),
    ("sliced_mask", sliced_mask, "broadcast"),
    ("two_dims", two_dims, None),
    ("three_dims", three_dims, None),
    ("two_dims_future", two_dims_future, "non-causal"),
]


class Attention(torch.nn.Module):
    def __init__(self, build, eager):
        super().__init__()
        self.build, self.eager = build, eager

    def forward(self, q, k, v):
        return _attend(q, k, v, self.build(q, k), self.eager)


def _qkv(nq, n=N, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, 2, n, 16, generator=g)[:, :, n - nq:]
    return q, torch.randn(2, 2, n, 16, generator=g), torch.randn(2, 2, n, 16, generator=g)


@pytest.mark.parametrize("eager", [False, True], ids=["sdpa", "eager"])
@pytest.mark.parametrize("nq", [N, 70], ids=["prompt", "chunk"])
@pytest.mark.parametrize("name,build,reason", CASES, ids=[c[0] for c in CASES])
def test_mask_is_rewritten_only_when_proven(name, build, reason, nq, eager):
    module = Attention(build, eager)
    q, k, v = _qkv(nq)
    e = mcompile.explain(module, q, k, v, options=OPTIONS)
    (site,) = e.sites
    if reason is None:
        assert site.rewritten, site.reason
    else:
        assert not site.rewritten and reason in site.reason, site.reason
    ref = module(q, k, v)
    for dense_below in (0, 10 ** 6):  # the sparse branch and the dense branch of the same graph
        torch._dynamo.reset()
        out = torch.compile(module, backend="minference", options={**OPTIONS, "dense_below": dense_below})(q, k, v)
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5, equal_nan=True)


def test_llama_with_a_prefix_written_into_its_mask():
    """The issue's example: a Llama whose mask gets ``mask[..., :16] = True`` after the causal
    build stays dense and equals eager; plain Inductor is exact."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    def prefix_sdpa(module, query, key, value, attention_mask, **kwargs):
        attention_mask = attention_mask.clone()  # (torch 2.13 cannot functionalize a write into the expanded mask)
        attention_mask[..., :16] = True
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register("mcompile_test_prefix", prefix_sdpa)
    AttentionMaskInterface.register("mcompile_test_prefix", sdpa_mask)  # the mask SDPA gets
    model = tiny_llama("mcompile_test_prefix")
    ids = torch.randint(0, 128, (2, 120), generator=torch.Generator().manual_seed(0))
    pad = torch.ones_like(ids)
    pad[1, -1] = 0  # a padded batch: transformers builds the 4-D mask (unpadded, it passes is_causal)
    with torch.no_grad():
        ref = model(ids, attention_mask=pad, use_cache=False).logits
        e = mcompile.explain(model, ids, attention_mask=pad, use_cache=False, options=OPTIONS)
        assert len(e.sites) == 2 and e.rewritten == 0, e.summary()
        assert all("changed in place" in s.reason for s in e.sites), e.summary()
        torch._dynamo.reset()
        # aot_eager: torch 2.11's Inductor cannot compile this model's write into a bool mask for the CPU
        compiled = torch.compile(model, backend="minference", options=OPTIONS)
        out = compiled(ids, attention_mask=pad, use_cache=False).logits
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
