"""Sparse attention as Inductor sees it on CUDA: a ``triton_op`` inside a ``torch.cond``.

The default rewrite (passes/rewrite.py) calls the opaque custom op ``mcompile::sparse_attention``,
whose body chooses at run time between dense attention and the Triton kernel. Opaque ops are
invisible to Inductor: the kernel launch is a call into Python. Where the rewrite can, it calls
``sparse_attention`` below instead, which states the same choice in the graph::

    out = cond(N >= dense_below,                      # a SymBool: no guard, one graph
               sparse: index = estimate_index(q, k)   # the opaque op, only on this branch
                       cond(dense_check(index),       # 0-dim bool tensor: the run-time density check
                            dense:  SDPA(is_causal)
                            sparse: mcompile::sparse_attention_kernel   (triton_op)
               dense:  SDPA(is_causal))

AOTAutograd traces both branches (``conditional.flat_cond``: ``torch.cond`` with the workarounds
it needs), once per distinct pattern set: the whole structure is a ``conditional.shared_region``
(``invoke_subgraph``), so layers with the same patterns share one traced and lowered subgraph;
``mcompile::sparse_attention_kernel`` is a
``torch.library.triton_op`` whose body launches the kernel through ``wrap_triton``, so Inductor
copies the Triton source into its output code and launches it from its wrapper, with no Python op
in between, and lowers the dense branches' SDPA as it would for plain ``backend="inductor"``.

Where it applies (``inline_reason``): whole prompts (query length == key length, known from the
shapes), no key padding (the dense branch is plain causal SDPA), static head counts and head dims,
a positive constant scale, and on CUDA a dtype and head dim the Triton kernel supports. By default
(option ``inline_kernels``) only CUDA graphs are inlined. Everything else keeps the opaque op, as
does a graph whose inlined compile fails (backend.py compiles it again with the opaque ops). On a device without the
kernel (the CPU, in tests) the triton_op's body runs the PyTorch reference through the opaque op,
so the graph structure is the same everywhere.

Layouts: transformers hands attention q/k/v as (B, H, N, D) views of (B, N, H, D) storage and
reshapes the output back to (B, N, H * D). The operands cross the region and the conditionals
in that memory order (``conditional.flat_cond``), and every branch returns (B, N, H, D)
storage (the kernel writes it; cuDNN's SDPA already does), so neither side costs a copy. The
copies this replaced cost about 2 ms per layer of Llama-3-8B at 128K (docs/BENCHMARKS.md).

Launch configuration: a traced launch is not autotuned (Inductor would tune once, at whatever
length it sees first). It uses ``sparse_attention_triton.fixed_config``: BLOCK_N 64 and 4 warps,
which the autotuner of the opaque path chose on an H100 for head dims 64 and 128 at 4K-128K, and
3 pipeline stages where they fit in shared memory (docs/BENCHMARKS.md, "Launch configurations"
and "One loop over short runs").
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.fx.experimental.symbolic_shapes import statically_known_true

from .. import ops
from ..conditional import flat_cond, shared_region
from ..index import SparseIndex
from ..patterns import DEFAULT_BUDGET_EXPONENT

# Benchmarks only: the run-time density check (the inner conditional) off CUDA too, where it never
# fires, so that a CPU compile has the graph structure of a CUDA one (benchmarks/compile_time.py).
_DENSE_CHECK_EVERYWHERE = False


def _triton():
    from . import sparse_attention_triton

    return sparse_attention_triton


@torch.library.triton_op("mcompile::sparse_attention_kernel", mutates_args=())
def sparse_attention_kernel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, runs: torch.Tensor,
                            run_count: torch.Tensor, diag_prefix: torch.Tensor, columns: torch.Tensor,
                            column_count: torch.Tensor, blocks: torch.Tensor, block_count: torch.Tensor,
                            scale: float) -> torch.Tensor:
    """Sparse causal attention of a whole prompt (q (B, H, N, D), k/v (B, Hk, N, D), any strides)
    over the index: the Triton kernel on CUDA, launched through ``wrap_triton``; elsewhere the
    PyTorch reference (through the opaque op, with ``dense_below`` 0 so it never turns dense).
    On CUDA the output (B, H, N, Dv) is a view of (B, N, H, Dv) storage: the layout in which
    the model reshapes it next, so that no transpose copy follows."""
    index = (runs, run_count, diag_prefix, columns, column_count, blocks, block_count)
    if q.device.type != "cuda":
        return torch.ops.mcompile.sparse_attention(q, k, v, *index, None, scale, 0)
    tri = _triton()
    d, dv = q.shape[-1], v.shape[-1]
    dp, dvp = tri.padded_head_dim(d), tri.padded_head_dim(dv)
    qp, kp, vp = tri.pad_head_dim(q, dp), tri.pad_head_dim(k, dp), tri.pad_head_dim(v, dvp)
    b, h, n = q.shape[:3]
    out = torch.empty(b, n, h, dvp, dtype=q.dtype, device=q.device).transpose(1, 2)
    grid, args, meta = tri.launch_args(qp, kp, vp, out, SparseIndex(*index), scale, None, 0)
    config = tri.fixed_config(dp, dvp, q.dtype)
    torch.library.wrap_triton(tri._sparse_attention_kernel)[grid](*args, **meta, **config)
    return out if dvp == dv else out[..., :dv].transpose(1, 2).contiguous().transpose(1, 2)


@torch.library.custom_op("mcompile::dense_check", mutates_args=())
def dense_check(runs: torch.Tensor, run_count: torch.Tensor, column_count: torch.Tensor,
                block_count: torch.Tensor, n: int) -> torch.Tensor:
    """0-dim bool tensor: True when the index covers so many pairs that dense attention is faster
    (``ops.dense_by_fraction``, the opaque op's check, logged and counted the same way)."""
    empty = runs.new_empty(0)
    index = SparseIndex(runs, run_count, empty, empty, column_count, empty, block_count)
    return torch.tensor(ops.dense_by_fraction(index, n, runs.is_cuda), device=runs.device)


@dense_check.register_fake
def _(runs, run_count, column_count, block_count, n):
    return runs.new_empty((), dtype=torch.bool)


def _causal(q, k, v, scale):
    gqa = q.shape[1] != k.shape[1]
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)


