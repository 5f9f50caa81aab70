"""Needle in a haystack over a grid of prompt lengths x needle depths, answered by greedy generation.

Every cell hides a different 5-digit password (drawn from a generator seeded by the cell, so
runs are repeatable and no single lucky number decides a whole grid) in real text
(``mcompile.tools.data``: standard-library documentation) and asks for it at the end. A cell passes
when the generated continuation contains the number.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch

from ..needle import answer, needle_prompt

ANSWER_TOKENS = 8  # greedy tokens generated per cell: a 5-digit number and some slack
VALUE_RANGE = (10000, 99999)  # passwords are 5-digit numbers


@dataclass(frozen=True)
class Cell:
    length: int  # requested prompt length (tokens)
    depth: float  # needle position in 0..1
    tokens: int  # actual prompt length
    value: str
    answer: str
    passed: bool


def cell_value(length: int, depth: float) -> str:
    """The cell's password: repeatable, different between cells."""
    return str(random.Random(f"needle-{length}-{depth:.4f}").randint(*VALUE_RANGE))


def run_grid(model, tokenizer, lengths: Sequence[int], depths: Sequence[float], device: str = "cpu",
             on_cell: Callable[[Cell], None] | None = None) -> list[Cell]:
    """Answer every (length, depth) cell with ``model`` as it is (compiled or not)."""
    cells = []
    for length in lengths:
        for depth in depths:
            prompt = needle_prompt(tokenizer, length, depth, value=cell_value(length, depth))
            prompt = type(prompt)(prompt.input_ids.to(device), prompt.value, prompt.depth)
            with torch.no_grad():
                text = tokenizer.decode(answer(model, prompt, max_new_tokens=ANSWER_TOKENS)).strip()
            cell = Cell(length, depth, prompt.input_ids.shape[1], prompt.value, text, prompt.passed(text))
            cells.append(cell)
            if on_cell is not None:
                on_cell(cell)
    return cells


def cells_to_json(cells: Sequence[Cell]) -> list[dict]:
    return [asdict(c) for c in cells]


def compare(dense: Sequence[dict], sparse: Sequence[dict]) -> dict:
    """The needle target: minference passes every cell dense passes."""
    key = lambda c: (c["length"], round(c["depth"], 4))
    sparse_by = {key(c): c for c in sparse}
    lost = [key(c) for c in dense if c["passed"] and not sparse_by.get(key(c), {}).get("passed", False)]
    gained = [key(c) for c in dense if not c["passed"] and sparse_by.get(key(c), {}).get("passed", False)]
    return {"dense_passed": sum(c["passed"] for c in dense), "minference_passed": sum(c["passed"] for c in sparse),
            "cells": len(dense), "lost": lost, "gained": gained, "target_met": not lost}
