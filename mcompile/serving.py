"""Sparse prefill where transformers serves batches of requests: continuous batching.

transformers' continuous batching (``generate_batch``, ``ContinuousBatchingManager``) prefills
prompts in chunks against a paged KV cache, several requests per step, and reads the cache outside
anything Dynamo traces: the packed requests' mask, keys and values are inputs of the compiled graph,
where no proof can show the mask causal, so the compile backend leaves that attention dense
(``explain`` says so). This module reaches it at the attention function instead::

    with mcompile.serving.sparse_batching(options={"dense_below": 24576}):
        out = model.generate_batch(prompts, generation_config=config)

Within the block, transformers' ``sdpa`` attention function is replaced (``ALL_ATTENTION_FUNCTIONS``,
process-wide) by ``packed_attention``: a call that carries continuous batching's per-request
lengths (``cu_seq_lens_q``, ``cu_seq_lens_k``) runs each request on its own, as the mask
transformers built for the packed batch says: request i's queries ``[cq[i], cq[i+1])`` are the last
of its keys ``[ck[i], ck[i+1])`` (a chunk after its cached prefix, bottom-right causal), limited
to the layer's sliding window if it has one. Each request is decided by ``ops.runs_dense``: a
short context or a short chunk (decode steps) runs dense, a long one estimates its index over
every cached key and runs the sparse kernel. Every other call goes to the original function (and
counts in ``counters["mcompile"]["packed_fallback"]``): no per-request lengths, gradients,
dropout, a non-causal module, or an argument that changes the attention's value (anything
outside ``KNOWN_KWARGS``: soft-capping, attention sinks). Patterns: ``default_pattern`` for every
head, or a sliding window's band. The lengths are read from the device once per step
(``LengthReader``), not once per layer, and the density checks of a layer's requests (a request
whose index covers so much that dense attention is faster runs dense) in one read per layer,
after every request's index is planned, not one per request.

Under ``model.compile(...)`` the function runs outside the compiled graphs (it is
``torch.compiler.disable``d, as the paged cache's update is): the graphs end before attention
and resume after it, and the layers' other work stays compiled.

Engines call ``paged_prefill`` with their own layout: packed chunks (T, H, D), a paged cache
(pages, page size, Hk, D) and block tables, as vLLM keeps them. Index planning (``plan_request``:
the index over all N keys for a chunk's queries) is separate from the kernel
(``request_attention`` with the plan), and both take q (1, H, Nq, D), k/v (1, Hk, N, D).
"""

from __future__ import annotations

import contextlib
import functools
import logging
from typing import Callable, Iterator, Optional

import torch
from torch._dynamo.utils import counters

from . import ops
from .config import MInferenceConfig
from .index import SparseIndex
from .patterns import Pattern, PatternKind, encode, scale_lists

log = logging.getLogger(__name__)
# Earlier releases update the paged cache inside their ``paged|sdpa`` attention function, which
# this module does not replace (tested with 5.25).
MIN_TRANSFORMERS = "5.25"


# What continuous batching passes an attention function besides q, k, v and the mask: bookkeeping
# this path reads (lengths, window) or that does not change the attention's value. Any other
# argument with a value (``softcap``, ``s_aux`` sinks, ...) changes the math: those calls go to
# the original function.
KNOWN_KWARGS = frozenset({
    "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k", "sliding_window", "scaling", "dropout",
    "is_causal", "position_ids", "read_index", "write_index", "block_table", "logits_indices",
    "logits_processor_args", "use_cache", "cache", "output_attentions"})


