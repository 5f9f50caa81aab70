"""Find the attentions of a Dynamo FX graph and decide whether each can become sparse.

Two shapes are rewritten, the two that transformers emits:

- SDPA: ``torch._C._nn.scaled_dot_product_attention(q, k, v, attn_mask=..., is_causal=...)``.
- Eager: ``matmul(q, k.transpose(2, 3)) * scale (+ mask) -> softmax(-1, float32) -> .to ->
  dropout -> matmul(., v)``, anchored on the softmax (RoPE has matmuls too).

Every other attention the graph holds is reported with the reason it stays dense, never left
out: a softmax over the product of two activations whose weights multiply a third tensor, with
scores of another form (soft-capping, ALiBi, attention sinks, a learned position bias:
unmatched.py says what was seen), a higher-order attention op (``flex_attention``), and
attentions inside the subgraph of any other higher-order op.

A match is an ``AttentionSite``: where the attention is, its inputs with ``repeat_kv`` stripped
(K/V at their own head count), and either no reason (it can be rewritten) or the reason it
stays dense. Under autocast (amp.py) the attention computes in autocast's dtype, as eager
autocast runs SDPA and matmul: the site's ``dtype`` says what q, k and v are cast to.

Queries may be fewer than keys (Nq < N: a chunk after a cached prefix, with K/V the tensors
the cache update produced, e.g. ``cat(past, new)``): such an attention is rewritten when its
mask is proven causal at offset ``P = N - Nq`` (mask_proof.py). SDPA's ``is_causal=True`` is
top-left aligned when Nq != N, which is not what a KV cache means, so it is rewritten only
when Nq == N is known. A statically short chunk (a decode step, a few draft tokens) stays
dense at compile time: estimating its pattern would cost as much as its dense attention.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch.fx.experimental.symbolic_shapes import statically_known_true

from ..ops import MIN_SPARSE_CHUNK
from .amp import Autocast, autocast_at, autocast_regions, cast_dtype
from .mask_proof import prove_mask
from .nodes import example, module_info
from .nodes import target_name as _fn
from .unmatched import (chain_text, cross_attention, describe_scores, from_weights, product_operands, root,
                        score_product, value_product)

SDPA_TARGETS = (torch._C._nn.scaled_dot_product_attention, F.scaled_dot_product_attention)
_SDPA_SIG = inspect.signature(lambda query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False,
                              scale=None, enable_gqa=False: None)
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
SCALE_REASON = "the softmax scale is a tensor, not a number: the sparse ops take a constant or a symbolic float"
# The layer index in a module path: model.layers.3., encoder.block.3., transformer.h.3.


@dataclass(frozen=True)
class AttentionSite:
    node: fx.Node  # the node whose value the sparse attention replaces
    kind: str  # "sdpa", "eager", or the name of a higher-order attention op ("flex_attention")
    layer: Optional[int]
    module: str  # qualified name of the attention module, from nn_module_stack
    module_type: str  # class name of that module, e.g. "LlamaAttention"
    q: Optional[fx.Node] = None
    k: Optional[fx.Node] = None  # at KV-head count (repeat_kv stripped)
    v: Optional[fx.Node] = None
    scale: object = None  # float, or an fx.Node holding a (symbolic) float
    key_padding: Optional[fx.Node] = None
    heads: int = 0
    kv_heads: int = 0
    head_dim: int = 0
    reason: Optional[str] = None  # None: rewritable
    dead: tuple = field(default=(), compare=False)  # nodes of the eager chain the rewrite frees
    dtype: Optional[torch.dtype] = None  # autocast's dtype, which q, k and v are cast to; None: as they are
    window: int = 0  # a sliding window of this many keys (the query's own included); 0: none


def strip_repeat_kv(node: fx.Node) -> fx.Node:
    """``repeat_kv``: x[:, :, None].expand(B, Hk, G, N, D).reshape(B, Hk * G, N, D) -> x."""
    if _fn(node) in ("reshape", "view"):
        exp = node.args[0]
        if _fn(exp) == "expand" and isinstance(exp.args[0], fx.Node) and _fn(exp.args[0]) == "getitem":
            idx = exp.args[0].args[1]
            full = slice(None, None, None)
            if isinstance(idx, tuple) and len(idx) == 5 and idx[2] is None \
                    and all(i == full for j, i in enumerate(idx) if j != 2):
                return exp.args[0].args[0]
    if _fn(node) == "repeat_interleave":
        return node.args[0]
    return node


def _graph_inputs(*nodes) -> bool:
    """Whether any of ``nodes`` is an input of the graph (possibly reshaped), not computed in it."""
    return any(isinstance(root(x), fx.Node) and root(x).op == "placeholder" for x in nodes)


def _shape_reason(q, k, v, amp: Autocast = Autocast()) -> tuple[Optional[str], int, int, int]:
    eq, ek, ev = example(q), example(k), example(v)
    if eq is None or ek is None or ev is None:
        return "the graph records no shapes for q, k or v", 0, 0, 0
    if eq.dim() != 4 or ek.dim() != 4 or ev.dim() != 4:
        return f"q has {eq.dim()} dims, not (batch, heads, length, head dim)", 0, 0, 0
    h, hk, d = eq.shape[1], ek.shape[1], eq.shape[3]
    if not all(isinstance(x, int) for x in (h, hk, d)):
        why = ("q, k and v are inputs of this graph (the graph broke before the attention), so dynamic shapes "
               "made their" if _graph_inputs(q, k, v) else "dynamic shapes made the")
        return (f"{why} head count or head dim symbolic: the sparse ops need both fixed (compile without "
                f"dynamic=True, which makes every dim of every input symbolic, or mark only the sequence dim "
                f"dynamic with torch._dynamo.mark_dynamic)"), 0, 0, 0
    if amp.unknown:
        return f"autocast state unknown: {amp.unknown}", h, hk, d
    dq, dk, dv = (cast_dtype(x.dtype, amp) for x in (eq, ek, ev))
    if dq not in SUPPORTED_DTYPES:
        return f"dtype {dq} (supported: float16, bfloat16, float32)", h, hk, d
    if not (dk == dv == dq):
        return (f"q, k and v have different dtypes ({eq.dtype}, {ek.dtype}, {ev.dtype}) and no autocast region "
                f"casts them to one"), h, hk, d
    if h % hk:
        return f"{h} query heads are not a multiple of {hk} KV heads", h, hk, d
    if ev.shape[3] != d:
        return f"value head dim {ev.shape[3]} differs from the query head dim {d}", h, hk, d
    if not statically_known_true(eq.shape[0] == ek.shape[0]):
        return "q and k have different batch sizes", h, hk, d
    return None, h, hk, d


def _scale(value, head_dim: int):
    """The softmax scale as the ops take it: a float, or a graph value holding a float (under
    ``dynamic=True`` Dynamo turns float attributes such as ``self.scaling`` into ``.item()``
    of a graph input)."""
    if value is None:
        return 1.0 / math.sqrt(head_dim), None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value), None
    ex = example(value) if isinstance(value, fx.Node) else None
    if isinstance(ex, (float, torch.SymFloat)):
        return value, None
    return None, SCALE_REASON


def _lengths(q, k):
    """(Nq, N) of the (B, H, Nq, D) query and (B, Hk, N, D) key values; None when unknown."""
    eq, ek = example(q), example(k)
    if eq is None or ek is None or eq.dim() != 4 or ek.dim() != 4:
        return None
    return eq.shape[2], ek.shape[2]


def short_chunk_reason(q, k) -> Optional[str]:
    """Why a statically short chunk after a cached prefix stays dense (None otherwise)."""
    lengths = _lengths(q, k)
    if lengths is None:
        return None
    nq, n = lengths
    if not isinstance(nq, int):
        return None
    if nq == 1 and statically_known_true(n == 1):
        return "a single query and key"
    if nq < MIN_SPARSE_CHUNK and not statically_known_true(nq == n):
        what = "decode step" if nq == 1 else f"short chunk of {nq} queries"
        return (f"{what}: query length differs from key length (a chunk after a cached prefix, or cross-attention); "
                f"chunks shorter than {MIN_SPARSE_CHUNK} queries stay dense: estimating a pattern costs as much as "
                f"dense attention")
    return None


MASK_INPUT_REASON = (
    "mask not proven causal: it is an input of this graph, built outside the compiled code (passed in by the "
    "caller, or built before a graph break), as transformers' continuous batching (generate_batch) passes its mask "
    "over packed requests of several lengths, which are not one causal prefill; for continuous batching, "
    "mcompile.serving.sparse_batching runs it sparse per request")
PAGED_REASON = (
    "mask not proven causal: the mask, K and V are all inputs of this graph, as when the graph starts after a "
    "KV-cache update Dynamo does not trace; transformers' paged cache for continuous batching (generate_batch) is "
    "one, and its mask covers packed requests of several lengths, which are not one causal prefill (for continuous "
    "batching, mcompile.serving.sparse_batching runs it sparse per request)")
CROSS_REASON = (
    "cross-attention: the keys and values are projections of another sequence than the queries (an encoder's "
    "output); MInference's patterns are for causal self-attention over a prompt")
POSITION_BIAS_REASON = (
    "the additive mask is computed from model weights: it carries a learned position bias (e.g. T5's relative "
    "attention buckets), which the sparse kernels do not add")


def _mask_origin_reason(mask, k, v) -> Optional[str]:
    """Why a mask cannot be proven whatever its form: read from outside the graph, or biased by weights."""
    if mask is None:
        return None
    if _graph_inputs(mask):
        return PAGED_REASON if _graph_inputs(strip_repeat_kv(k)) and _graph_inputs(strip_repeat_kv(v)) \
            else MASK_INPUT_REASON
    if from_weights(mask):
        return POSITION_BIAS_REASON
    return None


def _site(node, kind, q, k, v, scale, mask, additive, dead=(), amp: Autocast = Autocast()) -> AttentionSite:
    layer, module, module_type = module_info(node)
    k, v = strip_repeat_kv(k), strip_repeat_kv(v)
    reason, h, hk, d = _shape_reason(q, k, v, amp)
    reason = _mask_origin_reason(mask, k, v) or reason
    scale_value, scale_reason = _scale(scale, d or 1)
    reason = reason or scale_reason
    if reason is None:
        reason = _output_dtype_reason(node, q, amp)
    key_padding, window = None, 0
    lengths = _lengths(q, k)
    same_length = lengths is not None and statically_known_true(lengths[0] == lengths[1])
    if reason is None and mask is None and not same_length:
        reason = "is_causal with query length != key length (SDPA aligns it top-left, not as a KV cache would)"
    if reason is None and mask is not None:
        offset = lengths[1] - lengths[0]  # P: position of the first query (symbolic, no guard)
        proof = prove_mask(mask, additive, offset, (example(q).shape[0], *lengths))
        reason = None if proof.causal else proof.reason
        key_padding, window = proof.key_padding, proof.window
    return AttentionSite(node, kind, layer, module, module_type, q, k, v, scale_value, key_padding,
                         h, hk, d, reason, tuple(dead), amp.dtype, window)


def _output_dtype_reason(node, q, amp: Autocast) -> Optional[str]:
    """The sparse op returns the dtype it computes in (q's, or autocast's); the attention it
    replaces must have returned that too."""
    eo, eq = example(node), example(q)
    if eo is None or eq is None:
        return None
    expected = cast_dtype(eq.dtype, amp)
    if eo.dtype == expected:
        return None
    under = f" under autocast to {amp.dtype}" if amp.dtype is not None else ""
    return f"the attention returns {eo.dtype}, not the {expected} its q computes in{under}"


def _unmatched(node: fx.Node, kind: str, reason: str, q=None, v=None) -> AttentionSite:
    """A site that stays dense, with heads and head dim when q and v are (B, H, N, D)."""
    layer, module, module_type = module_info(node)
    eq, ev = example(q), example(strip_repeat_kv(v)) if isinstance(v, fx.Node) else None
    h = hk = d = 0
    if isinstance(eq, torch.Tensor) and isinstance(ev, torch.Tensor) and eq.dim() == ev.dim() == 4 \
            and all(isinstance(x, int) for x in (eq.shape[1], ev.shape[1], eq.shape[3])):
        h, hk, d = eq.shape[1], ev.shape[1], eq.shape[3]
    return AttentionSite(node, kind, layer, module, module_type, heads=h, kv_heads=hk, head_dim=d, reason=reason)


def _worded_as_cross(site: Optional[AttentionSite], q, k) -> Optional[AttentionSite]:
    """A dense site whose q and k look like cross-attention, with that as its reason."""
    if site is None or site.reason is None or not cross_attention(q, k):
        return site
    return dataclasses.replace(site, reason=CROSS_REASON)


def match_sdpa(node: fx.Node, regions: Optional[dict] = None) -> Optional[AttentionSite]:
    if node.op != "call_function" or node.target not in SDPA_TARGETS:
        return None
    site = _match_sdpa(node, regions)
    q, k = (node.args[i] if len(node.args) > i else node.kwargs.get(name) for i, name in ((0, "query"), (1, "key")))
    return _worded_as_cross(site, q, k)


def _match_sdpa(node: fx.Node, regions: Optional[dict]) -> AttentionSite:
    try:
        bound = _SDPA_SIG.bind(*node.args, **node.kwargs)
    except TypeError:
        return AttentionSite(node, "sdpa", *module_info(node), reason="unrecognised SDPA arguments")
    bound.apply_defaults()
    a = bound.arguments
    layer, module, module_type = module_info(node)
    if a["dropout_p"] != 0.0:
        return AttentionSite(node, "sdpa", layer, module, module_type, reason=f"dropout_p={a['dropout_p']}")
    mask = a["attn_mask"]
    short = short_chunk_reason(a["query"], a["key"])
    if short is not None:
        return AttentionSite(node, "sdpa", layer, module, module_type, reason=short)
    if mask is None and not a["is_causal"]:
        return AttentionSite(node, "sdpa", layer, module, module_type,
                             reason="non-causal attention: no mask and is_causal=False (an encoder's attention)")
    if mask is not None and a["is_causal"]:
        return AttentionSite(node, "sdpa", layer, module, module_type, reason="both attn_mask and is_causal")
    additive = mask is not None and example(mask) is not None and example(mask).dtype != torch.bool
    amp = _autocast(regions, node, a["query"])
    return _site(node, "sdpa", a["query"], a["key"], a["value"], a["scale"], mask, additive, amp=amp)


def _autocast(regions: Optional[dict], node: fx.Node, q) -> Autocast:
    eq = example(q)
    device = eq.device.type if isinstance(eq, torch.Tensor) else "cpu"
    return autocast_at(regions or {}, node, device)


def _single_user(node: fx.Node) -> Optional[fx.Node]:
    users = list(node.users)
    return users[0] if len(users) == 1 else None


_ADD = ("add", "__add__", "iadd")
_MUL = ("mul", "__mul__")
_DIV = ("div", "truediv", "__truediv__")


def _parse_scores(scores):
    """(q, k, scale, mask) of ``matmul(q, k.transpose(-2, -1)) (* scale | / d) (+ mask)``, or a
    string saying which part does not fit."""
    mask = None
    if _fn(scores) in _ADD:
        a, b = scores.args[:2]
        scores, mask = (a, b) if _fn(a) in _MUL + _DIV + ("matmul",) else (b, a)
    scale = 1.0
    if _fn(scores) in _MUL:
        scores, scale = scores.args[:2]
        if isinstance(scores, (int, float)):
            scores, scale = scale, scores
    elif _fn(scores) in _DIV:
        scores, div = scores.args[:2]
        scale = 1.0 / div if isinstance(div, (int, float)) and div else None
    if _fn(scores) != "matmul":
        return f"{_fn(scores) or 'a value'} in place of matmul(q, kᵀ) (* scale)"
    q, kt = scores.args[:2]
    if _fn(kt) != "transpose" or sorted(kt.args[1:3]) not in ([2, 3], [-2, -1]):
        return f"matmul(q, x) with x computed by {_fn(kt) or 'a value'} in place of k.transpose(-2, -1)"
    return q, kt.args[0], scale, mask


def _last_dim(softmax: fx.Node) -> bool:
    dim = softmax.args[1] if len(softmax.args) > 1 else softmax.kwargs.get("dim")
    ex = example(softmax)
    return dim == -1 or (isinstance(ex, torch.Tensor) and dim == ex.dim() - 1)


def match_eager(softmax: fx.Node, regions: Optional[dict] = None) -> Optional[AttentionSite]:
    """Anchor: a softmax over the product of two activations whose weights multiply a third
    (unmatched.py; anything else, e.g. an MoE router, is not an attention). Rewritable when the
    scores are matmul(q, k^T) * scale (+ mask) over the last dim."""
    if _fn(softmax) != "softmax":
        return None
    product, (value, value_operand) = score_product(softmax), value_product(softmax)
    if product is None or value is None:
        return None
    q, kt = product_operands(product)
    k = kt.args[0] if _fn(kt) == "transpose" and _fn(product) != "einsum" else kt
    return _worded_as_cross(_match_eager(softmax, product, value, value_operand, regions), q, k)


def _match_eager(softmax: fx.Node, product: fx.Node, value: fx.Node, value_operand: Optional[fx.Node],
                 regions: Optional[dict]) -> AttentionSite:
    layer, module, module_type = module_info(softmax)
    q_operand = product.args[0] if _fn(product) == "matmul" else None
    if not _last_dim(softmax):
        dim = softmax.args[1] if len(softmax.args) > 1 else softmax.kwargs.get("dim")
        return _unmatched(value, "eager", f"softmax over dim {dim}, not the key dim: not matched "
                                          f"(seen: {chain_text([product, softmax, value])})", q_operand, value_operand)
    parsed = _parse_scores(softmax.args[0])
    if isinstance(parsed, str) or parsed[0] is not product.args[0]:
        why = parsed if isinstance(parsed, str) else ""
        return _unmatched(value, "eager", describe_scores(product, softmax, why), q_operand, value_operand)
    q, k, scale, mask = parsed
    origin = _mask_origin_reason(mask, k, value_operand)
    if origin is not None:
        return _unmatched(value, "eager", origin, q, value_operand)
    # Forward: softmax -> [.to] -> [dropout] -> matmul(., v)
    chain, cur = [softmax], softmax
    while True:
        nxt = _single_user(cur)
        if nxt is None:
            where = (" (an output of this graph: returned with output_attentions=True, or the graph ends inside the "
                     "attention module after a graph break)" if any(u.op == "output" for u in cur.users) else "")
            return AttentionSite(softmax, "eager", layer, module, module_type,
                                 reason=f"the attention weights are used elsewhere{where}: the sparse kernels never "
                                        f"form them")
        name = _fn(nxt)
        if name in ("to", "type_as", "type"):
            chain.append(nxt)
        elif name == "dropout":
            p = nxt.args[1] if len(nxt.args) > 1 else nxt.kwargs.get("p", 0.5)
            training = nxt.args[2] if len(nxt.args) > 2 else nxt.kwargs.get("training", True)
            if p != 0.0 and training:
                return AttentionSite(softmax, "eager", layer, module, module_type, reason=f"dropout p={p} in training")
            chain.append(nxt)
        elif name == "matmul" and nxt.args[0] is cur:
            out, v = nxt, nxt.args[1]
            break
        else:
            return AttentionSite(softmax, "eager", layer, module, module_type,
                                 reason=f"attention weights feed {name or nxt.op}, not the value matmul")
        cur = nxt
    short = short_chunk_reason(q, k)
    if short is not None:
        return AttentionSite(out, "eager", layer, module, module_type, reason=short)
    if mask is None:
        return AttentionSite(out, "eager", layer, module, module_type,
                             reason="non-causal attention: no mask is added to the scores (an encoder's attention)")
    if scale is None:
        return AttentionSite(out, "eager", layer, module, module_type, reason=SCALE_REASON)
    amp = _autocast(regions, out, q)
    if amp != _autocast(regions, product, q):
        return AttentionSite(out, "eager", layer, module, module_type,
                             reason="autocast differs between the score product and the value product")
    return _site(out, "eager", q, k, v, scale, mask, additive=True, dead=chain, amp=amp)


FLEX_REASON = ("{name}: its score_mod and mask_mod are subgraphs and its block mask is built outside this graph; "
               "mcompile proves masks built from positions for SDPA and the eager chain only (load the model with "
               "attn_implementation='sdpa')")


def match_higher_order(gm: fx.GraphModule, node: fx.Node) -> list[AttentionSite]:
    """Attentions in a higher-order op: an attention op itself (``flex_attention``), or
    attentions inside the subgraphs another one calls (a checkpointed or nested region). They
    stay dense: the rewrite works on the top-level graph."""
    if node.op != "call_function" or not isinstance(node.target, torch._ops.HigherOrderOperator):
        return []
    name = node.target.name()
    if "attention" in name:
        args = node.args
        return [_unmatched(node, name, FLEX_REASON.format(name=name), args[0] if args else None,
                           args[2] if len(args) > 2 else None)]
    sites = []
    for arg in node.all_input_nodes:
        sub = _submodule(gm, arg)
        if sub is None:
            continue
        for inner in find_attention(sub):
            what = inner.reason or "causal, rewritable at the top level"
            sites.append(AttentionSite(node, inner.kind, inner.layer, inner.module, inner.module_type,
                                       heads=inner.heads, kv_heads=inner.kv_heads, head_dim=inner.head_dim,
                                       reason=f"inside a subgraph of {name} ({what}): the rewrite works on the "
                                              f"top-level graph only"))
    return sites


def _submodule(gm: fx.GraphModule, node: fx.Node) -> Optional[fx.GraphModule]:
    if node.op != "get_attr":
        return None
    obj = gm
    for part in str(node.target).split("."):
        obj = getattr(obj, part, None)
    return obj if isinstance(obj, fx.GraphModule) else None


def find_attention(gm: fx.GraphModule) -> list[AttentionSite]:
    """Every attention of the graph, in graph order, with its rewrite decision."""
    regions = autocast_regions(gm.graph)
    sites = []
    for node in gm.graph.nodes:
        site = match_sdpa(node, regions) or match_eager(node, regions)
        if site is not None:
            sites.append(site)
        else:
            sites.extend(match_higher_order(gm, node))
    return sites
