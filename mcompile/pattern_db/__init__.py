"""Pattern databases: per-layer, per-head patterns with a schema, a version and named fields.

On disk a database is JSON::

    {
      "format": "mcompile-pattern-db", "version": 1,
      "model": {"name": "SmolLM2-135M-Instruct", "model_type": "llama", "num_layers": 30,
                "num_heads": 9, "num_kv_heads": 3, "head_dim": 64},
      "calibration": {"length": 8192, "budget_length": 8192, "budget_exponent": 0.7,
                      "objective": "output", "command": "mcompile search ...", ...},
      "layers": [{"layer": 0, "heads": [{"head": 0, "kind": "vertical_slash",
                                         "vertical": 1000, "slash": 6096, "score": 0.012}, ...]}, ...]
    }

- ``model``: the fingerprint of the model the patterns are for, from its config.
- ``calibration``: how the database was made. The fields the backend reads are checked:
  ``budget_length`` (the prompt length at which the budgets hold; shorter prompts get them
  scaled by ``(N / budget_length) ** budget_exponent``, see patterns.scaled_budgets; 0 or absent:
  absolute budgets), ``budget_exponent`` (0.7 if absent), ``length`` (calibration tokens) and
  ``objective`` (``output``, ``recall`` or ``loss``). The rest (target, data, command, ...) is a record.
- per head: the pattern kind and its parameters (patterns.Pattern.from_dict), and optionally
  ``score``: the search objective of the chosen candidate on the calibration text, the relative
  L2 error of the head's attention output for ``objective: output`` (lower is better), the
  attention recall for ``objective: recall`` (higher is better), the change of the model's loss
  on calibration inputs when the head's layer runs the pattern for ``objective: loss``
  (allocate.py; lower is better).

``load`` is the one reader (it validates every field and names the bad one, and with ``model=``
checks the database against the model being compiled), ``save`` the one writer. Databases
shipped with the package live beside this file and are found by name (``shipped``,
``find_shipped``). ``search`` (mcompile.tools.search) writes them.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from ..config import INT64_MAX
from ..patterns import DEFAULT_BUDGET_EXPONENT, Pattern

FORMAT = "mcompile-pattern-db"
VERSION = 1
SHIPPED_DIR = Path(__file__).parent
_MODEL_FIELDS = ("model_type", "num_layers", "num_heads", "num_kv_heads", "head_dim")


class PatternDBError(ValueError):
    """A database that cannot be read or does not fit the model; the message names the field."""


@dataclass(frozen=True)
class ModelFingerprint:
    model_type: str
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    name: str = ""

    def to_dict(self) -> dict:
        return {"name": self.name, **{f: getattr(self, f) for f in _MODEL_FIELDS}}

    @classmethod
    def from_config(cls, config: Any, name: str = "") -> "ModelFingerprint":
        """From a transformers PretrainedConfig (Llama-like attribute names)."""
        heads = config.num_attention_heads
        return cls(config.model_type, config.num_hidden_layers, heads,
                   getattr(config, "num_key_value_heads", None) or heads,
                   getattr(config, "head_dim", None) or config.hidden_size // heads, name)


@dataclass(frozen=True)
class HeadEntry:
    pattern: Pattern
    score: Optional[float] = None


@dataclass(frozen=True)
class PatternDB:
    model: ModelFingerprint
    layers: tuple  # tuple[tuple[HeadEntry, ...], ...], one tuple of heads per layer
    calibration: dict = field(default_factory=dict, hash=False, compare=False)
    source: str = ""

    @property
    def budget_length(self) -> int:
        """Prompt length at which the budgets hold (``calibration.budget_length``; 0: absolute)."""
        return int(self.calibration.get("budget_length", 0))

    @property
    def budget_exponent(self) -> float:
        return float(self.calibration.get("budget_exponent", DEFAULT_BUDGET_EXPONENT))

    def patterns_for(self, layer: int) -> list[Pattern]:
        return [h.pattern for h in self.layers[layer]]

    def check_model(self, model: ModelFingerprint) -> None:
        """Raise PatternDBError naming the first fingerprint field that differs from ``model``."""
        for name in _MODEL_FIELDS:
            mine, theirs = getattr(self.model, name), getattr(model, name)
            if mine != theirs:
                raise PatternDBError(f"pattern database {self.source or self.model.name!r}: model.{name} is "
                                     f"{mine!r}, the model being compiled has {theirs!r}")

    def check_site(self, layer: Optional[int], num_heads: int, num_kv_heads: int, head_dim: int) -> Optional[str]:
        """None if the database covers this attention, else why it does not fit."""
        m = self.model
        if (num_heads, num_kv_heads, head_dim) != (m.num_heads, m.num_kv_heads, m.head_dim):
            return (f"pattern database {self.source or m.name!r} is for {m.num_heads} heads / {m.num_kv_heads} "
                    f"KV heads / head dim {m.head_dim}, the model has {num_heads} / {num_kv_heads} / {head_dim}")
        if layer is None:
            return "the layer index of this attention is unknown (regional compilation?)"
        if not 0 <= layer < m.num_layers:
            return f"layer {layer} is outside the database's {m.num_layers} layers"
        return None

    def to_json(self) -> dict:
        return {
            "format": FORMAT, "version": VERSION, "model": self.model.to_dict(),
            "calibration": dict(self.calibration),
            "layers": [{"layer": i, "heads": [{"head": j, **h.pattern.to_dict(),
                                                **({"score": h.score} if h.score is not None else {})}
                                               for j, h in enumerate(heads)]}
                       for i, heads in enumerate(self.layers)],
        }


def _require(obj: Any, key: str, kind, where: str):
    if not isinstance(obj, dict) or key not in obj:
        raise PatternDBError(f"{where}.{key} is missing")
    value = obj[key]
    if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise PatternDBError(f"{where}.{key} must be an int, got {value!r}")
    if kind is not int and not isinstance(value, kind):
        raise PatternDBError(f"{where}.{key} must be {getattr(kind, '__name__', kind)}, got {value!r}")
    return value


OBJECTIVES = ("output", "recall", "loss")


def _check_calibration(cal: Any) -> dict:
    """The calibration block, with the fields the backend reads validated."""
    if not isinstance(cal, dict):
        raise PatternDBError(f"db.calibration must be an object, got {cal!r}")
    for key, low in (("length", 1), ("budget_length", 0)):
        if key in cal:
            value = _require(cal, key, int, "calibration")
            if value < low or value > INT64_MAX:
                raise PatternDBError(f"calibration.{key} must be >= {low} and <= 2**63 - 1, got {value}")
    if "budget_exponent" in cal:
        value = cal["budget_exponent"]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 2.0:
            raise PatternDBError(f"calibration.budget_exponent must be a number in [0, 2], got {value!r}")
    if "objective" in cal and cal["objective"] not in OBJECTIVES:
        raise PatternDBError(f"calibration.objective must be one of {list(OBJECTIVES)}, got {cal['objective']!r}")
    return dict(cal)


def from_json(data: Any, source: str = "") -> PatternDB:
    """Validate a parsed database; errors name the offending field."""
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise PatternDBError(f"{source or 'database'}: not a pattern database (format must be {FORMAT!r})")
    version = data.get("version")
    if version != VERSION:
        raise PatternDBError(f"{source}: version {version!r} is not supported (this mcompile reads version {VERSION})")
    m = _require(data, "model", dict, "db")
    model = ModelFingerprint(_require(m, "model_type", str, "model"),
                             *[_require(m, f, int, "model") for f in _MODEL_FIELDS[1:]],
                             name=str(m.get("name", "")))
    layers = _require(data, "layers", list, "db")
    if len(layers) != model.num_layers:
        raise PatternDBError(f"db.layers has {len(layers)} entries, model.num_layers is {model.num_layers}")
    parsed = []
    for i, layer in enumerate(layers):
        where = f"layers[{i}]"
        if _require(layer, "layer", int, where) != i:
            raise PatternDBError(f"{where}.layer is {layer['layer']}, expected {i}")
        heads = _require(layer, "heads", list, where)
        if len(heads) != model.num_heads:
            raise PatternDBError(f"{where}.heads has {len(heads)} entries, model.num_heads is {model.num_heads}")
        entries = []
        for j, head in enumerate(heads):
            hw = f"{where}.heads[{j}]"
            if _require(head, "head", int, hw) != j:
                raise PatternDBError(f"{hw}.head is {head['head']}, expected {j}")
            spec = {k: v for k, v in head.items() if k not in ("head", "score")}
            try:
                pattern = Pattern.from_dict(spec)
            except ValueError as exc:
                raise PatternDBError(f"{hw}: {exc}") from None
            score = head.get("score")
            if score is not None and (isinstance(score, bool) or not isinstance(score, (int, float))):
                raise PatternDBError(f"{hw}.score must be a number, got {score!r}")
            entries.append(HeadEntry(pattern, score))
        parsed.append(tuple(entries))
    return PatternDB(model, tuple(parsed), _check_calibration(data.get("calibration", {})), source)


def shipped() -> list[str]:
    """Names of the databases that ship with the package."""
    return sorted(p.stem for p in SHIPPED_DIR.glob("*.json"))


def load(name_or_path: str | os.PathLike, model: Optional[ModelFingerprint] = None) -> PatternDB:
    """Read a database from a path or a shipped name; with ``model``, also check that it is for
    that model (``PatternDB.check_model``)."""
    path = Path(name_or_path)
    if not path.exists():
        path = SHIPPED_DIR / f"{name_or_path}.json"
        if not path.exists():
            raise PatternDBError(f"no pattern database at {str(name_or_path)!r}; shipped databases: {shipped()}")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise PatternDBError(f"{path}: not valid JSON ({exc})") from None
    db = from_json(data, source=str(name_or_path))
    if model is not None:
        db.check_model(model)
    return db


def save(db: PatternDB, path: str | os.PathLike) -> None:
    """Write ``db`` as JSON (the one writer); it reads back equal through ``load``."""
    data = db.to_json()
    from_json(data)  # never write what the loader would refuse
    Path(path).write_text(json.dumps(data, indent=1) + "\n")


# Shipped databases that ``pattern_db="auto"`` may pick on its own. A database qualifies once it
# passes the needle grid wherever dense does (mcompile eval, docs/ACCURACY.md). The searched
# SmolLM2 database does not yet: its block-sparse heads lose the needle in 12 of 17 cells that
# dense finds (its output error on plain text is lower than the default policy's), so SmolLM2
# runs the default policy unless that database is asked for by name.
AUTO_SELECTED: frozenset = frozenset()


def find_shipped(model_type: str, num_heads: int, num_kv_heads: int, head_dim: int,
                 num_layers: Optional[int] = None, auto: bool = False) -> Optional[PatternDB]:
    """The shipped database whose fingerprint matches, if exactly one does (``auto``: among
    ``AUTO_SELECTED`` only)."""
    found = []
    for name in shipped():
        if auto and name not in AUTO_SELECTED:
            continue
        db = load(name)
        m = db.model
        if (m.model_type, m.num_heads, m.num_kv_heads, m.head_dim) == (model_type, num_heads, num_kv_heads, head_dim) \
                and (num_layers is None or num_layers == m.num_layers):
            found.append(db)
    return found[0] if len(found) == 1 else None


def uniform(model: ModelFingerprint, pattern: Pattern, calibration: Optional[dict] = None) -> PatternDB:
    """A database giving every head the same pattern."""
    heads = tuple(HeadEntry(pattern) for _ in range(model.num_heads))
    return PatternDB(model, tuple(heads for _ in range(model.num_layers)), dict(calibration or {}))


__all__ = ["PatternDB", "PatternDBError", "ModelFingerprint", "HeadEntry", "OBJECTIVES", "load", "save", "from_json",
           "shipped", "find_shipped", "uniform"]
