"""Overhead of the minference backend below its dense threshold, where it should cost nothing.

    PYTHONPATH=. python benchmarks/short_prompt_overhead.py [--lengths 4096 8192] [--profile]

A random-weight model of SmolLM2-135M's shape (30 layers, 9 query / 3 KV heads, head dim 64;
small layers make per-layer host costs visible) in bf16 on CUDA, prefill without cache, last
position's logits, compiled with ``dynamic=True`` by plain Inductor and by minference with its
default threshold (these prompts run dense attention) in several configurations, so that each
part's cost shows: the whole backend; without the chunked MLP; with the opaque attention op
instead of the inlined one. Median of 20 calls after warm-up. ``--profile`` prints the top host
and device ops of each configuration at the first length, and one line with the profiled
forward's device time, kernel launches and the compiled wrapper's own Python time (the
``## Call CompiledFxGraph`` row's self time). ``--mask-free`` gives both the model's attention
as ``benchmarks/e2e.py`` does (causal SDPA, no N x N mask), so that plain Inductor is not slowed
by a mask the rewrite removes.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time

import torch

from mcompile.backend import minference_backend

SMOLLM2_SHAPE = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                     num_key_value_heads=3, head_dim=64, vocab_size=49152, tie_word_embeddings=True)
CONFIGS = {
    "inductor": None,
    "minference": {},
    "minference, chunk_mlp=False": {"chunk_mlp": False},
    "minference, inline_kernels=False": {"inline_kernels": False},
}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[4096, 8192])
    p.add_argument("--profile", action="store_true")
    p.add_argument("--mask-free", action="store_true", help="causal SDPA without a mask for both (as e2e.py)")
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS),
                   help="configurations to time (plain Inductor always runs: the baseline)")
    args = p.parse_args()
    from transformers import AutoModelForCausalLM, LlamaConfig

    attn_implementation = "sdpa"
    if args.mask_free:
        import e2e

        e2e.register_attention()
        attn_implementation = e2e.ATTN_IMPL
    torch.manual_seed(0)
    config = LlamaConfig(**SMOLLM2_SHAPE, max_position_embeddings=max(args.lengths))
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation)
    model = model.to("cuda", torch.bfloat16).eval()
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}", flush=True)
    ids = {n: torch.randint(0, 49152, (1, n), device="cuda") for n in args.lengths}
    results = {}
    configs = {name: CONFIGS[name] for name in CONFIGS if name == "inductor" or name in args.configs}
    for name, options in configs.items():
        torch._dynamo.reset()
        model._compiled_call_impl = None
        backend = "inductor" if options is None else functools.partial(minference_backend, options=options)
        model.compile(backend=backend, dynamic=True)
        kw = {"use_cache": False, "logits_to_keep": 1}
        for n in args.lengths:
            with torch.inference_mode():
                for _ in range(3):
                    model(ids[n], **kw)
                times = []
                for _ in range(20):
                    torch.cuda.synchronize()
                    t = time.perf_counter()
                    model(ids[n], **kw)
                    torch.cuda.synchronize()
                    times.append(time.perf_counter() - t)
            results[(name, n)] = statistics.median(times) * 1e3
            print(f"  {name:34} N={n:6d} {results[(name, n)]:8.2f} ms", flush=True)
        if args.profile:
            n = args.lengths[0]
            with torch.inference_mode(), torch.profiler.profile(
                    activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]) as prof:
                model(ids[n], **kw)
                torch.cuda.synchronize()
            events = prof.key_averages()
            cuda = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
            wrapper = sum(e.self_cpu_time_total for e in events if e.key.startswith("## Call CompiledFxGraph"))
            print(f"  profile {name}, N={n}: device time {sum(e.self_device_time_total for e in cuda) / 1e3:.2f} ms "
                  f"in {sum(e.count for e in cuda)} kernels; compiled wrapper's own Python time "
                  f"{wrapper / 1e3:.2f} ms", flush=True)
            print(events.table(sort_by="cpu_time_total", row_limit=12, max_name_column_width=60))
    print("\n| configuration | " + " | ".join(f"N={n}" for n in args.lengths) + " |")
    print("| --- | " + " | ".join("---" for _ in args.lengths) + " |")
    for name in configs:
        cells = [f"{results[(name, n)]:.2f} ms ({results[(name, n)] / results[('inductor', n)]:.3f}x)"
                 for n in args.lengths]
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
