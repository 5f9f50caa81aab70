"""GPU check of sparse attention inlined into Inductor's code (mcompile/kernels/inline.py).

    PYTHONPATH=. python benchmarks/gpu_check_inline.py [--lengths 32768 131072]

Part 1, structure and correctness: a small random Llama (2 layers, 8 query / 2 KV heads, bf16)
compiled with ``dynamic=True``, prompts below and above ``dense_below``. PASS when one graph
serves every length, Inductor's output code holds the Triton kernel's source and the length
test, and the logits match the opaque op's within bf16 noise.

Part 2, the attention layer at Llama-3-8B shapes (32 query / 8 KV heads, head dim 128, bf16):
estimation + attention compiled with ``inline_kernels`` on and off against cuDNN SDPA, on the
clustered and Gaussian inputs of benchmarks/kernels.py. On Gaussian inputs the index covers most
pairs and the run-time check must send the layer to dense attention (``dense_by_fraction``).
It also prints the launch configurations the opaque path's autotuner chose.
"""

from __future__ import annotations

import argparse
import functools

import torch
import torch.nn.functional as F
from torch._dynamo.utils import counters
from torch._inductor.utils import run_and_get_code

from benchmarks.kernels import clustered_qk, gaussian_qk, timed
from mcompile.backend import minference_backend
from mcompile.kernels import inline
from mcompile.kernels import sparse_attention_triton as tri


def backend(**options):
    return functools.partial(minference_backend, options=options)


def part1(head_dim: int) -> bool:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=512, intermediate_size=1024, num_hidden_layers=2, num_attention_heads=8,
                      num_key_value_heads=2, head_dim=head_dim, vocab_size=512)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).to("cuda", torch.bfloat16).eval()
    opts = dict(dense_below=2048, pattern_db=None,
                default_pattern={"kind": "vertical_slash", "vertical": 64, "slash": 256})
    lengths = (1000, 3000, 1500, 5017)
    logits, ok = {}, True
    for inlined in (False, None):
        torch._dynamo.reset()
        counters.clear()
        compiled = torch.compile(model, backend=backend(**opts, inline_kernels=inlined), dynamic=True)
        outs, code = [], ""
        with torch.no_grad():
            for n in lengths:
                ids = torch.randint(0, 512, (1, n), device="cuda", generator=torch.Generator("cuda").manual_seed(n))
                if not code:
                    out, codes = run_and_get_code(compiled, ids, use_cache=False)
                    code = "\n".join(codes)
                else:
                    out = compiled(ids, use_cache=False)
                outs.append(out.logits[:, -64:].float())
        logits[inlined] = outs
        graphs = counters["stats"]["unique_graphs"]
        if inlined is None:
            has_kernel = "def _sparse_attention_kernel" in code
            has_test = ">= 2048" in code
            print(f"  D={head_dim} inlined: graphs {graphs}, kernel source in output code {has_kernel}, "
                  f"length test in wrapper {has_test}, rewritten {counters['mcompile']['rewritten']}")
            ok &= graphs == 1 and has_kernel and has_test
    for n, a, b in zip(lengths, logits[False], logits[None]):
        err = ((a - b).abs().max() / a.abs().max()).item()
        good = err < 2e-2
        ok &= good
        print(f"  D={head_dim} N={n}: inlined vs opaque max|dlogit|/max|logit| = {err:.2e} {'PASS' if good else 'FAIL'}")
    return ok


class Attention(torch.nn.Module):
    def forward(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)


def part2(lengths):
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
    print("autotuned configurations of the opaque path (key: head dims, length bucket, dtypes):")
    for key, cfg in tri._sparse_attention_tuned.cache.items():
        print(f"  {tuple(key)[:3]}: BLOCK_N={cfg.kwargs['BLOCK_N']} warps={cfg.num_warps} stages={cfg.num_stages}")
    print("inlined launch configuration (bf16): "
          + ", ".join(f"head dim {d}: {tri.fixed_config(d, d, torch.bfloat16)}" for d in tri.HEAD_DIMS))


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", type=int, nargs="*", default=[32768, 131072])
    p.add_argument("--skip-part1", action="store_true")
    args = p.parse_args()
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}", flush=True)
    ok = True
    if not args.skip_part1:
        for d in (64, 128):
            ok &= part1(d)
        print("part 1:", "PASS" if ok else "FAIL", flush=True)
    part2(args.lengths)
    if not ok:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
