"""Block-mass estimation on the GPU: the Triton kernels against the PyTorch references, then the
estimate, the selection and the whole index against cuDNN's dense causal attention.

    python -m benchmarks.block_mass_kernel                 # from the repository root, on CUDA
    python -m benchmarks.block_mass_kernel --lengths 32768 65536 131072 --splits 8 16 32 64 0
    python -m benchmarks.block_mass_kernel --lengths 32768 65536 131072 --rows 64 128 --warps 4 8 --stages 2 3
    python -m benchmarks.block_mass_kernel --lengths 32768 131072 --scores mass max --samples 8 16 32

Correctness on random bf16 / fp16 inputs (head dims 64, 128 and 80, a chunk after a cached
prefix, GQA, batch 2, keys split over programs or not): the largest absolute difference of the
estimates, and whether the selection kernel keeps what the reference keeps. Timing: SmolLM2's
layer shape (9 query heads, 3 KV heads, head dim 64, bf16), median of ``triton.testing.do_bench``;
``--splits`` are key tiles per program (0: one program walks every key tile of its rows);
``--rows``, ``--warps``, ``--stages``: sampled rows per program and the tile-sums launch;
``--scores`` and ``--samples``: block-mass's tile score ("mass" or "max") and rows per block.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from mcompile.index import BLOCK
from mcompile.kernels.block_mass import select_tiles, tile_mass
from mcompile.kernels.block_mass_triton import SPLIT, select_tiles_triton, tile_mass_triton

SHAPES = [(1, 9, 3, 4096, 4096, 64), (2, 8, 2, 3001, 1000, 128), (1, 4, 4, 777, 777, 80)]  # B, H, Hk, N, Nq, D


def check(scores=("mass",)) -> float:
    worst = 0.0
    for dtype in (torch.bfloat16, torch.float16):
        for b, h, hk, n, nq, d in SHAPES:
            q = torch.randn(b, h, nq, d, device="cuda", dtype=dtype)
            k = torch.randn(b, hk, n, d, device="cuda", dtype=dtype)
            heads = torch.arange(h, device="cuda")
            for (samples, split, r), score in [(c, sc) for c in ((4, 4, 64), (8, SPLIT, 128), (8, 1000, 64),
                                                                  (16, SPLIT, 128)) for sc in scores]:
                est = tile_mass_triton(q, k, None, d ** -0.5, heads, samples, split, score=score, rows=r)
                ref = tile_mass(q, k, None, d ** -0.5, heads, samples, score=score)
                err = (est - ref).abs().max().item()
                worst = max(worst, err)
                recall = torch.linspace(0.5, 1.0, h, device="cuda")
                m0 = (n - nq) // BLOCK
                want = select_tiles(ref, recall, m0, 512)
                same = all(torch.equal(x, y) for arity in (2, 16, 64)
                           for x, y in zip(select_tiles_triton(ref, recall, m0, 512, arity=arity), want))
                print(f"{str(dtype):15s} B{b} H{h} Hk{hk} N{n} Nq{nq} D{d} {score} samples {samples} split {split}: "
                      f"max err {err:.2e}, selection equal {same}", flush=True)
                worst = worst if same else float("inf")
    return worst


def timing(lengths, splits, configs=((None, None, None),), scores=("mass",), samples_list=(4, 8)) -> list[dict]:
    from triton.testing import do_bench

    from mcompile.patterns import Pattern, encode

    rows = []
    for n in lengths:
        q = torch.randn(1, 9, n, 64, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(1, 3, n, 64, device="cuda", dtype=torch.bfloat16)
        v = torch.randn_like(k)
        heads = torch.arange(9, device="cuda")
        dense = do_bench(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True,
                                                                                  enable_gqa=True),
                         return_mode="median")
        for score, samples in [(sc, sa) for sc in scores for sa in samples_list]:
            for split in splits:
                for r, w, st in configs:
                    sp = split or n // BLOCK + 1
                    ms = do_bench(lambda: tile_mass_triton(q, k, None, 0.125, heads, samples, sp, score=score, rows=r,
                                                           num_warps=w, num_stages=st), return_mode="median")
                    rows.append({"n": n, "score": score, "samples": samples, "split": split, "rows": r, "warps": w,
                                 "stages": st, "estimate_ms": ms, "cudnn_ms": dense})
                    print(f"N={n:>6} {score} samples {samples} split {split:>4} rows/warps/stages {r}/{w}/{st}: "
                          f"estimate {ms:7.3f} ms, cuDNN causal {dense:7.2f} ms ({ms / dense:.3f} of dense)",
                          flush=True)
            est = tile_mass_triton(q, k, None, 0.125, heads, samples, score=score)
            recall = torch.full((9,), 0.98, device="cuda")
            sel = do_bench(lambda: select_tiles_triton(est, recall, 0, 2048), return_mode="median")
            # the threshold search with 15 and 63 thresholds a pass (8 and 6 passes instead of 31)
            sel_k = {a: do_bench(lambda: select_tiles_triton(est, recall, 0, 2048, arity=a), return_mode="median")
                     for a in (16, 64)}
            sel_ref = do_bench(lambda: select_tiles(est, recall, 0, 2048), return_mode="median")
            pattern = Pattern.from_dict({"kind": "block_mass", "recall": 0.98, "samples": samples, "score": score})
            kinds, p0, p1 = encode([pattern] * 9)
            whole = do_bench(lambda: torch.ops.mcompile.estimate_index(q, k, None, kinds, p0, p1, 0.125),
                             return_mode="median")
            # the host's share: calls issued back to back without waiting for the GPU (50 calls of a
            # few launches each stay within the launch queue, so none waits for the GPU either)
            torch.cuda.synchronize()
            t = time.perf_counter()
            for _ in range(50):
                torch.ops.mcompile.estimate_index(q, k, None, kinds, p0, p1, 0.125)
            host = (time.perf_counter() - t) / 50 * 1e3
            torch.cuda.synchronize()
            rows.append({"n": n, "score": score, "samples": samples, "select_ms": sel, "select_torch_ms": sel_ref,
                         **{f"select_arity{a}_ms": ms for a, ms in sel_k.items()},
                         "estimate_index_ms": whole, "estimate_index_host_ms": host, "cudnn_ms": dense})
            print(f"N={n:>6} {score} samples {samples}: selection {sel:.3f} ms (16-ary {sel_k[16]:.3f}, 64-ary "
                  f"{sel_k[64]:.3f}, torch sort {sel_ref:.3f} ms), whole "
                  f"estimate_index {whole:.3f} ms ({whole / dense:.3f} of dense; host {host:.3f} ms a call)", flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[32768])
    p.add_argument("--splits", type=int, nargs="+", default=[SPLIT])
    p.add_argument("--rows", type=int, nargs="+", default=[None])
    p.add_argument("--warps", type=int, nargs="+", default=[None])
    p.add_argument("--stages", type=int, nargs="+", default=[None])
    p.add_argument("--scores", nargs="+", default=["mass"], choices=["mass", "max"])
    p.add_argument("--samples", type=int, nargs="+", default=[4, 8])
    p.add_argument("--out", default="")
    args = p.parse_args()
    worst = check(args.scores)
    print(f"largest difference from the reference: {worst:.2e}")
    configs = [(r, w, s) for r in args.rows for w in args.warps for s in args.stages]
    rows = timing(args.lengths, args.splits, configs, args.scores, args.samples)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"check_max_err": worst, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
