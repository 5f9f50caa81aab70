"""The rewrite: each provably causal prefill attention becomes estimate_index + sparse_attention.

    attn = sdpa(q, repeat_kv(k), repeat_kv(v), attn_mask=causal & padding)
        ->
    index = mcompile.estimate_index(q, k, padding, kinds, p0, p1, scale, dense_below)
    attn  = mcompile.sparse_attention(q, k, v, *index, padding, scale, dense_below)

On CUDA, a whole prompt without key padding gets ``kernels.inline.sparse_attention`` instead
(estimation and kernel inside a ``torch.cond`` that Inductor lowers into its own code); the
report says which sites were inlined and why others were not.

Per-head patterns come from the pattern database by layer (``nn_module_stack``) and head, or
from the default pattern. Attentions that cannot be proven causal prefill stay as they are,
with the reason in the report. Dead code (the O(N^2) mask, ``repeat_kv``, the eager softmax
chain) is removed afterwards.
"""

from __future__ import annotations

import logging
import operator
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.fx as fx
from torch._dynamo.utils import counters

from .. import ops  # noqa: F401  (registers torch.ops.mcompile.*)
from ..config import MInferenceConfig
from ..kernels import inline
from ..pattern_db import PatternDB, PatternDBError, find_shipped, load
from ..patterns import Pattern, PatternKind, encode
from .match import AttentionSite, find_attention

log = logging.getLogger(__name__)
INDEX_FIELDS = 7  # tensors of a SparseIndex


@dataclass(frozen=True)
class SiteReport:
    """What happened to one attention of a graph."""

    layer: Optional[int]
    module: str
    kind: str
    rewritten: bool
    reason: str
    heads: int
    kv_heads: int
    head_dim: int
    patterns: tuple = ()
    pattern_source: str = ""
    key_padding: bool = False
    budget_scaling: tuple = (0, 0.0)  # (reference length, exponent) of the budgets; length 0: absolute
    inlined: bool = False  # sparse attention lowered by Inductor (kernels/inline.py), not the opaque op
    inline_reason: str = ""  # why not, where it was not


@dataclass(frozen=True)
class RewriteReport:
    sites: tuple
    pattern_db: str
    code: str = field(default="", repr=False)

    @property
    def rewritten(self) -> int:
        return sum(s.rewritten for s in self.sites)


_INPLACE_OPERATORS = {"iadd", "iand", "iconcat", "ifloordiv", "ilshift", "imod", "imul", "imatmul", "ior", "ipow",
                      "irshift", "isub", "itruediv", "ixor", "setitem", "delitem"}


def _mutates(node: fx.Node) -> bool:
    t = node.target
    if isinstance(t, torch._ops.OpOverload):
        return t._schema.is_mutable
    name = t if isinstance(t, str) else getattr(t, "__name__", "")
    if getattr(t, "__module__", None) in ("_operator", "operator"):
        return name in _INPLACE_OPERATORS
    return name.endswith("_") and not name.endswith("__")


def erase_dead(graph: fx.Graph, roots) -> None:
    """Erase ``roots`` and, transitively, their inputs once nothing uses them (pure nodes only)."""
    work = list(roots)
    while work:
        n = work.pop()
        if n.graph is not graph or n.users or n.op not in ("call_function", "call_method") or _mutates(n):
            continue
        inputs = n.all_input_nodes
        graph.erase_node(n)
        work.extend(inputs)


def resolve_db(config: MInferenceConfig, sites: list[AttentionSite]) -> tuple[Optional[PatternDB], str]:
    """The database for this graph and how it was chosen."""
    if config.pattern_db is None:
        return None, "none"
    if config.pattern_db != "auto":
        return load(config.pattern_db), config.pattern_db
    ok = [s for s in sites if s.heads]
    if not ok or any(s.layer is None for s in ok):
        return None, "auto: no match"
    s = ok[0]
    model_type = s.module_type.lower().replace("attention", "").replace("sdpa", "").replace("flash", "")
    db = find_shipped(model_type, s.heads, s.kv_heads, s.head_dim, num_layers=max(x.layer for x in ok) + 1, auto=True)
    if db is None:
        return None, "auto: no match"
    return db, f"auto: {db.source}"


def site_patterns(site: AttentionSite, db: Optional[PatternDB], config: MInferenceConfig,
                  explicit: bool) -> tuple[list[Pattern], str, tuple[int, float]]:
    """Patterns of the site's heads, where they came from, and their budget scaling
    (reference length, exponent; patterns.scaled_budgets)."""
    if db is not None:
        reason = db.check_site(site.layer, site.heads, site.kv_heads, site.head_dim)
        if reason is None:
            return (db.patterns_for(site.layer), f"database {db.source}",
                    (db.budget_length, db.budget_exponent))
        if explicit:
            hint = ("compile the whole model (model.compile(backend='minference')) so that layers are known, "
                    "or pass options={'pattern_db': None} to use the default pattern everywhere")
            raise PatternDBError(f"{reason}; {hint}" if site.layer is None else reason)
    return ([config.default_pattern] * site.heads, "default pattern",
            (config.budget_length, config.budget_exponent))


