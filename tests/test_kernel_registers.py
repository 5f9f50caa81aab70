"""Registers per thread of the sparse kernel, compiled for sm_90 on any machine with Triton's
bundled ptxas (no GPU). At 4 warps, 128 registers let four programs share a Hopper SM and 129-168
only three; on the H100 the key-block walk at 128 registers ran 6-10% faster than at 156-162
(docs/BENCHMARKS.md, "2026-12-07 (evening)"). A change that puts the walk of the default's
blocks-only index back above 128 fails here, before a GPU sees it."""
import os

import pytest

triton = pytest.importorskip("triton", reason="Triton is not installed")


def _ptxas() -> str:
    import triton.backends.nvidia

    return os.path.join(os.path.dirname(triton.backends.nvidia.__file__), "bin", "ptxas")


@pytest.mark.skipif(not os.path.exists(_ptxas()), reason="Triton's bundled ptxas is not there")
@pytest.mark.parametrize("head_dim, most", [(64, 128), (128, 176)])
def test_block_walk_registers(head_dim, most):
    from benchmarks.kernel_walk_probe import registers

    out = registers(head_dim=head_dim, kb=2048)  # the default's index capacity at 128K
    package = out["package"]
    assert isinstance(package["registers"], int), package  # ptxas answered
    assert package["registers"] <= most, package
    assert not package["spill_bytes"], package
