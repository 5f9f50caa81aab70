"""Which implementation runs an op on a given device, and why.

The pure-PyTorch implementations run everywhere. On CUDA the Triton kernels take over where
``capability`` says they can; otherwise the reason is logged once and the PyTorch path runs.
"""

from __future__ import annotations

import functools
import logging
from typing import Callable, Optional

import torch

from .estimate import estimate_index_ref
from .sparse_attention import sparse_attention_ref

log = logging.getLogger(__name__)


@functools.lru_cache(maxsize=None)
def _triton_module(name: str):
    try:
        import importlib

        return importlib.import_module(f"mcompile.kernels.{name}")
    except ImportError as exc:  # Triton missing or too old: the PyTorch path serves
        log.info("mcompile: Triton kernels unavailable (%s); using PyTorch implementations", exc)
        return None


def triton_reason(q: torch.Tensor) -> Optional[str]:
    """None when the Triton kernels can run on q's device and dtype, else why not."""
    if q.device.type != "cuda":
        return f"device {q.device.type} (Triton kernels run on CUDA)"
    mod = _triton_module("sparse_attention_triton")
    if mod is None:
        return "Triton kernels could not be imported"
    return mod.capability(q)


@functools.lru_cache(maxsize=None)
def _log_once(reason: str) -> None:
    log.info("mcompile: PyTorch path: %s", reason)


def attention_impl(q: torch.Tensor) -> Callable:
    reason = triton_reason(q)
    if reason is None:
        return _triton_module("sparse_attention_triton").sparse_attention_triton
    if q.device.type == "cuda":
        _log_once(reason)
    return sparse_attention_ref


def estimate_reason(q: torch.Tensor) -> Optional[str]:
    """None when the Triton estimation kernels run q, else why not (they stop at a smaller head
    dim than the attention kernel)."""
    reason = triton_reason(q)
    if reason is not None:
        return reason
    mod = _triton_module("estimate_triton")
    if mod is None:
        return "the estimation kernels could not be imported"
    if q.shape[-1] > mod.MAX_HEAD_DIM:
        return f"head dim {q.shape[-1]} (the estimation kernels support up to {mod.MAX_HEAD_DIM})"
    return None


def estimate_impl(q: torch.Tensor) -> Callable:
    reason = estimate_reason(q)
    if reason is None:
        return _triton_module("estimate_triton").estimate_index_triton
    if q.device.type == "cuda":
        _log_once(f"estimation: {reason}")
    return estimate_index_ref