def inline_decision(site: AttentionSite, config: MInferenceConfig) -> tuple[bool, str]:
    """Whether the site's sparse attention is inlined (kernels/inline.py), and why not."""
    if config.inline_kernels is False:
        return False, "inline_kernels=False"
    q, k, v = (x.meta.get("example_value") for x in (site.q, site.k, site.v))
    if not all(isinstance(x, torch.Tensor) for x in (q, k, v)):
        return False, "no example values in the graph"
    if config.inline_kernels is None and q.device.type != "cuda":
        return False, f"device {q.device.type} (auto inlines the Triton kernel on CUDA)"
    reason = inline.inline_reason(q, k, v, site.key_padding, site.scale)
    return reason is None, reason or ""


def _rewrite_site(graph: fx.Graph, site: AttentionSite, patterns: list[Pattern], config: MInferenceConfig,
                  scaling: tuple[int, float], inlined: bool):
    kinds, p0, p1 = encode(patterns)
    with graph.inserting_before(site.node):
        if inlined:  # estimation happens inside (kernels/inline.py)
            new = [graph.call_function(inline.sparse_attention, (site.q, site.k, site.v, kinds, p0, p1, site.scale,
                                                                config.dense_below, *scaling))]
        else:
            est = graph.call_function(torch.ops.mcompile.estimate_index.default,
                                      (site.q, site.k, site.key_padding, kinds, p0, p1, site.scale,
                                       config.dense_below, *scaling))
            parts = [graph.call_function(operator.getitem, (est, i)) for i in range(INDEX_FIELDS)]
            new = [est, *parts, graph.call_function(torch.ops.mcompile.sparse_attention.default,
                                                    (site.q, site.k, site.v, *parts, site.key_padding, site.scale,
                                                     config.dense_below))]
    attn = new[-1]
    for node in new:
        for key in ("nn_module_stack", "stack_trace", "source_fn_stack"):
            if key in site.node.meta:
                node.meta[key] = site.node.meta[key]
    site.node.replace_all_uses_with(attn)
    erase_dead(graph, [site.node, *reversed(site.dead)])


GRAD_REASON = ("gradients are enabled: the sparse ops are inference-only; run prefill under "
               "torch.no_grad() or torch.inference_mode() (generate() does)")


def rewrite_attention(gm: fx.GraphModule, config: MInferenceConfig, grad_enabled: bool = False) -> RewriteReport:
    """Rewrite every provably causal prefill attention of ``gm`` in place; report every site.

    ``grad_enabled``: the graph is compiled for autograd; everything then stays dense.
    """
    sites = find_attention(gm)
    db, db_source = resolve_db(config, sites)
    explicit = config.pattern_db not in (None, "auto")
    reports = []
    for site in sites:
        reason = site.reason or (GRAD_REASON if grad_enabled else None)
        patterns, source, scaling = [], "", (0, 0.0)
        inlined, why_not = False, ""
        if reason is None:
            patterns, source, scaling = site_patterns(site, db, config, explicit)
            if all(p.kind == PatternKind.DENSE for p in patterns):
                reason = f"every head is dense ({source})"
        if reason is None:
            inlined, why_not = inline_decision(site, config)
            _rewrite_site(gm.graph, site, patterns, config, scaling, inlined)
            counters["mcompile"]["rewritten"] += 1
            log.info("mcompile: rewrote %s attention in %s (layer %s) with %s", site.kind, site.module or "?",
                     site.layer, source)
        else:
            counters["mcompile"]["kept_dense"] += 1
            log.info("mcompile: kept %s attention in %s dense: %s", site.kind, site.module or "?", reason)
        reports.append(SiteReport(site.layer, site.module, site.kind, reason is None, reason or "", site.heads,
                                  site.kv_heads, site.head_dim, tuple(patterns), source, site.key_padding is not None,
                                  scaling, inlined, why_not))
    gm.graph.lint()
    gm.recompile()
    code = gm.print_readable(print_output=False)
    torch._logging.trace_structured(
        "artifact",
        metadata_fn=lambda: {"name": "mcompile_rewritten_graph", "encoding": "string"},
        payload_fn=lambda: code,
    )
    return RewriteReport(tuple(reports), db_source, code)
