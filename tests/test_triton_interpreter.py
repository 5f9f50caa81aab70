"""Runs tests/test_triton_kernels.py (the Triton kernels under Triton's interpreter, against the
PyTorch references) in a process of its own, with TRITON_INTERPRET=1 set before anything imports
Triton: in the suite's own process Triton is already imported by the time that file would set it,
and the interpreter then fails or the kernels are skipped depending on test order (conftest.py)."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import INTERPRETER_PROCESS, SHARD

pytest.importorskip("triton", reason="Triton is not installed; the Triton kernels cannot be tested")


SHARDS = 2  # the file's tests split over this many processes, so that xdist's workers share them


@pytest.mark.long
@pytest.mark.parametrize("shard", range(SHARDS))
def test_triton_kernels_under_the_interpreter(shard):
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "TRITON_INTERPRET": "1", INTERPRETER_PROCESS: "1", SHARD: f"{shard}/{SHARDS}"}
    env.pop("PYTEST_XDIST_WORKER", None)
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:randomly",
                          "tests/test_triton_kernels.py"], cwd=root, env=env, capture_output=True, text=True,
                         timeout=3000)
    tail = run.stdout[-6000:] + run.stderr[-2000:]
    assert run.returncode == 0, tail
    summary = re.search(r"(\d+) passed", run.stdout)
    assert summary and int(summary.group(1)) > 50 // SHARDS, tail  # the kernels ran; a skipped module is not a pass
    assert "skipped" not in run.stdout.splitlines()[-1], tail
