"""Command-line argument types shared by the subcommands (``mcompile demo``, ``explain``,
``eval``, ``search``...)."""

from __future__ import annotations

import argparse
import json

from ..patterns import Pattern, PatternKind, budget_names


def _number(text: str):
    """An int, a float, or the text itself (block_mass's score: ``block_mass:0.98,16,max``)."""
    try:
        return int(text)
    except ValueError:
        try:
            return float(text)
        except ValueError:
            return text


def pattern_arg(text: str) -> dict:
    """``vertical_slash:256,512`` / ``a_shape:128,1024`` / ``block_sparse:8`` /
    ``block_mass:0.98`` or ``block_mass:0.98,16`` or ``block_mass:0.98,16,max`` or ``block_mass:0.99,4,max,1`` / ``dense`` (the budgets in the order
    ``patterns.budget_names`` gives), or a pattern as JSON; validated by ``Pattern.from_dict``."""
    text = text.strip()
    try:
        if text.startswith("{"):
            spec = json.loads(text)
        else:
            kind, _, params = text.partition(":")
            if kind.upper() not in PatternKind.__members__:
                Pattern.from_dict({"kind": kind})  # raises: the unknown kind, with the valid ones
            names = budget_names(PatternKind[kind.upper()])
            values = [_number(x.strip()) for x in params.split(",")] if params else []
            if len(values) > len(names):
                raise ValueError(f"{kind} takes at most {len(names)} values ({', '.join(names) or 'none'}), "
                                 f"got {len(values)}")
            spec = {"kind": kind, **dict(zip(names, values))}
        Pattern.from_dict(spec)
    except ValueError as e:  # json.JSONDecodeError is one
        raise argparse.ArgumentTypeError(str(e)) from None
    return spec
