"""The accuracy harness (mcompile.tools.eval): metrics against their definitions on small inputs, the
CLI, the reports, and a fast real-weights subset of ``mcompile eval`` (marked slow)."""

import argparse
import math

import pytest
import torch
import torch.nn.functional as F

from mcompile.tools.capture import attention_recall
from mcompile.tools.eval import (
    EvalSpec,
    Variant,
    add_commands,
    attention,
    check_targets,
    compiled,
    needle_grid,
    perplexity,
    report,
    run_eval,
)
from mcompile.tools.eval.cli import spec_from_args
from mcompile.index import BLOCK
from mcompile.kernels.estimate import estimate_index_ref
from mcompile.kernels.sparse_attention import sparse_attention_ref
from mcompile.tools.models import tiny_llama

from .helpers import dense_causal, qkv

VS = 2  # PatternKind.VERTICAL_SLASH


def _parse(argv):
    parser = argparse.ArgumentParser()
    add_commands(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(argv)


def test_sample_rows_spread_and_last_block():
    rows = attention.sample_rows(1000, 4)
    assert all(r % BLOCK == 0 and 0 <= r < 1000 for r in rows)
    assert rows[0] == 0 and rows[-1] == 960 and len(rows) == 4
    assert attention.sample_rows(130, 10) == [0, 64, 128]  # fewer blocks than asked: all of them


def test_recall_and_error_match_their_definitions():
    """Recall equals capture.attention_recall; the output error is that of sparse_attention_ref
    against dense attention, on the same sampled rows."""
    b, h, hk, n, d = 1, 4, 2, 333, 16
    q, k, v = qkv(b, h, hk, n, d, seed=1)
    scale = d ** -0.5
    index = estimate_index_ref(q, k, None, [VS] * h, [30] * h, [100] * h, scale)
    rows = [0, 128, 320]
    recall, error = attention.recall_and_error(q, k, v, index, scale, rows)
    torch.testing.assert_close(recall, attention_recall(q, k, index, scale, rows=rows), atol=1e-5, rtol=1e-5)
    sparse, dense = sparse_attention_ref(q, k, v, index, scale), dense_causal(q, k, v, scale)
    pick = torch.cat([torch.arange(r, min(n, r + BLOCK)) for r in rows])
    want = ((sparse - dense)[:, :, pick].pow(2).sum((-1, -2)) / dense[:, :, pick].pow(2).sum((-1, -2))).sqrt()
    torch.testing.assert_close(error, want, atol=1e-4, rtol=1e-4)
    assert (recall < 0.999).all() and (error > 1e-3).all()  # the pattern really drops keys here
    full = estimate_index_ref(q, k, None, [0] * h, [0] * h, [0] * h, scale)  # dense index
    recall, error = attention.recall_and_error(q, k, v, full, scale, rows)
    torch.testing.assert_close(recall, torch.ones(b, h))
    assert error.max() < 1e-5


def test_measure_uses_the_backend_patterns():
    model = tiny_llama(layers=2)
    options = {"dense_below": 0, "pattern_db": None,
               "default_pattern": {"kind": "vertical_slash", "vertical": 30, "slash": 100}}
    patterns = attention.layer_patterns(model, options)
    assert sorted(patterns) == [0, 1] and all(p.describe() == "vertical_slash(vertical=30, slash=100)"
                                              for p in patterns[0][0])
    layers = attention.measure(model, torch.randint(0, 128, (1, 400)), patterns, row_blocks=4)
    assert [r["layer"] for r in layers] == [0, 1]
    for r in layers:
        assert len(r["recall"]) == 4 and all(0 < x <= 1 for x in r["recall"])
        assert all(0 < f < 1 for f in r["kept_fraction"])  # 30 + 100 of 400 keys: a real sparse index
    s = attention.summarize(layers)
    assert s["heads"] == 8 and s["recall_min"] <= s["recall_mean"] <= 1


def test_windows_score_every_token_once():
    w = perplexity.windows(4096, 1024, 512)
    assert w[0] == (0, 1) and w[1] == (512, 512) and w[-1] == (3072, 512)
    assert 1023 + 512 * (len(w) - 1) == 4095  # every token but the first, once
    with pytest.raises(ValueError, match="stride"):
        perplexity.windows(4096, 1024, 2048)
    with pytest.raises(ValueError, match="fewer than one window"):
        perplexity.windows(100, 1024, 512)


def test_perplexity_equals_cross_entropy_of_full_logits():
    model = tiny_llama(layers=2)
    tokens = torch.randint(0, 128, (300,), generator=torch.Generator().manual_seed(0)).tolist()
    got = perplexity.perplexity(model, tokens, window=300, stride=150)
    with torch.no_grad():
        logits = model(torch.tensor([tokens])).logits[0]
    want = math.exp(F.cross_entropy(logits[:-1], torch.tensor(tokens[1:])).item())
    assert got["scored"] == 299 and len(got["windows"]) == 1
    assert got["perplexity"] == pytest.approx(want, rel=1e-4)


def test_compiled_records_rewrites_and_undoes_itself():
    model = tiny_llama(layers=3)
    ids = torch.randint(0, 128, (1, 200))
    with compiled(model, Variant("minference", "eager", {"dense_below": 0, "pattern_db": None})) as comp:
        with torch.no_grad():
            model(ids, use_cache=False)
    assert comp.rewritten == 3 and comp.summary()["prefill_rewritten"] == 3
    assert model._compiled_call_impl is None
    with compiled(model, Variant("dense", "eager")) as comp, torch.no_grad():
        model(ids, use_cache=False)
    assert comp.reports == [] and comp.rewritten == 0


def test_variant_rejects_bad_options():
    with pytest.raises(ValueError, match="unknown minference option"):
        Variant("minference", "eager", {"dense_bellow": 0})
    with pytest.raises(ValueError, match="variant must be"):
        Variant("sparse")


def test_needle_compare_lost_and_gained():
    dense = [{"length": 1024, "depth": 0.1, "passed": True}, {"length": 1024, "depth": 0.5, "passed": False}]
    sparse = [{"length": 1024, "depth": 0.1, "passed": False}, {"length": 1024, "depth": 0.5, "passed": True}]
    c = needle_grid.compare(dense, sparse)
    assert c["lost"] == [(1024, 0.1)] and c["gained"] == [(1024, 0.5)] and not c["target_met"]
    assert needle_grid.cell_value(2048, 0.1) != needle_grid.cell_value(2048, 0.3)
    assert needle_grid.cell_value(2048, 0.1) == needle_grid.cell_value(2048, 0.1)


def _fake_results(rewritten=30, dense_below=0, lengths=(1024,)):
    cells = [{"length": n, "depth": d, "tokens": n, "value": "1", "answer": "1", "passed": True}
             for n in lengths for d in (0.1, 0.9)]
    comp = {"graphs": [], "prefill_rewritten": rewritten}
    spec = EvalSpec(lengths=lengths, options={"dense_below": dense_below, "pattern_db": None})
    results = {"spec": {"model": "m", "dtype": "float32", "device": "cpu", "command": "mcompile eval"},
               "variants": [], "needle": {"dense": {"cells": cells}, "minference": {"cells": cells, "compile": comp}},
               "perplexity": {}, "attention": {"by_length": {}}}
    results["needle"]["comparison"] = needle_grid.compare(cells, cells)
    return spec, results


def test_targets_fail_when_nothing_ran_sparse():
    spec, results = _fake_results()
    t = check_targets(spec, results)
    assert t["sparse_ran"]["met"] and t["needle_rewritten"]["met"] and t["needle"]["met"]
    spec, results = _fake_results(rewritten=0)
    assert check_targets(spec, results)["needle_rewritten"]["met"] is False
    spec, results = _fake_results(dense_below=4096)  # every prompt below dense_below: the op ran dense
    assert check_targets(spec, results)["sparse_ran"]["met"] is False


def test_report_writes_markdown_and_heatmap(tmp_path):
    spec, results = _fake_results(lengths=(1024, 2048))
    results["targets"] = check_targets(spec, results)
    report.write(results, tmp_path)
    md = (tmp_path / report.MARKDOWN).read_text()
    assert "| 10% | pass / pass | pass / pass |" in md and "Command: `mcompile eval`" in md
    assert (tmp_path / report.HEATMAP).read_bytes()[:4] == b"\x89PNG"


def test_cli_parses_into_a_spec():
    args = _parse(["eval", "--lengths", "1024,2048", "--depths", "0.2,0.8", "--pattern-db", "none",
                   "--pattern", "vertical_slash:64,128", "--device", "cpu", "--parts", "needle,perplexity"])
    spec = spec_from_args(args)
    assert spec.lengths == (1024, 2048) and spec.depths == (0.2, 0.8) and spec.parts == ("needle", "perplexity")
    assert spec.options == {"dense_below": 0, "pattern_db": None,
                            "default_pattern": {"kind": "vertical_slash", "vertical": 64, "slash": 128}}
    assert spec.compiler == "eager" and spec.dtype == "float32"
    assert spec_from_args(_parse(["eval", "--pattern-db", "auto", "--device", "cpu"])).options["pattern_db"] == "auto"
    for bad in (["--depths", "1.5"], ["--parts", "needle,speed"], ["--lengths", "2k"]):
        with pytest.raises(SystemExit):
            _parse(["eval", *bad])


def test_run_eval_rejects_unknown_part():
    with pytest.raises(ValueError, match="valid parts"):
        run_eval(EvalSpec(parts=("needle", "speed")))


@pytest.mark.slow
@pytest.mark.long
def test_fast_subset_on_smollm2(tmp_path):
    """CI's subset of the documented full run: one length, two depths, a short perplexity
    window, recall on every layer. The targets checked are those that hold at this length;
    the perplexity target is for the full 8K context (docs/ACCURACY.md)."""
    spec = EvalSpec(lengths=(1024,), depths=(0.3, 0.7), ppl_window=1024, ppl_stride=512, ppl_tokens=1536,
                    row_blocks=8, out_dir=str(tmp_path), progress=False, command="test_eval fast subset")
    results = run_eval(spec)
    t = results["targets"]
    assert t["sparse_ran"]["met"] and t["needle_rewritten"]["attentions"] == 30
    assert t["perplexity_rewritten"]["attentions"] == 30
    assert results["needle"]["comparison"]["dense_passed"] == 2, results["needle"]["dense"]["cells"]
    assert t["needle"]["met"], results["needle"]["minference"]["cells"]
    d, m = results["perplexity"]["dense"]["perplexity"], results["perplexity"]["minference"]["perplexity"]
    assert m != d  # the sparse path ran and dropped keys
    assert t["recall"]["met"], t["recall"]
    summary = results["attention"]["by_length"]["1024"]["summary"]
    # keys were dropped (a diffuse head may keep every tile at 1K: block-mass keeps what it needs)
    assert summary["layers"] == 30 and summary["kept_fraction_mean"] < 1.0
    assert (tmp_path / "eval.json").exists() and (tmp_path / report.HEATMAP).exists()
