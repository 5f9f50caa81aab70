"""Check the Triton path on a GPU for chunks after a cached prefix and for padded head dims.

    PYTHONPATH=. python benchmarks/gpu_check_prefix.py

Every case runs the graph ops as the compiled model would (``mcompile::estimate_index`` +
``mcompile::sparse_attention``, dense_below=0, so the sparse path is forced) with q the last
Nq of N positions (P = N - Nq), and compares with an fp32 computation of dense attention over
the mask the index stands for (``index.block_mask_rows``, bottom-right causal). Rule
(flash-attention's): the op's error against that fp32 oracle is at most twice PyTorch's own
error in the same dtype (matmuls in the dtype, softmax in fp32) plus a floor. Also checked:
the estimate kernel's scores at an offset against ``vertical_slash_scores``, which
implementation the dispatcher picks (Triton for head dims <= 128, the PyTorch reference for
256), and the op's dense branch for short chunks (bottom-right aligned). Prints one line per
case and a PASS/FAIL summary; exits 1 on any failure.
"""

from __future__ import annotations

import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from gpu_check_kernels import chunked_attention  # noqa: E402

from mcompile import ops  # noqa: E402
from mcompile.index import SparseIndex  # noqa: E402
from mcompile.kernels import dispatch, estimate_triton  # noqa: E402
from mcompile.kernels.estimate import vertical_slash_scores  # noqa: E402
from mcompile.patterns import PatternKind  # noqa: E402

FLOOR = 1e-3  # absolute error floor of the fp16/bf16 checks (fp32: 1e-5)
# Per-head patterns: dense, A-shape (sink, local), vertical-slash, block-sparse.
MIXED = [(PatternKind.DENSE, 0, 0), (PatternKind.A_SHAPE, 128, 1024),
         (PatternKind.VERTICAL_SLASH, 1000, 2048), (PatternKind.BLOCK_SPARSE, 16, 0)]
# (name, B, H, Hk, N, Nq, D, dtype, padded): Llama-3-8B heads (32/8 x 128) at 8K keys with the
# chunk at several offsets, odd offsets and lengths, GQA 3, batch 2 with padding, head dims
# 80/96 (padded to 128 by the launcher) and 256 (PyTorch reference path).
BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32
CASES = [
    ("llama3 whole prompt", 1, 32, 8, 8192, 8192, 128, BF16, False),
    ("llama3 chunk 4096 after 4096", 1, 32, 8, 8192, 4096, 128, BF16, False),
    ("llama3 chunk 1000 after 7192", 1, 32, 8, 8192, 1000, 128, BF16, False),
    ("llama3 chunk 64 after 8128", 1, 32, 8, 8192, 64, 128, BF16, False),
    ("odd: chunk 3001 of 5017, GQA 3", 1, 9, 3, 5017, 3001, 64, FP16, False),
    ("batch 2 + padding, chunk 777", 2, 8, 2, 4099, 777, 64, BF16, True),
    ("head dim 80 (padded), chunk 2000", 1, 16, 4, 6000, 2000, 80, BF16, False),
    ("head dim 96 (padded), whole prompt", 1, 16, 4, 4097, 4097, 96, FP16, False),
    ("head dim 96 (padded), chunk 1500", 2, 8, 8, 4097, 1500, 96, BF16, True),
    ("head dim 256 (reference), chunk 1000", 1, 8, 2, 4096, 1000, 256, BF16, False),
    ("fp32, chunk 513 after 2000", 1, 8, 4, 2513, 513, 64, FP32, False),
]


def dtype_name(dtype):
    return {BF16: "bf16", FP16: "fp16", FP32: "fp32"}[dtype]


def patterns(h):
    kinds, p0, p1 = zip(*(MIXED[i % len(MIXED)] for i in range(h)))
    return [int(k) for k in kinds], list(p0), list(p1)


