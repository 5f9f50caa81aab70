"""GPU checks (CUDA only; skipped, never passed, where no CUDA device is present).

What the CPU suite cannot reach: the Triton kernels compiled for a GPU, in bf16, at real shapes
(Llama-3-8B heads at 8K keys), through the graph ops, inlined into Inductor's code, and the whole
backend on CUDA. Run them on a GPU machine with ``python -m pytest tests/test_gpu.py`` (a few
minutes on an H100, most of it Inductor and Triton compiles), with the package
installed: the tests that ask for ``backend="minference"`` by name need its entry point. Timings stay in
benchmarks/ (gpu_check_kernels.py, gpu_check_inline.py, kernels.py).

Attention tolerance (flash-attention's rule): the error of the kernel (or op) against an fp32
computation is at most twice that of PyTorch attention in the same dtype (matmuls in the dtype,
softmax in fp32) over the mask the index stands for, plus a floor (1e-3 for fp16/bf16, 1e-5 for
fp32). Patterns are mixed per head: dense, A-shape, vertical-slash, block-sparse.
"""

import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.utils import counters
from torch._inductor.utils import run_and_get_code

import mcompile
from mcompile import ops
from mcompile.index import BLOCK, SparseIndex, block_mask_rows
from mcompile.kernels import dispatch, estimate_triton
from mcompile.kernels import sparse_attention_triton as attn_triton
from mcompile.kernels.estimate import estimate_index_ref, vertical_slash_scores
from mcompile.kernels.sparse_attention import sparse_attention_ref
from mcompile.passes import lowering
from mcompile.patterns import PatternKind
from mcompile.tools.models import tiny_llama

from .helpers import masked_dense

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (Triton kernels on CUDA)")

DEVICE = "cuda"
BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32
FLOOR = {BF16: 1e-3, FP16: 1e-3, FP32: 1e-5}  # absolute error floor per dtype
# Per-head (kind, p0, p1): dense, A-shape (128 sink, 1024 local), vertical-slash (1000, 2048),
# block-sparse (16 blocks): sparse at the lengths below.
MIXED = [(PatternKind.DENSE, 0, 0), (PatternKind.A_SHAPE, 128, 1024),
         (PatternKind.VERTICAL_SLASH, 1000, 2048), (PatternKind.BLOCK_SPARSE, 16, 0)]
CHUNK_ELEMS = 1 << 26  # score entries per chunk of the chunked dense reference


def _patterns(h):
    kinds, p0, p1 = zip(*(MIXED[i % len(MIXED)] for i in range(h)))
    return [int(k) for k in kinds], list(p0), list(p1)


