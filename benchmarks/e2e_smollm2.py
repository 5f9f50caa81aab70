"""SmolLM2-135M (real weights) with RoPE extended by YaRN x16 on one GPU: time to first token,
dense (Inductor + PyTorch SDPA) against minference, and the kernels on captured real Q/K.

    MCOMPILE_SMOLLM2_DIR=<folder with the GGUF> PYTHONPATH=. python benchmarks/e2e_smollm2.py

Part 1 compiles the model twice with dynamic=True (one graph per backend for every length),
prefills each length (last-token logits only), and reports the median time of 3 runs, peak
memory and whether the last-token prediction agrees. Part 2 captures Q/K/V of a few layers in
an uncompiled forward and times estimation + sparse attention against cuDNN and flash SDPA on
them, with the kept density and the attention recall of the pattern (attention mass of sampled
query blocks that falls on kept keys).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, os.path.dirname(__file__))
from gpu_check_kernels import index_stats  # noqa: E402

from mcompile.tools.data import haystack  # noqa: E402
from mcompile.index import block_mask_rows  # noqa: E402
from mcompile.kernels.estimate_triton import estimate_index_triton  # noqa: E402
from mcompile.kernels.sparse_attention_triton import sparse_attention_triton  # noqa: E402
from mcompile.tools.models import load_smollm2  # noqa: E402
from mcompile.backend import minference_backend  # noqa: E402  (works without the entry point)

PATTERN = {"kind": "vertical_slash", "vertical": 1000, "slash": 6096}  # MInference's default budgets


def sync_time(fn, reps=3):
    times = []
    for _ in range(reps):
        torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def prefill_table(model, tokens, lengths, dense_max):
    rows = {}
    for name, backend, options in (("dense", "inductor", None),
                                   ("minference", minference_backend, {"dense_below": 0, "default_pattern": PATTERN})):
        torch._dynamo.reset()
        model._compiled_call_impl = None
        model.compile(backend=backend, dynamic=True, **({"options": options} if options else {}))
        for n in lengths:
            if name == "dense" and n > dense_max:
                continue  # transformers' compiled mask is N x N: out of memory at 128K on an 80 GB GPU
            ids = tokens[:, :n]

            def fwd():
                with torch.inference_mode():
                    return model(ids, use_cache=False, logits_to_keep=1).logits[0, -1].float()

            torch.cuda.synchronize()
            t0 = time.perf_counter()
            logits = fwd()
            torch.cuda.synchronize()
            first = time.perf_counter() - t0
            torch.cuda.reset_peak_memory_stats()
            ms = sync_time(fwd) * 1e3
            peak = torch.cuda.max_memory_allocated() / 2**30
            rows[(name, n)] = (ms, first, peak, logits)
            print(f"  {name:10} N={n:7d}  {ms:9.1f} ms  (first call {first:6.1f} s)  peak {peak:5.1f} GiB", flush=True)
        graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        print(f"  {name}: {graphs} graph(s) compiled so far", flush=True)
    print("\nTTFT (SmolLM2-135M + YaRN x16, bf16, batch 1, last-token logits)")
    print(f"{'N':>8} {'dense ms':>10} {'minf ms':>10} {'speedup':>8} {'same top-1':>10} {'max |dlogit|':>12}")
    for n in lengths:
        m = rows[("minference", n)]
        if ("dense", n) not in rows:
            print(f"{n:8d} {'(N x N mask)':>10} {m[0]:10.1f}")
            continue
        d = rows[("dense", n)]
        same = int(d[3].argmax() == m[3].argmax())
        print(f"{n:8d} {d[0]:10.1f} {m[0]:10.1f} {d[0] / m[0]:8.2f}x {same:10d} {(d[3] - m[3]).abs().max().item():12.3f}")


def capture_qkv(model, ids, layers):
    """Q (post-RoPE), K, V of ``layers`` from one uncompiled forward (benchmark-only hook)."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    store = {}

    def capture(module, query, key, value, attention_mask, **kwargs):
        if module.layer_idx in layers:
            store[module.layer_idx] = (query.detach().clone(), key.detach().clone(), value.detach().clone())
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register("mcompile_capture", capture)
    old = model.config._attn_implementation
    model.set_attn_implementation("mcompile_capture")
    try:
        with torch.inference_mode():
            model(ids, use_cache=False, logits_to_keep=1)
    finally:
        model.set_attn_implementation(old)
    return store


