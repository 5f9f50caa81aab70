"""Loss-aware budget allocation: the knapsack against brute force, the targets it must respect,
the calibration attention function against plain SDPA and against the index's mask, the
database it writes."""

import argparse
import itertools

import pytest
import torch

from mcompile.tools.models import tiny_llama
from mcompile.pattern_db import ModelFingerprint, load, save
from mcompile.tools.allocate import (
    Calibration,
    Entry,
    Session,
    _knapsack,
    allocate,
    database,
    losses,
    model_means,
    sensitivity,
)
from mcompile.tools.db_commands import _kept_targets
from mcompile.patterns import DENSE, Pattern, PatternKind

VS = PatternKind.VERTICAL_SLASH
N = 320  # 5 query blocks: a 100-slash budget keeps a strict subset of the causal keys


def _calibration(vocab: int, seed: int = 0) -> Calibration:
    g = torch.Generator().manual_seed(seed)
    texts = [torch.randint(0, vocab, (1, N), generator=g)]
    needle = torch.randint(0, vocab, (1, N + 3), generator=g)
    return Calibration(texts, N // 4, [(needle, N, N)], "random ids")


@pytest.fixture(scope="module")
def model():
    return tiny_llama(layers=2, heads=4, kv_heads=2, head_dim=16, vocab=128, seed=3)


def test_knapsack_is_exact():
    g = torch.Generator().manual_seed(0)
    for trial in range(30):
        layers, options = 3, 4
        values = torch.randn(layers, options, generator=g, dtype=torch.float64)
        costs = torch.randint(0, 6, (layers, options), generator=g)
        capacity = int(torch.randint(0, 15, (1,), generator=g))
        brute = None
        for choice in itertools.product(range(options), repeat=layers):
            if sum(int(costs[i, j]) for i, j in enumerate(choice)) <= capacity:
                v = sum(float(values[i, j]) for i, j in enumerate(choice))
                brute = v if brute is None or v < brute else brute
        got = _knapsack(values, costs, capacity)
        if brute is None:
            assert got is None
        else:
            assert sum(int(costs[i, j]) for i, j in enumerate(got)) <= capacity
            assert sum(float(values[i, j]) for i, j in enumerate(got)) == pytest.approx(brute)


def _entry(text, kept, recall=1.0):
    return Entry(text, 0.0, {4096: kept, 8192: kept * 0.8}, {4096: recall, 8192: recall})


def test_allocate_respects_targets_and_recall_floor():
    # Layer 0 is sensitive (sparse costs loss), layer 1 is not: the budget goes to layer 0.
    table = [[_entry(0.10, 0.2), _entry(0.02, 0.5), _entry(0.0, 1.0)],
             [_entry(0.001, 0.2), _entry(0.0005, 0.5), _entry(0.0, 1.0)]]
    alloc = allocate(table, {4096: 0.36})
    assert alloc.choice == [1, 0]
    assert alloc.kept[4096] == pytest.approx(0.35) and alloc.predicted_text == pytest.approx(0.021)
    # A tighter target forces both cheap; an impossible one is refused.
    assert allocate(table, {4096: 0.2}).choice == [0, 0]
    assert allocate(table, {4096: 0.1}) is None
    # Every length's target binds: 8192's kept is 0.8x the 4096 one.
    assert allocate(table, {4096: 1.0, 8192: 0.29}).choice == [1, 0]
    assert allocate(table, {4096: 1.0, 8192: 0.27}).choice == [0, 0]
    # The recall floor moves budget to the layer whose recall is low, at a loss cost.
    table[1][0] = _entry(0.001, 0.2, recall=0.80)
    table[1][1] = _entry(0.0005, 0.5, recall=0.99)
    alloc = allocate(table, {4096: 0.36}, min_recall=0.95)
    assert alloc.choice == [0, 1] and min(alloc.recall.values()) >= 0.95
    assert allocate(table, {4096: 0.2}, min_recall=0.95) is None


def test_session_dense_and_covering_patterns_match_the_model(model):
    cal = _calibration(model.config.vocab_size)
    plain = losses(model, cal, "cpu")
    covering = Pattern(VS, N, N)  # every column and diagonal: the index keeps every causal pair
    with Session(model, reference_length=0) as s:
        dense, _, _ = s.run(cal, {})
        full, kept, recall = s.run(cal, {0: covering, 1: covering}, measure=True)
        sparse, kept_s, _ = s.run(cal, {1: Pattern(VS, 30, 100)}, measure=True)
    assert model.config._attn_implementation == "sdpa"  # restored
    assert dense.text == pytest.approx(plain.text, abs=1e-6) and dense.needle == pytest.approx(plain.needle, abs=1e-6)
    assert full.text == pytest.approx(plain.text, abs=1e-4) and full.needle == pytest.approx(plain.needle, abs=1e-4)
    assert all(v == pytest.approx(1.0) for v in kept.values()) and all(v == pytest.approx(1.0) for v in recall.values())
    assert set(kept_s) == {(1, N)}  # the needle prompt counts at its nominal length
    assert kept_s[(1, N)] < 0.9
    assert abs(sparse.text - plain.text) > 1e-5  # the sparse path ran and dropped keys


def test_session_sparse_layer_equals_masked_dense(model):
    """With one layer sparse, the loss equals that of the model whose layer runs dense attention
    over the index's mask materialised."""
    import torch.nn.functional as F
    from transformers import AttentionInterface

    from mcompile.index import SparseIndex, index_to_mask
    from mcompile.kernels.estimate import estimate_index_ref
    from mcompile.patterns import encode

    cal = _calibration(model.config.vocab_size, seed=1)
    pattern = Pattern(VS, 40, 100)
    with Session(model, reference_length=0) as s:
        got, _, _ = s.run(cal, {1: pattern})

    def masked(module, q, k, v, attention_mask, scaling=None, dropout=0.0, **kw):
        n, h = k.shape[2], q.shape[1]
        kk, vv = k.repeat_interleave(h // k.shape[1], 1), v.repeat_interleave(h // k.shape[1], 1)
        if module.layer_idx == 1:
            kinds, p0, p1 = encode([pattern] * h)
            mask = index_to_mask(SparseIndex(*estimate_index_ref(q, k, None, kinds, p0, p1, scaling)), n)
        else:
            mask = torch.ones(n, n, dtype=torch.bool).tril()
        return F.scaled_dot_product_attention(q, kk, vv, attn_mask=mask, scale=scaling).transpose(1, 2), None

    AttentionInterface.register("test_masked", masked)
    model.set_attn_implementation("test_masked")
    try:
        want = losses(model, cal, "cpu")
    finally:
        model.set_attn_implementation("sdpa")
    assert got.text == pytest.approx(want.text, abs=1e-4)
    assert got.needle == pytest.approx(want.needle, abs=1e-4)


def test_sensitivity_and_database_round_trip(model, tmp_path):
    cal = _calibration(model.config.vocab_size, seed=2)
    options = [Pattern(VS, 30, 100), Pattern(VS, 64, 200), DENSE]
    with Session(model, reference_length=0) as s:
        _, table = sensitivity(s, cal, options, model.config.num_hidden_layers)
    assert len(table) == 2 and all(len(row) == 3 for row in table)
    for row in table:
        assert row[2].text == 0.0 and row[2].kept == {N: 1.0}
        assert 0 < row[0].kept[N] < row[1].kept[N] <= 1.0  # the larger budget keeps more
        assert all(0 < r <= 1.0 + 1e-6 for e in row for r in e.recall.values())
    alloc = allocate(table, {N: 0.9})
    assert alloc is not None and alloc.kept[N] <= 0.9 + 1e-9
    fp = ModelFingerprint.from_config(model.config, "tiny")
    db = database(fp, options, alloc, table, {"length": N, "budget_length": 0, "objective": "loss"})
    save(db, tmp_path / "db.json")
    back = load(tmp_path / "db.json", model=fp)
    assert [back.patterns_for(i)[0] for i in range(2)] == alloc.patterns(options)
    assert back.calibration["objective"] == "loss"


def test_measured_means_count_dense_layers_as_keeping_everything(model):
    """The all-layers check of an allocation that leaves a layer dense: the model's mean kept
    fraction counts that layer as 1, so it equals the mean of the table's per-layer entries."""
    cal = _calibration(model.config.vocab_size, seed=4)
    options = [Pattern(VS, 30, 100), DENSE]
    with Session(model, reference_length=0) as s:
        _, table = sensitivity(s, cal, options, model.config.num_hidden_layers)
        _, kept, recall = s.run(cal, {0: DENSE, 1: options[0]}, measure=True)
    assert {layer for layer, _ in kept} == {1}  # the dense layer is not measured
    means = model_means(kept, 2)
    assert means[N] == pytest.approx((1.0 + table[1][0].kept[N]) / 2)
    assert model_means(recall, 2)[N] == pytest.approx((1.0 + table[1][0].recall[N]) / 2)


def test_kept_targets_option():
    assert _kept_targets("4096:0.28,8192:0.24") == {4096: 0.28, 8192: 0.24}
    for bad in ("4096", "4096:1.5", "x:0.2"):
        with pytest.raises(argparse.ArgumentTypeError):
            _kept_targets(bad)


def test_entry_json_round_trip():
    e = Entry(0.01, -0.2, {4096: 0.3, 8192: 0.2}, {4096: 0.96, 8192: 0.95})
    assert Entry.from_json(e.to_json()) == e


def test_sensitivity_resumes_an_interrupted_table(model):
    cal = _calibration(model.config.vocab_size, seed=4)
    options = [Pattern(VS, 30, 100), DENSE]
    saved = []
    with Session(model, reference_length=0) as s:
        base, full = sensitivity(s, cal, options, 2, on_layer=lambda b, t: saved.append(len(t)))
        _, resumed = sensitivity(s, cal, options, 2, base=base, table=full[:1])
    assert saved == [1, 2]
    assert resumed == full


def test_calibration_text_is_not_the_evaluation_text():
    from mcompile.tools.data import calibration_docs, haystack, stdlib_docs

    assert len(calibration_docs()) > 100_000 and calibration_docs()[:2000] not in stdlib_docs()
    with pytest.raises(ValueError, match="unknown text source"):
        haystack(None, 10, source="wiki")


def test_python_source_text_is_long_code_without_tests():
    """The long-prompt perplexity text (benchmarks/long_perplexity.py): the standard library's
    source, long enough for 128K prompts without repeating, test suites left out."""
    from mcompile.tools.data import PYTHON_SOURCE_CHARS, python_source, python_source_files, stdlib_docs

    files = python_source_files()
    assert files == sorted(files, key=lambda f: f.split("/")) and not any(set(f.split("/")) & {"test", "tests", "site-packages"} for f in files)
    text = python_source()
    assert len(text) == PYTHON_SOURCE_CHARS and text.startswith(f"# {files[0]}\n") and "\ndef " in text
    assert text[:2000] not in stdlib_docs()


def test_targets_at_unmeasured_lengths_are_an_error():
    table = [[_entry(0.1, 0.2), _entry(0.0, 1.0)]]
    with pytest.raises(ValueError, match="6144"):
        allocate(table, {6144: 0.3})


@pytest.mark.slow
def test_allocate_command_stops_at_its_time_limit_and_resumes(tmp_path, capsys):
    """``mcompile allocate`` on the real model, through the CLI: a time limit stops it after the
    first layer with exit code 3 and the table saved; ``--from-table`` resumes from that table
    (same first row, one more layer) instead of measuring again."""
    import json

    from mcompile.tools.cli import main

    path = tmp_path / "allocation.json"

    def allocate_cli(*extra, slashes="128"):
        return main(["allocate", "--device", "cpu", "--window", "256", "--needle-lengths", "256", "--depths", "0.5",
                     "--verticals", "64", "--slashes", slashes, "--kept", "256:0.9", "--reference-length", "256",
                     "--quiet", "--time-limit", "0.001", "--out", str(tmp_path), *extra])

    assert allocate_cli() == 3
    first = json.loads(path.read_text())
    assert "resume with --from-table" in capsys.readouterr().out
    assert first["options"] == ["vertical_slash(vertical=64, slash=128)", "dense"]
    assert len(first["table"]) == 1 and first["allocations"] == []
    assert "calibration_docs" in first["calibration"]
    assert allocate_cli("--from-table", str(path)) == 3
    second = json.loads(path.read_text())
    assert second["dense"] == first["dense"]
    assert len(second["table"]) == 2 and second["table"][0] == first["table"][0]
    kept = second["table"][1][0]["kept"]["256"]
    assert 0 < kept < 1 and second["table"][1][1]["kept"]["256"] == 1.0  # the sparse option, then dense
    # a table measured with other options is refused, not silently mixed in
    with pytest.raises(SystemExit, match="other options"):
        allocate_cli("--from-table", str(path), slashes="256")
