"""Time to first token of long prompts on one GPU: plain Inductor (dense cuDNN SDPA) against the
minference backend, in one process, with compile time, graph count and peak memory.

    PYTHONPATH=. python benchmarks/e2e.py --model llama8b --lengths 32768 131072 --out r.json
    PYTHONPATH=. python benchmarks/e2e.py --model llama8b --lengths 1048576 --cases ashape dense-mem --fit
    PYTHONPATH=. python benchmarks/e2e.py --smoke --out /tmp/smoke.json          # CPU, tiny model

Models: ``llama8b``: transformers' LlamaConfig with Llama-3-8B's shape (32 layers, 32 query / 8 KV
heads, head dim 128, intermediate 14336, vocab 128256), random bf16 weights; ``smollm2``:
SmolLM2-135M with real weights, RoPE extended by YaRN, real text (mcompile.tools.data.haystack).

Every forward is a prefill without a KV cache (``use_cache=False``: the 1M-token cache of
Llama-3-8B is 128 GiB in bf16, more than the GPU and, at 128 GiB, as much as the host's memory)
that returns the last position's logits: dense gets ``logits_to_keep=1`` (what ``generate()``
passes), minference computes them through its ``logits="last"`` pass. Attention is
transformers' SDPA call with ``is_causal=True`` and no mask (registered below): transformers
5.17 otherwise builds an N x N mask under compile, which does not fit at 128K and keeps SDPA off
cuDNN. cuDNN is put first in SDPA's backend priority.

Cases (--cases):
  dense      backend="inductor": the baseline.
  dense-mem  minference with every head dense: Inductor's SDPA (cuDNN) with the memory passes
             (chunked MLP, last-position logits). The baseline where plain Inductor runs out of
             memory (at 512K-1M the MLP's N x 14336 intermediates alone exceed 80 GB).
  ashape     minference, A-shape (sink 1000, local 6096) on every head: the same budgets as the
             default vertical-slash (1000 verticals, 6096 diagonals) laid out as a clustered
             index (verticals at the start, diagonals next to the main one), i.e. the kernel work
             of a vertical-slash index whose selections cluster, independent of the random Q/K.
             A-shape skips estimation, so the table adds the measured estimation cost of
             vertical-slash per layer ("+est": the isolated call's wall time, host overhead included).
  ashape-est the realistic figure: the ashape case with vertical-slash's estimation run in the model
             too, in every layer on that layer's Q/K (budgets as vs), its index dropped: the
             A-shape kernel work plus the estimation's GPU work, measured in place.
  vs         vertical-slash 1000/6096 (MInference's default budgets, the package's default
             until 2026-12-06) on the model's Q/K; on the random model the degenerate case (no
             structure: diagonals scatter, nearly every tile is computed).
  default    minference with its default options (patterns.DEFAULT_BLOCK_MASS; block-mass, recall 0.985
             of the max tile score, 8 rows per block shared with the neighbouring blocks, since
             2026-12-07 afternoon; 0.98 of it that morning; 0.99 without the neighbours from
             2026-12-06 evening; 0.98 of the mass before).
All minference cases keep the default dense_below (mcompile.config.DEFAULT_DENSE_BELOW): shorter prompts run dense.

--structured (llama8b): every attention takes benchmarks/kernels.py's clustered Q/K (sinks, vertical
  columns, local and far bands) instead of the random model's, in every case alike, so that the
  default's estimated index has structure to find (the random model's own Q/K have none).

--fit: instead of the full model, time 1- and 2-layer models with the same shapes and report
  per-layer time and ``fixed + 32 x per_layer`` (marked "fit"): dense at 512K-1M takes minutes
  per forward. Run an ``ashape`` length both ways to see the fit's error.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import math
import statistics
import time

import torch
import torch.nn.functional as F

from mcompile.backend import minference_backend
from mcompile.config import DEFAULT_DENSE_BELOW

ATTN_IMPL = "mcompile_causal_sdpa"
LLAMA8B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, head_dim=128, vocab_size=128256, rope_theta=500000.0, rms_norm_eps=1e-5)
SMOKE = dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16, vocab_size=256, rope_theta=500000.0, rms_norm_eps=1e-5)
VS = {"kind": "vertical_slash", "vertical": 1000, "slash": 6096}  # MInference's default budgets
ASHAPE = {"kind": "a_shape", "sink": VS["vertical"], "local": VS["slash"]}  # same budgets, clustered
BUDGET_LENGTH = 131072  # budgets hold from 128K and shrink below, as for the built-in default
SMOLLM2_CONTEXT = 8192
# Correctness check at --check-length: a case's max |dlogit| / max |logit| against the model run
# eagerly in fp32 must be at most CHECK_FACTOR x that of the same model run eagerly in the
# benchmark's dtype (flash-attention's rule: at most twice PyTorch's own same-dtype error), or
# CHECK_FLOOR, whichever is larger (fp32 runs have no same-dtype error to compare with).
CHECK_FACTOR = 2.0
CHECK_FLOOR = 1e-3
GIB = 2 ** 30
SMOKE_DENSE_BELOW = 256  # --smoke: the check length (128) runs dense, 256 and 512 sparse


def causal_sdpa(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers attention function: causal SDPA without a mask, for unpadded prompts: a
    prefill (as many queries as keys) or a one-token decode step (the query sees every key). A
    chunk after a cached prefix (``long_generate.py --prefill-chunk``) gets its bottom-right causal
    mask built from positions, which minference proves causal and drops (plain Inductor would
    materialise it: chunks are for the minference cases)."""
    if attention_mask is not None:
        raise ValueError(f"{ATTN_IMPL} takes no attention_mask (unpadded prompts only)")
    n_q, n_k = query.shape[2], key.shape[2]
    if getattr(module, "structured_q", None) is not None:  # --structured: the clustered Q/K instead
        query = query * 0 + module.structured_q[:, :, n_k - n_q:n_k]
        key = key * 0 + module.structured_k[:, :, :n_k]
    sdpa = functools.partial(F.scaled_dot_product_attention, query, key, value, scale=scaling,
                             enable_gqa=query.shape[1] != key.shape[1])
    if n_q != 1 and n_q != n_k:  # SDPA's is_causal aligns the mask top-left: build the bottom-right one
        keys = torch.arange(n_k, device=query.device)
        rows = torch.arange(n_q, device=query.device) + (n_k - n_q)
        out = sdpa(attn_mask=keys[None, :] <= rows[:, None])
        return out.transpose(1, 2).contiguous(), None
    # a branch, not is_causal=(n_q != 1): under dynamic shapes that is a SymBool SDPA refuses
    out = sdpa(is_causal=True) if n_q != 1 else sdpa()
    return out.transpose(1, 2).contiguous(), None


