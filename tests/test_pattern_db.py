"""Pattern database: round trip, validation errors that name the field, fit to the model."""

import json

import pytest
import torch

from mcompile.models import tiny_llama
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
    with pytest.raises(Exception, match="is for 8 heads"):
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
