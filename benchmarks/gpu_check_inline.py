"""Time sparse attention inlined into Inductor's code (mcompile/kernels/inline.py) on a GPU.

    PYTHONPATH=. python benchmarks/gpu_check_inline.py [--lengths 32768 131072]

The attention layer at Llama-3-8B shapes (32 query / 8 KV heads, head dim 128, bf16):
estimation + attention compiled with ``inline_kernels`` on and off against cuDNN SDPA, on the
clustered and Gaussian inputs of benchmarks/kernels.py. On Gaussian inputs the index covers most
pairs and the run-time check must send the layer to dense attention (``dense_by_fraction``).
It also prints the launch configurations the opaque path's autotuner chose. That the inlined
lowering is one graph holding the kernel's source and matches the opaque op is checked by
tests/test_gpu.py (test_inlined_kernel_matches_opaque_op).
"""

from __future__ import annotations

import argparse
import functools

import torch
import torch.nn.functional as F
from torch._dynamo.utils import counters

from benchmarks.kernels import clustered_qk, gaussian_qk, timed
from mcompile.backend import minference_backend
from mcompile.kernels import sparse_attention_triton as tri


def backend(**options):
    return functools.partial(minference_backend, options=options)


class Attention(torch.nn.Module):
    def forward(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)


def timings(lengths):
    h, hk, d = 32, 8, 128
    print("| input | N | budgets | cuDNN ms | opaque ms | inlined ms | inlined / opaque | speedup vs cuDNN | "
          "dense by fraction |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    cases = [("clustered", "500,3048"), ("clustered", "1000,6096"), ("gaussian", "1000,6096")]
    for n in lengths:
        for label, budgets in cases:
            make = clustered_qk if label == "clustered" else gaussian_qk
            q, k = make(n, h, hk, d)
            v = torch.randn_like(k)
            vert, slash = (int(x) for x in budgets.split(","))
            opts = dict(dense_below=0, pattern_db=None,
                        default_pattern={"kind": "vertical_slash", "vertical": vert, "slash": slash})
            cudnn = timed(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True))
            row = {}
            for name, inlined in (("opaque", False), ("inlined", True)):
                torch._dynamo.reset()
                counters.clear()
                fn = torch.compile(Attention(), backend=backend(**opts, inline_kernels=inlined))
                with torch.no_grad():
                    row[name] = timed(lambda: fn(q, k, v))
                row[name + "_fallback"] = counters["mcompile"]["dense_by_fraction"]
                assert counters["mcompile"]["rewritten"] == 1, dict(counters["mcompile"])
            print(f"| {label} | {n} | {budgets} | {cudnn:.2f} | {row['opaque']:.2f} | {row['inlined']:.2f} | "
                  f"{row['inlined'] / row['opaque']:.3f} | {cudnn / row['inlined']:.2f}x | "
                  f"{row['opaque_fallback']} / {row['inlined_fallback']} |", flush=True)
            del q, k, v
            torch.cuda.empty_cache()
    print("autotuned configurations (only where a caller asked for autotune=True; the opaque path launches "
          "fixed_config like the inlined one) (key: head dims, length bucket, dtypes):")
    for key, cfg in tri._sparse_attention_tuned.cache.items():
        print(f"  {tuple(key)[:3]}: BLOCK_N={cfg.kwargs['BLOCK_N']} warps={cfg.num_warps} stages={cfg.num_stages}")
    print("inlined launch configuration (bf16): "
          + ", ".join(f"head dim {d}: {tri.fixed_config(d, d, torch.bfloat16)}" for d in tri.HEAD_DIMS))


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", type=int, nargs="*", default=[32768, 131072])
    args = p.parse_args()
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}", flush=True)
    timings(args.lengths)


if __name__ == "__main__":
    main()