def register_attention():
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(ATTN_IMPL, causal_sdpa)
    AttentionMaskInterface.register(ATTN_IMPL, lambda *args, **kwargs: None)


CASES = ["dense", "dense-mem", "ashape", "ashape-est", "vs", "default"]


def _top_level_split(text: str) -> list:
    """Split on the commas outside JSON brackets and strings (a case option's value may be a pattern
    as JSON: ``default@default_pattern={"kind":"block_mass","recall":0.98}``)."""
    items, depth, quoted, start = [], 0, False, 0
    for i, ch in enumerate(text):
        if ch == '"':
            quoted = not quoted
        elif not quoted and ch in "{[":
            depth += 1
        elif not quoted and ch in "}]":
            depth -= 1
        elif not quoted and depth == 0 and ch == ",":
            items.append(text[start:i])
            start = i + 1
    items.append(text[start:])
    return items


def parse_case(case: str) -> tuple:
    """``"ashape@rope_once=false,mlp_chunk=32768"`` -> ("ashape", {"rope_once": False, "mlp_chunk": 32768}):
    a case with extra minference options, for A/B runs in one process."""
    name, _, extra = case.partition("@")
    if name not in CASES:
        raise ValueError(f"unknown case {name!r} (cases: {CASES})")
    options = {}
    for item in filter(None, _top_level_split(extra)):
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"case option {item!r} is not KEY=VALUE")
        options[key] = json.loads(value.lower() if value.lower() in ("true", "false", "null") else value)
    if options and name == "dense":
        raise ValueError("dense is plain Inductor: it takes no minference options")
    return name, options


