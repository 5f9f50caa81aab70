"""Tensor parallelism over heads (CPU, 2 gloo processes): a model loaded with transformers'
``tp_plan="auto"`` and compiled with ``backend="minference"`` runs sparse attention on every rank
over its own heads, and its logits equal one process's; a pattern database's heads are mapped to
each rank's shard (``passes/rewrite.head_shard``)."""

import json
import os

import pytest
import torch
import torch.multiprocessing as mp

from mcompile.pattern_db import HeadEntry, ModelFingerprint, PatternDB, save
from mcompile.patterns import Pattern, PatternKind
from mcompile.tools.models import tiny_llama

from .helpers import free_port, gloo_group

WAYS = 2
N = 300
# Distinct patterns per head, so that a wrong head mapping changes the logits.
HEAD_PATTERNS = [Pattern(PatternKind.VERTICAL_SLASH, 30, 100), Pattern(PatternKind.A_SHAPE, 4, 64),
                 Pattern(PatternKind.BLOCK_SPARSE, 2), Pattern(PatternKind.VERTICAL_SLASH, 60, 130)]
OPTIONS = {"dense_below": 0, "default_pattern": {"kind": "vertical_slash", "vertical": 30, "slash": 100}}


def _ids():
    return torch.randint(0, 128, (2, N), generator=torch.Generator().manual_seed(0))


def _run(model, db_path):
    """Logits of the compiled model (default pattern, then the database) and the sites' sources."""
    import functools

    import mcompile

    out, sources = {}, {}
    for name, db in (("default", None), ("db", db_path)):
        torch._dynamo.reset()
        reports = []
        backend = functools.partial(mcompile.minference_backend, options={**OPTIONS, "pattern_db": db},
                                    report_sink=reports.append)
        with torch.no_grad():
            out[name] = torch.compile(model, backend=backend)(_ids()).logits
        sources[name] = [s.pattern_source for r in reports for s in r.sites if s.rewritten]
    return out, sources


def _rank(rank: int, port: int, path: str):
    with gloo_group(rank, WAYS, port):
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(os.path.join(path, "model"), tp_plan="auto",
                                                     attn_implementation="sdpa").eval()
        out, sources = _run(model, os.path.join(path, "db.json"))
        torch.save(out, os.path.join(path, f"out{rank}.pt"))
        with open(os.path.join(path, f"sources{rank}.json"), "w") as f:
            json.dump(sources, f)


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not built")
def test_tensor_parallel_ranks_equal_one_process(tmp_path):
    model = tiny_llama("sdpa", layers=2, heads=4, kv_heads=2, head_dim=16)
    model.save_pretrained(tmp_path / "model")
    fingerprint = ModelFingerprint.from_config(model.config)
    save(PatternDB(fingerprint, tuple(tuple(HeadEntry(p) for p in HEAD_PATTERNS) for _ in range(2))),
         tmp_path / "db.json")
    mp.start_processes(_rank, args=(free_port(), str(tmp_path)), nprocs=WAYS, start_method="spawn")
    one, _ = _run(model, str(tmp_path / "db.json"))
    with torch.no_grad():
        dense = model(_ids()).logits
    for rank in range(WAYS):
        out = torch.load(tmp_path / f"out{rank}.pt")
        sources = json.loads((tmp_path / f"sources{rank}.json").read_text())
        for name in ("default", "db"):
            torch.testing.assert_close(out[name], one[name], atol=1e-5, rtol=1e-5)
        first = rank * 4 // WAYS
        assert sources["db"] == [f"database {tmp_path / 'db.json'}, heads {first}-{first + 1} "
                                 f"(tensor-parallel rank {rank} of {WAYS})"] * 2
        assert sources["default"] == ["default pattern"] * 2
    # The database's patterns drop keys (the comparison above is not dense against dense).
    assert (one["db"] - dense).abs().max() > 1e-3 and (one["db"] - one["default"]).abs().max() > 1e-3
