"""Pattern database: round trip, validation errors that name the field, fit to the model."""

import json

import pytest
import torch

from mcompile.tools.models import tiny_llama
from mcompile.pattern_db import ModelFingerprint, PatternDBError, load, save, uniform
from mcompile.patterns import DEFAULT_VERTICAL_SLASH, Pattern, PatternKind

MODEL = ModelFingerprint("llama", 2, 4, 2, 16, name="tiny")


def _write(tmp_path, data):
    path = tmp_path / "db.json"
    path.write_text(json.dumps(data))
    return path


def test_round_trip(tmp_path):
    db = uniform(MODEL, DEFAULT_VERTICAL_SLASH, {"length": 4096})
    save(db, tmp_path / "db.json")
    back = load(tmp_path / "db.json")
    assert back.model == MODEL and back.layers == db.layers and back.calibration == {"length": 4096}
    assert back.patterns_for(1) == [DEFAULT_VERTICAL_SLASH] * 4


@pytest.mark.parametrize("edit,message", [
    (lambda d: d.update(version=99), "version 99 is not supported"),
    (lambda d: d["model"].pop("num_heads"), "model.num_heads is missing"),
    (lambda d: d["layers"].pop(), "db.layers has 1 entries"),
    (lambda d: d["layers"][1]["heads"][2].update(kind="diagonal"), r"layers\[1\].heads\[2\]: unknown pattern kind"),
    (lambda d: d["layers"][0]["heads"][0].update(vertical=3), r"layers\[0\].heads\[0\]: vertical_slash.vertical must be >= 30"),
    (lambda d: d["layers"][0]["heads"].pop(), r"layers\[0\].heads has 3 entries"),
])
def test_corrupted_files_name_the_field(tmp_path, edit, message):
    data = uniform(MODEL, DEFAULT_VERTICAL_SLASH).to_json()
    edit(data)
    with pytest.raises(PatternDBError, match=message):
        load(_write(tmp_path, data))


def test_not_json_and_missing(tmp_path):
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(PatternDBError, match="not valid JSON"):
        load(tmp_path / "bad.json")
    with pytest.raises(PatternDBError, match="no pattern database"):
        load("no_such_database")


def test_database_for_another_model_is_refused(tmp_path):
    other = ModelFingerprint("llama", 2, 8, 2, 16)
    save(uniform(other, DEFAULT_VERTICAL_SLASH), tmp_path / "db.json")
    model = tiny_llama("sdpa")
    with pytest.raises(Exception, match="model.num_heads is 8, the model being compiled has 4"):
        with torch.no_grad():
            torch.compile(model, backend="minference", options={"pattern_db": str(tmp_path / "db.json")})(
                torch.randint(0, 128, (1, 64)))


def test_database_patterns_reach_the_graph(tmp_path):
    import mcompile

    heads = [Pattern(PatternKind.A_SHAPE, 4, 64), Pattern(PatternKind.BLOCK_SPARSE, 2), DEFAULT_VERTICAL_SLASH,
             Pattern(PatternKind.DENSE)]
    db = uniform(MODEL, DEFAULT_VERTICAL_SLASH)
    from mcompile.pattern_db import HeadEntry, PatternDB

    db = PatternDB(MODEL, (tuple(HeadEntry(p) for p in heads), db.layers[1]))
    save(db, tmp_path / "db.json")
    e = mcompile.explain(tiny_llama("sdpa"), torch.randint(0, 128, (1, 100)),
                         options={"pattern_db": str(tmp_path / "db.json"), "dense_below": 0})
    assert list(e.sites[0].patterns) == heads and e.sites[1].patterns == (DEFAULT_VERTICAL_SLASH,) * 4
    assert "database" in e.sites[0].pattern_source


@pytest.mark.parametrize("edit,message", [
    (lambda c: c.update(budget_length=-1), "calibration.budget_length must be >= 0"),
    (lambda c: c.update(budget_length="8K"), "calibration.budget_length must be an int"),
    (lambda c: c.update(budget_exponent=3), r"calibration.budget_exponent must be a number in \[0, 2\]"),
    (lambda c: c.update(length=0), "calibration.length must be >= 1"),
    (lambda c: c.update(objective="perplexity"), r"calibration.objective must be one of \['output', 'recall', 'loss'\]"),
])
def test_bad_calibration_names_the_field(tmp_path, edit, message):
    data = uniform(MODEL, DEFAULT_VERTICAL_SLASH, {"length": 4096, "budget_length": 4096}).to_json()
    edit(data["calibration"])
    with pytest.raises(PatternDBError, match=message):
        load(_write(tmp_path, data))