def case_backend(case: str, dense_below: int, sinks: dict):
    """(backend, needs logits_to_keep=1) of a case."""
    case, extra = parse_case(case)
    if case == "dense":
        return "inductor", True
    options = {"logits": "last", "dense_below": dense_below}
    if case == "dense-mem":
        options["default_pattern"] = {"kind": "dense"}
    elif case in ("ashape", "ashape-est"):
        options.update(default_pattern=ASHAPE, budget_length=BUDGET_LENGTH)
    elif case == "vs":
        options.update(default_pattern=VS, budget_length=BUDGET_LENGTH)
    options.update(extra)
    return functools.partial(minference_backend, options=options, report_sink=sinks["attention"].append,
                             memory_sink=sinks["memory"].append), False


def build_model(args, layers=None):
    from transformers import AutoModelForCausalLM, LlamaConfig

    if args.model == "smollm2":
        from mcompile.tools.models import load_smollm2

        factor = args.yarn_factor or max(16, math.ceil(max(args.lengths) / SMOLLM2_CONTEXT))
        model, tok = load_smollm2(dtype=args.dtype, attn_implementation=ATTN_IMPL, yarn_factor=factor,
                                  device=args.device)
        return model, tok, factor
    shape = dict(SMOKE if args.smoke else LLAMA8B)
    if layers:
        shape["num_hidden_layers"] = layers
    config = LlamaConfig(**shape, max_position_embeddings=max(args.lengths), tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.device(args.device):
        model = AutoModelForCausalLM.from_config(config, dtype=args.dtype, attn_implementation=ATTN_IMPL)
    if args.structured:
        structure_attention(model, max(args.lengths + [args.check_length]), args)
    return model.eval(), None, None


def structure_attention(model, n: int, args) -> None:
    """--structured: every attention of the random model takes benchmarks/kernels.py's clustered Q/K
    (sinks, vertical columns, local and far bands, as real long-context heads have) in place of
    its own, kept as one pair of (non-persistent) buffers shared by all layers, so that an index
    built from the Q/K (the default, block-mass) has the structure to find. The model's own Q/K
    are still computed (``q * 0 + structured``), in every case alike."""
    from benchmarks.kernels import clustered_qk

    cfg = model.config
    q, k = clustered_qk(n, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, device=args.device)
    q, k = q.to(args.dtype), k.to(args.dtype)
    for layer in model.model.layers:
        layer.self_attn.register_buffer("structured_q", q, persistent=False)
        layer.self_attn.register_buffer("structured_k", k, persistent=False)


@contextlib.contextmanager
def _structured_as_attributes(model):
    """--structured: the shared Q/K buffers as plain attributes for a while, so that ``Module.to``
    leaves them alone (it would convert a copy per layer: 32 x 2.5 GiB at 128K in fp32). Compiled
    cases keep them as buffers: as plain tensor attributes they become graph inputs of their own."""
    held = [m for m in model.modules() if "structured_q" in m._buffers]
    for m in held:
        q, k = m._buffers.pop("structured_q"), m._buffers.pop("structured_k")
        m.structured_q, m.structured_k = q, k
    try:
        yield
    finally:
        for m in held:
            q, k = m.__dict__.pop("structured_q"), m.__dict__.pop("structured_k")
            m.register_buffer("structured_q", q, persistent=False)
            m.register_buffer("structured_k", k, persistent=False)


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn, reps):
    times = []
    for _ in range(reps):
        sync()
        t = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def kernel_profile(fn, top: int) -> dict:
    """GPU time of one call of ``fn`` by kernel name (torch.profiler): total and the ``top`` largest
    (CPU time by op under --smoke)."""
    from torch.profiler import ProfilerActivity, profile

    gpu = torch.cuda.is_available()
    sync()
    with profile(activities=[ProfilerActivity.CUDA if gpu else ProfilerActivity.CPU]) as prof:
        fn()
        sync()
    by_name = {}
    for e in prof.key_averages():
        us = (getattr(e, "self_device_time_total", None) if gpu else e.self_cpu_time_total)
        if us is None:
            us = getattr(e, "self_cuda_time_total", 0)
        if us > 0:
            ms, calls = by_name.get(e.key, (0.0, 0))
            by_name[e.key] = (ms + us / 1e3, calls + e.count)
    ranked = sorted(by_name.items(), key=lambda kv: -kv[1][0])
    return {"total_ms": sum(ms for ms, _ in by_name.values()),
            "top": [{"kernel": name[:160], "ms": ms, "calls": calls} for name, (ms, calls) in ranked[:top]]}


