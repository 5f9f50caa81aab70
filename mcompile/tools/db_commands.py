"""Command line: ``mcompile search``, ``mcompile allocate``, ``mcompile evaluate-db`` and ``mcompile plot``.

``add_commands(subparsers)`` registers them (mcompile/tools/cli.py lists this module in
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
    from .compare import parse_policy

    try:
        return parse_policy(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def load_model(name: str, yarn=None):
    """(model, tokenizer or None, database name) for ``--model``."""
    from .models import load_smollm2, tiny_llama

    if name == "smollm2":
        model, tok = load_smollm2(yarn_factor=yarn)
        return model, tok, "SmolLM2-135M-Instruct"
    return tiny_llama(layers=2, heads=4, kv_heads=2, head_dim=16), None, "tiny-llama"


def calibration_ids(tok, vocab: int, length: int, offset: int) -> tuple[torch.Tensor, str]:
    """(1, length) token ids and a description of where they came from."""
    if tok is None:
        g = torch.Generator().manual_seed(TINY_SEED + offset)
        return torch.randint(0, vocab, (1, length), generator=g), f"random token ids (seed {TINY_SEED + offset})"
    from .data import haystack

    return (torch.tensor([haystack(tok, length, offset)]),
            f"mcompile.tools.data.haystack: stdlib docstrings, tokens {offset}..{offset + length}")


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
    from ..pattern_db import save
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
    from .compare import evaluate_policies, format_table

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
    from . import plot
    from ..pattern_db import load

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


def _kept_targets(text: str) -> dict:
    """``4096:0.28,6144:0.26,8192:0.24`` -> {4096: 0.28, ...}."""
    try:
        out = {}
        for part in text.split(","):
            n, _, t = part.partition(":")
            out[int(n)] = float(t)
        if not out or any(not 0 < t <= 1 for t in out.values()):
            raise ValueError("targets must be fractions in (0, 1]")
        return out
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"--kept takes LENGTH:FRACTION,... (e.g. 4096:0.28,8192:0.24): {exc}") from None


def _floats(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _allocate_command(args, targets: dict) -> str:
    """The options that shaped an allocation, in canonical form, for the database's record."""
    ints = lambda xs: ",".join(str(x) for x in xs)
    parts = ["mcompile allocate --model smollm2", f"--dtype {args.dtype}", f"--window {args.window}",
             f"--texts {args.texts}", f"--needle-lengths {ints(args.needle_lengths)}",
             f"--depths {','.join(f'{d:g}' for d in args.depths)}", f"--offset {args.offset}",
             f"--verticals {ints(args.verticals)}", f"--slashes {ints(args.slashes)}",
             f"--reference-length {args.reference_length}", f"--exponent {args.exponent:g}",
             f"--kept {','.join(f'{n}:{t:g}' for n, t in targets.items())}", f"--min-recall {args.min_recall:g}",
             f"--needle-weight {args.needle_weight:g}"]
    if args.yarn:
        parts.append(f"--yarn {args.yarn:g}")
    return " ".join(parts)


