"""The rewrite: each provably causal prefill attention becomes ``lowering.sparse_attention``.

    attn = sdpa(q, repeat_kv(k), repeat_kv(v), attn_mask=causal & padding)
        ->
    attn = lowering.sparse_attention(q, k, v, padding, kinds, p0, p1, scale, dense_below, ...)

a conditional between dense attention and estimate_index + the sparse kernel that Inductor lowers
with the rest of the graph (passes/lowering.py). The report says where the kernel sits (in
Inductor's code, or the opaque op) and why.

Per-head patterns come from the pattern database by layer (``nn_module_stack``) and head, or
from the default pattern. Attentions that cannot be proven causal prefill stay as they are,
with the reason in the report. Dead code (the O(N^2) mask, ``repeat_kv``, the eager softmax
chain) is removed afterwards.
"""

from __future__ import annotations

import dataclasses
import logging
import operator
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.fx as fx
from torch._dynamo.utils import counters
from torch.fx.experimental.symbolic_shapes import statically_known_true

from .. import ops  # noqa: F401  (registers torch.ops.mcompile.*)
from ..conditional import constant_float
from ..config import MInferenceConfig
from ..kernels.estimate import STATIC_BLOCK_BUDGET
from ..pattern_db import ModelFingerprint, PatternDB, PatternDBError, find_shipped, load
from ..patterns import Pattern, PatternKind, encode
from . import lowering
from .frame import model_config
from .match import AttentionSite, find_attention
from .mutation import mutates
from .nodes import example

log = logging.getLogger(__name__)


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
    inlined: bool = False  # the kernel launched from Inductor's code (passes/lowering.py), not the opaque op
    inline_reason: str = ""  # why not, where it was not


@dataclass(frozen=True)
class RewriteReport:
    sites: tuple
    pattern_db: str
    code: str = field(default="", repr=False)

    @property
    def rewritten(self) -> int:
        return sum(s.rewritten for s in self.sites)


def erase_dead(graph: fx.Graph, roots) -> None:
    """Erase ``roots`` and, transitively, their inputs once nothing uses them (pure nodes only)."""
    work = list(roots)
    while work:
        n = work.pop()
        if n.graph is not graph or n.users or n.op not in ("call_function", "call_method") or mutates(n):
            continue
        inputs = n.all_input_nodes
        graph.erase_node(n)
        work.extend(inputs)


def _graph_model_type(sites: list[AttentionSite]) -> Optional[str]:
    """transformers' model type of the attention modules (``transformers.models.<type>.modeling_<type>``),
    if they are transformers' own; None otherwise."""
    for site in sites:
        stack = site.node.meta.get("nn_module_stack") or {}
        cls = list(stack.values())[-1][1] if stack else None
        parts = (getattr(cls, "__module__", None) or "").split(".")
        if len(parts) >= 3 and parts[:2] == ["transformers", "models"]:
            return parts[2]
    return None


def compiled_fingerprint(sites: list[AttentionSite]) -> Optional[ModelFingerprint]:
    """The fingerprint of the model being compiled, from its config (passes/frame.py); None when
    the compiled frame is not a transformers model (regional compilation, a bare module)."""
    cfg = model_config()
    if cfg is None:
        return None
    try:
        return ModelFingerprint.from_config(cfg)
    except (AttributeError, TypeError) as exc:
        log.debug("mcompile: no fingerprint from the model's config: %s", exc)
        return None


def resolve_db(config: MInferenceConfig, sites: list[AttentionSite]) -> tuple[Optional[PatternDB], str]:
    """The database for this graph and how it was chosen. An explicit database must match the
    whole fingerprint of the model being compiled (model type, layers, heads, KV heads, head dim);
    where the model's config cannot be read, the model type the graph shows, and per attention its
    heads, head dim and layer index (``site_patterns``)."""
    if config.pattern_db is None:
        return None, "none"
    model = compiled_fingerprint(sites)
    if config.pattern_db != "auto":
        db = load(config.pattern_db)
        if model is not None:
            db.check_model(model)
        else:
            model_type = _graph_model_type(sites)
            if model_type is not None and model_type != db.model.model_type:
                raise PatternDBError(f"pattern database {db.source!r}: model.model_type is {db.model.model_type!r}, "
                                     f"the model being compiled is {model_type!r}")
        return db, config.pattern_db
    ok = [s for s in sites if s.heads and s.reason is None]  # attentions that can be rewritten
    if not ok or any(s.layer is None for s in ok):
        return None, "auto: no match"
    s = ok[0]
    model_type = _graph_model_type(ok) or \
        s.module_type.lower().replace("attention", "").replace("sdpa", "").replace("flash", "")
    layers = model.num_layers if model is not None else max(x.layer for x in ok) + 1
    db = find_shipped(model_type, s.heads, s.kv_heads, s.head_dim, num_layers=layers, auto=True)
    if db is None:
        return None, "auto: no match"
    return db, f"auto: {db.source}"


