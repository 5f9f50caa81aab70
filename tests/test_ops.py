"""The graph ops on CPU: estimation + sparse attention against dense attention with the index's
mask materialised, and against plain causal attention when the pattern covers everything."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mcompile import ops
from mcompile.index import SparseIndex, kept_fraction
from mcompile.kernels.estimate import estimate_index_ref
from mcompile.kernels.sparse_attention import sparse_attention_ref
from mcompile.patterns import PatternKind

from .helpers import dense_causal, masked_dense, padding_mask, qkv

# (B, H, Hk, N, D)
SHAPES = [(1, 4, 4, 1, 16), (1, 4, 2, 63, 16), (2, 6, 2, 97, 32), (1, 9, 3, 257, 64), (2, 8, 1, 300, 16)]
MIXED = {  # kinds, p0, p1 per head (cycled to the head count)
    "vertical_slash": ([2], [30], [100]),
    "mixed": ([0, 1, 2, 3], [0, 4, 40, 2], [0, 64, 120, 0]),
    "a_shape": ([1], [8], [70]),
    "block_sparse": ([3], [2], [0]),
}


def _patterns(name, h):
    kinds, p0, p1 = MIXED[name]
    return [kinds[i % len(kinds)] for i in range(h)], [p0[i % len(p0)] for i in range(h)], [p1[i % len(p1)] for i in range(h)]


def _run(q, k, v, kinds, p0, p1, scale, kp=None, dense_below=0):
    """What the lowering computes (passes/lowering.py): dense where ``ops.runs_dense`` says so."""
    index = ops.estimate_index(q, k, kp, kinds, p0, p1, scale)
    if ops.runs_dense(q.shape[2], k.shape[2], dense_below):
        return ops.dense_attention(q, k, v, kp, scale), SparseIndex(*index)
    return ops.sparse_attention(q, k, v, *index, kp, scale), SparseIndex(*index)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}H{}Hk{}N{}D{}".format(*s))
@pytest.mark.parametrize("patterns", list(MIXED))
def test_sparse_equals_dense_with_materialised_mask(shape, patterns):
    b, h, hk, n, d = shape
    q, k, v = qkv(b, h, hk, n, d, seed=n + h)
    kinds, p0, p1 = _patterns(patterns, h)
    out, index = _run(q, k, v, kinds, p0, p1, d ** -0.5)
    ref = masked_dense(q, k, v, index, d ** -0.5)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)


def test_pattern_is_really_sparse_at_length():
    """With small budgets at 1000 tokens, the index keeps a small part of the causal keys."""
    q, k, v = qkv(1, 4, 2, 1000, 16)
    _, index = _run(q, k, v, [2, 2, 1, 3], [30, 30, 4, 2], [100, 100, 64, 0], 0.25)
    assert (kept_fraction(index, 1000) < 0.5).all()


@pytest.mark.parametrize("kind,p0,p1", [(2, 10_000, 10_000), (3, 1000, 0), (1, 10_000, 10_000), (0, 0, 0)])
def test_covering_pattern_equals_dense(kind, p0, p1):
    b, h, hk, n, d = 2, 6, 3, 211, 16
    q, k, v = qkv(b, h, hk, n, d, seed=3)
    out, _ = _run(q, k, v, [kind] * h, [p0] * h, [p1] * h, d ** -0.5)
    torch.testing.assert_close(out, dense_causal(q, k, v, d ** -0.5), atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_error_within_twice_torch(dtype):
    """Error against an fp32 oracle at most twice PyTorch's own same-dtype error (plus a floor)."""
    b, h, hk, n, d = 1, 4, 2, 150, 32
    q, k, v = qkv(b, h, hk, n, d, seed=5)
    kinds, p0, p1 = _patterns("mixed", h)
    out, index = _run(q.to(dtype), k.to(dtype), v.to(dtype), kinds, p0, p1, d ** -0.5)
    oracle = masked_dense(q, k, v, index, d ** -0.5)
    torch_err = (masked_dense(q.to(dtype), k.to(dtype), v.to(dtype), index, d ** -0.5).to(dtype).float() - oracle).abs().max()
    assert out.dtype == dtype
    assert (out.float() - oracle).abs().max() <= 2 * torch_err + 1e-3


def test_key_padding_left_and_right():
    b, h, hk, n, d = 3, 4, 2, 130, 16
    q, k, v = qkv(b, h, hk, n, d, seed=7)
    kp = padding_mask(b, n, left=(0, 17, 0), right=(0, 0, 40))
    kinds, p0, p1 = _patterns("mixed", h)
    out, index = _run(q, k, v, kinds, p0, p1, d ** -0.5, kp)
    ref = masked_dense(q, k, v, index, d ** -0.5, kp)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)
    assert torch.isfinite(out).all()
    assert (out[1, :, :17] == 0).all()  # left-padded queries see no key: zeros, like SDPA


