"""Triton kernels under the interpreter (CPU): sparse attention and index estimation.

The sparse attention kernel is compared with ``sparse_attention_ref`` and with dense attention
over the mask ``index_to_mask`` materialises, over a shape table with odd lengths, GQA ratios,
batch > 1, key padding, and indexes both estimated (mixed dense / A-shape / vertical-slash /
block-sparse heads) and random (many runs, columns inside and outside run tiles, non-causal
key blocks). Tolerance (flash-attention's rule): the kernel's error against a float64 oracle
is at most twice that of PyTorch attention in the same dtype, plus a small absolute floor.

bf16 is not tested here: the interpreter multiplies bf16 tiles as raw uint16 bits
(tests/test_gpu.py checks bf16 on the GPU).
"""

import os

os.environ["TRITON_INTERPRET"] = "1"  # before Triton is imported: kernels run on the CPU

import pytest
import torch

triton = pytest.importorskip("triton", reason="Triton is not installed; the Triton kernels cannot be tested")

from mcompile.index import BLOCK, SENTINEL, SparseIndex, column_counts, index_to_mask, num_blocks, runs_to_diag_prefix  # noqa: E402
from mcompile.kernels import estimate_triton as est_triton  # noqa: E402
from mcompile.kernels import sparse_attention_triton as attn_triton  # noqa: E402
from mcompile.kernels.estimate import _forced_columns, diagonals_to_runs, estimate_index_ref, vertical_slash_scores  # noqa: E402
from mcompile.kernels.sparse_attention import sparse_attention_ref  # noqa: E402

if not isinstance(attn_triton._sparse_attention_kernel, triton.runtime.interpreter.InterpretedFunction):
    pytest.skip("mcompile's Triton kernels were compiled for a GPU before this module set TRITON_INTERPRET=1; "
                "run this file in its own process", allow_module_level=True)

FLOOR = {torch.float32: 1e-5, torch.float16: 1e-3}  # absolute error floor per dtype
# Per-head (kind, p0, p1): dense, A-shape (4 sink, 64 local), vertical-slash at its minimum
# budgets (30 verticals, 100 slashes), block-sparse (2 blocks): sparse at N <= 200.
PATTERNS = [(0, 0, 0), (1, 4, 64), (2, 30, 100), (3, 2, 0)]

# (B, H, Hk, N, D): odd lengths, GQA ratios 1 and 3, batch 1 and 2.
SHAPES = [
    (1, 4, 4, 1, 16),
    (1, 4, 4, 63, 32),
    (2, 4, 4, 64, 16),
    (1, 6, 2, 65, 16),
    (2, 6, 2, 97, 32),
    (2, 3, 1, 200, 16),
    (1, 4, 4, 200, 32),
]


def patterns(h):
    kinds, p0, p1 = zip(*(PATTERNS[i % len(PATTERNS)] for i in range(h)))
    return list(kinds), list(p0), list(p1)


def inputs(b, h, hk, n, d, seed, dv=None):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, n, d, generator=g)
    k = torch.randn(b, hk, n, d, generator=g)
    v = torch.randn(b, hk, n, dv or d, generator=g)
    return q, k, v


def padding(b, n, seed):
    """Random holes in every row; the last row also pads its first keys (its first queries see nothing)."""
    g = torch.Generator().manual_seed(seed)
    kp = torch.rand(b, n, generator=g) > 0.15
    kp[-1, :min(n, 5)] = False
    return kp


def oracle(q, k, v, mask, scale):
    """Dense float64 attention over a materialised (B, H, N, N) mask; rows with no key -> 0."""
    group = q.shape[1] // k.shape[1]
    kk = k.double().repeat_interleave(group, 1)
    vv = v.double().repeat_interleave(group, 1)
    s = (q.double() @ kk.transpose(-1, -2) * scale).masked_fill(~mask, float("-inf"))
    return torch.softmax(s, -1).nan_to_num(0.0) @ vv


def torch_same_dtype(q, k, v, mask, scale):
    """What PyTorch attention gets in q's dtype: low-precision matmuls, fp32 softmax."""
    group = q.shape[1] // k.shape[1]
    kk = k.repeat_interleave(group, 1)
    vv = v.repeat_interleave(group, 1)
    s = (q @ kk.transpose(-1, -2)).float() * scale
    p = torch.softmax(s.masked_fill(~mask, float("-inf")), -1).nan_to_num(0.0)
    return p.to(q.dtype) @ vv


def check(q, k, v, index, scale, key_padding=None, block_n=None, window=0):
    """Run the kernel; compare with the reference op and with dense masked attention. q may be
    a chunk after a cached prefix (Nq < N): its rows are the last Nq positions. ``window`` > 0:
    a sliding window on top of the index."""
    n = k.shape[2]
    out = attn_triton.sparse_attention_triton(q, k, v, index, scale, key_padding, block_n=block_n, window=window)
    assert out.shape == (*q.shape[:3], v.shape[-1]) and out.dtype == q.dtype and out.is_contiguous()
    mask = index_to_mask(index, n, key_padding, queries=q.shape[2])
    if window:
        pos, keys = torch.arange(n - q.shape[2], n)[:, None], torch.arange(n)[None, :]
        mask = mask & (keys > pos - window)
    exact = oracle(q, k, v, mask, scale)
    err = (out.double() - exact).abs().max().item()
    budget = 2 * (torch_same_dtype(q, k, v, mask, scale).double() - exact).abs().max().item() + FLOOR[q.dtype]
    assert err <= budget, f"kernel error {err:.3g} > budget {budget:.3g}"
    ref = sparse_attention_ref(q, k, v, index, scale, key_padding, window=window)
    ref_err = (ref.double() - exact).abs().max().item()
    assert err <= 2 * ref_err + FLOOR[q.dtype], f"kernel error {err:.3g} vs reference op {ref_err:.3g}"
    # Rows with no kept key are exactly zero, never NaN.
    empty = ~mask.any(-1)
    assert torch.isfinite(out).all()
    assert (out[empty] == 0).all()
    return out, mask


