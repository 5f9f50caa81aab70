"""Launch configurations of the sparse attention kernel, side by side, on a GPU.

    PYTHONPATH=. python benchmarks/kernel_configs.py --lengths 32768 131072 --out kernel_configs.json

For each input (clustered vertical-slash at two budgets, A-shape, Gaussian vertical-slash: the
degenerate index with scattered diagonals) and length, the kernel runs under each fixed
configuration (key tile BLOCK_N, warps, pipeline stages; 64 query rows per program) and under
the autotuner, on the same index. Every configuration is checked first: its output on
the last query blocks against fp32 masked attention (kernels.py's rule), and its whole output
against the first configuration's (the two differ only by rounding). Times are medians of CUDA
events (kernels.py's ``timed``); cuDNN's causal attention on the same q/k/v is the reference.
Inputs: ``clustered`` (vertical-slash 1000/6096 and 500/3048), ``ashape`` (500/3048), ``sink``
(A-shape 1000/64: nearly all of its work is the gathered column path), ``gaussian``.

Programs of 128 query rows (two index blocks) were compared with this script at commit 2dc0ad1,
which had them; they lost at head dim 128 and tied at 64 (docs/BENCHMARKS.md), and were removed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
from torch.nn.attention import SDPBackend

sys.path.insert(0, os.path.dirname(__file__))
from kernels import LLAMA3_8B, check_kernel, clustered_qk, dense_ms, gaussian_qk, timed  # noqa: E402

from mcompile.patterns import PatternKind  # noqa: E402

# (BLOCK_N, num_warps, num_stages); the first is the reference for the whole-output diff.
CONFIGS = [(64, 4, 2), (64, 4, 3), (128, 4, 2), (128, 8, 2)]


def run_config(q, k, v, index, scale, config, out=None):
    """The kernel under a fixed (BLOCK_N, warps, stages), into ``out`` (any strides; default a
    new contiguous (B, H, N, Dv))."""
    from mcompile.kernels import sparse_attention_triton as attn

    bn, w, s = config
    b, h, n, d = q.shape
    if out is None:
        out = torch.empty(b, h, n, v.shape[-1], dtype=q.dtype, device=q.device)
    grid, args, meta = attn.launch_args(q, k, v, out, index, scale, None, attn._length_bucket(n))
    attn._sparse_attention_kernel[grid](*args, **meta, BLOCK_N=bn, num_warps=w, num_stages=s)
    return out


BUDGETS = ((1000, 6096), (500, 3048))  # vertical-slash budgets of the clustered input
INPUTS = ("clustered", "ashape", "sink", "gaussian")


def cases(n, shape, which):
    h, hk, d = shape["h"], shape["hk"], shape["d"]
    if {"clustered", "ashape", "sink"} & set(which):
        q, k = clustered_qk(n, h, hk, d)
        v = torch.randn(1, hk, n, d, device="cuda", dtype=torch.bfloat16)
        for budgets in BUDGETS:
            if "clustered" in which:
                yield f"vs {budgets[0]}/{budgets[1]}", q, k, v, PatternKind.VERTICAL_SLASH, budgets
        if "ashape" in which:
            yield "ashape 500/3048", q, k, v, PatternKind.A_SHAPE, (500, 3048)
        if "sink" in which:  # the column path alone, nearly: 1000 sink columns and a 64-diagonal window
            yield "ashape 1000/64", q, k, v, PatternKind.A_SHAPE, (1000, 64)
        del q, k, v
    if "gaussian" in which:
        q, k = gaussian_qk(n, h, hk, d)
        v = torch.randn(1, hk, n, d, device="cuda", dtype=torch.bfloat16)
        yield "gaussian vs 1000/6096", q, k, v, PatternKind.VERTICAL_SLASH, (1000, 6096)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", type=int, nargs="*", default=[32768, 131072])
    p.add_argument("--inputs", nargs="*", default=list(INPUTS), choices=INPUTS)
    p.add_argument("--head-dim-64", action="store_true", help="also SmolLM2's shape (9 / 3 heads, head dim 64)")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("this benchmark needs a CUDA GPU")
    import triton

    from mcompile.kernels import estimate_triton
    from mcompile.kernels import sparse_attention_triton as attn

    shapes = [("8B", LLAMA3_8B)] + ([("smol", {"h": 9, "hk": 3, "d": 64})] if args.head_dim_64 else [])
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}  triton {triton.__version__}", flush=True)
    names = [f"{bn}/{w}/{s}" for bn, w, s in CONFIGS] + ["tuned"]
    print(f"  {'shape':<5} {'input':<22} {'N':>7} {'runs':>5} {'cuDNN':>8} " + " ".join(f"{x:>11}" for x in names), flush=True)
    rows, t0 = [], time.time()
    for shape_name, shape in shapes:
        for n in args.lengths:
            for label, q, k, v, kind, budgets in cases(n, shape, args.inputs):
                h, d = q.shape[1], q.shape[3]
                scale = d ** -0.5
                index = estimate_triton.estimate_index_triton(q, k, None, [int(kind)] * h, [budgets[0]] * h,
                                                              [budgets[1]] * h, scale)
                ref = None
                row = {"shape": shape_name, "input": label, "n": n, "runs_per_head": index.run_count.float().mean().item(),
                       "cudnn_ms": dense_ms(q, k, v, scale, SDPBackend.CUDNN_ATTENTION), "configs": {}}
                for config, name in zip(CONFIGS + [None], names):
                    if config is None:
                        fn = lambda: attn.sparse_attention_triton(q, k, v, index, scale, autotune=True)  # noqa: E731
                    else:
                        fn = lambda c=config: run_config(q, k, v, index, scale, c)  # noqa: E731
                    try:
                        out = fn()
                        _, _, ok = check_kernel(q, k, v, index, scale, lambda *a, f=fn: f())
                        diff = 0.0 if ref is None else (out.float() - ref).abs().max().item()
                        if ref is None:
                            ref = out.float()
                        ms = timed(fn)
                        entry = {"ms": ms, "check": bool(ok), "max_diff_vs_first": diff}
                    except Exception as exc:  # a config that does not compile here is reported
                        entry = {"error": f"{type(exc).__name__}: {str(exc)[:160]}"}
                    row["configs"][name] = entry
                row["tuned_block_n"] = attn.tuned_block_n(q, v)
                rows.append(row)
                cells = []
                for name in names:
                    e = row["configs"][name]
                    cells.append("error" if "error" in e else f"{e['ms']:8.2f}{'' if e['check'] else '!'}")
                print(f"  {shape_name:<5} {label:<22} {n:>7} {row['runs_per_head']:5.1f} {row['cudnn_ms']:8.2f} "
                      + " ".join(f"{c:>11}" for c in cells), flush=True)
                print(f"        tuned BLOCK_N {row['tuned_block_n']}; max diff vs {names[0]}: "
                      + ", ".join(f"{nm} {row['configs'][nm].get('max_diff_vs_first', float('nan')):.1e}"
                                  for nm in names[1:]), flush=True)
                if args.out:
                    with open(args.out, "w") as f:
                        json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                                   "triton": triton.__version__, "configs": names, "rows": rows}, f, indent=1)
                del index, ref
                torch.cuda.empty_cache()
    print(f"total {time.time() - t0:.0f} s  (ms per call; '!' marks a failed check)", flush=True)


if __name__ == "__main__":
    main()
