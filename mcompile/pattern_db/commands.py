"""Command line: ``mcompile search``, ``mcompile evaluate-db`` and ``mcompile plot``.

``add_commands(subparsers)`` registers them (mcompile/cli.py lists this module in
``COMMAND_MODULES``); each handler takes the parsed arguments and returns an exit code.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from ..patterns import PatternKind

MODELS = ("smollm2", "tiny")
TINY_SEED = 0  # random token ids of the tiny test model (it has no tokenizer)


def _ints(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _kinds(text: str) -> list[PatternKind]:
    names = {k.label: k for k in PatternKind if k != PatternKind.DENSE}
    out = []
    for name in text.split(","):
        if name not in names:
            raise argparse.ArgumentTypeError(f"unknown pattern kind {name!r}; valid kinds: {sorted(names)}")
        out.append(names[name])
    return out


def _target(text: str):
    """``SINK,LOCAL@LENGTH`` (A-shape budgets at a reference length)."""
    from .search import Target

    try:
        budgets, _, length = text.partition("@")
        sink, local = (int(x) for x in budgets.split(","))
        return Target(sink=sink, local=local, length=int(length))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"--target takes SINK,LOCAL@LENGTH (e.g. 1000,4096@30720): {exc}") from None


def _policy(text: str) -> tuple[str, str]:
    from .evaluate import parse_policy

    try:
        return parse_policy(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def load_model(name: str, yarn=None):
    """(model, tokenizer or None, database name) for ``--model``."""
    from ..models import load_smollm2, tiny_llama

    if name == "smollm2":
        model, tok = load_smollm2(yarn_factor=yarn)
        return model, tok, "SmolLM2-135M-Instruct"
    return tiny_llama(layers=2, heads=4, kv_heads=2, head_dim=16), None, "tiny-llama"


def calibration_ids(tok, vocab: int, length: int, offset: int) -> tuple[torch.Tensor, str]:
    """(1, length) token ids and a description of where they came from."""
    if tok is None:
        g = torch.Generator().manual_seed(TINY_SEED + offset)
        return torch.randint(0, vocab, (1, length), generator=g), f"random token ids (seed {TINY_SEED + offset})"
    from ..data import haystack

    return (torch.tensor([haystack(tok, length, offset)]),
            f"mcompile.data.haystack: stdlib docstrings, tokens {offset}..{offset + length}")


def _command(args) -> str:
    """The search's options, in canonical form, for the database's calibration block."""
    parts = ["mcompile search", f"--model {args.model}", f"--length {args.length}"]
    if args.offset:
        parts.append(f"--offset {args.offset}")
    if args.yarn:
        parts.append(f"--yarn {args.yarn:g}")
    parts.append(f"--objective {args.objective}")
    if args.target_density is not None:
        parts.append(f"--target-density {args.target_density:g}")
    else:
        t = args.target
        parts.append(f"--target {t.sink},{t.local}@{t.length}")
    if args.kinds:
        parts.append(f"--kinds {','.join(k.label for k in args.kinds)}")
    parts.append(f"--blocks {args.blocks}")
    return " ".join(parts)  # without --out / --vs-out: where the file goes does not change it


def search_cmd(args) -> int:
    from . import save
    from .search import CANDIDATES, Target, search_model

    t0 = time.perf_counter()
    model, tok, name = load_model(args.model, args.yarn)
    ids, data = calibration_ids(tok, model.config.vocab_size, args.length, args.offset)
    target = Target(density=args.target_density) if args.target_density is not None else args.target
    candidates = [c for c in CANDIDATES if not args.kinds or c.kind in args.kinds]
    calibration = {"data": data, "dtype": str(model.dtype).replace("torch.", ""), "command": _command(args)}
    if args.yarn:
        calibration["yarn_factor"] = args.yarn
    result = search_model(model, ids, target, args.objective, candidates, args.blocks, name, calibration)
    result.calibration["seconds"] = round(time.perf_counter() - t0)
    db = result.database()
    save(db, args.out)
    print(f"wrote {args.out}: {_kind_counts(db)}; target {result.calibration['target']['rule']} "
          f"({100 * result.calibration['target']['density']:.1f}% of causal pairs); "
          f"{result.calibration['seconds']} s")
    if args.vs_out:
        save(result.database([PatternKind.VERTICAL_SLASH]), args.vs_out)
        print(f"wrote {args.vs_out} (vertical-slash only, same target)")
    if args.details:
        Path(args.details).write_text(json.dumps(result.details()) + "\n")
    return 0


def _kind_counts(db) -> str:
    from collections import Counter

    counts = Counter(h.pattern.kind.label for layer in db.layers for h in layer)
    return ", ".join(f"{n} {k}" for k, n in counts.most_common())


def evaluate_cmd(args) -> int:
    from .evaluate import evaluate_policies, format_table

    model, tok, _ = load_model(args.model, args.yarn)
    policies = dict(args.policy)
    rows = []
    for n in args.lengths:
        ids, data = calibration_ids(tok, model.config.vocab_size, n, args.offset)
        print(f"{n} tokens: {data}", flush=True)
        rows += evaluate_policies(model, ids, policies, args.blocks)
    print(format_table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")
    return 0


def plot_cmd(args) -> int:
    from .. import plot
    from . import load

    db = load(args.db)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    chart = out / f"patterns_{args.length}.png"
    plot.plot_database(db, args.length, chart)
    print(f"wrote {chart}")
    if args.layer is not None:
        model, tok, _ = load_model(args.model, args.yarn)
        ids, data = calibration_ids(tok, model.config.vocab_size, args.length, args.offset)
        path = out / f"attention_L{args.layer}_H{args.head}_{args.length}.png"
        plot.plot_head(model, ids, db, args.layer, args.head, path, pixels=args.pixels, title_data=data)
        print(f"wrote {path}")
    return 0


def add_commands(sub) -> None:
    from .search import OBJECTIVES, SEARCH_BLOCKS, Target

    p = sub.add_parser("search", help="search a per-head pattern database on calibration text")
    p.add_argument("--model", default="smollm2", choices=MODELS)
    p.add_argument("--length", type=int, default=8192, help="calibration tokens (default 8192)")
    p.add_argument("--offset", type=int, default=0, help="first token of the calibration text")
    p.add_argument("--yarn", type=float, default=None, help="extend RoPE with YaRN by this factor")
    p.add_argument("--objective", default="output", choices=OBJECTIVES,
                   help="output: relative error of the attention output (default); recall: attention recall")
    p.add_argument("--target", type=_target, default=Target(),
                   help="A-shape budgets whose kernel cost every candidate matches, SINK,LOCAL@LENGTH, scaled "
                        "to the calibration length by (L / LENGTH) ** 0.7 (default 1000,4096@30720: the paper's)")
    p.add_argument("--target-density", type=float, default=None,
                   help="instead of --target: a fraction of the causal pairs")
    p.add_argument("--kinds", type=_kinds, default=None, help="candidate kinds, e.g. vertical_slash,block_sparse")
    p.add_argument("--blocks", type=int, default=SEARCH_BLOCKS, help="64-query blocks sampled per head")
    p.add_argument("--out", required=True, help="where to write the database (JSON)")
    p.add_argument("--vs-out", default=None, help="also write the best vertical-slash candidate of every head")
    p.add_argument("--details", default=None, help="also write every candidate's score (JSON)")
    p.set_defaults(fn=search_cmd)

    p = sub.add_parser("evaluate-db", help="attention recall and output error of pattern policies on real text")
    p.add_argument("--model", default="smollm2", choices=MODELS)
    p.add_argument("--policy", action="append", required=True, type=_policy,
                   help="NAME=SPEC, SPEC a database path or name, or 'default' (the policy without a database)")
    p.add_argument("--lengths", type=_ints, default=[2048, 4096, 8192])
    p.add_argument("--offset", type=int, default=0, help="first token of the text")
    p.add_argument("--yarn", type=float, default=None)
    p.add_argument("--blocks", type=int, default=64, help="64-query blocks sampled per head")
    p.add_argument("--json", default=None, help="also write the rows as JSON")
    p.set_defaults(fn=evaluate_cmd)

    p = sub.add_parser("plot", help="pattern kinds and densities of a database; one head's attention and mask")
    p.add_argument("--db", required=True, help="database path or shipped name")
    p.add_argument("--model", default="smollm2", choices=MODELS)
    p.add_argument("--length", type=int, default=4096)
    p.add_argument("--layer", type=int, default=None, help="also draw this layer's head (needs the model)")
    p.add_argument("--head", type=int, default=0)
    p.add_argument("--offset", type=int, default=0)
    p.add_argument("--yarn", type=float, default=None)
    p.add_argument("--pixels", type=int, default=512, help="side of the attention images")
    p.add_argument("--out", default=".", help="folder for the PNG files")
    p.set_defaults(fn=plot_cmd)