def print_profile(case: str, n: int, prof: dict) -> None:
    print(f"  profile {case} N={n}: {prof['total_ms']:.1f} ms of kernels", flush=True)
    for r in prof["top"]:
        print(f"    {r['ms']:9.2f} ms {r['calls']:6d}x  {r['kernel'][:110]}", flush=True)


def rel_err(x, ref) -> float:
    return ((x - ref).abs().max() / ref.abs().max()).item()


@contextlib.contextmanager
def vs_estimation_in_model():
    """While active, every estimation call also builds the vertical-slash index of the same
    Q/K (VS budgets, scaled to the length as the op scales the case's) and drops it; yields
    a one-item list counting those calls."""
    from mcompile.kernels import dispatch
    from mcompile.patterns import DEFAULT_BUDGET_EXPONENT, PatternKind, scale_lists

    original = dispatch.estimate_impl
    calls = [0]

    def estimate_impl(q):
        impl = original(q)

        def both(q, k, key_padding, kinds, p0, p1, scale, capacity=None):
            h, n = q.shape[1], k.shape[2]
            vs = [int(PatternKind.VERTICAL_SLASH)] * h
            v0, v1 = scale_lists(vs, [VS["vertical"]] * h, [VS["slash"]] * h, n, BUDGET_LENGTH,
                                 DEFAULT_BUDGET_EXPONENT)
            impl(q, k, key_padding, vs, v0, v1, scale)
            calls[0] += 1
            return impl(q, k, key_padding, kinds, p0, p1, scale, capacity=capacity)

        return both

    dispatch.estimate_impl = estimate_impl
    try:
        yield calls
    finally:
        dispatch.estimate_impl = original


def run_case(model, case, tokens, args, check):
    """Compile ``model`` for ``case`` (dynamic=True) and prefill every length: rows of results."""
    if parse_case(case)[0] != "ashape-est":
        return _run_case(model, case, tokens, args, check)
    with vs_estimation_in_model() as calls:
        rows, summary = _run_case(model, case, tokens, args, check)
    summary["vs_estimations"] = calls[0]
    return rows, summary


def _run_case(model, case, tokens, args, check):
    sinks = {"attention": [], "memory": []}
    backend, keep_one = case_backend(case, args.dense_below, sinks)
    torch._dynamo.reset()
    model._compiled_call_impl = None
    graphs0 = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    model.compile(backend=backend, dynamic=True)
    kw = {"use_cache": args.kv != "none", **({"logits_to_keep": 1} if keep_one else {})}
    rows, compile_s = [], None

    def forward(ids):
        cache = {}
        if args.kv != "none":
            from transformers import DynamicCache

            cache["past_key_values"] = DynamicCache(config=model.config, offloading=args.kv == "offload")
        with torch.inference_mode():
            out = model(ids, **kw, **cache).logits
        if out.shape[1] != 1:
            raise RuntimeError(f"{case}: logits for {out.shape[1]} positions, expected the last one only")
        return out[0, -1].float()

    for n in sorted(set([args.check_length] + args.lengths)):
        row = {"case": case, "length": n}
        try:
            sync()
            t0 = time.perf_counter()
            logits = forward(tokens[:, :n])
            sync()
            first = time.perf_counter() - t0
            if n == args.check_length:
                row["rel_err"] = rel_err(logits, check["ref"])
                row["same_top1"] = bool(logits.argmax() == check["ref"].argmax())
                row["check_ok"] = row["rel_err"] <= check["tol"]
            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()
            reps = args.reps if n <= args.long_from else args.long_reps
            row["ms"] = timed(functools.partial(forward, tokens[:, :n]), reps) * 1e3
            row["first_s"] = first
            row["peak_gib"] = torch.cuda.max_memory_allocated() / GIB if torch.cuda.is_available() else None
            if compile_s is None:
                compile_s = first - row["ms"] / 1e3
            if n in args.profile:
                row["profile"] = kernel_profile(functools.partial(forward, tokens[:, :n]), args.profile_top)
                print_profile(case, n, row["profile"])
        except torch.OutOfMemoryError as exc:
            row["error"] = f"out of memory: {str(exc).splitlines()[0]}"
        rows.append(row)
        if "error" in row:
            torch.cuda.empty_cache()
            print(f"  {case:9} N={n:8d}  {row['error'][:100]}", flush=True)
            break  # longer prompts need more memory still
        print(f"  {case:9} N={n:8d}  {row['ms']:10.1f} ms  first call {row['first_s']:7.1f} s  "
              f"peak {row['peak_gib'] or 0:5.1f} GiB", flush=True)
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs0
    summary = {"graphs": graphs, "compile_s": compile_s}
    if sinks["attention"]:
        a, m = sinks["attention"][-1], sinks["memory"][-1]
        summary.update(attention_rewritten=a.rewritten, attention_sites=len(a.sites),
                       chunked_mlp=m.applied("chunked_mlp"), last_logits=m.applied("last_logits"),
                       rope_once=m.applied("rope_once"), store_residual=m.applied("store_residual"),
                       quadratic=[s.reason for s in m.sites if s.pass_name == "quadratic"])
    return rows, summary