@torch.compiler.disable  # per-request sizes are data (cu_seq_lens): run eagerly, as the paged cache's update does
def packed_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: Optional[torch.Tensor], dropout: float = 0.0, scaling: Optional[float] = None,
                     *, fallback: Callable, config: MInferenceConfig, reader: Optional["LengthReader"] = None,
                     **kwargs):
    """transformers' attention-function signature: q (1, H, Q, D), k/v (1, Hk, K, D) of the packed
    requests; returns ((1, Q, H, Dv), None). See the module docstring."""
    lengths, reason = _request_lengths(module, query, key, dropout, kwargs, reader)
    if reason is not None:
        log.debug("mcompile: packed attention falls back to %s: %s", getattr(fallback, "__name__", "sdpa"), reason)
        counters["mcompile"]["packed_fallback"] += 1
        return fallback(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    d = query.shape[3]
    scale = float(scaling) if scaling is not None else d ** -0.5
    window = int(kwargs.get("sliding_window") or getattr(module, "sliding_window", None) or 0)
    out = query.new_zeros(*query.shape[:3], value.shape[-1])  # rows past the last request stay zero
    cq, ck = lengths
    requests = [(query[:, :, cq[i]:cq[i + 1]], key[:, :, ck[i]:ck[i + 1]], value[:, :, ck[i]:ck[i + 1]], cq[i])
                for i in range(len(cq) - 1) if cq[i + 1] > cq[i]]
    # every request's index first, then one host read for all their density checks (not one per
    # request: each read stalls the host until the GPU has caught up), then the kernels
    plans = [None if _runs_dense(q, k, k.shape[2], config) else SparseIndex(*plan_request(q, k, scale, config, window))
             for q, k, _, _ in requests]
    dense = ops.dense_by_fraction_many([(index, k.shape[2]) for (_, k, _, _), index in zip(requests, plans)],
                                       query.is_cuda and not window)
    for (q, k, v, r0), index, to_dense in zip(requests, plans, dense):
        if index is None or to_dense:
            o = ops.dense_attention(q, k, v, None, scale, window)
        else:
            counters["mcompile"]["packed_sparse"] += 1
            o = ops.run_sparse(q, k, v, index, None, scale, window)
        out[:, :, r0:r0 + q.shape[2]] = o
    return out.transpose(1, 2).contiguous(), None


def _runs_dense(q: torch.Tensor, k: torch.Tensor, n: int, config: MInferenceConfig) -> bool:
    """A short context or chunk (``ops.runs_dense``) or a prompt of ``n`` tokens below ``dense_below``."""
    return bool(ops.runs_dense(q.shape[2], k.shape[2], 0)) or n < config.dense_below


def request_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, config: MInferenceConfig,
                      window: int = 0, index: Optional[tuple] = None, prompt_length: Optional[int] = None
                      ) -> torch.Tensor:
    """One request: its chunk q (B, H, Nq, D), the last Nq of its keys k/v (B, Hk, N, D) (cached
    prefix + chunk). Dense when ``ops.runs_dense`` says so; otherwise ``index`` (a plan from
    ``plan_request``) or one estimated here, then the sparse kernel (counted in
    ``counters["mcompile"]["packed_sparse"]``). ``prompt_length``: the whole prompt's length
    where the caller knows it (context parallelism): ``dense_below`` and the budgets' scaling
    then follow it, as for the prompt prefilled at once, instead of the keys seen so far."""
    n = k.shape[2] if prompt_length is None else max(prompt_length, k.shape[2])
    if _runs_dense(q, k, n, config):
        return ops.dense_attention(q, k, v, None, scale, window)
    if index is None:
        index = plan_request(q, k, scale, config, window, n)
    counters["mcompile"]["packed_sparse"] += 1
    return ops.sparse_attention(q, k, v, *index, None, scale, window)


def plan_request(q: torch.Tensor, k: torch.Tensor, scale: float, config: MInferenceConfig, window: int = 0,
                 prompt_length: Optional[int] = None) -> tuple:
    """The index (``ops.estimate_index``'s tuple) of one request's chunk over all its keys:
    ``config.default_pattern`` for every head, its budgets scaled to ``prompt_length`` (by
    default the keys), or the band of a sliding window."""
    pattern = Pattern(PatternKind.A_SHAPE, 0, window) if window else config.default_pattern
    kinds, p0, p1 = encode([pattern] * q.shape[1])
    if not window:
        n = k.shape[2] if prompt_length is None else max(prompt_length, k.shape[2])
        p0, p1 = scale_lists(kinds, p0, p1, n, config.budget_length, config.budget_exponent)
    return ops.estimate_index(q, k, None, kinds, p0, p1, scale)


