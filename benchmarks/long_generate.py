"""A long prompt answered on one GPU: prefill with the KV cache kept, then greedy decoding. Time to
first token, time per decoded token, peak memory and the cache's size, per case and length.

    python -m benchmarks.long_generate --lengths 131072 524288 --cases ashape:fp8 dense:bf16 --out r.json
    python -m benchmarks.long_generate --smoke                # CPU, tiny model, dry run

Model: Llama-3-8B's shape with random bf16 weights (benchmarks/e2e.py's ``llama8b``), compiled
once per case with ``dynamic=True``: one prefill graph and one decode graph for every length.
Cases are ``PATTERN:CACHE``:

  PATTERN  ashape   minference, A-shape 1000 sink / 6096 local keys on every head from 128K (the
                    same kernel work as e2e.py's ashape case; random weights have no structure for
                    an estimate to find, so a fixed pattern stands in for a structured model's index)
           dense    plain Inductor (cuDNN SDPA)
           dense-mem minference with every head dense: cuDNN SDPA with the memory passes
  CACHE    fp8      mcompile.kv_cache.FP8Cache: K/V in float8 e4m3 (64 KiB per token for this shape),
                    each layer's store allocated for the prompt and its new tokens before the prefill
                    and written in place (``--grow-cache``: grown by concatenation instead, which
                    holds the cache twice while a chunk's graph runs)
           bf16     transformers' DynamicCache (128 KiB per token)

A case stops at its first out-of-memory length. ``--check-length``: the first decoded step's
logits of every case against ``dense:bf16`` at that length (minference runs dense there, so the
difference is the FP8 cache's rounding).
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import time
from pathlib import Path

import torch

from benchmarks import e2e  # the model, attention registration and cases of the TTFT benchmark
from mcompile.kv_cache import FP8Cache, cache_bytes

GIB = 2 ** 30
PATTERNS = ("ashape", "dense", "dense-mem")  # e2e.py's cases of those names
CACHES = ("fp8", "bf16")


def parse(case: str) -> tuple[str, str]:
    pattern, _, cache = case.partition(":")
    if pattern not in PATTERNS or cache not in CACHES:
        raise ValueError(f"case {case!r}: expected PATTERN:CACHE with PATTERN in {list(PATTERNS)}, CACHE in {CACHES}")
    return pattern, cache


def new_cache(kind, config, tokens: int, args):
    """The case's cache for ``tokens`` tokens (prompt and new tokens)."""
    from transformers import DynamicCache

    if kind != "fp8":
        return DynamicCache(config=config)
    if args.grow_cache:
        return FP8Cache(config)
    return FP8Cache(config, max_length=tokens, device=args.device)


def answer(model, ids, cache, new_tokens, keep_one, chunk=0):
    """(ttft_s, [decode step s], tokens, first decode logits, peak GiB after the prefill, peak GiB).
    ``chunk`` > 0: the prompt is prefilled ``chunk`` tokens at a time, each chunk attending to the
    cached keys before it (the activations then scale with the chunk, not the prompt)."""
    kw = {"past_key_values": cache, "use_cache": True, **({"logits_to_keep": 1} if keep_one else {})}
    gpu = torch.cuda.is_available()
    if gpu:
        torch.cuda.reset_peak_memory_stats()
    e2e.sync()
    t0 = time.perf_counter()
    # the chunks are cut outside inference mode, as the whole prompt is: one kind of input tensor
    chunks = ids.split(chunk, dim=1) if 0 < chunk < ids.shape[1] else (ids,)
    with torch.inference_mode():
        for i, part in enumerate(chunks):
            out = model(part, **kw)
            if len(chunks) > 1:  # progress of a long prefill (a sync per chunk: the GPU is busy anyway)
                e2e.sync()
                print(f"    chunk {i + 1}/{len(chunks)}: {time.perf_counter() - t0:8.1f} s, "
                      f"{cache.get_seq_length()} tokens cached", flush=True)
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        del out
        e2e.sync()
        ttft = time.perf_counter() - t0
        peak_prefill = torch.cuda.max_memory_allocated() / GIB if gpu else None
        tokens, steps, first = [nxt.item()], [], None
        for _ in range(new_tokens):
            t = time.perf_counter()
            logits = model(nxt, **kw).logits[:, -1]
            nxt = logits.argmax(-1, keepdim=True)
            e2e.sync()
            steps.append(time.perf_counter() - t)
            tokens.append(nxt.item())
            if first is None:
                first = logits[0].float().cpu()
    return ttft, steps, tokens, first, peak_prefill, (torch.cuda.max_memory_allocated() / GIB if gpu else None)