def test_padding_never_picks_padded_sinks():
    """Under left padding the forced sink columns are the first real tokens."""
    q, k, v = qkv(1, 2, 1, 200, 16)
    kp = padding_mask(1, 200, left=(50,))
    _, index = _run(q, k, v, [2, 2], [30, 30], [100, 100], 0.25, kp)
    cols = index.columns[0, 0]
    assert cols[cols < 2**31 - 1].min() >= 50
    assert set(range(50, 80)) <= set(cols.tolist())


def test_dense_below_runs_dense_attention():
    q, k, v = qkv(1, 4, 2, 100, 16)
    out, index = _run(q, k, v, [2] * 4, [30] * 4, [100] * 4, 0.25, dense_below=101)
    torch.testing.assert_close(out, dense_causal(q, k, v, 0.25).to(out.dtype), atol=2e-5, rtol=2e-5)
    assert ops.runs_dense(100, 100, 101) and not ops.runs_dense(100, 100, 100)
    assert ops.runs_dense(10, 100, 0) and not ops.runs_dense(64, 100, 0)  # a short chunk after a cached prefix


def test_ops_pass_opcheck():
    """Fake implementations agree with the real ones (shapes, strides, dtypes) and are traceable."""
    q, k, v = qkv(1, 4, 2, 130, 16)
    args = (q, k, None, [0, 1, 2, 3], [0, 4, 40, 2], [0, 64, 120, 0], 0.25)
    torch.library.opcheck(torch.ops.mcompile.estimate_index.default, args,
                          test_utils=("test_schema", "test_faketensor"))
    index = ops.estimate_index(*args)
    torch.library.opcheck(torch.ops.mcompile.sparse_attention.default, (q, k, v, *index, None, 0.25),
                          test_utils=("test_schema", "test_faketensor"))
    kp = torch.ones(1, 130, dtype=torch.bool)
    torch.library.opcheck(torch.ops.mcompile.dense_attention.default, (q[:, :, -70:], k, v, kp, 0.25),
                          test_utils=("test_schema", "test_faketensor"))


def test_fake_shapes_are_symbolic():
    """Under dynamic shapes the fake index sizes are expressions of N, with no guard on N."""
    from torch.fx.experimental.proxy_tensor import make_fx

    def f(q, k, v):
        idx = torch.ops.mcompile.estimate_index(q, k, None, [2, 3], [30, 2], [100, 0], 0.25)
        return torch.ops.mcompile.sparse_attention(q, k, v, *idx, None, 0.25)

    q, k, v = qkv(1, 2, 1, 300, 16)
    gm = make_fx(f, tracing_mode="symbolic")(q, k, v)
    assert "mcompile.sparse_attention" in gm.code
    shape_env = next(n.meta["val"] for n in gm.graph.nodes if n.op == "placeholder").fake_mode.shape_env
    assert not shape_env.guards, [str(g.expr) for g in shape_env.guards]


def test_fake_shapes_are_symbolic_for_a_cached_prefix():
    """A chunk after a cached prefix (Nq < N, both symbolic): the index is sized by N alone, the
    output by Nq, and tracing adds no guard on either."""
    from torch.fx.experimental.proxy_tensor import make_fx

    def f(q, k, v):
        idx = torch.ops.mcompile.estimate_index(q, k, None, [2, 3], [30, 2], [100, 0], 0.25)
        return torch.ops.mcompile.sparse_attention(q, k, v, *idx, None, 0.25), idx[2]

    q, k, v = qkv(1, 2, 1, 300, 16)
    gm = make_fx(f, tracing_mode="symbolic")(q[:, :, 170:].contiguous(), k, v)
    vals = [n.meta["val"] for n in gm.graph.nodes if n.op == "placeholder"]
    shape_env = vals[0].fake_mode.shape_env
    assert not shape_env.guards, [str(g.expr) for g in shape_env.guards]
    out = next(n for n in gm.graph.nodes if n.op == "output").args[0]
    assert out[0].meta["val"].shape[2] == vals[0].shape[2]  # Nq
    assert out[1].meta["val"].shape[2] == vals[1].shape[2] + 1  # diag_prefix: N + 1