# ------------------------------------------------------------------------------------------------
# Sparse attention: estimated indexes
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("padded", [False, True], ids=["nopad", "pad"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}H{}Hk{}N{}D{}".format(*s))
def test_estimated_index(shape, padded, dtype):
    b, h, hk, n, d = shape
    q, k, v = inputs(b, h, hk, n, d, seed=n * 7 + h)
    kp = padding(b, n, seed=n) if padded else None
    scale = d ** -0.5
    index = estimate_index_ref(q, k, kp, *patterns(h), scale)
    _, mask = check(q.to(dtype), k.to(dtype), v.to(dtype), index, scale, kp)
    if n >= 2 * BLOCK:  # at the table's longer lengths A-shape and block-sparse heads really skip keys
        causal = torch.ones(n, n, dtype=torch.bool).tril().sum()
        sparse_heads = [i for i, kind in enumerate(patterns(h)[0]) if kind in (1, 3)]
        assert (mask[:, sparse_heads].sum((-1, -2)) < 0.8 * causal).all()


# ------------------------------------------------------------------------------------------------
# Sparse attention: random indexes (many runs, columns inside run tiles, non-causal blocks)
# ------------------------------------------------------------------------------------------------

def random_index(b, h, n, seed):
    """Per head, by h % 4: dense run; random diagonals (merged into runs) with random columns,
    some inside run tiles; block lists with the diagonal block and sometimes the one after it
    (masked to nothing by causality); a short local run plus random columns, or in odd batch
    rows random columns alone (no run covers the diagonal, so columns need the causal mask)."""
    g = torch.Generator().manual_seed(seed)
    nb = num_blocks(n)
    diags = torch.full((b, h, n), SENTINEL, dtype=torch.int32)
    columns = torch.full((b, h, n), SENTINEL, dtype=torch.int32)
    blocks = torch.full((b, h, nb + 1, nb), SENTINEL, dtype=torch.int32)  # + the spare row
    block_count = torch.zeros(b, h, nb + 1, dtype=torch.int32)

    def subset(count, size):
        return torch.randperm(count, generator=g)[:size].sort().values

    for bi in range(b):
        for hi in range(h):
            style = hi % 4
            if style == 0:
                chosen = torch.arange(n)
            elif style == 1:  # local diagonals 0-2, then groups of 1-6 diagonals >= BLOCK apart
                groups, start = [torch.arange(min(n, 3))], 2 + BLOCK + int(torch.randint(1, 8, (1,), generator=g))
                while start < n:
                    width = int(torch.randint(1, 7, (1,), generator=g))
                    groups.append(torch.arange(start, min(n, start + width)))
                    start += width + BLOCK + int(torch.randint(0, 20, (1,), generator=g))
                chosen = torch.cat(groups)
            elif style == 3 and bi % 2 == 0:
                chosen = torch.arange(min(n, int(torch.randint(1, 64, (1,), generator=g))))
            else:
                chosen = torch.empty(0, dtype=torch.long)
            diags[bi, hi, :len(chosen)] = chosen.int()
            if style in (1, 3):
                cols = subset(n, max(1, n // 2 if len(chosen) == 0 else n // 5))
                columns[bi, hi, :len(cols)] = cols.int()
            if style == 2:
                for m in range(nb):
                    picks = torch.cat([subset(m + 1, 1 + m // 2), torch.tensor([m])])
                    if m + 1 < nb and (m + bi) % 2:
                        picks = torch.cat([picks, torch.tensor([m + 1])])
                    picks = picks.unique()
                    blocks[bi, hi, m, :len(picks)] = picks.int()
                    block_count[bi, hi, m] = len(picks)
    runs, run_count = diagonals_to_runs(diags)
    return SparseIndex(runs, run_count, runs_to_diag_prefix(runs, run_count, n), columns,
                       column_counts(columns, n), blocks, block_count)


@pytest.mark.parametrize("block_n", [64, 128])
@pytest.mark.parametrize("shape", [(2, 4, 4, 63, 16), (2, 4, 2, 130, 16), (1, 8, 8, 200, 32)],
                         ids=lambda s: "B{}H{}Hk{}N{}D{}".format(*s))
def test_random_index(shape, block_n):
    b, h, hk, n, d = shape
    q, k, v = inputs(b, h, hk, n, d, seed=n + block_n)
    index = random_index(b, h, n, seed=n)
    assert (index.column_count > 0).any()
    if n > 2 * BLOCK:  # room for runs BLOCK diagonals apart
        assert (index.run_count > 1).any()
    check(q, k, v, index, d ** -0.5, padding(b, n, seed=n + 1), block_n=block_n)
    check(q.half(), k.half(), v.half(), index, d ** -0.5, None, block_n=block_n)


@pytest.mark.parametrize("block_n", [64, 128])
@pytest.mark.parametrize("window", [1, 37, 64, 150])
def test_sliding_window(window, block_n):
    """The window's band (A-shape, no sink) masked to the window in every tile, whole prompts and
    a chunk after a prefix, with padding; and a window over a random index (columns and key
    blocks masked to it too)."""
    b, h, hk, n, d = 2, 4, 2, 230, 16
    q, k, v = inputs(b, h, hk, n, d, seed=window)
    band = estimate_index_ref(q, k, None, [1] * h, [0] * h, [window] * h, d ** -0.5)
    check(q, k, v, band, d ** -0.5, padding(b, n, seed=window), block_n=block_n, window=window)
    check(q[:, :, 100:], k, v, band, d ** -0.5, None, block_n=block_n, window=window)
    check(q, k, v, random_index(b, h, n, seed=window), d ** -0.5, None, block_n=block_n, window=window)


def test_columns_inside_run_tiles_are_not_counted_twice():
    """A column that a run tile already computes must be skipped: with every column of
    [0, N) listed and a dense run, the result is plain causal attention."""
    b, h, n, d = 1, 2, 150, 16
    q, k, v = inputs(b, h, h, n, d, seed=3)
    runs = torch.full((b, h, 1, 2), SENTINEL, dtype=torch.int32)
    runs[..., 0, :] = torch.tensor([0, n - 1], dtype=torch.int32)
    run_count = torch.ones(b, h, dtype=torch.int32)
    columns = torch.arange(n, dtype=torch.int32).expand(b, h, n).contiguous()
    nb = num_blocks(n)
    index = SparseIndex(runs, run_count, runs_to_diag_prefix(runs, run_count, n), columns,
                        column_counts(columns, n), torch.zeros(b, h, nb + 1, 0, dtype=torch.int32),
                        torch.zeros(b, h, nb + 1, dtype=torch.int32))
    out, mask = check(q, k, v, index, d ** -0.5)
    assert torch.equal(mask[0, 0], torch.ones(n, n, dtype=torch.bool).tril())
    causal = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(out, causal, atol=1e-5, rtol=1e-5)


def index_from(diags, columns, b, h, n):
    """An index of runs (merged from per-head diagonal lists) and columns, no key blocks:
    ``diags[hi]`` / ``columns[hi]`` are lists of ints for head ``hi``, the same for every batch row."""
    d = torch.full((b, h, n), SENTINEL, dtype=torch.int32)
    c = torch.full((b, h, max(1, max(len(x) for x in columns))), SENTINEL, dtype=torch.int32)
    for hi in range(h):
        d[:, hi, :len(diags[hi])] = torch.tensor(diags[hi], dtype=torch.int32)
        c[:, hi, :len(columns[hi])] = torch.tensor(sorted(columns[hi]), dtype=torch.int32)
    runs, run_count = diagonals_to_runs(d)
    nb = num_blocks(n)
    return SparseIndex(runs, run_count, runs_to_diag_prefix(runs, run_count, n), c, column_counts(c, n),
                       torch.zeros(b, h, nb + 1, 0, dtype=torch.int32), torch.zeros(b, h, nb + 1, dtype=torch.int32))


@pytest.mark.parametrize("block_n", [64, 128])
@pytest.mark.parametrize("nq", [None, 77], ids=["whole", "prefix"])
def test_columns_left_of_every_run_tile(block_n, nq):
    """Column chunks left of every run tile of a block run without coverage test or mask; the
    rest keep both. Sinks over several chunks (ending inside one, at a chunk's end, or making up
    the whole list), lists without column 0 or with a gap, a local run that covers part of the
    sink in the first blocks, a far run (diagonals 100-109), no run at all, and every key; with
    padding and a cached prefix."""
    b, h, hk, n, d = 2, 6, 3, 230, 16
    g = torch.Generator().manual_seed(block_n)
    q, k, v = inputs(b, h, hk, n, d, seed=block_n + (nq or 0))
    local = list(range(40))
    extra = sorted(torch.randperm(n - 160, generator=g)[:25].add(160).tolist())
    columns = [list(range(150)) + extra,             # a sink over chunks, then scattered columns
               list(range(128)) + extra,             # a sink that ends at a chunk boundary
               list(range(70)),                      # the whole list, no run: nothing covered
               list(range(1, 90)) + extra,           # no column 0
               [i for i in range(100) if i != 37],   # a gap in the first chunk, a far run
               list(range(n))]                       # every key
    diags = [local, local, [], local, local + list(range(100, 110)), local]
    index = index_from(diags, columns, b, h, n)
    q_in = q if nq is None else q[:, :, n - nq:]
    out, mask = check(q_in, k, v, index, d ** -0.5, padding(b, n, seed=2), block_n=block_n)
    check(q_in.half(), k.half(), v.half(), index, d ** -0.5, None, block_n=block_n)
    causal = torch.ones(n, n, dtype=torch.bool).tril()[n - q_in.shape[2]:]
    assert mask[:, 5].equal(causal & padding(b, n, seed=2)[:, None, :])  # every key: plain causal


@pytest.mark.parametrize("block_n", [64, 128])
@pytest.mark.parametrize("nq", [None, 301], ids=["whole", "prefix"])
def test_many_short_runs_in_one_loop(block_n, nq):
    """Past FLAT_RUNS runs a block walks all its run tiles in one loop, masking only the tiles
    that cross a run's end or the diagonal: short runs of 1-6 diagonals, a run that reaches
    only the last blocks, exactly FLAT_RUNS runs (per-run loops) against one more, and columns
    inside and outside run tiles; with padding and a cached prefix, fp32 and fp16."""
    b, h, hk, n, d = 1, 4, 2, 800, 16
    q, k, v = inputs(b, h, hk, n, d, seed=block_n + (nq or 0))

    def runs(starts, widths):
        return [s + i for s, w in zip(starts, widths) for i in range(w)]

    flat = int(attn_triton.FLAT_RUNS)
    spaced = [70 * i for i in range(11)]
    diags = [runs(spaced, [6, 1, 3, 6, 2, 5, 1, 6, 4, 1, 6]),       # 11 short runs
             runs(spaced[:flat], [5] * flat),                      # FLAT_RUNS runs: per-run loops
             runs(spaced[:flat] + [790], [5] * flat + [10]),       # one more, reaching the last blocks only
             runs([65 * i for i in range(12)], [1] * 12)]          # 12 single diagonals
    g = torch.Generator().manual_seed(3)
    columns = [list(range(4)) + sorted(torch.randperm(n - 4, generator=g)[:40].add(4).tolist()),
               [0, 1, 2], [], list(range(0, n, 7))]
    index = index_from(diags, columns, b, h, n)
    counts = index.run_count[0].tolist()
    assert counts[0] > flat and counts[1] == flat and counts[2] == flat + 1 and counts[3] > flat, counts
    q_in = q if nq is None else q[:, :, n - nq:]
    check(q_in, k, v, index, d ** -0.5, padding(b, n, seed=6), block_n=block_n)
    check(q_in.half(), k.half(), v.half(), index, d ** -0.5, None, block_n=block_n)


# ------------------------------------------------------------------------------------------------
# Sparse attention: layouts, padding forms, value head dim
# ------------------------------------------------------------------------------------------------

def test_strided_inputs_and_int_padding():
    """q/k/v as (B, N, H, D) storage seen through transpose, padding as a strided int8 tensor,
    a value head dim different from the query's."""
    b, h, hk, n, d, dv = 2, 6, 3, 97, 32, 16
    g = torch.Generator().manual_seed(11)
    q = torch.randn(b, n, h, d, generator=g).transpose(1, 2)
    k = torch.randn(b, n, hk, d, generator=g).transpose(1, 2)
    v = torch.randn(b, n, hk, dv, generator=g).transpose(1, 2)
    kp_bool = padding(b, n, seed=4)
    kp = kp_bool.to(torch.int8).t().contiguous().t()  # (B, N) with strides (1, B)
    index = estimate_index_ref(q, k, kp_bool, *patterns(h), d ** -0.5)
    out, _ = check(q, k, v, index, d ** -0.5, kp_bool)
    out_int = attn_triton.sparse_attention_triton(q, k, v, index, d ** -0.5, kp)
    assert torch.equal(out, out_int)


def test_fully_padded_batch_row_is_zero():
    b, h, n, d = 2, 2, 70, 16
    q, k, v = inputs(b, h, h, n, d, seed=5)
    kp = torch.ones(b, n, dtype=torch.bool)
    kp[1] = False
    index = estimate_index_ref(q, k, kp, *patterns(h), d ** -0.5)
    out, _ = check(q, k, v, index, d ** -0.5, kp)
    assert (out[1] == 0).all() and (out[0].abs().sum(-1) > 0).all()


# ------------------------------------------------------------------------------------------------
# Capability, contract, autotune pruning
# ------------------------------------------------------------------------------------------------

def test_capability_reasons():
    assert attn_triton.capability(torch.zeros(1, 2, 8, 64)) is None  # CPU runs under the interpreter
    assert attn_triton.capability(torch.zeros(1, 2, 8, 96)) is None  # padded to 128
    assert attn_triton.capability(torch.zeros(1, 2, 8, 256, dtype=torch.float16)) is None
    assert attn_triton.capability(torch.zeros(1, 2, 8, 200, dtype=torch.float16)) is None  # padded to 256
    assert "fp32" in attn_triton.capability(torch.zeros(1, 2, 8, 256))
    assert "head dim 512" in attn_triton.capability(torch.zeros(1, 2, 8, 512, dtype=torch.float16))
    assert "dtype" in attn_triton.capability(torch.zeros(1, 2, 8, 64, dtype=torch.float64))
    assert "dims" in attn_triton.capability(torch.zeros(2, 8, 64))


def test_contract_errors():
    b, h, n, d = 1, 4, 70, 16
    q, k, v = inputs(b, h, 2, n, d, seed=0)
    index = estimate_index_ref(q, k, None, *patterns(h), d ** -0.5)
    run = attn_triton.sparse_attention_triton
    with pytest.raises(ValueError, match="head dim 512"):
        run(torch.zeros(b, h, n, 512), k, v, index, 1.0)
    with pytest.raises(ValueError, match=r"k must be \(B=1, Hk, N, D=48\)"):
        run(torch.zeros(b, h, n, 48), k, v, index, 1.0)
    with pytest.raises(ValueError, match="query length 71 exceeds key length 70"):
        run(torch.zeros(b, h, n + 1, d), k, v, index, 1.0)
    with pytest.raises(ValueError, match="multiple of key/value heads"):
        run(q, *inputs(b, h, 3, n, d, seed=0)[1:], index, 1.0)
    with pytest.raises(ValueError, match="share dtype"):
        run(q, k.half(), v, index, 1.0)
    with pytest.raises(ValueError, match=r"index.columns must be int32"):
        run(q, k, v, index._replace(columns=index.columns.long()), 1.0)
    with pytest.raises(ValueError, match=r"index.diag_prefix must have shape"):
        run(q, k, v, index._replace(diag_prefix=index.diag_prefix[..., :-1]), 1.0)
    with pytest.raises(ValueError, match="key_padding must be"):
        run(q, k, v, index, 1.0, torch.ones(b, n + 1, dtype=torch.bool))
    with pytest.raises(ValueError, match="scale must be a positive"):
        run(q, k, v, index, 0.0)
    with pytest.raises(ValueError, match="block_n"):
        run(q, k, v, index, 1.0, block_n=32)


def test_autotune_pruning():
    configs = attn_triton._configs()
    for d in attn_triton.HEAD_DIMS[:-1]:
        kept = attn_triton._prune_configs(configs, {"HEAD_DIM": d, "HEAD_DV": d})
        assert kept and all(not (c.kwargs["BLOCK_N"] == 64 and c.num_warps == 8) for c in kept)
        assert {c.kwargs["BLOCK_N"] for c in kept} == {64, 128}
    wide = attn_triton._prune_configs(configs, {"HEAD_DIM": 256, "HEAD_DV": 256})
    assert {(c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) for c in wide} == {(64, 8, 2)}
    big = attn_triton._prune_configs(configs, {"HEAD_DIM": 128, "HEAD_DV": 128})
    assert not any(c.kwargs["BLOCK_N"] == 128 and c.num_stages == 3 for c in big)
    small = attn_triton._prune_configs(configs, {"HEAD_DIM": 64, "HEAD_DV": 64})
    assert any(c.kwargs["BLOCK_N"] == 128 and c.num_stages == 3 for c in small)


def test_fixed_config_fits_shared_memory():
    """The untuned launch (inlined, pinned block_n) takes 3 stages where K/V fit SMEM_BUDGET."""
    fixed = attn_triton.fixed_config
    assert fixed(128, 128, torch.bfloat16) == {"BLOCK_N": 64, "num_warps": 4, "num_stages": 3}
    assert fixed(128, 128, torch.float32)["num_stages"] == 2  # fp32 tiles: 3 stages would overflow
    assert fixed(64, 64, torch.float32)["num_stages"] == 3
    assert fixed(256, 256, torch.bfloat16) == {"BLOCK_N": 64, "num_warps": 8, "num_stages": 2}
    for d in attn_triton.HEAD_DIMS:
        for dtype in attn_triton.DTYPES if d <= 128 else (torch.float16, torch.bfloat16):
            for bn in (64, 128) if d <= 128 else (64,):
                c = fixed(d, d, dtype, bn)
                elem = 4 if dtype == torch.float32 else 2
                assert c["BLOCK_N"] == bn and c["num_stages"] * bn * 2 * d * elem <= attn_triton.SMEM_BUDGET


# ------------------------------------------------------------------------------------------------
# Estimation
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("padded", [False, True], ids=["nopad", "pad"])
@pytest.mark.parametrize("shape", [(1, 4, 4, 1, 16), (2, 6, 2, 97, 16), (1, 3, 1, 200, 32), (2, 4, 4, 65, 16)],
                         ids=lambda s: "B{}H{}Hk{}N{}D{}".format(*s))
def test_vertical_slash_scores(shape, padded):
    b, h, hk, n, d = shape
    q, k, _ = inputs(b, h, hk, n, d, seed=n)
    kp = padding(b, n, seed=n) if padded else None
    heads = torch.arange(h - 1, -1, -1, dtype=torch.int32)  # any head order
    vertical, slash = est_triton.vertical_slash_scores_triton(q, k, kp, d ** -0.5, heads)
    ref_v, ref_s = vertical_slash_scores(q, k, kp, d ** -0.5, torch.arange(h))
    torch.testing.assert_close(vertical, ref_v[:, heads.long()], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(slash, ref_s[:, heads.long()], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("programs", [1, 4])
def test_vertical_slash_scores_many_tiles_per_program(monkeypatch, programs):
    """Programs walking several tiles each (one for all of a head's tiles, or a few, whose
    diagonal tiles straddle the programs' boundaries) must give the same scores."""
    monkeypatch.setattr(est_triton, "TARGET_PROGRAMS", programs)
    b, h, n, d = 1, 2, 300, 16
    q, k, _ = inputs(b, h, 1, n, d, seed=1)
    kp = padding(b, n, seed=2)
    vertical, slash = est_triton.vertical_slash_scores_triton(q, k, kp, d ** -0.5, torch.arange(h, dtype=torch.int32))
    ref_v, ref_s = vertical_slash_scores(q, k, kp, d ** -0.5, torch.arange(h))
    torch.testing.assert_close(vertical, ref_v, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(slash, ref_s, atol=1e-5, rtol=1e-5)


def _topk_margin(scores, budget):
    """Gap between the budget-th and the next largest score (inf where nothing is left out)."""
    top = scores.sort(-1, descending=True).values
    if budget >= scores.shape[-1]:
        return torch.full(scores.shape[:-1], float("inf"))
    gap = top[..., budget - 1] - top[..., budget]
    return torch.where(torch.isinf(top[..., budget - 1]) & torch.isinf(top[..., budget]), 0.0, gap)


@pytest.mark.parametrize("dense", [False, True])
@pytest.mark.parametrize("padded", [False, True], ids=["nopad", "pad"])
def test_estimate_index_matches_ref(padded, dense):
    """Same index as the reference. Top-k picks may legitimately differ where two scores tie
    within fp32 rounding, so the data are first checked to have a clear gap at every budget."""
    b, h, hk, n, d = 2, 8, 4, 200, 16
    q, k, _ = inputs(b, h, hk, n, d, seed=9)
    kp = padding(b, n, seed=3) if padded else None
    kinds, p0, p1 = patterns(h)
    p0[6], p1[6] = 45, 130  # a vertical-slash head with picks beyond the forced ones
    if dense:  # every head dense: one run over all diagonals
        kinds = [0] * h
    else:
        ref_v, ref_s = vertical_slash_scores(q, k, kp, d ** -0.5, torch.arange(h))
        forced, allowed = _forced_columns(kp, n, q.device)  # forced and padded keys, as the estimator does
        if allowed is not None:
            ref_v.masked_fill_(~allowed, float("-inf"))
        ref_v.masked_fill_(forced, float("inf"))
        ref_s[..., :100] = float("inf")
        for i in (2, 6):
            assert (_topk_margin(ref_v[:, i], p0[i]) > 1e-4).all(), "near-tie in the test data: change the seed"
            assert (_topk_margin(ref_s[:, i], p1[i]) > 1e-4).all(), "near-tie in the test data: change the seed"
    got = est_triton.estimate_index_triton(q, k, kp, kinds, p0, p1, d ** -0.5)
    ref = estimate_index_ref(q, k, kp, kinds, p0, p1, d ** -0.5)
    for name in SparseIndex._fields:
        a, r = getattr(got, name), getattr(ref, name)
        assert a.shape == r.shape and a.dtype == r.dtype and torch.equal(a, r), name


def test_estimated_index_drives_the_kernel():
    """The estimate kernel's index and the reference's give the same attention output."""
    b, h, hk, n, d = 1, 4, 2, 160, 32
    q, k, v = inputs(b, h, hk, n, d, seed=21)
    kinds, p0, p1 = [2, 2, 3, 1], [40, 30, 3, 4], [110, 100, 0, 64]
    index = est_triton.estimate_index_triton(q, k, None, kinds, p0, p1, d ** -0.5)
    check(q, k, v, index, d ** -0.5)


# ------------------------------------------------------------------------------------------------
# Cached prefix (Nq < N), padded head dims, NaN
# ------------------------------------------------------------------------------------------------

# (B, H, Hk, N, Nq, D): chunks at block-aligned and unaligned offsets, one query, 63 queries.
PREFIX_SHAPES = [
    (2, 4, 2, 200, 130, 16),
    (1, 4, 4, 130, 1, 16),
    (1, 6, 2, 161, 63, 32),
    (2, 4, 4, 192, 64, 16),
]


@pytest.mark.parametrize("padded", [False, True], ids=["nopad", "pad"])
@pytest.mark.parametrize("shape", PREFIX_SHAPES, ids=lambda s: "B{}H{}Hk{}N{}Nq{}D{}".format(*s))
def test_cached_prefix(shape, padded):
    """Queries at positions P..N-1 (P = N - Nq): the kernel against the reference and against
    dense attention with the offset mask; the estimate kernel against the reference scores."""
    b, h, hk, n, nq, d = shape
    q, k, v = inputs(b, h, hk, n, d, seed=n + nq)
    q = q[:, :, n - nq:]
    kp = padding(b, n, seed=nq) if padded else None
    scale = d ** -0.5
    index = estimate_index_ref(q, k, kp, *patterns(h), scale)
    check(q, k, v, index, scale, kp)
    check(q.half(), k.half(), v.half(), index, scale, kp)
    heads = torch.arange(h, dtype=torch.int32)
    vertical, slash = est_triton.vertical_slash_scores_triton(q, k, kp, scale, heads)
    ref_v, ref_s = vertical_slash_scores(q, k, kp, scale, heads)
    torch.testing.assert_close(vertical, ref_v, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(slash, ref_s, atol=1e-5, rtol=1e-5)


def test_cached_prefix_random_index():
    """Random indexes (many runs, columns inside run tiles, future key blocks) at an offset."""
    b, h, n, nq, d = 2, 4, 200, 101, 16
    q, k, v = inputs(b, h, 2, n, d, seed=31)
    index = random_index(b, h, n, seed=5)
    check(q[:, :, n - nq:], k, v, index, d ** -0.5, padding(b, n, seed=6), block_n=128)


@pytest.mark.parametrize("d", [200, 256])
def test_head_dim_256(d):
    """Head dim 256 (Gemma 2 and 3), and 200 zero-padded to it, fp16: the estimation runs the
    PyTorch reference there (its kernels stop at 128), the attention kernel runs."""
    b, h, hk, n = 1, 2, 1, 150
    q, k, v = (t.half() for t in inputs(b, h, hk, n, d, seed=d))
    index = estimate_index_ref(q.float(), k.float(), None, [2, 1], [30, 4], [100, 64], d ** -0.5)
    check(q, k, v, index, d ** -0.5, padding(b, n, seed=d))
    check(q[:, :, 70:], k, v, index, d ** -0.5, None, window=40)


@pytest.mark.parametrize("d", [48, 80, 96])
def test_padded_head_dims(d):
    """Head dims the kernel is not built for run zero-padded to the next one (80, 96 -> 128)."""
    b, h, hk, n = 1, 2, 1, 97
    q, k, v = inputs(b, h, hk, n, d, seed=d)
    scale = d ** -0.5
    assert attn_triton.padded_head_dim(d) == (64 if d == 48 else 128)
    index = est_triton.estimate_index_triton(q, k, None, [2, 1], [30, 4], [100, 64], scale)
    ref_index = estimate_index_ref(q, k, None, [2, 1], [30, 4], [100, 64], scale)
    assert torch.equal(index.runs, ref_index.runs) and torch.equal(index.columns, ref_index.columns)
    out, _ = check(q, k, v, index, scale)
    assert out.shape[-1] == d
    check(q[:, :, 40:], k, v, index, scale)  # padded and offset together


@pytest.mark.parametrize("where", ["q", "k"])
def test_nan_rows(where):
    """A NaN in query row i gives NaN in output row i only; a NaN key j gives NaN in the rows
    that keep it; the kernel returns (its loops run over index counts, never over data)."""
    b, h, n, d = 1, 2, 130, 16
    q, k, v = inputs(b, h, h, n, d, seed=3)
    if where == "q":
        q[0, 1, 100, 0] = float("nan")
    else:
        k[0, 0, 20, 0] = float("nan")
    index = estimate_index_ref(q, k, None, [2, 0], [30, 0], [100, 0], d ** -0.5)
    out = attn_triton.sparse_attention_triton(q, k, v, index, d ** -0.5)
    nan = torch.isnan(out).any(-1)[0]  # (H, N)
    mask = index_to_mask(index, n)[0]
    if where == "q":
        assert nan[1, 100] and nan.sum() == 1
    else:
        assert (nan[0] >= mask[0, :, 20]).all() and mask[0, :, 20].any() and not nan[1].any()


@pytest.mark.parametrize("nq", [200, 70], ids=["whole", "prefix"])
def test_block_mass_index_drives_the_kernel(nq):
    """A block-mass index (per-row key tiles chosen by estimated mass, one diffuse head dense)
    through the Triton kernel, against the reference and dense masked attention."""
    from mcompile.patterns import Pattern, encode

    b, h, hk, n, d = 2, 4, 2, 200, 16
    q, k, v = inputs(b, h, hk, n, d, seed=11)
    q = q[:, :, n - nq:].contiguous()
    pats = [Pattern.from_dict({"kind": "block_mass", "recall": r, "samples": 4}) for r in (0.5, 0.7, 0.9, 1.0)]
    index = estimate_index_ref(q, k, None, *encode(pats), d ** -0.5, capacity=(1, 0, 3))
    assert (index.block_count > 0).any() and (index.run_count > 0).any()  # tiles, and a head run dense
    check(q, k, v, index, d ** -0.5)


@pytest.mark.parametrize("samples,split,chunked,rows", [(1, 32, False, 64), (4, 1, True, 128), (8, 2, False, 64),
                                                       (32, 3, True, 64), (64, 2, False, 128)])
@pytest.mark.parametrize("b,h,hk,n,nq,d,pad", [(1, 2, 2, 200, 200, 16, False), (2, 4, 2, 161, 100, 32, True),
                                               (1, 3, 1, 330, 330, 8, False)])
def test_tile_mass_kernel_equals_reference(b, h, hk, n, nq, d, pad, samples, split, chunked, rows, monkeypatch):
    """The fused block-mass estimate equals block_mass.tile_mass: odd lengths, a chunk after a
    cached prefix, GQA, batch > 1, padding, a head dim padded to 16, the keys of a row group
    split over programs (1, 2 and 3 tiles each) or not, the row groups in chunks of one (the
    bound on the kept tile sums) or all at once, 64 or 128 sampled rows per program, row groups
    after the first (their leading tiles need no mask)."""
    from mcompile.kernels import block_mass_triton
    from mcompile.kernels.block_mass import tile_mass
    from mcompile.kernels.block_mass_triton import tile_mass_triton

    if chunked:
        monkeypatch.setattr(block_mass_triton, "TILE_SUM_BYTES", 1)

    q, k, _ = inputs(b, h, hk, n, d, seed=n + samples)
    q = q[:, :, n - nq:]
    kp = padding(b, n, seed=n) if pad else None
    heads = torch.tensor([h - 1, 0])
    est = tile_mass_triton(q, k, kp, d ** -0.5, heads, samples, split, rows=rows)
    ref = tile_mass(q, k, kp, d ** -0.5, heads, samples)
    torch.testing.assert_close(est, ref, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("b,h,hk,n,nq,d,pad,samples,split,chunked,rows", [
    (1, 2, 2, 200, 200, 16, False, 8, 32, False, 64), (2, 4, 2, 161, 100, 32, True, 4, 1, True, 128),
    (1, 3, 1, 330, 330, 8, False, 32, 3, False, 64)])
def test_tile_max_kernel_equals_reference(b, h, hk, n, nq, d, pad, samples, split, chunked, rows, monkeypatch):
    """The "max" tile score of the fused estimate equals block_mass.tile_mass's: masked and
    unmasked tiles (the unmasked ones take the scale per row), padding, a prefix chunk, GQA,
    batch > 1, splits and chunks."""
    from mcompile.kernels import block_mass_triton
    from mcompile.kernels.block_mass import tile_mass
    from mcompile.kernels.block_mass_triton import tile_mass_triton

    if chunked:
        monkeypatch.setattr(block_mass_triton, "TILE_SUM_BYTES", 1)
    q, k, _ = inputs(b, h, hk, n, d, seed=n + samples + 1)
    q = q[:, :, n - nq:]
    kp = padding(b, n, seed=n) if pad else None
    heads = torch.tensor([h - 1, 0])
    est = tile_mass_triton(q, k, kp, d ** -0.5, heads, samples, split, score="max", rows=rows)
    ref = tile_mass(q, k, kp, d ** -0.5, heads, samples, score="max")
    torch.testing.assert_close(est, ref, atol=2e-5, rtol=1e-4)
    assert not torch.allclose(ref, tile_mass(q, k, kp, d ** -0.5, heads, samples))  # a score of its own


def test_estimate_index_triton_mixes_tile_scores_like_the_reference():
    """A layer whose block-mass heads use both scores: each head's index as the reference builds it."""
    from mcompile.patterns import Pattern, encode

    b, h, hk, n, d = 2, 4, 2, 230, 16
    q, k, _ = inputs(b, h, hk, n, d, seed=6)
    pats = [Pattern.from_dict({"kind": "block_mass", "recall": r, "samples": 4, "score": sc})
            for r, sc in ((0.6, "max"), (0.8, "mass"), (0.9, "max"), (0.7, "mass"))]
    ref = estimate_index_ref(q, k, None, *encode(pats), d ** -0.5)
    tri = est_triton.estimate_index_triton(q, k, None, *encode(pats), d ** -0.5)
    for name in ("run_count", "block_count", "blocks"):
        assert torch.equal(getattr(ref, name), getattr(tri, name)), name
    alone = estimate_index_ref(q, k, None, *encode([pats[0]] * h), d ** -0.5)
    assert torch.equal(ref.blocks[:, 0], alone.blocks[:, 0])  # a head's index does not depend on its neighbours'


def _estimates(b, hm, m0, nb, seed):
    """Tile estimates as the estimate makes them (rows summing to 1 over causal tiles) with
    zeros, ties and a dominant tile."""
    g = torch.Generator().manual_seed(seed)
    e = torch.rand(b, hm, nb - m0, nb, generator=g) ** 6
    e[e < 0.02] = 0.0
    e[..., 1::5] = e[..., 1:2]  # ties
    causal = torch.arange(nb)[None, :] <= torch.arange(m0, nb)[:, None]
    e = e.masked_fill(~causal, 0.0)
    return e / e.sum(-1, keepdim=True).clamp(min=1e-30)


@pytest.mark.parametrize("b,hm,m0,nb,cap,arity", [(1, 4, 9, 21, 21, 2), (1, 4, 5, 23, 6, 2), (1, 4, 0, 1, 1, 2),
                                                 (2, 4, 15, 20, 0, 2), (1, 4, 9, 21, 21, 16), (1, 4, 5, 23, 6, 16),
                                                 (1, 4, 0, 1, 1, 16), (2, 4, 15, 20, 0, 64), (1, 2, 150, 160, 160, 64)])
def test_select_kernel_equals_reference(b, hm, m0, nb, cap, arity):
    """The threshold search (bisection, or ``arity - 1`` thresholds a pass) keeps what
    block_mass.select_tiles keeps: forced tiles, ties at the threshold, zero estimates, recall 0
    and 1, a capacity below the need (dense heads), rows longer than the kernel's chunk of
    estimates and (160 tiles, arity 64: 64 a step) than the search's step."""
    from mcompile.kernels.block_mass import select_tiles
    from mcompile.kernels.block_mass_triton import select_tiles_triton

    est = _estimates(b, hm, m0, nb, seed=nb + cap)
    recall = torch.tensor([0.0, 0.5, 0.95, 1.0])[-hm:]
    got = select_tiles_triton(est, recall, m0, cap, chunk=8, arity=arity)  # rows of up to three chunks
    want = select_tiles(est, recall, m0, cap)
    for name, x, y in zip(("tiles", "counts", "dense"), got, want):
        assert torch.equal(x, y), name


@pytest.mark.parametrize("b,hm,m0,nb", [(1, 4, 9, 21), (1, 4, 0, 19), (1, 4, 5, 6), (1, 4, 0, 1), (2, 4, 7, 8)])
def test_share_kernel_equals_reference(b, hm, m0, nb):
    """block-mass's neighbours on the GPU: each shared head's rows equal share_neighbours' (first
    and last rows with one neighbour, a single row with none, rows longer than the chunk, a
    zero row), the other heads' rows copied; the selection from them equals the reference's."""
    from mcompile.kernels.block_mass import select_tiles, share_neighbours
    from mcompile.kernels.block_mass_triton import select_tiles_triton, share_neighbours_triton

    est = _estimates(b, hm, m0, nb, seed=nb)
    est[:, 0, 0] = 0.0  # a row whose sampled rows saw no key
    shared = torch.tensor([True, False, True, True])
    got = share_neighbours_triton(est, m0, shared, chunk=8)
    want = torch.where(shared.view(1, -1, 1, 1), share_neighbours(est, m0), est)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
    recall = torch.tensor([0.5, 0.9, 0.95, 1.0])
    got = select_tiles_triton(est, recall, m0, nb, chunk=8, shared=shared)
    want = select_tiles(est, recall, m0, nb, shared=shared)
    for name, x, y in zip(("tiles", "counts", "dense"), got, want):
        assert torch.equal(x, y), name


def test_estimate_index_triton_with_neighbours_equals_the_reference():
    """A layer of block-mass heads with and without neighbours, GQA, batch 2: the same index."""
    from mcompile.patterns import Pattern, encode

    b, h, hk, n, d = 2, 4, 2, 300, 16
    q, k, _ = inputs(b, h, hk, n, d, seed=6)
    pats = [Pattern.from_dict({"kind": "block_mass", "recall": r, "samples": 4, "score": "max", "neighbours": nb})
            for r, nb in ((0.8, 1), (0.9, 0), (0.95, 1), (0.99, 1))]
    ref = estimate_index_ref(q, k, None, *encode(pats), d ** -0.5)
    tri = est_triton.estimate_index_triton(q, k, None, *encode(pats), d ** -0.5)
    for name in ("run_count", "block_count", "blocks"):
        assert torch.equal(getattr(ref, name), getattr(tri, name)), name


@pytest.mark.parametrize("nq,capacity", [(230, None), (100, (1, 0, 3)), (230, (1, 0, 3))])
def test_estimate_index_triton_builds_the_block_mass_index_of_the_reference(nq, capacity):
    """Every table of the index equals the reference's: the selection written into the index and
    the finishing kernel (diffuse heads dense when the capacity is small, their run and
    diagonal prefix), a chunk after a cached prefix, a repeated call (the cached head tables)."""
    from mcompile.patterns import Pattern, encode

    b, h, hk, n, d = 2, 4, 2, 230, 16
    q, k, _ = inputs(b, h, hk, n, d, seed=5)
    q = q[:, :, n - nq:].contiguous()
    pats = [Pattern.from_dict({"kind": "block_mass", "recall": r, "samples": 4, "neighbours": i % 2})
            for i, r in enumerate((0.6, 0.8, 0.9, 1.0))]
    ref = estimate_index_ref(q, k, None, *encode(pats), d ** -0.5, capacity=capacity)
    for _ in range(2):
        tri = est_triton.estimate_index_triton(q, k, None, *encode(pats), d ** -0.5, capacity=capacity)
        for name in ref._fields:
            assert torch.equal(getattr(ref, name), getattr(tri, name)), name
    if capacity is not None:
        assert 0 < int(ref.run_count.sum()) < b * h  # some heads dense, some not


def test_estimate_dispatch_names_the_head_dim_it_cannot_run(monkeypatch):
    """A head dim the attention kernel runs but the estimation kernels do not (256): the PyTorch
    estimate runs, with the reason (logged once on CUDA)."""
    from mcompile.kernels import dispatch
    from mcompile.kernels.estimate import estimate_index_ref

    monkeypatch.setattr(dispatch, "triton_reason", lambda q: None)  # as on a GPU that runs the kernels
    wide, usual = torch.zeros(1, 2, 8, 256, device="meta"), torch.zeros(1, 2, 8, 64, device="meta")
    assert dispatch.estimate_reason(wide) == "head dim 256 (the estimation kernels support up to 128)"
    assert dispatch.estimate_impl(wide) is estimate_index_ref
    assert dispatch.estimate_reason(usual) is None
    assert dispatch.estimate_impl(usual) is est_triton.estimate_index_triton


def test_kernel_walk_probe_variants_equal_masked_dense():
    """benchmarks/kernel_walk_probe.py's tile walks (64-row programs, 128-row programs over the
    union of two blocks' tiles, exp2 by polynomial) against dense attention over the same mask."""
    from benchmarks import kernel_walk_probe

    kernel_walk_probe.main(["256"])  # asserts each variant's error against the reference


def test_kernel_walk_probe_against_a_revision():
    """``--against REV`` imports the kernel file as of a git revision beside today's and checks
    both against the reference (here the checkout's own HEAD, which any clone has)."""
    import shutil
    import subprocess

    from benchmarks import kernel_walk_probe

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if shutil.which("git") is None or subprocess.run(["git", "rev-parse", "HEAD"], cwd=root,
                                                     capture_output=True).returncode:
        pytest.skip("not a git checkout")
    then = kernel_walk_probe.kernel_at("HEAD")
    assert then.__name__ == "mcompile.kernels._sparse_attention_at_HEAD" and then is not attn_triton
    kernel_walk_probe.main(["256", "--against", "HEAD"])


@pytest.mark.parametrize("arity", [1, 3, 128])
def test_select_arity_must_be_a_power_of_two_up_to_64(arity):
    from mcompile.kernels.block_mass_triton import select_tiles_triton

    with pytest.raises(ValueError, match="arity must be a power of two"):
        select_tiles_triton(torch.zeros(1, 1, 1, 1), torch.ones(1), 0, 1, arity=arity)
