"""``mcompile eval``: the accuracy harness from the command line (registered by ``add_commands``)."""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys

from ..options import pattern_arg
from .runner import PARTS, EvalSpec, run_eval


def _ints(text: str) -> tuple:
    try:
        return tuple(int(x) for x in text.split(",") if x)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _depths(text: str) -> tuple:
    try:
        values = tuple(float(x) for x in text.split(",") if x)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated depths in 0..1, got {text!r}") from None
    if not values or not all(0.0 <= v <= 1.0 for v in values):
        raise argparse.ArgumentTypeError(f"depths must lie in 0..1, got {text!r}")
    return values


def _parts(text: str) -> tuple:
    parts = tuple(p for p in text.split(",") if p)
    bad = sorted(set(parts) - set(PARTS))
    if bad:
        raise argparse.ArgumentTypeError(f"unknown part(s) {bad}; valid parts: {list(PARTS)}")
    return parts


def _pattern_db(text: str):
    return None if text.lower() == "none" else text


def add_commands(sub) -> None:
    """Register ``eval`` on a subparsers object."""
    p = sub.add_parser("eval", help="accuracy: needle grid, perplexity, attention recall (dense vs minference)")
    p.add_argument("--model", default="smollm2", help="'smollm2' (shipped GGUF), a model folder or a .gguf file")
    p.add_argument("--lengths", type=_ints, default=(2048, 4096, 6144, 8192), help="needle prompt lengths")
    p.add_argument("--depths", type=_depths, default=(0.1, 0.3, 0.5, 0.7, 0.9), help="needle depths in 0..1")
    p.add_argument("--parts", type=_parts, default=PARTS, help=f"what to run, of {','.join(PARTS)}")
    p.add_argument("--pattern-db", type=_pattern_db, default=None,
                   help="pattern database: path, shipped name, 'auto' or 'none' (default none: the default pattern)")
    p.add_argument("--pattern", type=pattern_arg, default=None,
                   help="default pattern, e.g. vertical_slash:1000,6096 (default: the built-in policy, scaled by length)")
    p.add_argument("--dense-below", type=int, default=0, help="prompts shorter than this stay dense (default 0)")
    p.add_argument("--budget-length", type=int, default=None, help="reference length of the pattern's budgets")
    p.add_argument("--budget-exponent", type=float, default=None, help="exponent of the budget scaling")
    p.add_argument("--compiler", default="auto", choices=["auto", "inductor", "aot_eager", "eager"],
                   help="dense backend and minference compiler (auto: inductor on GPU, eager on CPU; "
                        "eager runs the dense model uncompiled)")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="auto: float32 on CPU, bfloat16 on GPU")
    p.add_argument("--yarn", type=float, default=None, help="extend RoPE with YaRN by this factor (smollm2)")
    p.add_argument("--ppl-window", type=int, default=None, help="perplexity window (default: the model's context)")
    p.add_argument("--ppl-stride", type=int, default=None, help="perplexity stride (default: half the window)")
    p.add_argument("--ppl-tokens", type=int, default=16384, help="tokens of text to score (default 16384; 0: all, about 111K)")
    p.add_argument("--attention-lengths", type=_ints, default=None,
                   help="lengths of the recall / density measurement (default: the needle lengths)")
    p.add_argument("--row-blocks", type=int, default=32, help="64-row query blocks sampled per layer for recall")
    p.add_argument("--out", default="out/eval", help="folder for eval.json, eval.md, needle_heatmap.png (default out/eval)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(fn=eval_cmd)


def spec_from_args(args) -> EvalSpec:
    import torch

    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    compiler = args.compiler if args.compiler != "auto" else ("inductor" if device == "cuda" else "eager")
    dtype = args.dtype if args.dtype != "auto" else ("bfloat16" if device == "cuda" else "float32")
    options = {"dense_below": args.dense_below, "pattern_db": args.pattern_db}
    for key, value in (("default_pattern", args.pattern), ("budget_length", args.budget_length),
                       ("budget_exponent", args.budget_exponent)):
        if value is not None:
            options[key] = value
    return EvalSpec(model=args.model, device=device, dtype=dtype, yarn=args.yarn, compiler=compiler, options=options,
                    lengths=args.lengths, depths=args.depths, ppl_window=args.ppl_window, ppl_stride=args.ppl_stride,
                    ppl_tokens=args.ppl_tokens, attention_lengths=args.attention_lengths, row_blocks=args.row_blocks,
                    parts=args.parts, out_dir=args.out, progress=not args.no_progress,
                    command=_command_line())


def _command_line() -> str:
    """The command as typed, in its ``mcompile eval`` form (also for ``python -m mcompile.tools.eval``)."""
    argv = sys.argv[1:]
    if "eval" in argv:
        argv = argv[argv.index("eval") + 1:]
    return "mcompile eval " + " ".join(shlex.quote(a) for a in argv)


def eval_cmd(args) -> int:
    """Exit 0 when every measured target is met, 1 otherwise (the report says which)."""
    logging.getLogger("mcompile").setLevel(logging.WARNING)
    spec = spec_from_args(args)
    print(f"mcompile eval: {spec.model} on {spec.device} ({spec.dtype}), graphs run by {spec.compiler}; "
          f"minference options {spec.options}", flush=True)
    results = run_eval(spec)
    print(f"\nwrote {args.out}/eval.json, eval.md and needle_heatmap.png\n")
    failed = [name for name, t in results["targets"].items() if t.get("met") is False]
    print(json.dumps({k: v.get("met") for k, v in results["targets"].items()}))
    if failed:
        print(f"targets missed: {failed}")
    return 1 if failed else 0
