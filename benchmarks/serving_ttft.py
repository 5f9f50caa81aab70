"""Time to first token under continuous batching: transformers' ``generate_batch`` (chunked
prefill over a paged cache) with dense paged attention against ``mcompile.serving.sparse_batching``.

    MCOMPILE_SMOLLM2_DIR=<gguf dir> python -m benchmarks.serving_ttft --out r.json     # CUDA, transformers >= 5.25
    python -m benchmarks.serving_ttft --model llama8b --out r.json                      # GPU-bound shape
    python -m benchmarks.serving_ttft --smoke                                           # CPU, tiny model

SmolLM2-135M (real weights, RoPE stretched by YaRN x16, bf16), four prompts of real text
(``--lengths``, 32K-128K by default) submitted together; each run generates ``--new-tokens``
tokens per request. Per request: the time from the call to its first generated token (the
timestamps transformers records), and the whole call's wall time. Runs, in this order: a warm-up
(one short sparse batch: Triton compiles), dense (transformers' own ``sdpa`` over the paged
cache), sparse (``sparse_batching`` at the package's defaults), and with ``--cover`` sparse with
budgets covering every key, whose tokens must equal dense's (the sparse path's exactness).

``--model llama8b``: Llama-3-8B's shape with random bf16 weights (benchmarks/e2e.py's), prompts
of random tokens, sparse runs with e2e.py's A-shape (1000 sink / 6096 local keys, scaled by
length as there): random weights have no structure for an estimate to find, so this measures
the serving path's kernel work and overhead on a model whose GPU time dominates (SmolLM2-135M's
steps are mostly host work, dense's included).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time

import torch
from torch._dynamo.utils import counters


ALLOC_STATS = ("num_alloc_retries", "num_device_alloc", "num_device_free")


def run(model, prompts, new_tokens, chunk, options=None, memory_percent=None):
    """({request: (ttft_s, tokens)}, wall_s, counters) of one generate_batch call; sparse when
    ``options`` is given. The counters include the CUDA allocator's retries (a full cache made it
    free cached blocks and synchronise) and device allocations during the call."""
    from transformers import ContinuousBatchingConfig, GenerationConfig

    from mcompile.serving import sparse_batching

    config = GenerationConfig(max_new_tokens=new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0)
    cb = ContinuousBatchingConfig(max_batch_tokens=chunk, use_cuda_graph=False, auto_switch_to_flash=False,
                                  max_memory_percent=memory_percent)
    counters["mcompile"].clear()
    gpu = torch.cuda.is_available()
    before = torch.cuda.memory_stats() if gpu else {}
    scope = sparse_batching(options=options) if options is not None else contextlib.nullcontext()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    with torch.no_grad(), scope:
        out = model.generate_batch(prompts, generation_config=config, continuous_batching_config=cb,
                                   progress_bar=False, warmup=False, record_timestamps=True)
    wall = time.perf_counter() - t0
    per = {k: ((o.timestamps[0] - t0) if o.timestamps else float("nan"), list(o.generated_tokens))
           for k, o in sorted(out.items())}
    ctr = dict(counters["mcompile"])
    if gpu:
        after = torch.cuda.memory_stats()
        ctr.update({name: after.get(name, 0) - before.get(name, 0) for name in ALLOC_STATS})
    return per, wall, ctr


def profile_run(model, prompts, chunk, options, results) -> None:
    """One more sparse prefill (one new token) under torch.profiler: device time by kernel against
    the wall time: is the chunked path device- or host-bound?"""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    t0 = time.perf_counter()
    with profile(activities=acts) as prof:
        run(model, prompts, 1, chunk, options)
    wall = time.perf_counter() - t0
    rows = []
    for e in prof.key_averages():
        dev = getattr(e, "self_device_time_total", 0) or 0
        rows.append({"name": e.key[:120], "calls": e.count, "device_ms": dev / 1e3, "cpu_total_ms": e.cpu_time_total / 1e3})
    device = sum(r["device_ms"] for r in rows)
    top = sorted(rows, key=lambda r: -r["device_ms"])[:15]
    results["profile"] = {"wall_s": wall, "device_ms": device, "top_device": top}
    print(f"profile: wall {wall:.2f} s, device busy {device / 1e3:.2f} s", flush=True)
    for r in top:
        print(f"  {r['device_ms']:9.1f} ms {r['calls']:6d}x  {r['name'][:100]}", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[32768, 65536, 98304, 131072])
    p.add_argument("--new-tokens", type=int, default=4)
    p.add_argument("--chunk", type=int, default=8192, help="max_batch_tokens (transformers' default 8192)")
    p.add_argument("--cover", action="store_true", help="also run budgets covering every key (tokens = dense)")
    p.add_argument("--memory-percent", type=float, nargs="*", default=[],
                   help="also run dense and sparse with the paged cache given this share of free GPU memory "
                        "(ContinuousBatchingConfig.max_memory_percent; transformers' default 0.9)")
    p.add_argument("--profile", action="store_true", help="one more sparse run under torch.profiler")
    p.add_argument("--smoke", action="store_true", help="tiny random Llama on the CPU")
    p.add_argument("--model", choices=["smollm2", "llama8b"], default="smollm2")
    p.add_argument("--out", default="")
    args = p.parse_args()
    import transformers

    if args.smoke:
        from mcompile.tools.models import tiny_llama

        model = tiny_llama("sdpa", layers=2)
        lengths, chunk = [300, 420, 260, 512], 128
        prompts = [[(7 * i + j) % 120 + 3 for i in range(n)] for j, n in enumerate(lengths)]
        sparse = {"dense_below": 0, "pattern_db": None}
        warm = None
    elif args.model == "llama8b":
        from transformers import AutoModelForCausalLM, LlamaConfig

        from benchmarks import e2e

        config = LlamaConfig(**e2e.LLAMA8B, max_position_embeddings=max(args.lengths), tie_word_embeddings=False)
        torch.manual_seed(0)
        with torch.device("cuda"):
            model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16, attn_implementation="sdpa").eval()
        lengths, chunk = args.lengths, args.chunk
        g = torch.Generator().manual_seed(0)
        prompts = [torch.randint(100, 120000, (n,), generator=g).tolist() for n in lengths]
        sparse = {"default_pattern": e2e.ASHAPE, "budget_length": e2e.BUDGET_LENGTH}
        warm = prompts
    else:
        from mcompile.tools.data import haystack
        from mcompile.tools.models import load_smollm2

        model, tok = load_smollm2(dtype=torch.bfloat16, device="cuda", yarn_factor=max(16, max(args.lengths) / 8192))
        lengths, chunk = args.lengths, args.chunk
        prompts = [haystack(tok, n, offset=20000 + 7919 * j) for j, n in enumerate(lengths)]
        sparse = {}
        warm = prompts  # every length bucket the timed runs meet: Triton compiles and autotunes here
    cover = {**sparse, "default_pattern": {"kind": "vertical_slash", "vertical": max(lengths), "slash": max(lengths)}}
    print(f"device {torch.cuda.get_device_name() if torch.cuda.is_available() and not args.smoke else 'cpu'}, "
          f"torch {torch.__version__}, transformers {transformers.__version__}; prompts {lengths}, chunk {chunk}",
          flush=True)
    results = {"lengths": lengths, "chunk": chunk, "new_tokens": args.new_tokens, "runs": {}}

    def save():
        if args.out:
            with open(args.out, "w") as f:
                json.dump(results, f, indent=1)

    if warm:
        run(model, warm, 1, chunk, sparse)
        run(model, warm, 1, chunk)
    cases = [("dense", None, None), ("sparse", sparse, None)] + ([("cover", cover, None)] if args.cover else [])
    for pct in args.memory_percent:
        cases += [(f"dense@{pct}", None, pct), (f"sparse@{pct}", sparse, pct)]
    for name, options, pct in cases:
        per, wall, ctr = run(model, prompts, args.new_tokens, chunk, options, pct)
        results["runs"][name] = {"ttft_s": [t for t, _ in per.values()], "tokens": [x for _, x in per.values()],
                                 "wall_s": wall, "counters": ctr}
        print(f"{name:7s} TTFT per request (s): " + " ".join(f"{t:7.2f}" for t, _ in per.values()) +
              f" | wall {wall:7.2f} s | {ctr}", flush=True)
        save()
    for name in results["runs"]:
        r = results["runs"][name]
        pct = name.partition("@")[2]
        dense = results["runs"]["dense@" + pct if pct else "dense"]  # same cache size
        r["ttft_vs_dense"] = [d / s for d, s in zip(dense["ttft_s"], r["ttft_s"])]
        r["tokens_equal_dense"] = r["tokens"] == dense["tokens"]
        print(f"{name:7s} TTFT vs dense: " + " ".join(f"{x:5.2f}x" for x in r["ttft_vs_dense"]) +
              f"; tokens equal dense: {r['tokens_equal_dense']}", flush=True)
    save()
    if args.profile:
        profile_run(model, prompts, chunk, sparse, results)
        save()
    if args.cover and not results["runs"]["cover"]["tokens_equal_dense"]:
        raise SystemExit("covering budgets did not reproduce dense's tokens")


if __name__ == "__main__":
    main()
