"""Pattern search: the kernel cost model, equal-cost candidates, planted structures, the CLI."""

import argparse
import json
import math

import pytest
import torch

from mcompile.index import (
    BLOCK,
    SENTINEL,
    SparseIndex,
    column_counts,
    index_rows,
    index_to_mask,
    runs_to_diag_prefix,
)
from mcompile.kernels.estimate import estimate_index_ref
from mcompile.pattern_db import load
from mcompile.pattern_db.cost import (
    causal_pairs,
    expected_density,
    kernel_pairs,
    pattern_pairs,
    solve_budget,
)
from mcompile.tools.search import (
    CANDIDATES,
    FIT_TOLERANCE,
    Candidate,
    Target,
    choose,
    search_layer,
)
from mcompile.patterns import Pattern, PatternKind

A, VS, BS = PatternKind.A_SHAPE, PatternKind.VERTICAL_SLASH, PatternKind.BLOCK_SPARSE


def _index(n, runs, columns):
    """A one-head index from explicit runs and columns (no key blocks)."""
    r = torch.tensor([[runs]], dtype=torch.int32).view(1, 1, -1, 2)
    rc = torch.tensor([[len(runs)]], dtype=torch.int32)
    c = torch.tensor([[columns or [SENTINEL]]], dtype=torch.int32)
    return SparseIndex(r, rc, runs_to_diag_prefix(r, rc, n), c, column_counts(c, n),
                       torch.full((1, 1, index_rows(n), 0), SENTINEL, dtype=torch.int32),
                       torch.zeros(1, 1, index_rows(n), dtype=torch.int32))


def test_kernel_pairs_counts_tiles_columns_and_blocks():
    # Two 64-row blocks; run (0, 0) is a 64-key tile per block; column 0 is gathered by both.
    assert kernel_pairs(_index(128, [(0, 0)], [0]), 128).item() == 2 * 64 * 64 + 2 * 64
    # A run (100, 130) starts left of key 0 in block 0 (empty) and block 1 (keys 0..27 of 94).
    assert kernel_pairs(_index(128, [(100, 130)], []), 128).item() == 64 * (128 - 100)
    # A last block of 10 rows counts 10 rows.
    assert kernel_pairs(_index(74, [(0, 0)], []), 74).item() == 64 * 64 + 10 * (74 - 64)


@pytest.mark.parametrize("n", [1000, 2048, 4096])
def test_kernel_work_covers_the_kept_pairs(n):
    torch.manual_seed(0)
    q, k = torch.randn(1, 4, n, 16), torch.randn(1, 2, n, 16)
    index = estimate_index_ref(q, k, None, [1, 2, 3, 0], [16, 64, 5, 0], [200, 300, 0, 0], 0.25)
    work = kernel_pairs(index, n)[0]
    kept = index_to_mask(index, n).sum((-1, -2))[0].double()
    assert (work >= kept).all()
    # Dense: every causal pair plus the future half of the diagonal tiles.
    assert work[3] == pytest.approx(causal_pairs(n) + n * BLOCK / 2, rel=0.02)


@pytest.mark.parametrize("n", [1024, 4096, 8192])
@pytest.mark.parametrize("pattern", [Pattern(A, 64, 256), Pattern(A, 397, 1626), Pattern(A, 0, 777),
                                     Pattern(BS, 4), Pattern(BS, 13)])
def test_formulas_match_the_kernel_work(n, pattern):
    """A-shape and block-sparse cost depends on the length only: the closed form must match the
    exact count (block-sparse exactly, A-shape within one 64 x 64 tile)."""
    q, k = torch.randn(1, 1, n, 8), torch.randn(1, 1, n, 8)
    index = estimate_index_ref(q, k, None, [int(pattern.kind)], [pattern.p0], [pattern.p1], 1.0)
    exact = kernel_pairs(index, n).item()
    assert abs(pattern_pairs(pattern, n) - exact) <= (0 if pattern.kind == BS else BLOCK * BLOCK)


def test_solve_budget_inverts_the_formula():
    n, target = 8192, 0.3 * causal_pairs(8192)
    for kind, share in ((A, 0.2), (VS, 0.25), (BS, 0.0)):
        b = solve_budget(kind, n, target, share=share)
        if kind == BS:
            p = Pattern(BS, round(b))
        else:
            first = round(share * b)
            p = Pattern(kind, max(first, 30 if kind == VS else 0), round(b) - first)
        assert pattern_pairs(p, n) == pytest.approx(target, rel=0.01 if kind != BS else 0.02)


def test_expected_density_is_monotone_and_bounded():
    for p in (Pattern(A, 100, 1000), Pattern(VS, 500, 2000), Pattern(BS, 20)):
        d = [expected_density(p, n) for n in (4096, 8192, 16384, 65536)]
        assert all(0 < x <= 1 for x in d) and d == sorted(d, reverse=True)
    assert expected_density(Pattern(A, 0, 1 << 20), 4096) == 1.0