def gather_pages(cache: torch.Tensor, pages: torch.Tensor, length: int) -> torch.Tensor:
    """One request's first ``length`` entries of a paged cache, (1, Hk, length, D): ``cache``
    (num_pages, page_size, Hk, D) (vLLM's layout), ``pages`` its block table row (page ids in
    order). A copy: the kernels read contiguous keys."""
    page = cache.shape[1]
    used = pages[: -(-length // page)].long()
    return cache[used].flatten(0, 1)[:length].transpose(0, 1).unsqueeze(0)


def paged_prefill(query: torch.Tensor, cu_seqlens_q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                  block_table: torch.Tensor, context_lens: torch.Tensor, scale: Optional[float] = None,
                  options: Optional[dict] = None, window: int = 0, plans: Optional[list] = None) -> torch.Tensor:
    """Attention of a packed batch of request chunks over a paged KV cache, as a serving engine
    lays them out; each request sparse or dense as ``request_attention`` decides.

    query (T, H, D): the chunks of R requests one after another, request i's rows
    ``[cu_seqlens_q[i], cu_seqlens_q[i + 1])``; k_cache / v_cache (num_pages, page_size, Hk, D);
    block_table (R, max_pages) int: request i's pages in order; context_lens (R,): request i's
    keys, its chunk's included (the chunk's keys are written to the cache before the call), so
    its queries sit at positions ``context_lens[i] - Nq_i ..``. ``window``: a sliding window of
    that many keys (0: none). ``plans``: per request an index from ``plan_request`` (None:
    estimated here), so that index planning can run apart from the kernel (on another stream,
    or once for several layers that share a pattern). Returns (T, H, Dv). The lengths are read
    from the device once."""
    config = MInferenceConfig.from_options(options)
    if query.dim() != 3 or k_cache.dim() != 4 or v_cache.shape[:3] != k_cache.shape[:3]:
        raise ValueError(f"paged_prefill takes query (T, H, D) and caches (pages, page size, Hk, D), got "
                         f"{tuple(query.shape)}, {tuple(k_cache.shape)}, {tuple(v_cache.shape)}")
    cq, ctx = cu_seqlens_q.tolist(), context_lens.tolist()
    if len(cq) != len(ctx) + 1 or block_table.shape[0] != len(ctx) or cq[-1] > query.shape[0]:
        raise ValueError(f"paged_prefill: {len(cq)} query offsets, {len(ctx)} context lengths and "
                         f"{block_table.shape[0]} block-table rows do not describe the same requests")
    page = k_cache.shape[1]
    need = [-(-n // page) for n in ctx]  # pages each request's keys fill
    for i, n in enumerate(ctx):
        if cq[i + 1] - cq[i] > n or need[i] > block_table.shape[1]:
            raise ValueError(f"paged_prefill: request {i} has {cq[i + 1] - cq[i]} queries over {n} keys in "
                             f"{block_table.shape[1]} pages of {page}")
    used = torch.arange(block_table.shape[1], device=block_table.device)[None, :] < torch.tensor(
        need, device=block_table.device)[:, None]
    outside = used & ((block_table < 0) | (block_table >= k_cache.shape[0]))  # -1 would read the last page
    if bool(outside.any()):  # one host read for every request
        i = int(outside.any(1).nonzero()[0])
        raise ValueError(f"paged_prefill: request {i}'s block table names pages outside the cache's "
                         f"{k_cache.shape[0]}: {block_table[i, :need[i]].tolist()}")
    scale = float(scale) if scale is not None else query.shape[-1] ** -0.5
    out = query.new_zeros(*query.shape[:2], v_cache.shape[-1])
    for i, n in enumerate(ctx):
        if cq[i + 1] == cq[i]:
            continue
        q = query[cq[i]:cq[i + 1]].transpose(0, 1).unsqueeze(0)
        k, v = gather_pages(k_cache, block_table[i], n), gather_pages(v_cache, block_table[i], n)
        o = request_attention(q, k, v, scale, config, window, None if plans is None else plans[i])
        out[cq[i]:cq[i + 1]] = o[0].transpose(0, 1)
    return out


class LengthReader:
    """Continuous batching's per-request lengths on the host, read from the device once per step
    rather than once per layer: every layer of a step gets the same two tensors, unchanged, and a
    host read stalls the host until the GPU has caught up. The lengths read last are reused while
    the very same tensor objects arrive at the same version (an in-place write bumps it); tensors
    whose version is not tracked (made under ``torch.inference_mode``) are read every time.
    Continuous batching slices new views of its buffers every step, so a step's first layer
    always reads; a writer that bypasses the version counter (``.data``, NumPy views) must not
    reuse the same tensor objects across steps."""

    def __init__(self):
        self._key: Optional[tuple] = None  # (cu_q, its version, cu_k, its version): held, so never reused ids
        self._value: list = []

    def read(self, cu_q: torch.Tensor, cu_k: torch.Tensor) -> list:
        try:
            key = (cu_q, cu_q._version, cu_k, cu_k._version)
        except RuntimeError:  # an inference tensor: no version counter
            key = None
        last = self._key
        if key is not None and last is not None and key[0] is last[0] and key[2] is last[2] \
                and key[1] == last[1] and key[3] == last[3]:
            counters["mcompile"]["packed_lengths_reused"] += 1
            return self._value
        value = torch.cat([cu_q, cu_k.to(cu_q)]).tolist()  # one host read: the loop over requests needs them
        self._key, self._value = key, value
        return value


def _request_lengths(module, query, key, dropout, kwargs, lengths: Optional[LengthReader] = None
                     ) -> tuple[Optional[tuple[list, list]], Optional[str]]:
    """((cumulative query lengths, cumulative key lengths), None) read from the device once
    (``lengths``: reused across the layers of a step), or (None, why this call goes to the
    original function)."""
    cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    if not (isinstance(cu_q, torch.Tensor) and isinstance(cu_k, torch.Tensor)):
        return None, "no per-request lengths (not a continuous-batching call)"
    if query.dim() != 4 or query.shape[0] != 1 or key.shape[0] != 1:
        return None, "not one packed row of requests"
    if dropout or torch.is_grad_enabled():
        return None, "dropout or gradients"
    if getattr(module, "is_causal", True) is False:
        return None, "the attention module is not causal"
    unknown = sorted(name for name, value in kwargs.items() if name not in KNOWN_KWARGS and value is not None)
    if unknown:
        return None, f"arguments this path does not apply: {unknown}"
    if cu_q.dim() != 1 or cu_q.shape != cu_k.shape:
        return None, "per-request lengths of different shapes"
    both = lengths.read(cu_q, cu_k) if lengths is not None else LengthReader().read(cu_q, cu_k)
    cq, ck = both[:len(both) // 2], both[len(both) // 2:]
    if cq[-1] > query.shape[2] or ck[-1] > key.shape[2]:
        return None, "per-request lengths past the packed tensors"
    return (cq, ck), None


@contextlib.contextmanager
def sparse_batching(options: Optional[dict] = None) -> Iterator[None]:
    """Within the block, continuous batching's SDPA attention runs sparse per request (module
    docstring); ``options`` as for the backend (``dense_below``, ``default_pattern``, ...)."""
    import transformers
    from packaging.version import Version
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if Version(transformers.__version__) < Version(MIN_TRANSFORMERS):
        raise RuntimeError(f"mcompile.serving.sparse_batching needs transformers >= {MIN_TRANSFORMERS} (its continuous "
                           f"batching updates the paged cache before the attention function), found "
                           f"{transformers.__version__}")
    config = MInferenceConfig.from_options(options)
    local = ALL_ATTENTION_FUNCTIONS._local_mapping
    had, before = "sdpa" in local, local.get("sdpa")
    original = ALL_ATTENTION_FUNCTIONS["sdpa"]
    ALL_ATTENTION_FUNCTIONS["sdpa"] = functools.partial(packed_attention, fallback=original, config=config,
                                                        reader=LengthReader())
    try:
        yield
    finally:
        if had:
            local["sdpa"] = before
        else:
            local.pop("sdpa", None)


__all__ = ["gather_pages", "packed_attention", "paged_prefill", "plan_request", "request_attention",
           "sparse_batching"]
