"""Every op mcompile registers, in the ``mcompile`` library namespace (their fake implementations
use symbolic arithmetic only, so one compiled graph serves every length):

- ``mcompile::estimate_index`` builds a layer's SparseIndex (all heads at once) and
  ``mcompile::sparse_attention`` consumes it; ``mcompile::dense_attention`` is the dense
  answer with an explicit mask (a chunk after a cached prefix, key padding). Whether an attention
  runs dense or sparse is decided by ``runs_dense`` in the graph (passes/lowering.py), not by
  these ops: they compute what they are asked. On CUDA the bodies run the Triton kernels where
  ``kernels.dispatch`` allows, and the pure-PyTorch implementations otherwise.
- ``mcompile::sparse_attention_kernel`` (a ``torch.library.triton_op``: Inductor copies the
  kernel into its own code) and ``mcompile::dense_check`` (the run-time density check): what the
  lowering puts in its conditionals where the kernel sits in the graph.
- ``mcompile::chunked_mlp``: a gated MLP run over the tokens a chunk at a time (below).

Queries may be a chunk after a cached prefix: q (B, H, Nq, D) over k/v (B, Hk, N, D) with
Nq <= N; query row i is at position ``N - Nq + i`` and sees keys up to it (bottom-right
causal alignment, index.py). The index is built over N.

The chunked MLP::

    out = down(act(gate(x)) * up(x))        x: (..., hidden) -> out: (..., hidden_out)

Inductor compiles a gated MLP into gate and up matmuls whose outputs are N x intermediate_size
each (Llama-3-8B at 1M tokens: 28 GiB apiece in bf16). This op computes the same function
``chunk`` tokens at a time (tokens of all batch rows flattened), writing each chunk's result into
its rows of the output, so the largest temporaries are chunk x intermediate_size; the loop over
chunks is a run-time loop, not a guard. Each chunk's activation-multiply is one fused kernel
(kernels/act_mul_triton.py on CUDA, the same one Inductor would generate). Inference only: the
op has no backward.
"""

from __future__ import annotations

import functools
import logging
from typing import Optional

import torch
import torch.nn.functional as F
from torch._dynamo.utils import counters

from .index import BLOCK, SparseIndex, computed_fraction, index_rows
from .kernels import dispatch
from .kernels.act_mul import ACTIVATIONS, act_mul_ref
from .kernels.estimate import estimate_index_ref, index_capacity
from .kernels.sparse_attention import sparse_attention_ref
from .patterns import DEFAULT_BUDGET_EXPONENT, LAST_Q, decode, scale_lists

log = logging.getLogger(__name__)

# A chunk after a cached prefix with fewer queries than this stays dense: estimating its
# pattern reads as many (query, key) pairs as its dense attention (decode steps, draft tokens).
MIN_SPARSE_CHUNK = LAST_Q
# Dense attention with an explicit mask (padding, or a chunk after a cached prefix) runs in
# query chunks whose (rows, keys) boolean mask stays under this many entries.
DENSE_MASK_ENTRIES = 1 << 26


# Past this share of computed pairs the sparse kernel is slower than cuDNN's dense attention: it
# runs below cuDNN's throughput per computed pair and estimation costs extra (docs/BENCHMARKS.md,
# benchmarks/kernels.py).
DENSE_ABOVE_FRACTION = 0.5
# The check costs one device-to-host copy per layer; below this key length it is not worth it
# (and such prompts normally run dense anyway, see ``dense_below``).
FRACTION_CHECK_MIN = 16384


def dense_is_faster(fraction: float, n: int) -> bool:
    """The rule of the density check: at key length ``n`` (checked from FRACTION_CHECK_MIN on),
    an index computing ``fraction`` of the causal pairs runs dense attention instead."""
    return n >= FRACTION_CHECK_MIN and fraction > DENSE_ABOVE_FRACTION


def too_dense_many(items: list, on_cuda: bool) -> list:
    """For each (index or None, key length n): the computed fraction where it says dense attention
    would be faster (CUDA, long inputs, not while a CUDA graph is being captured), else None. Every
    checked index's fraction comes back in one host read."""
    out = [None] * len(items)
    checked = [i for i, (index, n) in enumerate(items) if index is not None and n >= FRACTION_CHECK_MIN]
    if not on_cuda or not checked:
        return out
    if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
        return out  # a host read would break the capture
    fractions = torch.stack([computed_fraction(items[i][0], items[i][1]) for i in checked]).tolist()
    for i, fraction in zip(checked, fractions):
        if dense_is_faster(fraction, items[i][1]):
            out[i] = fraction
    return out


