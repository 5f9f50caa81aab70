"""A Gemma-3-shaped model (random weights) at long prompts: does the prefill fit, and are the
sliding layers exact?

    python -m benchmarks.gemma3_memory --lengths 131072 --check-length 8192 --out r.json   # on CUDA
    python -m benchmarks.gemma3_memory --smoke                                    # CPU, tiny

Gemma 3 270M's shape (transformers' Gemma3TextConfig: 18 layers, hidden 640, 4 query heads and 1
KV head of dim 256, sliding window 512, five sliding layers to one global), bf16, random weights,
prefill to the last token's logits. For each of ``--lengths``, plain Inductor and minference
(peak memory and time, or the out-of-memory error), then the check at ``--check-length``:

1. check: the minference backend with every global layer dense
   (``default_pattern={"kind": "dense"}``, ``dense_below=0``) against the model run eagerly:
   the sliding layers then run the sparse kernel on their window alone, so the logits must match
   eager's as closely as Inductor's own compile does (max |dlogit| / max |logit| at most twice
   plain Inductor's against the same eager run, or 1e-2);
2. plain Inductor (``backend="inductor"``, SDPA with transformers' masks): peak memory and time,
   or the out-of-memory error;
3. minference at its defaults (block-mass on the global layers): peak memory and time.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

GEMMA3_270M = dict(vocab_size=262144, hidden_size=640, intermediate_size=2048, num_hidden_layers=18,
                   num_attention_heads=4, num_key_value_heads=1, head_dim=256, sliding_window=512,
                   max_position_embeddings=1 << 20)
SMOKE = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=6, num_attention_heads=4,
             num_key_value_heads=1, head_dim=16, sliding_window=64, max_position_embeddings=1 << 14)
GIB = 2 ** 30


def build(shape, device, dtype):
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    config = AutoConfig.for_model("gemma3_text", **shape)
    config.layer_types = ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention"
                          for i in range(shape["num_hidden_layers"])]
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=dtype)
    return model.to(device).eval()


def forward(model, ids, logits_to_keep=1):
    with torch.no_grad():
        return model(ids, use_cache=False, logits_to_keep=logits_to_keep).logits[:, -1].float()


def timed(fn, device):
    """(result, seconds, peak GiB) of one call, or (error text, None, peak) when it runs out of memory."""
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    try:
        out = fn()
    except torch.OutOfMemoryError as e:
        out = f"out of memory: {str(e).splitlines()[0][:160]}"
        if device == "cuda":
            torch.cuda.empty_cache()
        return out, None, (torch.cuda.max_memory_allocated() / GIB if device == "cuda" else None)
    if device == "cuda":
        torch.cuda.synchronize()
    return out, time.perf_counter() - t, (torch.cuda.max_memory_allocated() / GIB if device == "cuda" else None)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[131072], help="lengths of the memory runs")
    p.add_argument("--check-length", type=int, default=8192, help="length of the exactness check (0: none)")
    p.add_argument("--smoke", action="store_true", help="tiny model on the CPU, fp32")
    p.add_argument("--out", default="")
    args = p.parse_args()
    from mcompile.backend import minference_backend
    import functools

    device = "cpu" if args.smoke else "cuda"
    dtype = torch.float32 if args.smoke else torch.bfloat16
    shape = SMOKE if args.smoke else GEMMA3_270M
    lengths = [1024] if args.smoke else args.lengths
    model = build(shape, device, dtype)
    rows = []

    def save():
        if args.out:
            with open(args.out, "w") as f:
                json.dump({"device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
                           "torch": torch.__version__, "shape": shape, "rows": rows}, f, indent=1)

    reports = []
    exact = functools.partial(minference_backend, report_sink=reports.append,
                              options={"dense_below": 0, "default_pattern": {"kind": "dense"}, "logits": "last"})
    default = functools.partial(minference_backend, options={"logits": "last", "dense_below": 0 if args.smoke else 24576})
    for n in lengths:  # the memory runs first: they are what the long lengths are for
        ids = torch.randint(0, shape["vocab_size"], (1, n), device=device)
        for case, backend in (("minference", default), ("inductor", "inductor")):
            torch._dynamo.reset()
            compiled = torch.compile(model, backend=backend, dynamic=False)
            _, first_s, _ = timed(lambda: forward(compiled, ids), device)  # compile + first run
            out, sec, peak = timed(lambda: forward(compiled, ids), device)
            row = {"n": n, "case": case, "first_call_s": first_s, "seconds": sec, "peak_gib": peak,
                   "error": out if isinstance(out, str) else None}
            rows.append(row)
            print(f"{case:10s} N={n:>7}: " + (f"{1000 * sec:9.1f} ms, peak {peak} GiB" if sec is not None
                                               else f"{out} (peak {peak} GiB)"), flush=True)
            save()
            del compiled
            if device == "cuda":
                torch.cuda.empty_cache()
    n = 512 if args.smoke else args.check_length
    if n:
        ids = torch.randint(0, shape["vocab_size"], (1, n), device=device)
        ref = forward(model, ids)
        torch._dynamo.reset()
        ind = forward(torch.compile(model, backend="inductor"), ids)
        torch._dynamo.reset()
        out = forward(torch.compile(model, backend=exact), ids)
        scale = ref.abs().max().item()
        err, ind_err = (out - ref).abs().max().item() / scale, (ind - ref).abs().max().item() / scale
        ok = err <= max(2 * ind_err, 1e-2)
        sites = [s for r in reports for s in r.sites]
        sliding = sum("sliding window" in (s.pattern_source or "") for s in sites)
        rows.append({"n": n, "case": "check", "rel_err": err, "inductor_rel_err": ind_err, "ok": ok,
                     "sliding_sites": sliding, "sites": len(sites), "rewritten": sum(s.rewritten for s in sites)})
        print(f"check N={n}: minference (sliding layers sparse, global dense) rel err {err:.2e}, inductor "
              f"{ind_err:.2e} -> {'ok' if ok else 'FAIL'}; {sliding} sliding sites of {len(sites)}", flush=True)
        save()

if __name__ == "__main__":
    main()