def recall(q, k, index, scale, n, blocks=4):
    """Mean attention mass on kept keys over ``blocks`` sampled 64-row query blocks (fp32)."""
    group = q.shape[1] // k.shape[1]
    total = []
    for frac in torch.linspace(0.25, 1.0, blocks).tolist():
        r1 = max(64, int(n * frac) // 64 * 64) if frac < 1 else n
        r0 = (r1 - 1) // 64 * 64
        qs = q[:, :, r0:r1].float()
        s = torch.matmul(qs, k[:, :, :r1].float().repeat_interleave(group, 1).transpose(-1, -2)) * scale
        s = s.masked_fill(torch.arange(r1, device=q.device)[None, :] > torch.arange(r0, r1, device=q.device)[:, None],
                          float("-inf"))
        p = torch.softmax(s, -1)
        keep = block_mask_rows(index, r0, r1, r1)
        total.append((p * keep).sum(-1).mean().item())
    return sum(total) / len(total)


def kernel_table(model, tokens, lengths, layers):
    print("\nkernels on captured Q/K/V (vertical-slash 1000/6096 on every head)")
    print(f"{'N':>8} {'layer':>5} {'density':>8} {'recall':>7} {'est ms':>7} {'attn ms':>8} {'cuDNN ms':>9} "
          f"{'flash ms':>9} {'speedup':>8} {'est %':>6} {'TFLOP/s':>8}")
    for n in lengths:
        store = capture_qkv(model, tokens[:, :n], layers)
        for layer in layers:
            q, k, v = store[layer]
            h, d = q.shape[1], q.shape[-1]
            scale = d ** -0.5
            kinds, p0, p1 = [2] * h, [PATTERN["vertical"]] * h, [PATTERN["slash"]] * h
            index = estimate_index_triton(q, k, None, kinds, p0, p1, scale)
            t_est = sync_time(lambda: estimate_index_triton(q, k, None, kinds, p0, p1, scale), 5) * 1e3
            t_attn = sync_time(lambda: sparse_attention_triton(q, k, v, index, scale, None), 5) * 1e3
            dense = {}
            for name, be in (("cudnn", SDPBackend.CUDNN_ATTENTION), ("flash", SDPBackend.FLASH_ATTENTION)):
                with sdpa_kernel(be):
                    dense[name] = sync_time(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                                                                   enable_gqa=True), 5) * 1e3
            kept, computed = index_stats(index, n, 64)
            density = kept / (h * n * (n + 1) / 2)
            rec = recall(q, k, index, scale, n)
            best = min(dense.values())
            total = t_est + t_attn
            tflops = computed * d * 4 / (t_attn * 1e-3) / 1e12
            print(f"{n:8d} {layer:5d} {density:8.2%} {rec:7.3f} {t_est:7.2f} {t_attn:8.2f} {dense['cudnn']:9.2f} "
                  f"{dense['flash']:9.2f} {best / total:7.2f}x {t_est / total:6.1%} {tflops:8.1f}", flush=True)
        del store
        torch.cuda.empty_cache()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--lengths", type=int, nargs="+", default=[8192, 32768, 65536, 131072])
    parser.add_argument("--kernel-lengths", type=int, nargs="+", default=[32768, 131072])
    parser.add_argument("--layers", type=int, nargs="+", default=[2, 15, 28])
    parser.add_argument("--skip-prefill", action="store_true")
    parser.add_argument("--dense-max", type=int, default=32768, help="longest dense prefill (its mask is N x N)")
    args = parser.parse_args()
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}  "
          f"transformers {__import__('transformers').__version__}  triton {__import__('triton').__version__}", flush=True)
    model, tok = load_smollm2(dtype=torch.bfloat16, device="cuda", yarn_factor=16)
    n_max = max(args.lengths + args.kernel_lengths)
    tokens = torch.tensor([haystack(tok, n_max)], device="cuda")
    if not args.skip_prefill:
        prefill_table(model, tokens, args.lengths, args.dense_max)
    torch._dynamo.reset()
    model._compiled_call_impl = None
    kernel_table(model, tokens, args.kernel_lengths, args.layers)


if __name__ == "__main__":
    main()
