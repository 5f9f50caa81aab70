"""Real English text that ships with the software: the documentation of the standard library
(the demo's and the evaluation's text) and of PyTorch (calibration text, never evaluated on).

Long-context demos and evaluations need real text, not generated filler, and nothing can be
downloaded; the docstrings of the standard library are a few MB of real technical English.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import pkgutil
import warnings

_SKIP = ("test", "idlelib", "tkinter", "turtle", "lib2to3", "ensurepip", "antigravity", "this", "__main__",
         "pydoc_data", "msilib", "winreg", "winsound", "_")


@functools.lru_cache(maxsize=1)
def stdlib_docs() -> str:
    """Docstrings of standard-library modules and their public members, in a fixed order."""
    import sys

    names = sorted(m.name for m in pkgutil.iter_modules() if m.name in sys.stdlib_module_names)
    parts = []
    for name in names:
        if name.startswith(_SKIP):
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                mod = importlib.import_module(name)
        except Exception:  # a module that cannot import here (platform-specific) is simply left out
            continue
        doc = inspect.getdoc(mod)
        if doc:
            parts.append(doc)
        for attr in sorted(getattr(mod, "__all__", []) or []):
            obj = getattr(mod, attr, None)
            d = inspect.getdoc(obj) if obj is not None and (inspect.isclass(obj) or inspect.isfunction(obj)) else None
            if d and len(d) > 200:
                parts.append(d)
    return "\n\n".join(parts)


# Packages whose documentation is calibration text: real technical English like the standard
# library's, but a different text, so what is tuned on it is never scored on the evaluation text.
CALIBRATION_PACKAGES = ("torch", "torch.nn", "torch.nn.functional", "torch.optim", "torch.utils.data",
                        "torch.distributions", "torch.fx", "torch.autograd", "torch.linalg", "torch.fft")


@functools.lru_cache(maxsize=1)
def calibration_docs() -> str:
    """Docstrings of PyTorch's public modules, classes and functions, in a fixed order: text for
    calibrating patterns that the evaluation (``stdlib_docs``) never scores."""
    parts = []
    seen = set()
    for name in CALIBRATION_PACKAGES:
        try:
            mod = importlib.import_module(name)
        except Exception:
            continue
        doc = inspect.getdoc(mod)
        if doc and len(doc) > 200:
            parts.append(doc)
        for attr in sorted(a for a in dir(mod) if not a.startswith("_")):
            obj = getattr(mod, attr, None)
            if obj is None or id(obj) in seen or not (inspect.isclass(obj) or inspect.isfunction(obj)
                                                      or inspect.isbuiltin(obj)):
                continue
            seen.add(id(obj))
            d = inspect.getdoc(obj)
            if d and len(d) > 200:
                parts.append(d)
    return "\n\n".join(parts)


PYTHON_SOURCE_CHARS = 4_000_000  # about 1M tokens of code: enough for two 128K prompts and more


SKIPPED_SOURCE_DIRS = ("site-packages", "test", "tests", "idlelib", "tkinter")


def _stdlib_root():
    import sysconfig
    from pathlib import Path

    return Path(sysconfig.get_paths()["stdlib"])


def python_source_files() -> list[str]:
    """The standard library's ``.py`` files (paths relative to it, sorted), test suites and
    installed packages left out."""
    root = _stdlib_root()
    rels = sorted(path.relative_to(root).parts for path in root.rglob("*.py"))  # by path components
    return ["/".join(rel) for rel in rels if not any(part in SKIPPED_SOURCE_DIRS for part in rel)]


@functools.lru_cache(maxsize=1)
def python_source() -> str:
    """The standard library's own Python source (``python_source_files``, each after a
    ``# path`` line), up to ``PYTHON_SOURCE_CHARS``: long real code, for perplexity at 32K-128K
    where the documentation (about 111K tokens) would repeat inside one prompt."""
    root = _stdlib_root()
    parts, size = [], 0
    for rel in python_source_files():
        try:
            text = (root / rel).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        parts.append(f"# {rel}\n{text}")
        size += len(parts[-1])
        if size >= PYTHON_SOURCE_CHARS:
            break
    return "\n\n".join(parts)[:PYTHON_SOURCE_CHARS]


SOURCES = {"stdlib": stdlib_docs, "calibration": calibration_docs, "python": python_source}


def haystack(tokenizer, tokens: int, offset: int = 0, source: str = "stdlib") -> list[int]:
    """``tokens`` token ids of real text, starting ``offset`` tokens in: the standard library's
    documentation (``source="stdlib"``, the evaluation text), PyTorch's (``"calibration"``) or
    the standard library's source code (``"python"``)."""
    if source not in SOURCES:
        raise ValueError(f"unknown text source {source!r}; valid sources: {sorted(SOURCES)}")
    ids = _tokenized(tokenizer, source)
    if offset + tokens > len(ids):
        reps = (offset + tokens) // len(ids) + 1
        ids = ids * reps
    return ids[offset:offset + tokens]


@functools.lru_cache(maxsize=4)
def _tokenized(tokenizer, source: str = "stdlib") -> list[int]:
    return tokenizer(SOURCES[source](), add_special_tokens=False)["input_ids"]