def run_case(model, case, tokens, args, out_rows, check_ref):
    pattern, kind = parse(case)
    sinks = {"attention": [], "memory": []}
    backend, keep_one = e2e.case_backend(pattern, args.dense_below, sinks)
    torch._dynamo.reset()
    model._compiled_call_impl = None
    graphs0 = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    model.compile(backend=backend, dynamic=True)
    t = time.perf_counter()
    # compiles the prefill and decode graphs, and with --prefill-chunk the graph of a chunk after cached keys
    answer(model, tokens[:, :args.check_length], new_cache(kind, model.config, args.check_length + 2, args), 2, keep_one,
           3 * args.check_length // 4 if args.prefill_chunk else 0)  # a chunk unlike its prefix in length: no duck-sized graph
    warm = 3 * args.dense_below
    if args.prefill_chunk and pattern != "dense" and warm > args.check_length and warm <= max(args.lengths):
        # the check's chunks are shorter than dense_below, so they ran dense: run the sparse branches once
        # (the prefill graph's and a chunk's) so that their Triton kernels compile here, not in the first TTFT
        answer(model, tokens[:, :warm], new_cache(kind, model.config, warm + 1, args), 1, keep_one, 2 * warm // 3)
    compile_s = time.perf_counter() - t
    for n in [args.check_length] + sorted(args.lengths if pattern != "dense" else args.dense_lengths):
        chunk = args.prefill_chunk if n > args.check_length else 0
        row = {"case": case, "length": n, "prefill_chunk": chunk}
        cache = new_cache(kind, model.config, n + args.new_tokens, args)
        try:
            ttft, steps, toks, first, peak_prefill, peak = answer(model, tokens[:, :n], cache, args.new_tokens, keep_one,
                                                                  chunk)
        except torch.OutOfMemoryError as exc:
            row["error"] = f"out of memory: {str(exc).splitlines()[0][:160]}"
            print(f"  {case:14} N={n:8d}  {row['error'][:110]}", flush=True)
            out_rows.append(row)
            del cache
            torch.cuda.empty_cache()
            break
        row.update(ttft_s=ttft, decode_ms=statistics.median(steps) * 1e3, decode_ms_max=max(steps) * 1e3,
                   new_tokens=len(steps), tokens=toks, peak_prefill_gib=peak_prefill, peak_gib=peak,
                   cache_gib=cache_bytes(cache) / GIB,
                   cached_tokens=cache.get_seq_length())
        if n == args.check_length:
            if check_ref.get("logits") is None:
                check_ref["logits"], check_ref["case"] = first, case
            ref = check_ref["logits"]
            row["check_vs"] = check_ref["case"]
            row["first_step_rel_err"] = ((first - ref).abs().max() / ref.abs().max()).item()
        del cache
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        out_rows.append(row)
        print(f"  {case:14} N={n:8d}  TTFT {ttft:8.2f} s  decode {row['decode_ms']:7.1f} ms/token  cache "
              f"{row['cache_gib']:6.1f} GiB  peak {peak or 0:6.1f} GiB"
              + (f"  first-step rel err vs {row['check_vs']} {row['first_step_rel_err']:.1e}"
                 if "first_step_rel_err" in row else ""), flush=True)
        if args.out:
            Path(args.out).write_text(json.dumps({**args.info, "rows": out_rows}, indent=1))
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs0
    # per graph compiled (prefill, chunk after cached keys, decode): a chunk graph left dense would
    # run dense attention with an (Nq, N) mask over the whole cache
    rewritten = [r.rewritten for r in sinks["attention"]]
    return {"graphs": graphs, "compile_s": compile_s, "attention_rewritten_per_graph": rewritten}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", type=int, nargs="+", default=[131072, 262144, 524288, 1048576])
    p.add_argument("--dense-lengths", type=int, nargs="*", default=[131072],
                   help="lengths for the dense cases (dense takes 10 minutes at 1M)")
    p.add_argument("--cases", nargs="+", default=["dense:bf16", "ashape:fp8"])
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--check-length", type=int, default=4096)
    p.add_argument("--dense-below", type=int, default=e2e.DEFAULT_DENSE_BELOW)
    p.add_argument("--prefill-chunk", type=int, default=0,
                   help="prefill prompts longer than --check-length this many tokens at a time against "
                        "the cache (0: the whole prompt in one forward)")
    p.add_argument("--grow-cache", action="store_true",
                   help="fp8: grow the cache by concatenation instead of preallocating it")
    p.add_argument("--smoke", action="store_true", help="tiny random Llama on the CPU, fp32")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    for case in args.cases:
        parse(case)
    args.model, args.fit, args.structured = "llama8b", False, False  # e2e.build_model's options
    args.device = "cpu" if args.smoke else "cuda"
    args.dtype = torch.float32 if args.smoke else torch.bfloat16
    if args.smoke:
        args.lengths = [l for l in args.lengths if l <= 1024] or [256, 512]
        args.dense_lengths = [l for l in args.dense_lengths if l <= 1024] or [256]
        args.check_length, args.new_tokens = 128, min(args.new_tokens, 4)
        args.dense_below = min(args.dense_below, e2e.SMOKE_DENSE_BELOW)
    import transformers

    args.info = {"device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
                 "torch": torch.__version__, "transformers": transformers.__version__,
                 "gpu_gib": torch.cuda.get_device_properties(0).total_memory / GIB if args.device == "cuda" else None}
    print(" ".join(f"{k}: {v}" for k, v in args.info.items()), flush=True)
    e2e.register_attention()
    model, _, _ = e2e.build_model(args)
    cfg = model.config
    weights = sum(t.numel() * t.element_size() for t in model.parameters()) / GIB
    per_token = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim  # K and V elements
    args.info.update(weights_gib=weights, kv_bytes_per_token={"fp8": per_token, "bf16": 2 * per_token})
    print(f"weights {weights:.1f} GiB; KV cache per token: fp8 {per_token / 1024:.0f} KiB, "
          f"bf16 {2 * per_token / 1024:.0f} KiB", flush=True)
    n_max = max(args.lengths + args.dense_lengths + [args.check_length])
    tokens = torch.randint(0, cfg.vocab_size, (1, n_max), generator=torch.Generator().manual_seed(0)).to(args.device)
    rows, summaries, check = [], {}, {}
    backends = [torch.nn.attention.SDPBackend.CUDNN_ATTENTION, torch.nn.attention.SDPBackend.FLASH_ATTENTION,
                torch.nn.attention.SDPBackend.EFFICIENT_ATTENTION, torch.nn.attention.SDPBackend.MATH]
    with torch.nn.attention.sdpa_kernel(backends, set_priority=True):
        for case in args.cases:
            summaries[case] = run_case(model, case, tokens, args, rows, check)
            print(f"  {case}: {summaries[case]}", flush=True)
    print(f"\n{'case':14} {'N':>8} {'TTFT s':>8} {'decode ms/tok':>13} {'cache GiB':>9} {'peak GiB':>8}")
    for r in rows:
        if "error" in r:
            print(f"{r['case']:14} {r['length']:8d} {r['error'][:70]}")
        else:
            print(f"{r['case']:14} {r['length']:8d} {r['ttft_s']:8.2f} {r['decode_ms']:13.1f} {r['cache_gib']:9.2f} "
                  f"{r['peak_gib'] or 0:8.1f}")
    if args.out:
        Path(args.out).write_text(json.dumps({**args.info, "rows": rows, "summaries": summaries}, indent=1))


if __name__ == "__main__":
    main()
