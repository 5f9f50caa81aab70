"""Index estimation on its own: the vertical-slash score kernels against their PyTorch
reference, then their time and the time of whole index builds.

    PYTHONPATH=. python benchmarks/estimation.py [--length 131072]

1. Correctness: ``vertical_slash_scores_triton`` against ``vertical_slash_scores`` at an odd
   length (bf16 inputs, fp32 scores, 8 query heads over 2 KV heads).
2. Speed at ``--length`` (Llama-3-8B heads: 32 query / 8 KV, head dim 128, random bf16 Q/K):
   the two score passes back to back (CUDA events, mean of 20 calls), then ``estimate_index``
   for vertical-slash (1000 / 6096) and for A-shape (500 / 3048): wall time (median, host
   launch overhead included) and GPU time by kernel (torch.profiler). Random Q/K change no
   work here: both passes read every key whatever the scores.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from e2e import kernel_profile, print_profile, timed  # noqa: E402

from mcompile.kernels import estimate_triton  # noqa: E402
from mcompile.kernels.estimate import vertical_slash_scores  # noqa: E402
from mcompile.ops import estimate_index  # noqa: E402
from mcompile.patterns import PatternKind  # noqa: E402


def qk(n, h, hk, d, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(1, n, h, d, device="cuda", dtype=torch.bfloat16, generator=g).transpose(1, 2)
    k = torch.randn(1, n, hk, d, device="cuda", dtype=torch.bfloat16, generator=g).transpose(1, 2)
    return q, k


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--length", type=int, default=131072)
    p.add_argument("--check-length", type=int, default=16000)
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU (the Triton kernels)")
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}", flush=True)

    h, hk, d = 8, 2, 128
    q, k = qk(args.check_length, h, hk, d, seed=0)
    heads = torch.arange(h, device="cuda", dtype=torch.int32)
    ref_v, ref_s = vertical_slash_scores(q, k, None, d ** -0.5, heads)
    v, s = estimate_triton.vertical_slash_scores_triton(q, k, None, d ** -0.5, heads)
    err = max((v - ref_v).abs().max().item(), (s - ref_s).abs().max().item())
    ok = err <= 1e-6
    print(f"scores vs reference, N={args.check_length}: max abs diff {err:.1e} "
          f"(rows sum to {ref_v.sum(-1).mean().item():.1f}) -> {'PASS' if ok else 'FAIL'}", flush=True)

    n, h, hk = args.length, 32, 8
    q, k = qk(n, h, hk, d, seed=1)
    heads = torch.arange(h, device="cuda", dtype=torch.int32)
    scores = functools.partial(estimate_triton.vertical_slash_scores_triton, q, k, None, d ** -0.5, heads)
    scores()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(20):
        scores()
    end.record()
    torch.cuda.synchronize()
    print(f"N={n}: both score passes {start.elapsed_time(end) / 20:.3f} ms", flush=True)
    for name, (kind, p0, p1) in {"vertical-slash 1000/6096": (PatternKind.VERTICAL_SLASH, 1000, 6096),
                                 "A-shape 500/3048": (PatternKind.A_SHAPE, 500, 3048)}.items():
        call = functools.partial(estimate_index, q, k, None, [int(kind)] * h, [p0] * h, [p1] * h, d ** -0.5, 0, n)
        call()
        wall = timed(call, 20) * 1e3
        prof = kernel_profile(call, 12)
        print(f"{name}: estimate_index wall {wall:.3f} ms, GPU {prof['total_ms']:.3f} ms", flush=True)
        print_profile(name, n, prof)
    if not ok:
        raise SystemExit("score kernels disagree with the reference")


if __name__ == "__main__":
    main()