def too_dense(index: SparseIndex, n: int, on_cuda: bool) -> Optional[float]:
    """``too_dense_many`` of one index."""
    return too_dense_many([(index, n)], on_cuda)[0]


def dense_by_fraction_many(items: list, on_cuda: bool) -> list:
    """``too_dense_many`` as booleans, each that fires logged and counted
    (``counters["mcompile"]["dense_by_fraction"]``)."""
    fractions = too_dense_many(items, on_cuda)
    for (_, n), fraction in zip(items, fractions):
        if fraction is not None:
            counters["mcompile"]["dense_by_fraction"] += 1
            log.info("mcompile: sparse index covers %.0f%% of the causal pairs at N=%d (> %.0f%%): dense attention "
                     "is faster, running it", 100 * fraction, n, 100 * DENSE_ABOVE_FRACTION)
    return [fraction is not None for fraction in fractions]


def dense_by_fraction(index: SparseIndex, n: int, on_cuda: bool) -> bool:
    """``dense_by_fraction_many`` of one index."""
    return dense_by_fraction_many([(index, n)], on_cuda)[0]


def runs_dense(nq, nk, dense_below: int):
    """Whether an attention of ``nq`` queries over ``nk`` keys runs dense: context shorter than
    ``dense_below`` (``nk``, the key length: the prompt, or cached prefix + chunk), or a short
    chunk after a cached prefix. The one place this is decided; the lowering evaluates it on
    symbolic lengths (a SymBool: ``|`` and ``&``, not ``or`` and ``and``, which would guard)."""
    return (nk < dense_below) | ((nq < nk) & (nq < MIN_SPARSE_CHUNK))


def _check_inputs(q: torch.Tensor, k: torch.Tensor, v: Optional[torch.Tensor], kinds=None, p0=None, p1=None,
                  key_padding: Optional[torch.Tensor] = None, window: int = 0):
    """Shapes of q/k/v and padding, the window, and (where given) one valid pattern per query head."""
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(f"mcompile attention expects (B, H, N, D) tensors, got q {tuple(q.shape)}, k {tuple(k.shape)}")
    h, hk = q.shape[1], k.shape[1]
    if h % hk:
        raise ValueError(f"query heads ({h}) must be a multiple of key/value heads ({hk})")
    if q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} disagree in batch or head dim")
    if q.shape[2] > k.shape[2]:
        raise ValueError(f"query length ({q.shape[2]}) exceeds key length ({k.shape[2]}): queries must be "
                         "the last Nq of the N key positions")
    if v is not None and v.shape[:3] != k.shape[:3]:
        raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} disagree")
    if key_padding is not None and (key_padding.dim() != 2 or key_padding.shape[0] != q.shape[0]
                                    or key_padding.shape[1] != k.shape[2]):
        raise ValueError(f"key_padding must be (B, N) = ({q.shape[0]}, {k.shape[2]}): one flag per key of each "
                         f"batch row, got {tuple(key_padding.shape)}")
    if window < 0:
        raise ValueError(f"window must be >= 0 (0: none), got {window}")
    if kinds is None:
        return
    if not (len(kinds) == len(p0) == len(p1) == h):
        raise ValueError(f"need one pattern per query head ({h}), got {len(kinds)}")
    decode(kinds, p0, p1)  # validates kinds and budgets, with a message naming the bad field


@torch.library.custom_op("mcompile::estimate_index", mutates_args=())
def estimate_index(q: torch.Tensor, k: torch.Tensor, key_padding: Optional[torch.Tensor],
                   kinds: list[int], p0: list[int], p1: list[int], scale: float, budget_length: int = 0,
                   budget_exponent: float = DEFAULT_BUDGET_EXPONENT) -> tuple[
                       torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                       torch.Tensor]:
    """SparseIndex of every head of a layer over the N = k.shape[2] keys. Budgets are scaled to the
    length N when ``budget_length`` > 0 (``patterns.scaled_budgets``); the scaled budgets never
    exceed the given ones, so the index capacity does not change."""
    _check_inputs(q, k, None, kinds, p0, p1, key_padding)
    with _no_autocast(q):
        return _estimate_index(q, k, key_padding, kinds, p0, p1, scale, budget_length, budget_exponent)