def test_score_must_be_a_number(tmp_path):
    data = uniform(MODEL, DEFAULT_VERTICAL_SLASH).to_json()
    data["layers"][0]["heads"][1]["score"] = True
    with pytest.raises(PatternDBError, match=r"layers\[0\].heads\[1\].score must be a number"):
        load(_write(tmp_path, data))


def test_load_checks_the_model_being_compiled(tmp_path):
    save(uniform(MODEL, DEFAULT_VERTICAL_SLASH), tmp_path / "db.json")
    assert load(tmp_path / "db.json", model=ModelFingerprint.from_config(tiny_llama("sdpa", layers=2).config)).model == MODEL
    with pytest.raises(PatternDBError, match="model.num_layers is 2, the model being compiled has 3"):
        load(tmp_path / "db.json", model=ModelFingerprint.from_config(tiny_llama("sdpa", layers=3).config))
    with pytest.raises(PatternDBError, match="model.head_dim is 16, the model being compiled has 32"):
        load(tmp_path / "db.json", model=ModelFingerprint("llama", 2, 4, 2, 32))


def test_save_refuses_what_load_would_refuse(tmp_path):
    from mcompile.pattern_db import HeadEntry, PatternDB

    db = uniform(MODEL, DEFAULT_VERTICAL_SLASH)
    broken = PatternDB(MODEL, db.layers[:1], {})
    with pytest.raises(PatternDBError, match="db.layers has 1 entries"):
        save(broken, tmp_path / "db.json")
    assert not (tmp_path / "db.json").exists()
    scored = PatternDB(MODEL, tuple(tuple(HeadEntry(h.pattern, 0.01 * j) for j, h in enumerate(layer))
                                    for layer in db.layers), {"objective": "output"})
    save(scored, tmp_path / "db.json")
    assert [h.score for h in load(tmp_path / "db.json").layers[1]] == [0.0, 0.01, 0.02, 0.03]


SMOLLM2 = ModelFingerprint("llama", 30, 9, 3, 64)


def test_shipped_smollm2_database_is_found_for_its_fingerprint():
    from mcompile.pattern_db import find_shipped, shipped
    from mcompile.pattern_db.cost import expected_density
    from mcompile.patterns import scaled_budgets

    assert "smollm2-135m-instruct" in shipped()
    db = find_shipped("llama", 9, 3, 64, num_layers=30)
    assert db is not None and db.source == "smollm2-135m-instruct"
    db.check_model(SMOLLM2)
    assert db.check_site(29, 9, 3, 64) is None and find_shipped("llama", 9, 3, 64, num_layers=2) is None
    cal = db.calibration
    assert cal["budget_length"] == cal["length"] == db.budget_length and cal["objective"] == "output"
    assert cal["command"].startswith("mcompile search --model smollm2") and "stdlib" in cal["data"]
    kinds = {h.pattern.kind for layer in db.layers for h in layer}
    assert len(kinds) >= 2  # the search chose per head, not one kind everywhere
    # Budgets scale with the length: the expected kernel density rises as prompts get shorter
    # (budgets shrink as N^0.7, the causal pairs as N^2) and stays below dense.
    mean = [sum(expected_density(scaled_budgets(h.pattern, n, db.budget_length, db.budget_exponent), n)
                for layer in db.layers for h in layer) / (30 * 9) for n in (2048, 4096, 8192, 32768)]
    assert mean == sorted(mean, reverse=True) and mean[0] < 1.0
    target = cal["target"]["density"]
    assert mean[2] == pytest.approx(target, rel=0.25)  # nominal formula vs the fitted target


def test_auto_picks_only_validated_databases(monkeypatch):
    """``pattern_db="auto"`` chooses among AUTO_SELECTED only; a shipped database stays
    reachable by name."""
    import mcompile.pattern_db as pdb

    assert pdb.find_shipped("llama", 9, 3, 64, num_layers=30, auto=True) is None
    monkeypatch.setattr(pdb, "AUTO_SELECTED", frozenset(pdb.shipped()))
    db = pdb.find_shipped("llama", 9, 3, 64, num_layers=30, auto=True)
    assert db is not None and db.model.num_layers == 30
