"""The package's layout holds: the runtime never imports the offline tools, no module imports
another that imports it back, and the command line's argument types parse every pattern kind."""

from __future__ import annotations

import argparse
import ast
import pathlib
import subprocess
import sys

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "mcompile"


def _modules() -> dict:
    mods = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = path
    return mods


def _imports(mods: dict) -> dict:
    """module -> the package modules it imports (at the top or inside functions)."""
    edges = {m: set() for m in mods}
    for m, path in mods.items():
        package = m if path.name == "__init__.py" else m.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                for alias in node.names:
                    full = f"{target}.{alias.name}"
                    hit = full if full in mods else target if target in mods else None
                    if hit and hit != m:
                        edges[m].add(hit)
            elif isinstance(node, ast.Import):
                edges[m].update(a.name for a in node.names if a.name in mods and a.name != m)
    return edges


def _cycles(edges: dict) -> list:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, found, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycle():
    assert _cycles(_imports(_modules())) == []


def test_cycle_finder_finds_one():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_runtime_never_imports_the_tools():
    """Nothing outside mcompile/tools imports mcompile.tools, and compiling a model with the
    backend loads none of it."""
    mods = _modules()
    edges = _imports(mods)
    leaks = {m: sorted(t for t in ts if t.startswith("mcompile.tools"))
             for m, ts in edges.items() if not m.startswith("mcompile.tools") and m != "mcompile.__main__"}
    assert {m: ts for m, ts in leaks.items() if ts} == {}
    code = ("import sys, torch, mcompile\n"
            "m = torch.nn.Linear(4, 4)\n"
            "torch.compile(m, backend='minference')(torch.randn(2, 4))\n"
            "print(sorted(k for k in sys.modules if k.startswith('mcompile.tools')))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                         cwd=PACKAGE.parent)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"


@pytest.mark.parametrize("text,want", [
    ("vertical_slash:256,512", {"kind": "vertical_slash", "vertical": 256, "slash": 512}),
    ("a_shape:128,1024", {"kind": "a_shape", "sink": 128, "local": 1024}),
    ("block_sparse:8", {"kind": "block_sparse", "blocks": 8}),
    ("block_mass:0.98", {"kind": "block_mass", "recall": 0.98}),
    ("block_mass:0.98,16", {"kind": "block_mass", "recall": 0.98, "samples": 16}),
    ("block_mass:0.98,16,max", {"kind": "block_mass", "recall": 0.98, "samples": 16, "score": "max"}),
    ("block_mass:0.99,4,max,1", {"kind": "block_mass", "recall": 0.99, "samples": 4, "score": "max", "neighbours": 1}),
    ("dense", {"kind": "dense"}),
    ('{"kind": "block_mass", "recall": 0.9}', {"kind": "block_mass", "recall": 0.9}),
])
def test_pattern_arg(text, want):
    from mcompile.patterns import Pattern
    from mcompile.tools.options import pattern_arg

    assert pattern_arg(text) == want
    Pattern.from_dict(pattern_arg(text))  # a pattern the package accepts


@pytest.mark.parametrize("text,match", [("spiral:3", "unknown pattern kind"), ("a_shape:128", r"a_shape needs \['local'\]"),
                                        ("block_mass:0.9,8,max,1,2", "takes at most 4 values"),
                                        ("block_mass:0.9,8,1", "score must be one of"),
                                        ("block_sparse:x", "blocks must be an int, got 'x'"),
                                        ("block_mass:1.5", r"recall must be a number in \(0, 1\]"),
                                        ('{"kind": "a_shape", "sink": 4}', r"a_shape needs \['local'\]"),
                                        ("{oops", "Expecting property name")])
def test_pattern_arg_rejects(text, match):
    from mcompile.tools.options import pattern_arg

    with pytest.raises(argparse.ArgumentTypeError, match=match):
        pattern_arg(text)