def estimation_ms(model, n, args) -> float:
    """Per-layer cost of vertical-slash estimation minus A-shape's (which has none), on random
    Q/K of the model's attention shape."""
    from mcompile.ops import estimate_index

    cfg = model.config
    h, hk, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    q = torch.randn(1, n, h, d, device=args.device, dtype=args.dtype).transpose(1, 2)  # (B, H, N, D) view
    k = torch.randn(1, n, hk, d, device=args.device, dtype=args.dtype).transpose(1, 2)
    cost = {}
    for name, (kind, p0, p1) in {"vs": (2, VS["vertical"], VS["slash"]),
                                 "ashape": (1, ASHAPE["sink"], ASHAPE["local"])}.items():
        call = functools.partial(estimate_index, q, k, None, [kind] * h, [p0] * h, [p1] * h, d ** -0.5, 0,
                                 BUDGET_LENGTH)
        call()
        cost[name] = timed(call, 3) * 1e3
    del q, k
    return cost["vs"] - cost["ashape"]


def measure(args, tokens, layers=None):
    model, _, _ = build_model(args, layers) if layers else (args.model_obj, None, None)
    ids = tokens[:, :args.check_length]

    def eager():
        with torch.inference_mode():
            return model(ids, use_cache=False, logits_to_keep=1).logits[0, -1].float()

    same_dtype = eager()
    # The fp32 reference runs the model cast to fp32 and back; the cast back would also turn the
    # fp32 buffers (RoPE's inv_freq) into bf16 and change every later run, so they are restored.
    buffers = {name: b.clone() for name, b in model.named_buffers()}
    cast = torch.nn.Module.to  # transformers' own .float() refuses models loaded from GGUF
    with _structured_as_attributes(model):  # one shared copy, not one per layer, through the casts
        ref = eager() if args.dtype == torch.float32 else (cast(model, torch.float32), eager(), cast(model, args.dtype))[1]
    for name, b in model.named_buffers():
        b.data = buffers[name]
    check = {"ref": ref, "eager_err": rel_err(same_dtype, ref)}
    check["tol"] = max(CHECK_FACTOR * check["eager_err"], CHECK_FLOOR)
    print(f"check at N={args.check_length}: eager {args.dtype} vs fp32 rel err {check['eager_err']:.1e}, "
          f"tolerance {check['tol']:.1e}", flush=True)
    rows, summaries = [], {"check": {k: v for k, v in check.items() if k != "ref"}}
    for case in args.cases:
        case_rows, summaries[case] = run_case(model, case, tokens, args, check)
        rows += case_rows
    return model, rows, summaries