def _no_autocast(x: torch.Tensor):
    """The ops compute in their inputs' dtype. Where a graph runs as written (compiler="eager")
    or the ops are called directly, an active autocast would recast their matmuls."""
    return torch.autocast(x.device.type, enabled=False)


def _estimate_index(q, k, key_padding, kinds, p0, p1, scale, budget_length, budget_exponent):
    n = k.shape[2]
    capacity = index_capacity(n, kinds, p0, p1)  # what the fake promises, from the unscaled budgets
    p0, p1 = scale_lists(kinds, p0, p1, n, budget_length, budget_exponent)
    impl = dispatch.estimate_impl(q)
    return tuple(impl(q, k, key_padding, kinds, p0, p1, scale, capacity=capacity))


def _index_buffers(q: torch.Tensor, n, capacity) -> tuple:
    """Index tensors of the shapes the fake promises (fake values: shapes only)."""
    b, h = q.shape[:2]
    r, c, kb = capacity
    nb = index_rows(n)
    i32 = dict(dtype=torch.int32, device=q.device)
    return (q.new_empty(b, h, r, 2, **i32), q.new_empty(b, h, **i32), q.new_empty(b, h, n + 1, **i32),
            q.new_empty(b, h, c, **i32), q.new_empty(b, h, nb, **i32), q.new_empty(b, h, nb, kb, **i32),
            q.new_empty(b, h, nb, **i32))


@estimate_index.register_fake
def _(q, k, key_padding, kinds, p0, p1, scale, budget_length=0, budget_exponent=DEFAULT_BUDGET_EXPONENT):
    n = k.shape[2]
    return _index_buffers(q, n, index_capacity(n, kinds, p0, p1))


@torch.library.custom_op("mcompile::dense_attention", mutates_args=())
def dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_padding: Optional[torch.Tensor],
                    scale: float, window: int = 0) -> torch.Tensor:
    """Causal attention through PyTorch's SDPA (cuDNN or flash on GPU), GQA without copies.

    q (B, H, Nq, D) over k/v (B, Hk, N, D): query row i is at position N - Nq + i (bottom-right
    alignment; SDPA's ``is_causal`` is top-left aligned when Nq != N, so that case and key
    padding get an explicit mask, built per chunk of query rows: O(DENSE_MASK_ENTRIES) memory).
    Rows whose keys are all padded get zeros. ``window`` > 0: a sliding window, each query keeps
    the keys less than ``window`` positions behind it (the mask per query chunk covers only
    those keys)."""
    _check_inputs(q, k, v, key_padding=key_padding, window=window)
    with _no_autocast(q):
        return _dense_attention(q, k, v, key_padding, scale, window)


def _dense_attention(q, k, v, key_padding, scale, window=0):
    gqa = q.shape[1] != k.shape[1]
    nq, n = q.shape[2], k.shape[2]
    if window >= n:
        window = 0  # every key is within the window
    if key_padding is None and nq == n and not window:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
        return out.contiguous()
    p = n - nq
    out = torch.empty(*q.shape[:3], v.shape[-1], dtype=q.dtype, device=q.device)
    step = max(BLOCK, DENSE_MASK_ENTRIES // max(1, q.shape[0] * n))
    keys = torch.arange(n, device=q.device)
    for r0 in range(0, nq, step):
        r1 = min(nq, r0 + step)
        end = p + r1  # keys at or past this position are in every row's future
        start = max(0, p + r0 - window + 1) if window else 0  # keys before it are behind every row's window
        rows = torch.arange(p + r0, end, device=q.device)
        mask = keys[None, start:end] <= rows[:, None]
        if window:
            mask = mask & (keys[None, start:end] > rows[:, None] - window)
        mask = mask[None, None]  # (1, 1, rows, keys)
        if key_padding is not None:
            mask = mask & key_padding[:, None, None, start:end].bool()
        o = F.scaled_dot_product_attention(q[:, :, r0:r1], k[:, :, start:end], v[:, :, start:end], attn_mask=mask,
                                           scale=scale, enable_gqa=gqa)
        if key_padding is not None:
            o = torch.where(mask.any(-1, keepdim=True), o, 0)  # no unpadded key -> zeros
        out[:, :, r0:r1] = o
    return out


@dense_attention.register_fake
def _(q, k, v, key_padding, scale, window=0):
    return q.new_empty(*q.shape[:3], v.shape[-1])


@torch.library.custom_op("mcompile::sparse_attention", mutates_args=())
def sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, runs: torch.Tensor,
                     run_count: torch.Tensor, diag_prefix: torch.Tensor, columns: torch.Tensor,
                     column_count: torch.Tensor, blocks: torch.Tensor, block_count: torch.Tensor,
                     key_padding: Optional[torch.Tensor], scale: float, window: int = 0) -> torch.Tensor:
    """Causal attention of q (B, H, Nq, D) over k/v (B, Hk, N, D), Nq <= N, keeping what the
    index keeps (within a sliding window of ``window`` keys when > 0); dense attention where the
    index covers so much that dense is faster (``dense_by_fraction``; never with a window, whose
    index is the window itself)."""
    _check_inputs(q, k, v, key_padding=key_padding, window=window)
    index = SparseIndex(runs, run_count, diag_prefix, columns, column_count, blocks, block_count)
    if not window and dense_by_fraction(index, k.shape[2], q.is_cuda):
        with _no_autocast(q):
            return _dense_attention(q, k, v, key_padding, scale)
    return run_sparse(q, k, v, index, key_padding, scale, window)


