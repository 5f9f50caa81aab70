"""capture_qkv and attention_recall."""

import torch

from mcompile.tools.capture import attention_recall, capture_qkv
from mcompile.index import index_to_mask
from mcompile.kernels.estimate import estimate_index_ref
from mcompile.tools.models import tiny_llama


def test_capture_shapes_and_restores_attention():
    model = tiny_llama("sdpa", layers=3, heads=4, kv_heads=2, head_dim=16)
    ids = torch.randint(0, 128, (2, 70))
    store = capture_qkv(model, ids, layers=[0, 2])
    assert sorted(store) == [0, 2]
    q, k, v = store[2]
    assert q.shape == (2, 4, 70, 16) and k.shape == (2, 2, 70, 16) and v.shape == (2, 2, 70, 16)
    assert model.config._attn_implementation == "sdpa"
    seen = []
    assert capture_qkv(model, ids, on_layer=lambda i, *_: seen.append(i)) == {}
    assert seen == [0, 1, 2]


def test_recall_matches_masked_softmax():
    torch.manual_seed(0)
    b, h, hk, n, d = 2, 4, 2, 200, 16
    q, k = torch.randn(b, h, n, d), torch.randn(b, hk, n, d)
    scale = d ** -0.5
    index = estimate_index_ref(q, k, None, [2] * h, [30] * h, [100] * h, scale)
    kk = k.repeat_interleave(h // hk, 1)
    s = (q @ kk.transpose(-1, -2)) * scale
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    p = torch.softmax(s.masked_fill(~causal, float("-inf")), -1)
    want = (p * index_to_mask(index, n)).sum(-1).mean(-1)
    got = attention_recall(q, k, index, scale)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert (got < 0.999).all()  # the pattern drops mass on random inputs
    dense = estimate_index_ref(q, k, None, [0] * h, [0] * h, [0] * h, scale)
    torch.testing.assert_close(attention_recall(q, k, dense, scale), torch.ones(b, h))
    sampled = attention_recall(q, k, index, scale, rows=[64, 128])
    torch.testing.assert_close(sampled, (p * index_to_mask(index, n))[:, :, 64:192].sum(-1).mean(-1),
                               atol=1e-5, rtol=1e-5)