def fit_rows(rows1, rows2, layers):
    """fixed + layers x per_layer from 1- and 2-layer timings of the same case and length."""
    by = {(r["case"], r["length"]): r for r in rows1 if "ms" in r}
    out = []
    for r2 in rows2:
        r1 = by.get((r2["case"], r2["length"]))
        if r1 is None or "ms" not in r2:
            out.append({**r2, "fit": True})
            continue
        per_layer = r2["ms"] - r1["ms"]
        out.append({**r2, "ms": r1["ms"] + (layers - 1) * per_layer, "per_layer_ms": per_layer, "fit": True,
                    "peak_gib_2_layers": r2.get("peak_gib")})
    return out


def print_table(rows, est, layers):
    base = {}
    for r in rows:
        if r["case"] in ("dense", "dense-mem") and "ms" in r:
            base.setdefault(r["length"], r["ms"])  # dense first, dense-mem where dense failed
    print(f"\n{'case':10} {'N':>8} {'TTFT ms':>11} {'vs dense':>8} {'+est ms':>9} {'vs dense':>8} "
          f"{'peak GiB':>8} {'check':>12}")
    for r in rows:
        if "ms" not in r:
            print(f"{r['case']:10} {r['length']:8d} {r.get('error', 'no result')[:60]}")
            continue
        fit = "~" if r.get("fit") else " "
        speed = f"{base[r['length']] / r['ms']:7.2f}x" if r["length"] in base else "       -"
        extra = speed2 = ""
        if parse_case(r["case"])[0] == "ashape" and r["length"] in est:
            plus = r["ms"] + layers * est[r["length"]]
            extra = f"{plus:9.1f}"
            speed2 = f"{base[r['length']] / plus:7.2f}x" if r["length"] in base else ""
        check = (f"{r['rel_err']:.1e} {'ok' if r['check_ok'] else 'FAIL'}" if "rel_err" in r else "")
        peak = f"{r['peak_gib']:8.1f}" if r.get("peak_gib") is not None else f"{'-':>8}"
        print(f"{r['case']:10} {r['length']:8d} {fit}{r['ms']:10.1f} {speed} {extra:>9} {speed2:>8} {peak} {check:>12}")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=["llama8b", "smollm2"], default="llama8b")
    p.add_argument("--lengths", type=int, nargs="+", default=[32768, 131072])
    p.add_argument("--cases", nargs="+", default=["dense", "ashape", "vs"],
                   help=f"{CASES}; CASE@KEY=VALUE,... adds minference options (ashape@rope_once=false)")
    p.add_argument("--fit", action="store_true", help="time 1- and 2-layer models and extrapolate")
    p.add_argument("--check-length", type=int, default=4096, help="length of the correctness check")
    p.add_argument("--dense-below", type=int, default=DEFAULT_DENSE_BELOW)
    p.add_argument("--reps", type=int, default=3, help="timed repetitions (median) up to --long-from")
    p.add_argument("--long-from", type=int, default=262144, help="longer prompts are timed --long-reps times")
    p.add_argument("--long-reps", type=int, default=1)
    p.add_argument("--yarn-factor", type=float, default=None, help="smollm2: default max(16, N / 8192)")
    p.add_argument("--no-estimation", action="store_true", help="skip the estimation-cost measurement")
    p.add_argument("--kv", choices=["none", "gpu", "offload"], default="none",
                   help="none: prefill only (the default; the only one that fits 1M on one GPU); gpu: "
                        "keep a DynamicCache; offload: transformers' offloaded DynamicCache (K/V in host "
                        "memory: 4 GiB per layer at 1M for Llama-3-8B, 128 GiB in all; under compile on transformers "
                        "5.17 it recompiles per layer and crashed, plain Inductor too: docs/BENCHMARKS.md)")
    p.add_argument("--ashape-budgets", default=None,
                   help="sink,local of the ashape case (default 1000,6096); the estimation cost added to it "
                        "is vertical-slash's at the same budgets")
    p.add_argument("--smoke", action="store_true", help="tiny random Llama on CPU, fp32 (dry run)")
    p.add_argument("--structured", action="store_true",
                   help="llama8b: attention on clustered Q/K (benchmarks/kernels.py) instead of the random model's, "
                        "so that the default's estimated index has structure to find")
    p.add_argument("--profile", type=int, nargs="*", default=[],
                   help="lengths at which one more forward runs under torch.profiler: GPU time by kernel")
    p.add_argument("--profile-top", type=int, default=25, help="kernels listed per profile")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args()
    if args.ashape_budgets:
        sink, local = (int(x) for x in args.ashape_budgets.split(","))
        ASHAPE.update(sink=sink, local=local)
        VS.update(vertical=sink, slash=local)
    if args.fit and args.model != "llama8b":
        p.error("--fit builds 1- and 2-layer models of the llama8b shape only")
    if args.structured and args.model != "llama8b":
        p.error("--structured replaces the Q/K of the random llama8b-shaped model only")
    args.device = "cpu" if args.smoke else "cuda"
    args.dtype = torch.float32 if args.smoke else torch.bfloat16
    if args.smoke:
        args.lengths, args.check_length = [l for l in args.lengths if l <= 1024] or [256, 512], 128
        args.reps = args.long_reps = 1
        args.dense_below = min(args.dense_below, SMOKE_DENSE_BELOW)
    import transformers

    device = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    info = {"device": device, "torch": torch.__version__, "transformers": transformers.__version__}
    print(" ".join(f"{k}: {v}" for k, v in info.items()), flush=True)
    for case in args.cases:
        parse_case(case)  # bad case names fail before the model is built
    register_attention()
    model, tok, factor = build_model(args, layers=1 if args.fit else None)
    n_max = max(args.lengths + [args.check_length])
    if tok is not None:
        from mcompile.tools.data import haystack

        tokens = torch.tensor([haystack(tok, n_max)], device=args.device)
    else:
        tokens = torch.randint(0, model.config.vocab_size, (1, n_max), generator=torch.Generator().manual_seed(0))
        tokens = tokens.to(args.device)
    layers = LLAMA8B["num_hidden_layers"] if not args.smoke else SMOKE["num_hidden_layers"]
    if args.model == "smollm2":
        layers = model.config.num_hidden_layers
    backends = [torch.nn.attention.SDPBackend.CUDNN_ATTENTION, torch.nn.attention.SDPBackend.FLASH_ATTENTION,
                torch.nn.attention.SDPBackend.EFFICIENT_ATTENTION, torch.nn.attention.SDPBackend.MATH]
    with torch.nn.attention.sdpa_kernel(backends, set_priority=True):
        args.model_obj = model
        if args.fit:
            _, rows1, summaries = measure(args, tokens)
            del model, args.model_obj
            _, rows2, _ = measure(args, tokens, layers=2)
            rows = fit_rows(rows1, rows2, layers)
        else:
            _, rows, summaries = measure(args, tokens)
        est = {}
        if any(parse_case(c)[0] == "ashape" for c in args.cases) and not args.no_estimation:
            cfg_model = args.model_obj if not args.fit else build_model(args, layers=1)[0]
            for n in args.lengths:
                if n >= args.dense_below:
                    est[n] = estimation_ms(cfg_model, n, args)
    cache = {"none": "prefill only (no KV cache)", "gpu": "KV cache on the GPU", "offload": "KV cache offloaded"}
    print(f"\nTTFT, {args.model}{' (smoke)' if args.smoke else ''}, batch 1, {cache[args.kv]}, "
          f"last-token logits; {'~: fitted from 1- and 2-layer models' if args.fit else 'full model'}")
    print_table(rows, est, layers)
    for case, s in summaries.items():
        if case == "check":
            continue
        print(f"{case}: " + ", ".join(f"{k}={v:.1f}" if isinstance(v, float) else f"{k}={v}"
                                      for k, v in s.items() if k != "quadratic" or v))
    failed = [r for r in rows if r.get("check_ok") is False]
    result = {**info, "model": args.model, "yarn_factor": factor, "fit": args.fit, "structured": args.structured,
              "layers": layers,
              "cases": args.cases, "kv": args.kv, "dense_below": args.dense_below, "rows": rows, "summaries": summaries,
              "estimation_ms_per_layer": est, "check_failed": len(failed)}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    if failed:
        raise SystemExit(f"correctness check failed for {[r['case'] for r in failed]}")


if __name__ == "__main__":
    main()
