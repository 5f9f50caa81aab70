"""Compile time of the minference backend against plain Inductor, on any device (CPU included).

    PYTHONPATH=. python benchmarks/compile_time.py [--layers 32] [--configs inductor minference ...] [--profile]

A random-weight Llama of 32 layers with small sizes (hidden 256, 8 query / 2 KV heads, head dim 32,
intermediate 512, vocabulary 1000), compiled with ``dynamic=True``; the time of the first call
(Dynamo + AOTAutograd + Inductor + C++/Triton compile, plus one tiny forward) is the compile time.
Each configuration runs in a fresh process with a fresh Inductor cache directory, one at a time.
``inline_kernels=True`` gives the graph the structure it has on CUDA (the length test, the
density check and the kernel op in conditionals; the MLP's conditional) on any device. The breakdown is ``torch._dynamo.utils.compile_times()``;
``--profile`` adds cProfile's top cumulative functions.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

CONFIGS = {
    "inductor": None,
    "minference": {"inline_kernels": True},
    "minference, dense_below=0": {"inline_kernels": True, "dense_below": 0},
    "minference, chunk_mlp=False": {"inline_kernels": True, "chunk_mlp": False},
    "minference, inline_kernels=False": {"inline_kernels": False},
    "minference, inline_kernels=False, chunk_mlp=False": {"inline_kernels": False, "chunk_mlp": False},
}
# Compile-time phases of torch._dynamo.utils.compile_times() worth a column (cumulative seconds).
PHASES = ["_compile.compile_inner", "create_aot_dispatcher_function", "compile_fx_inner", "GraphLowering.run",
          "GraphLowering.codegen", "async_compile.wait", "compile_file"]


def one(name: str, args) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    import mcompile  # noqa: F401  (registers the backend)

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=args.hidden, intermediate_size=2 * args.hidden, num_hidden_layers=args.layers,
                      num_attention_heads=8, num_key_value_heads=2, head_dim=args.hidden // 8, vocab_size=1000,
                      max_position_embeddings=4096)
    model = LlamaForCausalLM(cfg).eval()
    options = CONFIGS[name]
    if options is None:
        compiled = torch.compile(model, backend="inductor", dynamic=True)
    else:
        compiled = torch.compile(model, backend="minference", dynamic=True,
                                 options={"pattern_db": None, **options})
    ids = torch.randint(0, 1000, (1, args.length), generator=torch.Generator().manual_seed(1))
    prof = None
    if args.profile:
        import cProfile

        prof = cProfile.Profile()
        prof.enable()
    t = time.perf_counter()
    with torch.no_grad():
        out = compiled(ids, use_cache=False).logits
    seconds = time.perf_counter() - t
    if prof is not None:
        prof.disable()
        if os.environ.get("COMPILE_TIME_PSTATS"):
            prof.dump_stats(os.environ["COMPILE_TIME_PSTATS"])
        import io
        import pstats

        s = io.StringIO()
        pstats.Stats(prof, stream=s).sort_stats("cumulative").print_stats(args.profile_rows)
        print(s.getvalue(), file=sys.stderr)
    t = time.perf_counter()
    with torch.no_grad():
        compiled(ids, use_cache=False)
    second = time.perf_counter() - t
    from torch._dynamo.utils import compile_times, counters

    times = compile_times(repr="csv", aggregate=True)
    phases = dict(zip(*times)) if isinstance(times, tuple) else {}
    with torch.no_grad():
        ref = model(ids, use_cache=False).logits
    return {"name": name, "seconds": seconds, "second_call": second,
            "phases": {k: float(v) for k, v in phases.items()},
            "graphs": counters["stats"]["unique_graphs"], "max_abs_diff_vs_eager": (out - ref).abs().max().item(),
            "checksum": out.double().sum().item()}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--length", type=int, default=64)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--profile", action="store_true")
    p.add_argument("--profile-rows", type=int, default=60)
    p.add_argument("--one", help=argparse.SUPPRESS)
    p.add_argument("--json", help="append each result as one JSON line to this file")
    args = p.parse_args()
    if args.one:
        print("RESULT " + json.dumps(one(args.one, args)), flush=True)
        return
    results = []
    for rep in range(args.repeats):
        for name in args.configs:
            with tempfile.TemporaryDirectory() as cache:
                env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache, "TRITON_CACHE_DIR": os.path.join(cache, "t")}
                cmd = [sys.executable, __file__, "--one", name, "--layers", str(args.layers), "--hidden",
                       str(args.hidden), "--length", str(args.length)]
                if args.profile:
                    cmd += ["--profile", "--profile-rows", str(args.profile_rows)]
                proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if args.profile or proc.returncode:
                sys.stderr.write(proc.stderr[-200000:])
            line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
            if not line:
                print(f"{name}: failed (rc {proc.returncode})", flush=True)
                continue
            r = json.loads(line[-1][7:])
            results.append(r)
            if args.json:
                with open(args.json, "a") as f:
                    f.write(json.dumps(r) + "\n")
            ph = r["phases"]
            print(f"{name:50} {r['seconds']:7.2f} s  " + "  ".join(
                f"{k.split('.')[-1]}={ph.get(k, 0):.2f}" for k in PHASES) +
                f"  graphs={r['graphs']} diff={r['max_abs_diff_vs_eager']:.2e}", flush=True)
    base = [r["seconds"] for r in results if r["name"] == "inductor"]
    if base:
        b = min(base)
        print("\n| configuration | compile s | ratio |\n| --- | --- | --- |")
        for name in args.configs:
            s = [r["seconds"] for r in results if r["name"] == name]
            if s:
                print(f"| {name} | {min(s):.2f} | {min(s) / b:.2f}x |")


if __name__ == "__main__":
    main()
