"""Sparse prefill over a paged KV cache as an engine lays it out (``serving.paged_prefill``):
packed request chunks, pages scattered in the cache, block tables; each request against dense
attention over its own keys with the mask materialised."""

import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.utils import counters

from mcompile.config import MInferenceConfig
from mcompile.serving import gather_pages, paged_prefill, plan_request, request_attention

H, HK, D, PAGE = 4, 2, 16, 16
# (context length, chunk length): a long chunk after a prefix, a whole prompt, a decode step, a
# short chunk (below the sparse kernel's minimum: dense), a chunk ending mid-page
REQUESTS = [(300, 120), (200, 200), (257, 1), (190, 40), (161, 97)]
COVER = {"dense_below": 0, "pattern_db": None, "default_pattern": {"kind": "vertical_slash", "vertical": 1000,
                                                                    "slash": 1000}}
SPARSE = {"dense_below": 0, "pattern_db": None, "default_pattern": {"kind": "vertical_slash", "vertical": 30,
                                                                     "slash": 100}}


def _layout(seed=0, requests=REQUESTS):
    """Per request contiguous (q, k, v), and the same laid out as an engine keeps them: packed
    queries, a cache whose pages are shuffled, block tables, context lengths."""
    g = torch.Generator().manual_seed(seed)
    reqs = [(torch.randn(1, H, nq, D, generator=g), torch.randn(1, HK, n, D, generator=g),
             torch.randn(1, HK, n, D, generator=g)) for n, nq in requests]
    pages_of = [-(-n // PAGE) for n, _ in requests]
    total = sum(pages_of) + 3  # spare pages nobody owns
    order = torch.randperm(total, generator=g)
    k_cache = torch.randn(total, PAGE, HK, D, generator=g)  # unowned slots hold noise
    v_cache = torch.randn(total, PAGE, HK, D, generator=g)
    table = torch.full((len(requests), max(pages_of) + 2), -1, dtype=torch.int32)
    used = 0
    for i, ((n, _), (_, k, v)) in enumerate(zip(requests, reqs)):
        ids = order[used:used + pages_of[i]]
        used += pages_of[i]
        table[i, :len(ids)] = ids.to(torch.int32)
        for j, pid in enumerate(ids.tolist()):
            rows = slice(j * PAGE, min((j + 1) * PAGE, n))
            k_cache[pid, : rows.stop - rows.start] = k[0, :, rows].transpose(0, 1)
            v_cache[pid, : rows.stop - rows.start] = v[0, :, rows].transpose(0, 1)
    query = torch.cat([q[0].transpose(0, 1) for q, _, _ in reqs])
    cu = torch.tensor([0] + [nq for _, nq in requests]).cumsum(0)
    ctx = torch.tensor([n for n, _ in requests])
    return reqs, query, cu, k_cache, v_cache, table, ctx


def _dense(q, k, v, window=0):
    """fp32 attention of the chunk's queries (the last of the keys) with the mask materialised."""
    nq, n = q.shape[2], k.shape[2]
    pos = torch.arange(n - nq, n)[:, None]
    key = torch.arange(n)[None, :]
    mask = (key <= pos) & ((key > pos - window) if window else True)
    g = H // HK
    return F.scaled_dot_product_attention(q, k.repeat_interleave(g, 1), v.repeat_interleave(g, 1), attn_mask=mask,
                                          scale=D ** -0.5)


def test_gather_pages_reads_a_request_back():
    reqs, _, _, k_cache, _, table, ctx = _layout()
    for i, (_, k, _) in enumerate(reqs):
        assert torch.equal(gather_pages(k_cache, table[i], int(ctx[i])), k)


@pytest.mark.parametrize("window", [0, 24])
def test_paged_prefill_with_covering_budgets_equals_dense_per_request(window):
    reqs, query, cu, k_cache, v_cache, table, ctx = _layout(seed=1)
    counters["mcompile"].clear()
    out = paged_prefill(query, cu, k_cache, v_cache, table, ctx, options=COVER, window=window)
    for i, (q, k, v) in enumerate(reqs):
        want = _dense(q, k, v, window)[0].transpose(0, 1)
        torch.testing.assert_close(out[cu[i]:cu[i + 1]], want, atol=2e-5, rtol=2e-5)
    # the decode step and the 40-query chunk run dense; the other three sparse
    assert counters["mcompile"]["packed_sparse"] == 3


def test_paged_prefill_runs_the_index_it_is_given():
    """A sparse pattern: each request equals its own attention over contiguous keys with the
    same index, whether the plans are made apart (``plan_request``) or in the call; and the
    index drops keys (the result differs from dense)."""
    reqs, query, cu, k_cache, v_cache, table, ctx = _layout(seed=2, requests=[(1000, 300), (700, 700)])
    config = MInferenceConfig.from_options(SPARSE)
    plans = [plan_request(q, k, D ** -0.5, config) for q, k, _ in reqs]
    out = paged_prefill(query, cu, k_cache, v_cache, table, ctx, options=SPARSE, plans=plans)
    again = paged_prefill(query, cu, k_cache, v_cache, table, ctx, options=SPARSE)
    torch.testing.assert_close(out, again, atol=0, rtol=0)
    for i, (q, k, v) in enumerate(reqs):
        want = request_attention(q, k, v, D ** -0.5, config, index=plans[i])[0].transpose(0, 1)
        torch.testing.assert_close(out[cu[i]:cu[i + 1]], want, atol=1e-6, rtol=1e-6)
        assert not torch.allclose(out[cu[i]:cu[i + 1]], _dense(q, k, v)[0].transpose(0, 1), atol=1e-3)


@pytest.mark.parametrize("bad,match", [
    (dict(context_lens=torch.tensor([300, 200])), "do not describe the same requests"),
    (dict(query=torch.zeros(10, H * D)), r"query \(T, H, D\)"),
    (dict(context_lens=torch.tensor([100, 200, 257, 190, 161])), "request 0 has 120 queries over 100 keys"),
    (dict(context_lens=torch.tensor([3000, 200, 257, 190, 161])), "request 0 has 120 queries over 3000 keys"),
    (dict(context_lens=torch.tensor([300, 200, 257, 190, 180])), "request 4's block table names pages outside"),
])
def test_paged_prefill_rejects_inconsistent_layouts(bad, match):
    _, query, cu, k_cache, v_cache, table, ctx = _layout()
    args = dict(query=query, cu_seqlens_q=cu, k_cache=k_cache, v_cache=v_cache, block_table=table, context_lens=ctx)
    args.update(bad)
    with pytest.raises(ValueError, match=match):
        paged_prefill(**args, options=COVER)