def make_inputs(b, h, hk, n, nq, d, dtype, padded, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(b, n, h, d, device="cuda", generator=g).to(dtype).transpose(1, 2)[:, :, n - nq:]  # strided
    k = torch.randn(b, hk, n, d, device="cuda", generator=g).to(dtype)
    v = torch.randn(b, hk, n, d, device="cuda", generator=g).to(dtype)
    kp = None
    if padded:
        kp = torch.ones(b, n, dtype=torch.bool, device="cuda")
        kp[-1, :n // 5] = False  # left padding in the last row
        if b > 1:
            kp[0, n // 3:n // 3 + 50] = False  # a hole
    return q, k, v, kp


def check_case(name, b, h, hk, n, nq, d, dtype, padded):
    q, k, v, kp = make_inputs(b, h, hk, n, nq, d, dtype, padded, seed=n + nq + d)
    scale = d ** -0.5
    kinds, p0, p1 = patterns(h)
    impl = dispatch.attention_impl(q).__name__
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fields = ops.estimate_index(q, k, kp, kinds, p0, p1, scale, 0)
    out = ops.sparse_attention(q, k, v, *fields, kp, scale, 0)
    torch.cuda.synchronize()
    ms = 1e3 * (time.perf_counter() - t0)
    index = SparseIndex(*fields)
    exact = chunked_attention(q, k, v, index, scale, kp, low_precision=False)
    same = chunked_attention(q, k, v, index, scale, kp, low_precision=True)
    err = (out.float() - exact).abs().max().item()
    base = (same - exact).abs().max().item()
    floor = 1e-5 if dtype == FP32 else FLOOR
    want_impl = "sparse_attention_ref" if d > 128 else "sparse_attention_triton"
    ok = bool(torch.isfinite(out).all()) and out.shape == (b, h, nq, d) and err <= 2 * base + floor \
        and impl == want_impl
    print(f"  {name:<38} {dtype_name(dtype)} {impl:<24} op err {err:.2e}  torch {dtype_name(dtype)} err "
          f"{base:.2e}  ({ms:7.1f} ms incl. first-call tuning) -> {'PASS' if ok else 'FAIL'}")
    return ok


def check_estimate_offset(n, nq, h, hk, d):
    g = torch.Generator(device="cuda").manual_seed(3)
    q = torch.randn(1, h, nq, d, device="cuda", generator=g)
    k = torch.randn(1, hk, n, d, device="cuda", generator=g)
    heads = torch.arange(h, device="cuda", dtype=torch.int32)
    vert, slash = estimate_triton.vertical_slash_scores_triton(q, k, None, d ** -0.5, heads)
    rv, rs = vertical_slash_scores(q, k, None, d ** -0.5, heads.long())
    ok = torch.allclose(vert, rv, rtol=1e-4, atol=1e-6) and torch.allclose(slash, rs, rtol=1e-4, atol=1e-6)
    print(f"  estimate scores fp32 N={n} Nq={nq} D={d}: max abs err vertical {(vert - rv).abs().max().item():.1e} "
          f"slash {(slash - rs).abs().max().item():.1e} -> {'PASS' if ok else 'FAIL'}")
    return ok


def check_short_chunk_dense(n, nq):
    """The op's dense branch for a short chunk: bottom-right causal, against fp32 SDPA."""
    g = torch.Generator(device="cuda").manual_seed(5)
    q = torch.randn(1, 8, nq, 128, device="cuda", generator=g, dtype=BF16)
    k = torch.randn(1, 2, n, 128, device="cuda", generator=g, dtype=BF16)
    v = torch.randn(1, 2, n, 128, device="cuda", generator=g, dtype=BF16)
    fields = ops.estimate_index(q, k, None, [2] * 8, [1000] * 8, [2048] * 8, 128 ** -0.5, 0)
    out = ops.sparse_attention(q, k, v, *fields, None, 128 ** -0.5, 0)
    mask = torch.ones(nq, n, dtype=torch.bool, device="cuda").tril(n - nq)
    kk, vv = k.repeat_interleave(4, 1), v.repeat_interleave(4, 1)
    exact = torch.nn.functional.scaled_dot_product_attention(q.float(), kk.float(), vv.float(), attn_mask=mask)
    same = torch.nn.functional.scaled_dot_product_attention(q, kk, vv, attn_mask=mask).float()
    err, base = (out.float() - exact).abs().max().item(), (same - exact).abs().max().item()
    ok = ops.runs_dense(nq, n, 0) and err <= 2 * base + FLOOR
    print(f"  dense branch, chunk {nq} after {n - nq}: op err {err:.2e}  torch bf16 err {base:.2e} -> "
          f"{'PASS' if ok else 'FAIL'}")
    return ok


def main() -> int:
    if not torch.cuda.is_available():
        print("no CUDA device: this check is for the GPU machine")
        return 1
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}")
    results = []
    print("sparse attention ops at an offset (rule: op err <= 2 x torch same-dtype err + floor):")
    for case in CASES:
        try:
            results.append((case[0], check_case(*case)))
        except Exception as exc:  # report and go on
            print(f"  {case[0]:<38} FAILED to run: {type(exc).__name__}: {str(exc)[:300]}")
            results.append((case[0], False))
    print("estimate kernel at an offset:")
    for n, nq, d in ((8192, 3000, 128), (5017, 33, 64), (4097, 1000, 96)):
        results.append((f"estimate N={n} Nq={nq} D={d}", check_estimate_offset(n, nq, 8, 2, d)))
    print("dense branch of the op:")
    for n, nq in ((8192, 1), (8192, 63)):
        results.append((f"dense branch Nq={nq}", check_short_chunk_dense(n, nq)))
    failed = [name for name, ok in results if not ok]
    print(f"\n{len(results) - len(failed)} / {len(results)} PASS" + (f"; FAIL: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