def head_shard(site: AttentionSite, db: PatternDB) -> Optional[tuple[int, int]]:
    """(rank, ways) when the site holds one tensor-parallel shard of the database's heads: the
    process group spans ``ways`` ranks, and the site has ``1 / ways`` of the database's query and
    KV heads. Tensor parallelism over heads (transformers' ``tp_plan="auto"``, DTensor's colwise
    q/k/v projections) gives rank r the contiguous heads ``[r * H / ways, (r + 1) * H / ways)``.
    None otherwise (one process, or tensor parallelism within a sub-group: then the database
    does not fit and the site says why)."""
    m = db.model
    if site.heads == m.num_heads or not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return None
    ways = torch.distributed.get_world_size()
    if ways < 2 or site.heads * ways != m.num_heads or site.kv_heads * ways != m.num_kv_heads:
        return None
    return torch.distributed.get_rank(), ways


def site_patterns(site: AttentionSite, db: Optional[PatternDB], config: MInferenceConfig,
                  explicit: bool) -> tuple[list[Pattern], str, tuple[int, float]]:
    """Patterns of the site's heads, where they came from, and their budget scaling
    (reference length, exponent; patterns.scaled_budgets). Under tensor parallelism the site's
    heads are the rank's shard of the database's (``head_shard``)."""
    if db is not None:
        shard = head_shard(site, db)
        ways = shard[1] if shard else 1
        reason = db.check_site(site.layer, site.heads * ways, site.kv_heads * ways, site.head_dim)
        if reason is None:
            patterns, source = db.patterns_for(site.layer), f"database {db.source}"
            if shard is not None:
                first = shard[0] * site.heads
                patterns = patterns[first:first + site.heads]
                source += f", heads {first}-{first + site.heads - 1} (tensor-parallel rank {shard[0]} of {ways})"
            return patterns, source, (db.budget_length, db.budget_exponent)
        if explicit:
            hint = ("compile the whole model (model.compile(backend='minference')) so that layers are known, "
                    "or pass options={'pattern_db': None} to use the default pattern everywhere")
            raise PatternDBError(f"{reason}; {hint}" if site.layer is None else reason)
    return ([config.default_pattern] * site.heads, "default pattern",
            (config.budget_length, config.budget_exponent))


def _sized_at_run_time(patterns: list[Pattern]) -> bool:
    """Whether the index's block lists are sized at run time (block-mass, or a block budget above
    what the estimation sizes statically): the in-graph kernel sizes them when compiled."""
    return any(p.kind == PatternKind.BLOCK_MASS or (p.kind == PatternKind.BLOCK_SPARSE and p.blocks > STATIC_BLOCK_BUDGET)
               for p in patterns)


def inline_decision(site: AttentionSite, patterns: list[Pattern], config: MInferenceConfig) -> tuple[bool, str]:
    """Whether the site's kernel is launched from Inductor's code (passes/lowering.py), and why not."""
    if config.inline_kernels is False:
        return False, "inline_kernels=False"
    q, k, v = (x.meta.get("example_value") for x in (site.q, site.k, site.v))
    if not all(isinstance(x, torch.Tensor) for x in (q, k, v)):
        return False, "no example values in the graph"
    if site.dtype is not None:  # what autocast casts them to (_rewrite_site)
        q, k, v = (x.to(site.dtype) for x in (q, k, v))
    if config.inline_kernels is None and q.device.type != "cuda":
        return False, f"device {q.device.type} (auto puts the Triton kernel in the graph on CUDA)"
    reason = lowering.kernel_reason(q, k, v, site.key_padding, site.scale, _sized_at_run_time(patterns))
    return reason is None, reason or ""


def _cast(graph: fx.Graph, node: fx.Node, dtype: Optional[torch.dtype]) -> fx.Node:
    """``node.to(dtype)`` where autocast would cast it (site.dtype), else ``node``."""
    ex = node.meta.get("example_value")
    if dtype is None or not isinstance(ex, torch.Tensor) or ex.dtype == dtype:
        return node
    cast = graph.call_method("to", (node, dtype))
    cast.meta["example_value"] = ex.to(dtype)
    return cast


