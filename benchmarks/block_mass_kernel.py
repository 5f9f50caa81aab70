"""The block-mass tile estimate on the GPU: the fused kernel against the PyTorch reference, then
its time against cuDNN's dense causal attention of the same layer.

    python -m benchmarks.block_mass_kernel                 # from the repository root, on CUDA
    python -m benchmarks.block_mass_kernel --lengths 32768 131072

Correctness on random bf16 / fp16 inputs (head dims 64, 128 and 80, a chunk after a cached
prefix, GQA, batch 2): the largest absolute difference of the estimates. Timing: SmolLM2's
layer shape (9 query heads, 3 KV heads, head dim 64, bf16), median of ``triton.testing.do_bench``.
"""

from __future__ import annotations

import argparse

import torch

from mcompile.kernels.block_mass import tile_mass
from mcompile.kernels.block_mass_triton import tile_mass_triton

SHAPES = [(1, 9, 3, 4096, 4096, 64), (2, 8, 2, 3001, 1000, 128), (1, 4, 4, 777, 777, 80)]  # B, H, Hk, N, Nq, D


def check() -> float:
    worst = 0.0
    for dtype in (torch.bfloat16, torch.float16):
        for b, h, hk, n, nq, d in SHAPES:
            q = torch.randn(b, h, nq, d, device="cuda", dtype=dtype)
            k = torch.randn(b, hk, n, d, device="cuda", dtype=dtype)
            heads = torch.arange(h, device="cuda")
            for samples in (4, 8):
                err = (tile_mass_triton(q, k, None, d ** -0.5, heads, samples)
                       - tile_mass(q, k, None, d ** -0.5, heads, samples)).abs().max().item()
                worst = max(worst, err)
                print(f"{str(dtype):15s} B{b} H{h} Hk{hk} N{n} Nq{nq} D{d} samples {samples}: max err {err:.2e}")
    return worst


def timing(lengths) -> None:
    from triton.testing import do_bench

    for n in lengths:
        q = torch.randn(1, 9, n, 64, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(1, 3, n, 64, device="cuda", dtype=torch.bfloat16)
        v = torch.randn_like(k)
        heads = torch.arange(9, device="cuda")
        dense = do_bench(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True,
                                                                                  enable_gqa=True),
                         return_mode="median")
        for samples in (4, 8):
            ms = do_bench(lambda: tile_mass_triton(q, k, None, 0.125, heads, samples), return_mode="median")
            print(f"N={n:>6} samples {samples}: estimate {ms:7.2f} ms, cuDNN causal {dense:7.2f} ms "
                  f"({ms / dense:.2f} of dense)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[32768])
    args = p.parse_args()
    worst = check()
    print(f"largest difference from the reference: {worst:.2e}")
    timing(args.lengths)


if __name__ == "__main__":
    main()
