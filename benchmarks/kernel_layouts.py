"""Memory layouts of the sparse attention kernel's operands, side by side, on a GPU.

    PYTHONPATH=. python benchmarks/kernel_layouts.py --lengths 131072 --out kernel_layouts.json

A transformers model hands attention q/k/v as (B, H, N, D) views of (B, N, H, D) storage (the
projections' output, through RoPE) and turns the output back into (B, N, H * D). The kernel
takes any strides; this script times it, at the inlined launch configuration
(``sparse_attention_triton.fixed_config``), on the same values stored in each layout:

    layout     q      k, v    out
    bhnd       BHND   BHND    BHND     (contiguous (B, H, N, D): the kernel benchmarks' inputs)
    bnhd       BNHD   BNHD    BHND     (the model's views; a BHND output needs a copy after)
    bnhd-out   BNHD   BNHD    BNHD     (output written where the model's (B, N, H*D) wants it)
    q-bnhd     BNHD   BHND    BNHD     (k/v made contiguous first: k by RoPE, v by a copy)

plus the copies a layout change costs on its own (v to BHND, the output BHND -> BNHD). Every
layout's output is compared with the first one's (the same arithmetic: expected equal).
Inputs: clustered synthetic Q/K (kernels.py), A-shape 500/3048 and vertical-slash 500/3048.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from kernel_configs import run_config  # noqa: E402
from kernels import LLAMA3_8B, clustered_qk, timed  # noqa: E402

from mcompile.kernels.sparse_attention_triton import fixed_config  # noqa: E402
from mcompile.patterns import PatternKind  # noqa: E402

# name: (q layout, k/v layout, out layout)
LAYOUTS = {"bhnd": ("bhnd", "bhnd", "bhnd"), "bnhd": ("bnhd", "bnhd", "bhnd"),
           "bnhd-out": ("bnhd", "bnhd", "bnhd"), "q-bnhd": ("bnhd", "bhnd", "bnhd")}
_FIXED = fixed_config(LLAMA3_8B["d"], LLAMA3_8B["d"], torch.bfloat16)
INLINE = (_FIXED["BLOCK_N"], _FIXED["num_warps"], _FIXED["num_stages"])
INPUTS = {"ashape 500/3048": (PatternKind.A_SHAPE, (500, 3048)),
          "vs 500/3048": (PatternKind.VERTICAL_SLASH, (500, 3048))}


def stored(x: torch.Tensor, layout: str) -> torch.Tensor:
    """x (B, H, N, D) with the same values, stored as ``layout``."""
    return x.contiguous() if layout == "bhnd" else x.transpose(1, 2).contiguous().transpose(1, 2)


def empty(shape, layout, like):
    b, h, n, d = shape
    if layout == "bhnd":
        return torch.empty(b, h, n, d, dtype=like.dtype, device=like.device)
    return torch.empty(b, n, h, d, dtype=like.dtype, device=like.device).transpose(1, 2)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", type=int, nargs="*", default=[131072])
    p.add_argument("--out", default=None)
    args = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("this benchmark needs a CUDA GPU")
    from mcompile.kernels import estimate_triton

    h, hk, d = LLAMA3_8B["h"], LLAMA3_8B["hk"], LLAMA3_8B["d"]
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}", flush=True)
    print(f"  {'input':<16} {'N':>7} " + " ".join(f"{x:>9}" for x in LAYOUTS) + f" {'v copy':>8} {'out copy':>8}",
          flush=True)
    rows, t0 = [], time.time()
    for n in args.lengths:
        q, k = clustered_qk(n, h, hk, d)
        v = torch.randn(1, hk, n, d, device="cuda", dtype=torch.bfloat16)
        scale = d ** -0.5
        v_bnhd = stored(v, "bnhd")
        out_bhnd = torch.empty(1, h, n, d, device="cuda", dtype=torch.bfloat16)
        copies = {"v_copy_ms": timed(v_bnhd.contiguous),
                  "out_copy_ms": timed(functools.partial(torch.Tensor.contiguous, out_bhnd.transpose(1, 2)))}
        for label, (kind, budgets) in INPUTS.items():
            index = estimate_triton.estimate_index_triton(q, k, None, [int(kind)] * h, [budgets[0]] * h,
                                                          [budgets[1]] * h, scale)
            row = {"input": label, "n": n, "layouts": {}, **copies}
            first = None
            for name, (lq, lkv, lo) in LAYOUTS.items():
                qq, kk, vv = stored(q, lq), stored(k, lkv), stored(v, lkv)
                out = empty((1, h, n, d), lo, q)
                fn = functools.partial(run_config, qq, kk, vv, index, scale, INLINE, out=out)
                res = fn().float()
                diff = 0.0 if first is None else (res - first).abs().max().item()
                if first is None:
                    first = res
                row["layouts"][name] = {"ms": timed(fn), "max_diff_vs_first": diff}
                del fn, res
            rows.append(row)
            print(f"  {label:<16} {n:>7} " + " ".join(f"{row['layouts'][x]['ms']:9.2f}" for x in LAYOUTS)
                  + f" {copies['v_copy_ms']:8.2f} {copies['out_copy_ms']:8.2f}", flush=True)
            print("        max diff vs bhnd: " + ", ".join(f"{x} {row['layouts'][x]['max_diff_vs_first']:.1e}"
                                                       for x in list(LAYOUTS)[1:]), flush=True)
            if args.out:
                with open(args.out, "w") as f:
                    json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                               "layouts": LAYOUTS, "rows": rows}, f, indent=1)
            del index, first
        del q, k, v, v_bnhd, out_bhnd
        torch.cuda.empty_cache()
    print(f"total {time.time() - t0:.0f} s  (ms per call, inlined launch configuration)", flush=True)


if __name__ == "__main__":
    main()