def _rewrite_site(graph: fx.Graph, site: AttentionSite, patterns: list[Pattern], config: MInferenceConfig,
                  scaling: tuple[int, float], inlined: bool):
    kinds, p0, p1 = encode(patterns)
    before = set(graph.nodes)
    with graph.inserting_before(site.node):
        # Under autocast the attention computes in autocast's dtype, as eager SDPA and matmul do
        # (passes/amp.py): q, k and v are cast to it, and the ops run with autocast off (as in a
        # graph AOTAutograd compiled), so that they compute as documented and return that dtype.
        q, k, v = (_cast(graph, x, site.dtype) for x in (site.q, site.k, site.v))
        region = None
        if site.dtype is not None:
            device = site.q.meta["example_value"].device.type
            region = graph.call_function(torch.amp.autocast_mode._enter_autocast, (device, None, False, None))
        attn = graph.call_function(lowering.sparse_attention, (q, k, v, site.key_padding, kinds, p0, p1, site.scale,
                                                             config.dense_below, *scaling, inlined, site.window))
        if region is not None:
            graph.call_function(torch.amp.autocast_mode._exit_autocast, (region,))
    for node in graph.nodes:
        if node not in before:
            for key in ("nn_module_stack", "stack_trace", "source_fn_stack"):
                if key in site.node.meta:
                    node.meta[key] = site.node.meta[key]
    site.node.replace_all_uses_with(attn)
    erase_dead(graph, [site.node, *reversed(site.dead)])


def fit_padding(graph: fx.Graph, site: AttentionSite) -> AttentionSite:
    """The site with its key padding cut to (B, N), the shape the ops read.

    The mask proof shows the mask reads ``padding[b, k]`` for the B batch rows and N keys of the
    attention; transformers also accepts a 2-D attention_mask wider than the keys (its mask
    reads the first N columns), which the ops would reject."""
    pad = site.key_padding
    ep, eq, ek = example(pad), example(site.q), example(site.k)
    if pad is None or not all(isinstance(x, torch.Tensor) for x in (ep, eq, ek)):
        return site
    b, n = eq.shape[0], ek.shape[2]
    if statically_known_true(ep.shape[0] == b) and statically_known_true(ep.shape[1] == n):
        return site
    with graph.inserting_before(site.node):
        sizes = [x if isinstance(x, int) else graph.call_function(torch.ops.aten.sym_size.int, (src, dim))
                 for x, src, dim in ((b, site.q, 0), (n, site.k, 2))]
        cut = graph.call_function(operator.getitem, (pad, (slice(None, sizes[0]), slice(None, sizes[1]))))
    cut.meta["example_value"] = ep[:b, :n]
    return dataclasses.replace(site, key_padding=cut)


SYMBOLIC_SCALE_REASON = ("the softmax scale is a symbolic float not backed by an input value: the lowering needs a "
                         "constant; torch._dynamo.config.specialize_float = True makes it one")


def constant_scale(site: AttentionSite) -> AttentionSite:
    """The site with its scale a Python float where ``conditional.constant_float`` can make it one.
    Under ``dynamic=True`` Dynamo may hand a float attribute (``self.scaling``) as a SymFloat; the
    lowering closes over the scale in its conditionals' branches, which take only tensors and
    sizes. A specialised scale is guarded: the graph is reused while the attribute keeps its value."""
    if isinstance(site.scale, float) or not isinstance(site.scale, fx.Node):
        return site
    value = constant_float(example(site.scale))
    return site if value is None else dataclasses.replace(site, scale=value)


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
            site = constant_scale(site)
            if not isinstance(site.scale, float):
                reason = SYMBOLIC_SCALE_REASON
        if reason is None and site.window:  # the window is the pattern: exact, whatever the database says
            patterns = [Pattern(PatternKind.A_SHAPE, 0, site.window)] * site.heads
            source = f"sliding window of {site.window} keys, exact"
        elif reason is None:
            patterns, source, scaling = site_patterns(site, db, config, explicit)
            if all(p.kind == PatternKind.DENSE for p in patterns):
                reason = f"every head is dense ({source})"
        if reason is None:
            site = fit_padding(gm.graph, site)
            inlined, why_not = inline_decision(site, patterns, config)
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