def allocate_cmd(args) -> int:
    """Sensitivity of every (layer, option), then one allocation per target scale, each checked
    with all layers sparse; writes ``allocation.json`` and one database per scale into ``--out``."""
    from tqdm.auto import tqdm

    from ..pattern_db import ModelFingerprint, save
    from .allocate import (
        Entry,
        Losses,
        Session,
        allocate,
        calibration_inputs,
        database,
        default_options,
        model_means,
        sensitivity,
    )

    t0 = time.perf_counter()
    dtype = getattr(torch, args.dtype)
    from .models import load_smollm2

    model, tok = load_smollm2(dtype=dtype, device=args.device, yarn_factor=args.yarn)
    cal = calibration_inputs(tok, args.window, args.texts, args.needle_lengths, args.depths, args.offset)
    options = default_options(args.verticals, args.slashes)
    layers = model.config.num_hidden_layers
    fp = ModelFingerprint.from_config(model.config, "SmolLM2-135M-Instruct")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with Session(model, args.reference_length, args.exponent) as session:
        base, table = None, []
        if args.from_table:  # a previous run's sensitivity, complete or interrupted (same options and inputs)
            previous = json.loads(Path(args.from_table).read_text())
            if previous["options"] != [o.describe() for o in options] or previous["calibration"] != cal.description:
                raise SystemExit(f"{args.from_table} was measured with other options or calibration inputs")
            base = Losses(previous["dense"]["text"], previous["dense"]["needle"], previous["dense"]["needles"])
            table = [[Entry.from_json(e) for e in row] for row in previous["table"]]

        def save_progress(base, table):  # after every layer, so an interrupted run can resume
            record = {"calibration": cal.description, "options": [o.describe() for o in options],
                      "dense": {"text": base.text, "needle": base.needle, "needles": base.needles},
                      "table": [[e.to_json() for e in row] for row in table], "allocations": []}
            (out / "allocation.json").write_text(json.dumps(record, indent=1) + "\n")
            if args.time_limit and time.perf_counter() - t0 > args.time_limit and len(table) < layers:
                raise TimeoutError(f"{len(table)} of {layers} layers measured")
            return record

        bar = tqdm(total=layers * (len(options) - 1), initial=len(table) * (len(options) - 1), desc="sensitivity",
                   disable=args.quiet)
        try:
            base, table = sensitivity(session, cal, options, layers, on_step=bar.update, base=base, table=table,
                                      on_layer=save_progress)
        except TimeoutError as exc:
            print(f"time limit reached: {exc}; resume with --from-table {out / 'allocation.json'}")
            return 3
        bar.close()
        record = save_progress(base, table)
        log_time = time.perf_counter() - t0
        print(f"dense: text loss {base.text:.4f}, needle answer loss {base.needle:.4f} "
              f"(sensitivity done at {log_time:.0f} s)")
        print("scale | kept targets | predicted text / needle | measured text / needle | kept by length | "
              "recall by length | options")
        for scale in args.scales:
            targets = {n: min(1.0, t * scale) for n, t in args.kept.items()}
            alloc = allocate(table, targets, args.min_recall, args.needle_weight)
            if alloc is None:
                print(f"{scale:g} | {targets} | infeasible")
                continue
            measured = None
            if not args.no_check:
                res, kept, recall = session.run(cal, dict(enumerate(alloc.patterns(options))), measure=True)
                measured = {"text": res.text - base.text, "needle": res.needle - base.needle, "needles": res.needles,
                            "kept": {n: round(v, 4) for n, v in model_means(kept, layers).items()},
                            "recall": {n: round(v, 4) for n, v in model_means(recall, layers).items()}}
            calibration = {"length": args.window, "budget_length": args.reference_length,
                           "budget_exponent": args.exponent, "objective": "loss", "data": cal.description,
                           "dtype": args.dtype, "kept_targets": {str(n): t for n, t in targets.items()},
                           "min_recall": args.min_recall, "needle_weight": args.needle_weight,
                           "predicted": {"text": alloc.predicted_text, "needle": alloc.predicted_needle,
                                         "kept": {str(n): v for n, v in alloc.kept.items()},
                                         "recall": {str(n): v for n, v in alloc.recall.items()}},
                           "command": _allocate_command(args, targets)}
            if measured is not None:
                calibration["measured"] = {"text": measured["text"], "needle": measured["needle"],
                                           "kept": {str(n): v for n, v in measured["kept"].items()}}
            db = database(fp, options, alloc, table, calibration, args.needle_weight)
            path = out / f"db_{scale:g}.json"
            save(db, path)
            record["allocations"].append({"scale": scale, "targets": {str(n): t for n, t in targets.items()},
                                          "choice": alloc.choice, "patterns": [options[j].describe() for j in alloc.choice],
                                          "predicted": {"text": alloc.predicted_text, "needle": alloc.predicted_needle,
                                                        "kept": alloc.kept, "recall": alloc.recall},
                                          "measured": measured, "database": str(path)})
            names = ", ".join(f"{sum(1 for j in alloc.choice if j == i)}x {options[i].describe()}"
                              for i in sorted(set(alloc.choice)))
            shown = (f"{measured['text']:+.4f} / {measured['needle']:+.3f} | {measured['kept']} | {measured['recall']}"
                     if measured else f"not checked | {alloc.kept} (predicted) | {alloc.recall} (predicted)")
            print(f"{scale:g} | {targets} | {alloc.predicted_text:+.4f} / {alloc.predicted_needle:+.3f} | {shown} | "
                  f"{names}", flush=True)
    record["seconds"] = round(time.perf_counter() - t0)
    (out / "allocation.json").write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {out / 'allocation.json'} ({record['seconds']} s)")
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

    from .allocate import (
        BUDGET_EXPONENT,
        NEEDLE_WEIGHT,
        REFERENCE_LENGTH,
        SLASHES,
        VERTICALS,
    )

    p = sub.add_parser("allocate", help="per-layer budgets from the model's loss, under a kept-fraction budget")
    p.add_argument("--model", default="smollm2", choices=("smollm2",))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--yarn", type=float, default=None, help="extend RoPE with YaRN by this factor")
    p.add_argument("--kept", type=_kept_targets, default={4096: 0.30},
                   help="mean kept fraction of causal keys allowed per length, of the needle lengths "
                        "(default 4096:0.30)")
    p.add_argument("--scales", type=_floats, default=[1.0], help="also allocate at these multiples of --kept")
    p.add_argument("--min-recall", type=float, default=0.0, help="mean attention recall floor at every length")
    p.add_argument("--needle-weight", type=float, default=NEEDLE_WEIGHT)
    p.add_argument("--window", type=int, default=8192, help="calibration text window (default: 8192)")
    p.add_argument("--texts", type=int, default=1, help="calibration text windows")
    p.add_argument("--needle-lengths", type=_ints, default=[4096, 8192])
    p.add_argument("--depths", type=_floats, default=[0.1, 0.9])
    p.add_argument("--offset", type=int, default=0, help="first token of the calibration text")
    p.add_argument("--verticals", type=_ints, default=list(VERTICALS))
    p.add_argument("--slashes", type=_ints, default=list(SLASHES))
    p.add_argument("--reference-length", type=int, default=REFERENCE_LENGTH)
    p.add_argument("--exponent", type=float, default=BUDGET_EXPONENT)
    p.add_argument("--from-table", default=None, help="reuse (or resume) the sensitivity table of a previous allocation.json")
    p.add_argument("--time-limit", type=float, default=None,
                   help="stop measuring after this many seconds (progress is saved; exit code 3)")
    p.add_argument("--no-check", action="store_true",
                   help="do not run the allocations with all layers sparse (predictions only)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--out", required=True, help="folder for allocation.json and the databases")
    p.set_defaults(fn=allocate_cmd)

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