def test_default_target_is_the_papers_scaled_by_length():
    t = Target()
    assert t.reference(30720) == Pattern(A, 1000, 4096) and t.reference(65536) == Pattern(A, 1000, 4096)
    r = (8192 / 30720) ** 0.7
    assert t.reference(8192) == Pattern(A, round(1000 * r), round(4096 * r))
    assert t.pairs(8192) == pattern_pairs(t.reference(8192), 8192)
    assert Target(density=0.25).pairs(4096) == 0.25 * causal_pairs(4096)
    with pytest.raises(ValueError, match="density must be in"):
        Target(density=1.5)


# ---------------------------------------------------------------------------------------------
# Planted structures
# ---------------------------------------------------------------------------------------------
N = 2048
TARGET_DENSITY = 0.3
SLASH_OFFSETS = (400, 700, 1100)  # beyond any A-shape window at this budget
COLUMNS = (333, 517, 901, 1200, 1500)  # beyond any A-shape sink at this budget


def planted_heads(n=N, d=64, seed=0):
    """q, k (1, 3, n, d), v: head 0 attends to a 4-token sink and a local window (logit slope
    1/80 per token), head 1 to five key columns and three diagonals far from the main one, head 2
    to its own query block and two random earlier blocks. Scale 1."""
    g = torch.Generator().manual_seed(seed)
    pos = torch.arange(n, dtype=torch.float64)
    q, k = torch.zeros(3, n, d, dtype=torch.float64), torch.zeros(3, n, d, dtype=torch.float64)
    slope = 1 / 80  # head 0: logit = slope * key position: decays away from the diagonal
    q[0, :, 0], k[0, :, 0] = slope, pos
    k[0, :4, 1], q[0, :, 1] = 1.0, slope * pos + 1.0  # sink tokens score e^1 above the diagonal
    # head 1: sum over frequencies 2pi/2^f of cos(w (i - j - offset)) peaks at j = i - offset
    for t, f in enumerate(range(1, 15)):
        w = 2 * math.pi / 2 ** f
        k[1, :, 2 + 2 * t], k[1, :, 3 + 2 * t] = torch.cos(w * pos), torch.sin(w * pos)
        for off in SLASH_OFFSETS:
            q[1, :, 2 + 2 * t] += torch.cos(w * (pos - off))
            q[1, :, 3 + 2 * t] += torch.sin(w * (pos - off))
    k[1, list(COLUMNS), 40], q[1, :, 40] = 1.0, 18.0  # column logits as high as the diagonals'
    nb = n // BLOCK  # head 2: one-hot key-block codes; query block m scores its chosen blocks at 8
    k[2, torch.arange(n), torch.arange(n) // BLOCK] = 1.0
    for m in range(nb):
        chosen = [m] + ([int(x) for x in torch.randperm(m - 5, generator=g)[:2]] if m > 7 else [])
        q[2, m * BLOCK:(m + 1) * BLOCK, chosen] = 8.0
    return q[None].float(), k[None].float(), torch.randn(1, 3, n, d, generator=g)


@pytest.fixture(scope="module")
def planted_search():
    q, k, v = planted_heads()
    target = TARGET_DENSITY * causal_pairs(N)
    return target, search_layer(q, k, v, 1.0, target, "output")


def test_search_picks_the_planted_pattern(planted_search):
    _, table = planted_search
    picked = [choose(head, "output").candidate.kind for head in table]
    assert picked == [A, VS, BS]
    # Not a near tie: the winner's output error is well below the best other kind's.
    for head, kind in zip(table, picked):
        best = choose(head, "output").score
        other = min(s.score for s in head if s.candidate.kind != kind and s.within_budget)
        assert best < 0.8 * other


def test_candidates_cost_the_same(planted_search):
    target, table = planted_search
    for h, head in enumerate(table):
        for s in head:
            err = abs(s.pairs - target)
            if s.candidate.kind == A:  # one token more or less changes the cost by about N
                assert err <= max(FIT_TOLERANCE * target, N)
            elif s.candidate.kind == BS or h == 1:
                # One key block more or less changes the cost by BLOCK * N, and so can one more
                # scattered diagonal (head 1's slashes are isolated runs): half a step at most.
                assert err <= BLOCK * N / 2 + 1 or not s.within_budget
            else:  # heads whose diagonals merge into a band: the fit is fine-grained
                assert err <= max(FIT_TOLERANCE * target, 2 * N) or not s.within_budget
    # Every candidate of the A-shape and block-sparse heads fits the budget.
    assert all(s.within_budget for s in table[0] + table[2] if s.candidate.kind != VS or s.candidate.share < 0.5)


def test_recall_objective_agrees_on_planted_heads():
    q, k, v = planted_heads()
    table = search_layer(q, k, v, 1.0, TARGET_DENSITY * causal_pairs(N), "recall",
                         [Candidate(A, 0.05), Candidate(VS, 0.25), Candidate(BS)], blocks=16)
    assert [choose(h, "recall").candidate.kind for h in table] == [A, VS, BS]


def test_search_layer_rejects_bad_input():
    q, k, v = torch.randn(1, 2, 256, 16), torch.randn(1, 1, 256, 16), torch.randn(1, 1, 256, 16)
    with pytest.raises(ValueError, match=r"objective must be one of \['output', 'recall'\]"):
        search_layer(q, k, v, 1.0, 1e4, "loss")
    with pytest.raises(ValueError, match="batch 1"):
        search_layer(q.expand(2, -1, -1, -1), k.expand(2, -1, -1, -1), v.expand(2, -1, -1, -1), 1.0, 1e4)


# ---------------------------------------------------------------------------------------------
# Command line on the tiny model
# ---------------------------------------------------------------------------------------------
def _run(argv):
    from mcompile.tools.db_commands import add_commands

    parser = argparse.ArgumentParser(prog="mcompile")
    add_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.fn(args)


def test_cli_search_evaluate_plot(tmp_path, capsys):
    import mcompile
    from mcompile.tools.models import tiny_llama

    db_path, vs_path = tmp_path / "db.json", tmp_path / "vs.json"
    assert _run(["search", "--model", "tiny", "--length", "1024", "--target-density", "0.3", "--blocks", "8",
                 "--out", str(db_path), "--vs-out", str(vs_path)]) == 0
    db, vs = load(db_path), load(vs_path)
    assert (db.model.num_layers, db.model.num_heads, db.model.num_kv_heads, db.model.head_dim) == (2, 4, 2, 16)
    cal = db.calibration
    assert cal["length"] == cal["budget_length"] == db.budget_length == 1024 and cal["objective"] == "output"
    assert cal["command"].startswith("mcompile search --model tiny --length 1024") and "--target-density 0.3" in cal["command"]
    assert cal["candidates"] == [c.label for c in CANDIDATES]
    assert all(h.pattern.kind == VS for layer in vs.layers for h in layer)
    assert all(h.score is not None for layer in db.layers for h in layer)

    # The searched database drives the backend, and explain reports its expected density.
    e = mcompile.explain(tiny_llama("sdpa"), torch.randint(0, 128, (1, 300)),
                         options={"pattern_db": str(db_path), "dense_below": 0})
    assert e.rewritten == 2 and list(e.sites[1].patterns) == db.patterns_for(1)
    from mcompile.patterns import scaled_budgets

    want = sum(expected_density(scaled_budgets(p, 300, 1024, 0.7), 300) for p in db.patterns_for(0)) / 4
    assert e.density(e.sites[0]) == pytest.approx(want)

    assert _run(["evaluate-db", "--model", "tiny", "--policy", f"searched={db_path}", "--policy", "default=default",
                 "--lengths", "512,1024", "--blocks", "4", "--json", str(tmp_path / "eval.json")]) == 0
    rows = json.loads((tmp_path / "eval.json").read_text())
    assert [(r["policy"], r["length"]) for r in rows] == [("searched", 512), ("default", 512),
                                                          ("searched", 1024), ("default", 1024)]
    assert all(0 < r["recall"] <= 1 and r["error"] >= 0 and 0 < r["density"] for r in rows)
    assert "searched" in capsys.readouterr().out

    assert _run(["plot", "--db", str(db_path), "--model", "tiny", "--length", "512", "--layer", "1",
                 "--head", "3", "--pixels", "64", "--out", str(tmp_path)]) == 0
    for name in ("patterns_512.png", "attention_L1_H3_512.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_rejects_bad_options(tmp_path):
    with pytest.raises(SystemExit):
        _run(["search", "--model", "tiny", "--kinds", "diagonal", "--out", str(tmp_path / "x.json")])
    with pytest.raises(ValueError, match="nothing to search"):  # the paper's target is dense at 512 tokens
        _run(["search", "--model", "tiny", "--length", "512", "--out", str(tmp_path / "x.json")])


@pytest.mark.slow
def test_shipped_database_on_smollm2_below_its_budget_length(smollm2):
    """The shipped database at 2K tokens (budgets scaled down from 8K) on real text: most of the
    attention mass kept, outputs close to dense, not everything computed."""
    from mcompile.tools.data import haystack
    from mcompile.tools.compare import evaluate_policies

    model, tok = smollm2
    ids = torch.tensor([haystack(tok, 2048, offset=50000)])  # not the calibration text
    rows = {r["policy"]: r for r in evaluate_policies(model, ids, {"searched": "smollm2-135m-instruct",
                                                                   "default": "default"}, blocks=16)}
    searched = rows["searched"]
    assert searched["recall"] >= 0.95 and searched["error"] <= 0.08 and searched["density"] <= 0.8
    assert searched["recall"] >= rows["default"]["recall"] - 0.01
