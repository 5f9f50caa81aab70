"""Command line: ``mcompile demo`` and ``mcompile explain`` (also ``python -m mcompile``)."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
import time

import torch

from .options import pattern_arg


# Modules that add subcommands through ``add_commands(subparsers)``.
COMMAND_MODULES: tuple = ("mcompile.tools.db_commands", "mcompile.tools.eval")


def _device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def _timed_prefill(model, ids) -> float:
    """Time to first token: ``generate`` with one new token, as ``needle.answer`` calls it, so
    that the answer reuses the compiled prefill graph (a forward call with ``use_cache=False``
    would compile a third graph per backend)."""
    kw = dict(attention_mask=torch.ones_like(ids), max_new_tokens=1, do_sample=False)
    with torch.no_grad():
        model.generate(ids, **kw)  # compile (first call)
        if ids.is_cuda:
            torch.cuda.synchronize()
        t = time.perf_counter()
        model.generate(ids, **kw)
        if ids.is_cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - t


def demo(args) -> int:
    from .. import explain
    from .models import load_smollm2
    from .needle import answer, needle_prompt

    device = _device(args.device)
    compiler = args.compiler
    if compiler == "auto":  # Inductor takes minutes to compile the 30 layers on a CPU
        compiler = "inductor" if device == "cuda" else "eager"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    print(f"loading SmolLM2-135M-Instruct (real weights, {dtype}, {device}) ...", flush=True)
    model, tok = load_smollm2(dtype=dtype, device=device, yarn_factor=args.yarn)
    prompt = needle_prompt(tok, args.length, args.depth)
    prompt = type(prompt)(prompt.input_ids.to(device), prompt.value, prompt.depth)
    n = prompt.input_ids.shape[1]
    print(f"prompt: {n} tokens of Python documentation, a password hidden at {args.depth:.0%} depth; "
          f"graphs run by {compiler}", flush=True)
    options = {"dense_below": args.dense_below, "compiler": compiler}
    if args.pattern is not None:  # one pattern for every head instead of the shipped database
        options.update(default_pattern=args.pattern, pattern_db=None)
    results = {}
    from ..backend import minference_backend  # the callable: works without the installed entry point

    for name, backend, opts in (("dense", "inductor", None), ("minference", minference_backend, options)):
        torch._dynamo.reset()
        model._compiled_call_impl = None
        kwargs = {"options": opts} if opts else {}
        if name == "dense" and compiler != "inductor":
            backend = compiler
        print(f"[{name}] compiling and prefilling ...", flush=True)
        model.compile(backend=backend, dynamic=True, **kwargs)
        t0 = time.perf_counter()
        prefill = _timed_prefill(model, prompt.input_ids)
        compile_and_first = time.perf_counter() - t0 - prefill
        text = tok.decode(answer(model, prompt, max_new_tokens=8)).strip()
        results[name] = (text, prefill, compile_and_first)
        mark = "found" if prompt.passed(text) else "MISSED"
        print(f"[{name}] answer: {text!r} ({mark}); time to first token {prefill:.2f} s (compile + first call {compile_and_first:.1f} s)",
              flush=True)
    print("\nwhat minference rewrote:")  # explain looks through model.compile: it traces the model as written
    print(explain(model, prompt.input_ids, options=options, use_cache=False).summary())
    d, m = results["dense"], results["minference"]
    print(f"\npassword {prompt.value}: dense {'found' if prompt.passed(d[0]) else 'missed'}, "
          f"minference {'found' if prompt.passed(m[0]) else 'missed'}; time to first token dense {d[1]:.2f} s, "
          f"minference {m[1]:.2f} s on {device}")
    if device == "cpu":
        print("(on CPU the sparse ops run their PyTorch reference, which is not faster than dense; "
              "the speed-up comes from the Triton kernels on a GPU at long lengths: see docs/BENCHMARKS.md)")
    return 0 if prompt.passed(m[0]) or not prompt.passed(d[0]) else 1


def explain_cmd(args) -> int:
    from .. import explain
    from .models import load_smollm2, tiny_llama

    if args.model == "smollm2":
        model, _ = load_smollm2()
    else:
        model = tiny_llama(layers=2)
    ids = torch.randint(0, model.config.vocab_size, (1, args.length))
    options = {"dense_below": args.dense_below}
    if args.pattern:
        options["default_pattern"] = args.pattern
    if args.pattern_db:
        options["pattern_db"] = None if args.pattern_db == "none" else args.pattern_db
    e = explain(model, ids, options=options, use_cache=False, length=args.at or args.length)
    print(e.table())
    if args.graph:
        print(e.graph_code())
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="mcompile", description="Dynamic sparse attention for long prefill, "
                                     "as the torch.compile backend 'minference'.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what the backend does")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="needle retrieval on SmolLM2-135M: dense vs minference")
    p.add_argument("--length", type=int, default=4096, help="prompt tokens (default 4096)")
    p.add_argument("--depth", type=float, default=0.5, help="needle depth in 0..1 (default 0.5)")
    p.add_argument("--pattern", type=pattern_arg, default=None,
                   help="one pattern for every head, e.g. block_mass:0.95 or vertical_slash:128,256 "
                        "(default: the default pattern, block_mass:0.985,8,max,1)")
    p.add_argument("--dense-below", type=int, default=0, help="dense below this length (default 0: always sparse)")
    p.add_argument("--compiler", default="auto", choices=["auto", "inductor", "aot_eager", "eager"],
                   help="what runs the graphs (auto: inductor on GPU, eager on CPU)")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto")
    p.add_argument("--yarn", type=float, default=None, help="extend RoPE with YaRN by this factor")
    p.set_defaults(fn=demo)

    p = sub.add_parser("explain", help="what the backend rewrites in a model, and why")
    p.add_argument("--model", default="smollm2", choices=["smollm2", "tiny"])
    p.add_argument("--length", type=int, default=256, help="example input length")
    p.add_argument("--at", type=int, default=None, help="report densities at this length")
    p.add_argument("--pattern", type=pattern_arg, default=None)
    p.add_argument("--pattern-db", default=None, help="path, shipped name, 'auto' or 'none'")
    p.add_argument("--dense-below", type=int, default=0)
    p.add_argument("--graph", action="store_true", help="print the rewritten graph")
    p.set_defaults(fn=explain_cmd)

    for name in COMMAND_MODULES:  # commands that live beside what they run
        importlib.import_module(name).add_commands(sub)

    args = parser.parse_args(argv)
    if args.verbose:
        logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