def _masked_attention(q, k, v, index, scale, key_padding, low_precision):
    """Dense attention of q (B, H, Nq, D) at positions N - Nq.. over the index's mask
    (``block_mask_rows``, materialised by chunks of query rows), fp32 result. low_precision:
    matmuls in q's dtype and P rounded to it (PyTorch attention in that dtype); otherwise fp32
    throughout. Rows with no kept key -> 0."""
    b, h, nq, _ = q.shape
    n = k.shape[2]
    p = n - nq
    group = h // k.shape[1]
    kk, vv = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    if not low_precision:
        q, kk, vv = q.float(), kk.float(), vv.float()
    out = torch.empty(b, h, nq, v.shape[-1], dtype=torch.float32, device=q.device)
    step = max(BLOCK, CHUNK_ELEMS // (b * h * n) // BLOCK * BLOCK)
    for r0 in range(0, nq, step):
        r1 = min(nq, r0 + step)
        s = (q[:, :, r0:r1] @ kk.transpose(-1, -2)).float() * scale
        keep = block_mask_rows(index, p + r0, p + r1, n, key_padding)
        w = torch.softmax(s.masked_fill(~keep, float("-inf")), -1).nan_to_num_(0.0)
        out[:, :, r0:r1] = (w.to(vv.dtype) @ vv).float()
    return out


def _errors(out, exact, same):
    """(max |out - exact|, max |same - exact|): the tested error and PyTorch's own."""
    return (out.float() - exact).abs().max().item(), (same - exact).abs().max().item()


# ------------------------------------------------------------------------------------------------
# The kernels (was benchmarks/gpu_check_kernels.py, correctness part)
# ------------------------------------------------------------------------------------------------

KERNEL_CASES = [  # (B, H, Hk, N, D, dtype, padded, strided, block_n)
    pytest.param(1, 32, 8, 8192, 128, BF16, False, False, None, id="bf16-llama3-N8192"),
    pytest.param(1, 9, 3, 5017, 64, BF16, True, True, None, id="bf16-gqa3-D64-N5017-strided-leftpad"),
    pytest.param(1, 9, 3, 5017, 64, FP16, False, False, 128, id="fp16-gqa3-D64-N5017-block_n128"),
]


@pytest.mark.parametrize("b, h, hk, n, d, dtype, padded, strided, block_n", KERNEL_CASES)
def test_sparse_attention_kernel_matches_fp32_reference(b, h, hk, n, d, dtype, padded, strided, block_n):
    """``sparse_attention_triton`` on an estimated mixed-pattern index against
    ``sparse_attention_ref`` in fp32, within twice the error of same-dtype PyTorch attention over
    the materialised mask plus 1e-3; strided q is (B, N, H, D) storage, left padding leaves the
    first queries with no key (their rows must be zeros, not NaN)."""
    g = torch.Generator(device=DEVICE).manual_seed(n + h)
    if strided:  # (B, N, H, D) storage seen as (B, H, N, D), as attention layers produce it
        q = torch.randn(b, n, h, d, device=DEVICE, generator=g).to(dtype).transpose(1, 2)
    else:
        q = torch.randn(b, h, n, d, device=DEVICE, generator=g).to(dtype)
    k = torch.randn(b, hk, n, d, device=DEVICE, generator=g).to(dtype)
    v = torch.randn(b, hk, n, d, device=DEVICE, generator=g).to(dtype)
    kp = None
    if padded:
        kp = torch.ones(b, n, dtype=torch.bool, device=DEVICE)
        kp[:, :77] = False
    scale = d ** -0.5
    index = estimate_index_ref(q, k, kp, *_patterns(h), scale)
    out = attn_triton.sparse_attention_triton(q, k, v, index, scale, kp, block_n=block_n)
    exact = sparse_attention_ref(q.float(), k.float(), v.float(), index, scale, kp).float()
    same = _masked_attention(q, k, v, index, scale, kp, low_precision=True)
    err, base = _errors(out, exact, same)
    assert out.shape == (b, h, n, d) and out.dtype == dtype
    assert torch.isfinite(out).all()
    assert err <= 2 * base + FLOOR[dtype], f"kernel err {err:.2e}, torch {dtype} err {base:.2e}"


ESTIMATE_CASES = [  # (N, Nq, H, Hk, D, padded): whole prompts, then chunks after a cached prefix
    pytest.param(8192, 8192, 32, 8, 128, False, id="llama3-N8192"),
    pytest.param(5017, 5017, 9, 3, 64, True, id="gqa3-D64-N5017-leftpad"),
    pytest.param(8192, 3000, 8, 2, 128, False, id="chunk3000-of-8192"),
    pytest.param(5017, 33, 8, 2, 64, False, id="chunk33-of-5017"),
    pytest.param(4097, 1000, 8, 2, 96, False, id="D96-padded-chunk1000-of-4097"),
]


@pytest.mark.parametrize("n, nq, h, hk, d, padded", ESTIMATE_CASES)
def test_estimate_scores_match_reference(n, nq, h, hk, d, padded):
    """The estimation kernel's vertical and slash scores (fp32 inputs) equal
    ``vertical_slash_scores`` within rtol 1e-4, atol 1e-6, for whole prompts and for chunks
    after a cached prefix, with left padding and a head dim the launcher pads (96)."""
    g = torch.Generator(device=DEVICE).manual_seed(7)
    q = torch.randn(1, h, nq, d, device=DEVICE, generator=g)
    k = torch.randn(1, hk, n, d, device=DEVICE, generator=g)
    kp = None
    if padded:
        kp = torch.ones(1, n, dtype=torch.bool, device=DEVICE)
        kp[:, :77] = False
    heads = torch.arange(h, device=DEVICE, dtype=torch.int32)
    vert, slash = estimate_triton.vertical_slash_scores_triton(q, k, kp, d ** -0.5, heads)
    rv, rs = vertical_slash_scores(q, k, kp, d ** -0.5, heads.long())
    torch.testing.assert_close(vert, rv, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(slash, rs, rtol=1e-4, atol=1e-6)


TILE_SCORE_CASES = [  # (N, Nq, H, Hk, D, dtype, padded, samples)
    pytest.param(8192, 8192, 9, 3, 64, BF16, False, 8, id="smollm2-shape-bf16-8rows"),
    pytest.param(8192, 3000, 8, 2, 128, FP16, False, 16, id="D128-fp16-chunk3000-16rows"),
    pytest.param(5017, 5017, 4, 2, 64, FP32, True, 4, id="fp32-leftpad-N5017-4rows"),
]


@pytest.mark.parametrize("score", ["mass", "max"])
@pytest.mark.parametrize("n, nq, h, hk, d, dtype, padded, samples", TILE_SCORE_CASES)
def test_block_mass_tile_scores_match_reference(n, nq, h, hk, d, dtype, padded, samples, score):
    """Block-mass's fused estimate on CUDA (both tile scores) equals block_mass.tile_mass run in
    fp32 on the same inputs: whole prompts and a chunk after a prefix, padding, GQA."""
    from mcompile.kernels.block_mass import tile_mass
    from mcompile.kernels.block_mass_triton import tile_mass_triton

    g = torch.Generator(device=DEVICE).manual_seed(n + samples)
    q = torch.randn(1, h, nq, d, device=DEVICE, generator=g).to(dtype)
    k = torch.randn(1, hk, n, d, device=DEVICE, generator=g).to(dtype)
    kp = None
    if padded:
        kp = torch.ones(1, n, dtype=torch.bool, device=DEVICE)
        kp[:, :77] = False
    heads = torch.arange(h, device=DEVICE)
    est = tile_mass_triton(q, k, kp, d ** -0.5, heads, samples, score=score)
    ref = tile_mass(q.float(), k.float(), kp, d ** -0.5, heads, samples, score=score)
    torch.testing.assert_close(est, ref, rtol=1e-3, atol=1e-6)


# ------------------------------------------------------------------------------------------------
# The graph ops after a cached prefix and at padded head dims (was benchmarks/gpu_check_prefix.py)
# ------------------------------------------------------------------------------------------------

OP_CASES = [  # (B, H, Hk, N, Nq, D, dtype, padded): q is the last Nq of N positions
    pytest.param(1, 32, 8, 8192, 8192, 128, BF16, False, id="llama3-whole-prompt"),
    pytest.param(1, 32, 8, 8192, 4096, 128, BF16, False, id="llama3-chunk4096-after-4096"),
    pytest.param(1, 32, 8, 8192, 1000, 128, BF16, False, id="llama3-chunk1000-after-7192"),
    pytest.param(1, 32, 8, 8192, 64, 128, BF16, False, id="llama3-chunk64-after-8128"),
    pytest.param(1, 9, 3, 5017, 3001, 64, FP16, False, id="fp16-gqa3-chunk3001-of-5017"),
    pytest.param(2, 8, 2, 4099, 777, 64, BF16, True, id="batch2-padding-chunk777"),
    pytest.param(1, 16, 4, 6000, 2000, 80, BF16, False, id="D80-padded-chunk2000"),
    pytest.param(1, 16, 4, 4097, 4097, 96, FP16, False, id="D96-padded-whole-prompt"),
    pytest.param(2, 8, 8, 4097, 1500, 96, BF16, True, id="D96-padded-batch2-padding-chunk1500"),
    pytest.param(1, 8, 2, 4096, 1000, 256, BF16, False, id="D256-chunk1000"),
    pytest.param(1, 8, 4, 2513, 513, 64, FP32, False, id="fp32-chunk513-after-2000"),
]


def _op_inputs(b, h, hk, n, nq, d, dtype, padded, seed):
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    q = torch.randn(b, n, h, d, device=DEVICE, generator=g).to(dtype).transpose(1, 2)[:, :, n - nq:]  # strided
    k = torch.randn(b, hk, n, d, device=DEVICE, generator=g).to(dtype)
    v = torch.randn(b, hk, n, d, device=DEVICE, generator=g).to(dtype)
    kp = None
    if padded:
        kp = torch.ones(b, n, dtype=torch.bool, device=DEVICE)
        kp[-1, :n // 5] = False  # left padding in the last row
        if b > 1:
            kp[0, n // 3:n // 3 + 50] = False  # a hole
    return q, k, v, kp


@pytest.mark.parametrize("b, h, hk, n, nq, d, dtype, padded", OP_CASES)
def test_ops_after_prefix_match_fp32_dense_over_the_mask(b, h, hk, n, nq, d, dtype, padded):
    """``mcompile::estimate_index`` + ``mcompile::sparse_attention`` with q a strided chunk after
    a cached prefix, against fp32 dense attention over the mask the index stands for (bottom-right causal), within twice PyTorch's same-dtype error plus
    the floor; the dispatcher picks the Triton kernel for every head dim here (80 and 96 padded to
    128; 256 on 8 warps)."""
    q, k, v, kp = _op_inputs(b, h, hk, n, nq, d, dtype, padded, seed=n + nq + d)
    scale = d ** -0.5
    impl = dispatch.attention_impl(q).__name__
    assert impl == "sparse_attention_triton"
    fields = ops.estimate_index(q, k, kp, *_patterns(h), scale)
    out = ops.sparse_attention(q, k, v, *fields, kp, scale)
    index = SparseIndex(*fields)
    exact = _masked_attention(q, k, v, index, scale, kp, low_precision=False)
    same = _masked_attention(q, k, v, index, scale, kp, low_precision=True)
    err, base = _errors(out, exact, same)
    assert out.shape == (b, h, nq, d)
    assert torch.isfinite(out).all()
    assert err <= 2 * base + FLOOR[dtype], f"op err {err:.2e}, torch {dtype} err {base:.2e}"


def test_opaque_op_launches_the_fixed_config_not_the_autotuner():
    """The opaque op (chunks after a cached prefix, key padding, block-mass indices) launches the
    kernel with ``fixed_config``, as the inlined path does: no config compiled and timed at the
    first call of each length bucket, seconds that would land in a request's latency. The tuner
    runs where asked (``autotune=True``) and gives the same output up to rounding."""
    q, k, v, kp = _op_inputs(1, 4, 2, 4096, 4096, 64, BF16, False, seed=5)
    scale = 64 ** -0.5
    fields = ops.estimate_index(q, k, None, *_patterns(4), scale)
    before = dict(attn_triton._sparse_attention_tuned.cache)
    out = ops.sparse_attention(q, k, v, *fields, None, scale)
    assert attn_triton._sparse_attention_tuned.cache == before
    tuned = attn_triton.sparse_attention_triton(q, k, v, SparseIndex(*fields), scale, autotune=True)
    assert attn_triton.tuned_block_n(q, v) in (64, 128)
    torch.testing.assert_close(out, tuned, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("n, nq", [(8192, 1), (8192, 63)])
def test_short_chunk_takes_dense_branch_bottom_right(n, nq):
    """A chunk shorter than ``MIN_SPARSE_CHUNK`` after a cached prefix takes the lowering's dense
    branch (``mcompile::dense_attention``), bottom-right causal: against fp32 SDPA with that
    mask, within twice bf16 SDPA's error plus 1e-3."""
    g = torch.Generator(device=DEVICE).manual_seed(5)
    q = torch.randn(1, 8, nq, 128, device=DEVICE, generator=g).to(BF16)
    k = torch.randn(1, 2, n, 128, device=DEVICE, generator=g).to(BF16)
    v = torch.randn(1, 2, n, 128, device=DEVICE, generator=g).to(BF16)
    assert ops.runs_dense(nq, n, 0)
    scale = 128 ** -0.5
    out = lowering.sparse_attention(q, k, v, None, [2] * 8, [1000] * 8, [2048] * 8, scale, 0, kernel_in_graph=False)
    mask = torch.ones(nq, n, dtype=torch.bool, device=DEVICE).tril(n - nq)
    kk, vv = k.repeat_interleave(4, 1), v.repeat_interleave(4, 1)
    exact = F.scaled_dot_product_attention(q.float(), kk.float(), vv.float(), attn_mask=mask)
    same = F.scaled_dot_product_attention(q, kk, vv, attn_mask=mask).float()
    err, base = _errors(out, exact, same)
    assert out.shape == (1, 8, nq, 128)
    assert err <= 2 * base + FLOOR[BF16], f"op err {err:.2e}, torch bf16 err {base:.2e}"


@pytest.mark.parametrize("n, nq, d, hk", [(8192, 3000, 64, 3), (5017, 4096, 128, 2), (8192, 1, 64, 2)])
def test_dense_attention_chunk_after_prefix(n, nq, d, hk):
    """``mcompile::dense_attention`` of a long chunk after a cached prefix (continuous batching's
    dense requests), bottom-right causal: against fp32 SDPA with that mask, within twice bf16
    SDPA's error plus 1e-3."""
    g = torch.Generator(device=DEVICE).manual_seed(nq)
    q = torch.randn(1, 8 if hk != 3 else 9, nq, d, device=DEVICE, generator=g).to(BF16)
    k = torch.randn(1, hk, n, d, device=DEVICE, generator=g).to(BF16)
    v = torch.randn(1, hk, n, d, device=DEVICE, generator=g).to(BF16)
    out = ops.dense_attention(q, k, v, None, d ** -0.5)
    mask = torch.ones(nq, n, dtype=torch.bool, device=DEVICE).tril(n - nq)
    rep = q.shape[1] // hk
    kk, vv = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    exact = F.scaled_dot_product_attention(q.float(), kk.float(), vv.float(), attn_mask=mask)
    same = F.scaled_dot_product_attention(q, kk, vv, attn_mask=mask).float()
    err, base = _errors(out, exact, same)
    assert out.shape == q.shape
    assert err <= 2 * base + FLOOR[BF16], f"op err {err:.2e}, torch bf16 err {base:.2e}"


@pytest.mark.parametrize("n, nq, window, d", [(8192, 8192, 4096, 128), (8192, 3000, 512, 64), (5017, 5017, 1, 64)])
def test_sliding_window_matches_fp32_window(n, nq, window, d):
    """The window's band (A-shape, no sink) with the kernel's window mask, bf16, 8 / 2 heads,
    against fp32 attention over the window mask: within twice bf16 PyTorch's error plus 1e-3."""
    g = torch.Generator(device=DEVICE).manual_seed(window)
    q = torch.randn(1, 8, n, d, device=DEVICE, generator=g).to(BF16)[:, :, n - nq:]
    k = torch.randn(1, 2, n, d, device=DEVICE, generator=g).to(BF16)
    v = torch.randn(1, 2, n, d, device=DEVICE, generator=g).to(BF16)
    scale = d ** -0.5
    index = ops.estimate_index(q, k, None, [int(PatternKind.A_SHAPE)] * 8, [0] * 8, [window] * 8, scale)
    assert dispatch.attention_impl(q).__name__ == "sparse_attention_triton"
    out = ops.sparse_attention(q, k, v, *index, None, scale, window)
    pos = torch.arange(n - nq, n, device=DEVICE)[:, None]
    keys = torch.arange(n, device=DEVICE)[None, :]
    mask = (keys <= pos) & (keys > pos - window)
    kk, vv = k.repeat_interleave(4, 1), v.repeat_interleave(4, 1)
    exact = F.scaled_dot_product_attention(q.float(), kk.float(), vv.float(), attn_mask=mask, scale=scale)
    same = F.scaled_dot_product_attention(q, kk, vv, attn_mask=mask, scale=scale).float()
    err, base = _errors(out, exact, same)
    assert err <= 2 * base + FLOOR[BF16], f"window {window}: err {err:.2e}, torch bf16 err {base:.2e}"
    inlined = torch.ops.mcompile.sparse_attention_kernel(q, k, v, *index, scale, window) if nq == n else out
    assert (inlined.float() - out.float()).abs().max().item() <= FLOOR[BF16]


# ------------------------------------------------------------------------------------------------
# Inlined into Inductor's code (was benchmarks/gpu_check_inline.py, part 1)
# ------------------------------------------------------------------------------------------------

INLINE_DENSE_BELOW = 2048
INLINE_LENGTHS = (1000, 3000, 1500, 5017)  # dense, sparse, dense, sparse


@pytest.mark.parametrize("head_dim", [64, 128])
def test_inlined_kernel_matches_opaque_op(head_dim):
    """A random 2-layer Llama (8 query / 2 KV heads, bf16) compiled with ``dynamic=True`` and
    ``inline_kernels`` on auto: one graph serves prompts below and above ``dense_below``,
    Inductor's output code holds the Triton kernel's source and the length test, and the last 64
    positions' logits equal those with the opaque op (``inline_kernels=False``) within
    max|dlogit| / max|logit| < 2e-2."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=512, intermediate_size=1024, num_hidden_layers=2, num_attention_heads=8,
                      num_key_value_heads=2, head_dim=head_dim, vocab_size=512)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).to(DEVICE, BF16).eval()
    opts = {"dense_below": INLINE_DENSE_BELOW, "pattern_db": None,
            "default_pattern": {"kind": "vertical_slash", "vertical": 64, "slash": 256}}
    logits = {}
    for inlined in (False, None):
        torch._dynamo.reset()
        counters.clear()
        compiled = torch.compile(model, backend="minference", dynamic=True,
                                 options={**opts, "inline_kernels": inlined})
        outs, code = [], ""
        with torch.no_grad():
            for n in INLINE_LENGTHS:
                ids = torch.randint(0, 512, (1, n), device=DEVICE, generator=torch.Generator(DEVICE).manual_seed(n))
                if not code:
                    out, codes = run_and_get_code(compiled, ids, use_cache=False)
                    code = "\n".join(codes)
                else:
                    out = compiled(ids, use_cache=False)
                outs.append(out.logits[:, -64:].float())
        logits[inlined] = outs
        if inlined is None:
            assert counters["stats"]["unique_graphs"] == 1
            assert "def _sparse_attention_kernel" in code  # the kernel's source, launched by Inductor
            assert f"< {INLINE_DENSE_BELOW}" in code  # the length test in Inductor's wrapper
    for n, a, b in zip(INLINE_LENGTHS, logits[False], logits[None]):
        err = ((a - b).abs().max() / a.abs().max()).item()
        assert err < 2e-2, f"N={n}: inlined vs opaque max|dlogit|/max|logit| = {err:.2e}"


# ------------------------------------------------------------------------------------------------
# The whole backend (was benchmarks/gpu_check_backend.py)
# ------------------------------------------------------------------------------------------------

SPARSE = {"dense_below": 0, "default_pattern": {"kind": "vertical_slash", "vertical": 30, "slash": 100}}
COVER = {"dense_below": 0, "default_pattern": {"kind": "vertical_slash", "vertical": 8192, "slash": 8192}}
BACKEND_LENGTH = 1000


def _compiled_logits(model, ids, backend, options=None, **kw):
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(model, backend=backend, **({"options": options} if options else {}))
    with torch.no_grad():
        return compiled(ids, **kw).logits.float(), dict(counters["mcompile"])


@pytest.mark.parametrize("padded", [False, True], ids=["nopad", "pad"])
@pytest.mark.parametrize("dtype", [BF16, FP16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_backend_matches_inductor_and_masked_dense(impl, dtype, padded, monkeypatch):
    """A random 2-layer Llama (8 query / 2 KV heads, head dim 64), batch 2 of 1000 tokens (row 0
    left-padded by 37 when padded), through ``backend="minference"`` on CUDA with the Triton
    kernels: with covering budgets it equals the model compiled by Inductor, and with sparse
    budgets the same model whose attention is dense over the index's mask materialised (fp32),
    both within max|dlogit| / max|logit| < 3e-2 on the unpadded row; the sparse budgets really
    drop keys (further from dense than from the masked-dense model). The masked-dense model runs
    the opaque op (``inline_kernels=False``), whose attention the test replaces."""
    assert dispatch.triton_reason(torch.empty(1, 8, 64, 64, device=DEVICE, dtype=dtype)) is None
    model = tiny_llama(impl, layers=2, heads=8, kv_heads=2, head_dim=64).to(DEVICE, dtype)
    ids = torch.randint(0, 128, (2, BACKEND_LENGTH), device=DEVICE, generator=torch.Generator(DEVICE).manual_seed(0))
    kw = {}
    if padded:
        kw["attention_mask"] = torch.ones_like(ids)
        kw["attention_mask"][0, :37] = 0
    dense, _ = _compiled_logits(model, ids, "inductor", **kw)
    cover, c1 = _compiled_logits(model, ids, mcompile.minference_backend, COVER, **kw)
    sparse, c2 = _compiled_logits(model, ids, mcompile.minference_backend, SPARSE, **kw)

    def masked(q):
        return lambda q, k, v, index, scale, kp, window=0: masked_dense(q, k, v, index, scale, kp).to(q.dtype)

    monkeypatch.setattr(dispatch, "attention_impl", masked)
    opaque = {**SPARSE, "inline_kernels": False}
    ref_sparse, c3 = _compiled_logits(model, ids, mcompile.minference_backend, opaque, **kw)
    assert c1.get("rewritten") == 2 and c2.get("rewritten") == 2 and c3.get("rewritten") == 2
    scale = dense[1].abs().max().item()
    e_cover = (cover - dense)[1].abs().max().item() / scale
    e_sparse = (sparse - ref_sparse)[1].abs().max().item() / scale
    e_drop = (sparse - dense)[1].abs().max().item() / scale
    assert e_cover < 3e-2, f"covering budgets vs Inductor: {e_cover:.2e}"
    assert e_sparse < 3e-2, f"sparse vs masked dense: {e_sparse:.2e}"
    assert e_drop > e_sparse, f"sparse vs dense {e_drop:.2e} <= sparse vs masked dense {e_sparse:.2e}"


def test_mistral_sliding_window_on_cuda():
    """A random 2-layer Mistral (sliding window 300, bf16) compiled with ``dense_below=0``:
    every layer rewritten with its window (kernel inlined on auto) and the last 64 positions'
    logits within max|dlogit| / max|logit| < 2e-2 of plain Inductor's."""
    model = tiny_llama("sdpa", model_type="mistral", layers=2, heads=8, kv_heads=2, head_dim=64,
                       sliding_window=300).to(DEVICE, BF16)
    ids = torch.randint(0, 128, (1, 2000), device=DEVICE, generator=torch.Generator(DEVICE).manual_seed(0))
    e = mcompile.explain(model, ids, options={"dense_below": 0, "pattern_db": None})
    assert e.rewritten == 2 and all(s.inlined and "sliding window of 300" in s.pattern_source for s in e.sites)
    torch._dynamo.reset()
    with torch.no_grad():
        out = torch.compile(model, backend="minference", options={"dense_below": 0})(ids).logits[:, -64:].float()
        torch._dynamo.reset()
        ref = torch.compile(model, backend="inductor")(ids).logits[:, -64:].float()
    err = ((out - ref).abs().max() / ref.abs().max()).item()
    assert err < 2e-2, f"max|dlogit|/max|logit| = {err:.2e}"