def run_sparse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, index: SparseIndex,
               key_padding: Optional[torch.Tensor], scale: float, window: int = 0) -> torch.Tensor:
    """The sparse kernel (or its PyTorch reference off CUDA) over ``index``, with no density check:
    ``sparse_attention``'s body, for callers that decided dense or sparse themselves (the serving
    path reads every request's density in one host read)."""
    with _no_autocast(q):
        return dispatch.attention_impl(q)(q, k, v, index, scale, key_padding, window=window)


@sparse_attention.register_fake
def _(q, k, v, runs, run_count, diag_prefix, columns, column_count, blocks, block_count,
      key_padding, scale, window=0):
    return q.new_empty(*q.shape[:3], v.shape[-1])


# ----------------------------------------------------------------------------------------------
# What the inlined attention (passes/lowering.py) puts in its conditionals
# ----------------------------------------------------------------------------------------------

def _triton():
    from .kernels import sparse_attention_triton

    return sparse_attention_triton


@torch.library.triton_op("mcompile::sparse_attention_kernel", mutates_args=())
def sparse_attention_kernel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, runs: torch.Tensor,
                            run_count: torch.Tensor, diag_prefix: torch.Tensor, columns: torch.Tensor,
                            column_count: torch.Tensor, blocks: torch.Tensor, block_count: torch.Tensor,
                            scale: float, window: int = 0) -> torch.Tensor:
    """Sparse causal attention of a whole prompt (q (B, H, N, D), k/v (B, Hk, N, D), any strides)
    over the index: the Triton kernel on CUDA, launched through ``wrap_triton``; elsewhere the
    PyTorch reference (through the opaque op; its density check never fires off CUDA).
    On CUDA the output (B, H, N, Dv) is a view of (B, N, H, Dv) storage: the layout in which
    the model reshapes it next, so that no transpose copy follows."""
    index = (runs, run_count, diag_prefix, columns, column_count, blocks, block_count)
    if q.device.type != "cuda":
        return torch.ops.mcompile.sparse_attention(q, k, v, *index, None, scale, window)
    tri = _triton()
    d, dv = q.shape[-1], v.shape[-1]
    dp, dvp = tri.padded_head_dim(d), tri.padded_head_dim(dv)
    qp, kp, vp = tri.pad_head_dim(q, dp), tri.pad_head_dim(k, dp), tri.pad_head_dim(v, dvp)
    b, h, n = q.shape[:3]
    out = torch.empty(b, n, h, dvp, dtype=q.dtype, device=q.device).transpose(1, 2)
    grid, args, meta = tri.launch_args(qp, kp, vp, out, SparseIndex(*index), scale, None, 0, window)
    config = tri.fixed_config(dp, dvp, q.dtype)
    torch.library.wrap_triton(tri._sparse_attention_kernel)[grid](*args, **meta, **config)
    return out if dvp == dv else out[..., :dv].transpose(1, 2).contiguous().transpose(1, 2)