def _bnhd(x: torch.Tensor) -> torch.Tensor:
    """(B, H, N, D) -> contiguous (B, N, H, D): what every branch returns, so that both agree on
    one layout, the one the model's ``transpose(1, 2).reshape`` reads without a copy (cuDNN
    SDPA and the kernel write it directly; then this is a view)."""
    return x.transpose(1, 2).contiguous()


def sparse_attention(q, k, v, kinds: list[int], p0: list[int], p1: list[int], scale: float, dense_below: int,
                     budget_length: int = 0, budget_exponent: float = DEFAULT_BUDGET_EXPONENT) -> torch.Tensor:
    """``ops.estimate_index`` + ``ops.sparse_attention`` for a whole prompt without key padding,
    as conditionals the compiler traces (module docstring; ``conditional.flat_cond``). Same
    result as the opaque ops; the estimation runs inside the sparse branch, so a prompt below
    ``dense_below`` calls no opaque op."""
    def attention(q, k, v):
        n = k.shape[2]

        def dense(q, k, v, *index):
            return _bnhd(_causal(q, k, v, scale))

        def kernel(q, k, v, *index):
            return _bnhd(torch.ops.mcompile.sparse_attention_kernel(q, k, v, *index, scale))

        def sparse(q, k, v):
            index = torch.ops.mcompile.estimate_index(q, k, None, kinds, p0, p1, scale, 0, budget_length,
                                                      budget_exponent)
            if q.device.type != "cuda" and not _DENSE_CHECK_EVERYWHERE:  # never fires off CUDA (ops.too_dense)
                return kernel(q, k, v, *index)
            runs, run_count, _, _, column_count, _, block_count = index
            check = torch.ops.mcompile.dense_check(runs, run_count, column_count, block_count, k.shape[2])
            return flat_cond(check, dense, kernel, (q, k, v), index)

        return flat_cond(n >= dense_below, sparse, dense, (q, k, v))

    out = shared_region("sparse_attention", attention, (q, k, v),
                        (kinds, p0, p1, scale, dense_below, budget_length, budget_exponent, _DENSE_CHECK_EVERYWHERE))
    return out.transpose(1, 2)  # (B, H, N, Dv), stored as (B, N, H, Dv)


def inline_reason(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_padding, scale) -> str | None:
    """None when ``sparse_attention`` can stand in for the opaque op for these (fake) inputs on
    this device; else why not."""
    if key_padding is not None:
        return "key padding (the opaque op masks it)"
    if not statically_known_true(q.shape[2] == k.shape[2]):
        return "queries are not the whole prompt (a chunk after a cached prefix)"
    if not all(isinstance(x, int) for x in (k.shape[1], q.shape[3], v.shape[3])):
        return "symbolic head count or head dim"
    if not isinstance(scale, float) or not math.isfinite(scale) or scale <= 0:
        return "the softmax scale is not a positive constant"
    if q.device.type == "cuda":
        from .dispatch import triton_reason

        reason = triton_reason(q)
        if reason is not None:
            return reason
    return None


__all__ = ["sparse_attention", "sparse_attention_kernel", "dense_check", "inline_reason"]
