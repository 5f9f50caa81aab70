"""Command-line argument types shared by the subcommands (``mcompile demo``, ``explain``,
``eval``, ``search``...)."""

from __future__ import annotations

import argparse
import json

# kind -> (parameter names, their types) of the short form ``kind:a,b``
PATTERN_FORMS: dict = {
    "vertical_slash": (("vertical", int), ("slash", int)),
    "a_shape": (("sink", int), ("local", int)),
    "block_sparse": (("blocks", int),),
    "block_mass": (("recall", float), ("samples", int)),
    "dense": (),
}


def pattern_arg(text: str) -> dict:
    """``vertical_slash:256,512`` / ``a_shape:128,1024`` / ``block_sparse:8`` /
    ``block_mass:0.98`` or ``block_mass:0.98,16`` / ``dense``, or a pattern as JSON."""
    text = text.strip()
    if text.startswith("{"):
        return json.loads(text)
    kind, _, params = text.partition(":")
    if kind not in PATTERN_FORMS:
        raise argparse.ArgumentTypeError(f"unknown pattern kind {kind!r}; valid kinds: {sorted(PATTERN_FORMS)}")
    form = PATTERN_FORMS[kind]
    values = [x.strip() for x in params.split(",")] if params else []
    least = 1 if kind == "block_mass" else len(form)  # block_mass: samples optional
    if not least <= len(values) <= len(form):
        raise argparse.ArgumentTypeError(f"{kind} takes {len(form)} numbers: {', '.join(n for n, _ in form)}")
    try:
        return {"kind": kind, **{name: cast(v) for (name, cast), v in zip(form, values)}}
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"{kind}: {e}") from None
