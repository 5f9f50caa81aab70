"""Registers per thread of the sparse kernel, compiled for sm_90 on any machine with Triton's
bundled ptxas (no GPU). At 4 warps, 128 registers let four programs share a Hopper SM and 129-168
only three; on the H100 the key-block walk at 128 registers ran 6-10% faster than at 156-162
(docs/BENCHMARKS.md, "2026-12-07 (evening)"). A change that puts the walk of the default's
blocks-only index back above 128 fails here, before a GPU sees it."""
import json
import os
import subprocess
import sys

import pytest

triton = pytest.importorskip("triton", reason="Triton is not installed")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The compile needs Triton's compiler, not its interpreter: a process of its own without
# TRITON_INTERPRET (README's test command sets it for the whole suite).
PROBE = """
import json
from benchmarks.kernel_walk_probe import registers
print(json.dumps({d: registers(head_dim=d, kb=2048)["package"] for d in (64, 128)}))
"""


def _ptxas() -> str:
    import triton.backends.nvidia

    return os.path.join(os.path.dirname(triton.backends.nvidia.__file__), "bin", "ptxas")


@pytest.fixture(scope="module")
def package_registers():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return {int(d): r for d, r in json.loads(done.stdout.strip().splitlines()[-1]).items()}


@pytest.mark.skipif(not os.path.exists(_ptxas()), reason="Triton's bundled ptxas is not there")
@pytest.mark.parametrize("head_dim, most", [(64, 128), (128, 176)])
def test_block_walk_registers(package_registers, head_dim, most):
    package = package_registers[head_dim]  # the default's index capacity at 128K (2048 tiles)
    assert isinstance(package["registers"], int), package  # ptxas answered
    assert package["registers"] <= most, package
    assert not package["spill_bytes"], package