@torch.library.custom_op("mcompile::dense_check", mutates_args=())
def dense_check(runs: torch.Tensor, run_count: torch.Tensor, column_count: torch.Tensor,
                block_count: torch.Tensor, n: int) -> torch.Tensor:
    """0-dim bool tensor: True when the index covers so many pairs that dense attention is faster
    (``dense_by_fraction``, the opaque op's check, logged and counted the same way)."""
    empty = runs.new_empty(0)
    index = SparseIndex(runs, run_count, empty, empty, column_count, empty, block_count)
    return torch.tensor(dense_by_fraction(index, n, runs.is_cuda), device=runs.device)


@dense_check.register_fake
def _(runs, run_count, column_count, block_count, n):
    return runs.new_empty((), dtype=torch.bool)


# ----------------------------------------------------------------------------------------------
# The chunked MLP
# ----------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=1)
def _triton_act_mul():
    try:
        from .kernels.act_mul_triton import act_mul_triton

        return act_mul_triton
    except ImportError as exc:  # Triton missing: the PyTorch path serves
        log.info("mcompile: Triton unavailable for the chunked MLP (%s); using PyTorch", exc)
        return None


def act_mul(g: torch.Tensor, u: torch.Tensor, activation: str) -> torch.Tensor:
    """act(g) * u: in place into ``g`` by a Triton kernel on CUDA, the reference elsewhere."""
    if g.is_cuda:
        kernel = _triton_act_mul()
        if kernel is not None:
            return kernel(g, u, activation)
    return act_mul_ref(g, u, activation)


def _check_mlp(x, w_gate, w_up, w_down, activation: str, chunk: int) -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(f"chunked_mlp: activation must be one of {list(ACTIVATIONS)}, got {activation!r}")
    if chunk < 1:
        raise ValueError(f"chunked_mlp: chunk must be >= 1 token, got {chunk}")
    if w_gate.shape != w_up.shape or w_gate.shape[1] != x.shape[-1] or w_down.shape[1] != w_gate.shape[0]:
        raise ValueError(f"chunked_mlp: weights gate {tuple(w_gate.shape)}, up {tuple(w_up.shape)}, down "
                         f"{tuple(w_down.shape)} do not fit x (..., {x.shape[-1]})")


@torch.library.custom_op("mcompile::chunked_mlp", mutates_args=())
def chunked_mlp(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor,
                b_gate: Optional[torch.Tensor], b_up: Optional[torch.Tensor], b_down: Optional[torch.Tensor],
                activation: str, chunk: int) -> torch.Tensor:
    """down(act(gate(x)) * up(x)) over ``chunk`` tokens at a time; x (..., hidden)."""
    _check_mlp(x, w_gate, w_up, w_down, activation, chunk)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])  # (T, hidden): tokens of every batch row
    tokens = x2.shape[0]
    out = x2.new_empty(tokens, w_down.shape[0])  # (T, hidden_out)
    w_down_t = w_down.t()
    for start in range(0, tokens, chunk):
        xs = x2[start:start + chunk]
        h = act_mul(F.linear(xs, w_gate, b_gate), F.linear(xs, w_up, b_up), activation)  # (chunk, inter)
        rows = out[start:start + chunk]  # contiguous: whole rows of a contiguous tensor
        if b_down is None:
            torch.mm(h, w_down_t, out=rows)
        else:
            torch.addmm(b_down, h, w_down_t, out=rows)
        del h
    return out.view(*lead, w_down.shape[0])


@chunked_mlp.register_fake
def _(x, w_gate, w_up, w_down, b_gate, b_up, b_down, activation, chunk):
    return x.new_empty(*x.shape[:-1], w_down.shape[0])


def mlp_ref(x, w_gate, w_up, w_down, b_gate=None, b_up=None, b_down=None, activation: str = "silu"):
    """The unchunked MLP, for tests."""
    return F.linear(act_mul_ref(F.linear(x, w_gate, b_gate), F.linear(x, w_up, b_up), activation), w_down, b_down)


__all__ = ["estimate_index", "sparse_attention", "dense_attention", "sparse_attention_kernel", "dense_check",
           "chunked_mlp", "runs_dense", "run_sparse", "dense_by_fraction_many", "act_mul", "mlp_ref", "estimate_index_ref", "sparse_attention_ref"]
