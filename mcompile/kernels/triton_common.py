"""What the Triton kernels share: the base-2 softmax constants, the head dims they are built
for (others zero-padded up to the next), and whether Triton's CPU interpreter runs them."""

from __future__ import annotations

import functools
import logging
import os

import torch
import triton.language as tl

log = logging.getLogger(__name__)

LOG2E = 1.4426950408889634  # exp(x) == exp2(x * LOG2E): the kernels' softmax works in base 2
# Start of a running row max: finite, so a row whose keys are all masked computes
# exp2(-inf - NEG_INIT) = 0 and exp2(NEG_INIT - NEG_INIT) = 1, never NaN; real scores are far above it.
NEG_INIT = tl.constexpr(-1.0e30)
HEAD_DIMS = (16, 32, 64, 128)  # head dims the kernels are built for (16/32 mainly for tests)
MAX_HEAD_DIM = HEAD_DIMS[-1]  # larger head dims do not fit the tiles: the references run them


def interpreting() -> bool:
    """Whether Triton's interpreter runs the kernels (TRITON_INTERPRET=1: CPU tensors, no launch options)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def padded_head_dim(d: int) -> int:
    """The kernel head dim that serves head dim ``d`` (<= MAX_HEAD_DIM): the smallest in HEAD_DIMS >= d."""
    return next(x for x in HEAD_DIMS if x >= d)


@functools.lru_cache(maxsize=None)
def _log_padding(d: int, dp: int) -> None:
    log.info("mcompile: head dim %d runs the Triton kernels zero-padded to %d (q/k/v copied once per call)", d, dp)


def pad_head_dim(x: torch.Tensor, dp: int) -> torch.Tensor:
    """x (..., D) zero-padded to (..., dp); x itself when D == dp. Zero columns leave q . k unchanged."""
    d = x.shape[-1]
    if d == dp:
        return x
    _log_padding(d, dp)
    return torch.nn.functional.pad(x, (0, dp - d))