@pytest.mark.parametrize("bad,message", [
    (dict(kinds=[7, 2, 2, 2]), "is not a valid PatternKind"),
    (dict(p0=[1, 30, 30, 30]), "vertical must be >= 30"),
    (dict(kinds=[2, 2]), "one pattern per query head"),
])
def test_bad_patterns_are_clear_errors(bad, message):
    q, k, v = qkv(1, 4, 2, 64, 16)
    args = dict(kinds=[2] * 4, p0=[30] * 4, p1=[100] * 4)
    args.update(bad)
    with pytest.raises(ValueError, match=message):
        ops.estimate_index(q, k, None, args["kinds"], args["p0"], args["p1"], 0.25)


def test_bad_shapes_are_clear_errors():
    q, k, v = qkv(1, 4, 3, 64, 16)
    with pytest.raises(ValueError, match="multiple of key/value heads"):
        ops.estimate_index(q, k, None, [2] * 4, [30] * 4, [100] * 4, 0.25)
    q, k, v = qkv(1, 4, 2, 64, 16)
    with pytest.raises(ValueError, match=r"query length \(64\) exceeds key length \(10\)"):
        ops.estimate_index(q, k[:, :, :10], None, [2] * 4, [30] * 4, [100] * 4, 0.25)
    with pytest.raises(ValueError, match="disagree in batch or head dim"):
        ops.estimate_index(q, k[..., :8], None, [2] * 4, [30] * 4, [100] * 4, 0.25)


@settings(max_examples=40, deadline=None)
@given(b=st.integers(1, 2), hk=st.integers(1, 3), group=st.integers(1, 3), n=st.integers(1, 200),
       kind=st.sampled_from(list(PatternKind)), budget=st.integers(1, 400), seed=st.integers(0, 99))
def test_property_sparse_equals_masked_dense(b, hk, group, n, kind, budget, seed):
    h, d = hk * group, 8
    q, k, v = qkv(b, h, hk, n, d, seed=seed)
    p0 = {PatternKind.DENSE: 0, PatternKind.A_SHAPE: budget % 50, PatternKind.VERTICAL_SLASH: max(30, budget),
          PatternKind.BLOCK_SPARSE: max(2, budget // 64), PatternKind.BLOCK_MASS: min(1000, 2 * budget + 200)}[kind]
    p1 = {PatternKind.A_SHAPE: 1 + budget, PatternKind.VERTICAL_SLASH: max(100, budget),
          PatternKind.BLOCK_MASS: 1 << (budget % 7)}.get(kind, 0)
    out, index = _run(q, k, v, [int(kind)] * h, [p0] * h, [p1] * h, d ** -0.5)
    torch.testing.assert_close(out, masked_dense(q, k, v, index, d ** -0.5), atol=3e-5, rtol=3e-5)
    covers = {PatternKind.DENSE: True, PatternKind.A_SHAPE: p1 >= n,
              PatternKind.VERTICAL_SLASH: p0 >= n and p1 >= n, PatternKind.BLOCK_SPARSE: p0 >= (n + 63) // 64,
              PatternKind.BLOCK_MASS: p0 == 1000}[kind]
    if covers:  # the pattern keeps every causal key
        torch.testing.assert_close(out, dense_causal(q, k, v, d ** -0.5), atol=3e-5, rtol=3e-5)


def test_reference_matches_op():
    q, k, v = qkv(2, 4, 2, 100, 16)
    idx = estimate_index_ref(q, k, None, [2, 3, 1, 0], [30, 2, 4, 0], [100, 0, 64, 0], 0.25)
    out, _ = _run(q, k, v, [2, 3, 1, 0], [30, 2, 4, 0], [100, 0, 64, 0], 0.25)
    torch.testing.assert_close(out, sparse_attention_ref(q, k, v, idx, 0.25))


def test_too_dense_sends_near_dense_indices_to_dense_attention():
    """The run-time check (CUDA only) flags an index covering most causal pairs at long lengths
    and leaves sparse ones, short inputs and CPU alone."""
    n = ops.FRACTION_CHECK_MIN
    q, k = torch.randn(1, 2, n, 16), torch.randn(1, 1, n, 16)
    dense = SparseIndex(*ops.estimate_index(q, k, None, [0, 0], [0, 0], [0, 0], 0.25))
    sparse = SparseIndex(*ops.estimate_index(q, k, None, [1, 1], [16, 16], [256, 256], 0.25))
    assert ops.too_dense(dense, n, on_cuda=True) > ops.DENSE_ABOVE_FRACTION
    assert ops.too_dense(sparse, n, on_cuda=True) is None
    assert ops.too_dense(dense, n, on_cuda=False) is None
