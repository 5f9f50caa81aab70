"""Find the attentions of a Dynamo FX graph and decide whether each can become sparse.

Two shapes are recognised, the two that transformers emits:

- SDPA: ``torch._C._nn.scaled_dot_product_attention(q, k, v, attn_mask=..., is_causal=...)``.
- Eager: ``matmul(q, k.transpose(2, 3)) * scale (+ mask) -> softmax(-1, float32) -> .to ->
  dropout -> matmul(., v)``, anchored on the softmax (RoPE has matmuls too).

A match is an ``AttentionSite``: where the attention is, its inputs with ``repeat_kv`` stripped
(K/V at their own head count), and either no reason (it can be rewritten) or the reason it
stays dense.

Queries may be fewer than keys (Nq < N: a chunk after a cached prefix, with K/V the tensors
the cache update produced, e.g. ``cat(past, new)``): such an attention is rewritten when its
mask is proven causal at offset ``P = N - Nq`` (mask_proof.py). SDPA's ``is_causal=True`` is
top-left aligned when Nq != N, which is not what a KV cache means, so it is rewritten only
when Nq == N is known. A statically short chunk (a decode step, a few draft tokens) stays
dense at compile time: estimating its pattern would cost as much as its dense attention.
"""

from __future__ import annotations

import inspect
import math
import re
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch.fx.experimental.symbolic_shapes import statically_known_true

from ..ops import MIN_SPARSE_CHUNK
from .mask_proof import prove_mask
from .nodes import example
from .nodes import target_name as _fn

SDPA_TARGETS = (torch._C._nn.scaled_dot_product_attention, F.scaled_dot_product_attention)
_SDPA_SIG = inspect.signature(lambda query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False,
                              scale=None, enable_gqa=False: None)
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_LAYER_RE = re.compile(r"layers?[._](\d+)[._]")


@dataclass(frozen=True)
class AttentionSite:
    node: fx.Node  # the node whose value the sparse attention replaces
    kind: str  # "sdpa" or "eager"
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


def _module_info(node: fx.Node) -> tuple[Optional[int], str, str]:
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return None, "", ""
    qualname, cls = list(stack.values())[-1]
    cls_name = getattr(cls, "__name__", str(cls).rsplit(".", 1)[-1].strip("'>"))
    layer = None
    for path, _ in stack.values():
        m = _LAYER_RE.search(str(path).replace("[", ".").replace("]", ".") + ".")
        if m:
            layer = int(m.group(1))
    return layer, str(qualname), cls_name


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


def _shape_reason(q, k, v) -> tuple[Optional[str], int, int, int]:
    eq, ek, ev = example(q), example(k), example(v)
    if eq is None or ek is None or ev is None:
        return "tensor shapes unknown", 0, 0, 0
    if eq.dim() != 4 or ek.dim() != 4 or ev.dim() != 4:
        return f"not (B, H, N, D) attention (q has {eq.dim()} dims)", 0, 0, 0
    h, hk, d = eq.shape[1], ek.shape[1], eq.shape[3]
    if not all(isinstance(x, int) for x in (h, hk, d)):
        return "symbolic head count or head dim", 0, 0, 0
    if eq.dtype not in SUPPORTED_DTYPES:
        return f"dtype {eq.dtype} (supported: float16, bfloat16, float32)", h, hk, d
    if not (ek.dtype == ev.dtype == eq.dtype):
        return "q, k and v have different dtypes", h, hk, d
    if h % hk:
        return f"{h} query heads are not a multiple of {hk} KV heads", h, hk, d
    if ev.shape[3] != d:
        return "value head dim differs from query head dim", h, hk, d
    if not statically_known_true(eq.shape[0] == ek.shape[0]):
        return "batch of q and k differ", h, hk, d
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
    return None, "the softmax scale is not a float"


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
        return (f"{what} after a cached prefix (query length differs from key length; chunks shorter than "
                f"{MIN_SPARSE_CHUNK} queries stay dense: estimating a pattern costs as much as dense attention)")
    return None


def _site(node, kind, q, k, v, scale, mask, additive, dead=()) -> AttentionSite:
    layer, module, module_type = _module_info(node)
    k, v = strip_repeat_kv(k), strip_repeat_kv(v)
    reason, h, hk, d = _shape_reason(q, k, v)
    scale_value, scale_reason = _scale(scale, d or 1)
    reason = reason or scale_reason
    key_padding = None
    lengths = _lengths(q, k)
    same_length = lengths is not None and statically_known_true(lengths[0] == lengths[1])
    if reason is None and mask is None and not same_length:
        reason = "is_causal with query length != key length (SDPA aligns it top-left, not as a KV cache would)"
    if reason is None and mask is not None:
        offset = lengths[1] - lengths[0]  # P: position of the first query (symbolic, no guard)
        proof = prove_mask(mask, additive, offset)
        reason = None if proof.causal else proof.reason
        key_padding = proof.key_padding
    return AttentionSite(node, kind, layer, module, module_type, q, k, v, scale_value, key_padding,
                         h, hk, d, reason, tuple(dead))


def match_sdpa(node: fx.Node) -> Optional[AttentionSite]:
    if node.op != "call_function" or node.target not in SDPA_TARGETS:
        return None
    try:
        bound = _SDPA_SIG.bind(*node.args, **node.kwargs)
    except TypeError:
        return AttentionSite(node, "sdpa", *_module_info(node), reason="unrecognised SDPA arguments")
    bound.apply_defaults()
    a = bound.arguments
    layer, module, module_type = _module_info(node)
    if a["dropout_p"] != 0.0:
        return AttentionSite(node, "sdpa", layer, module, module_type, reason=f"dropout_p={a['dropout_p']}")
    mask = a["attn_mask"]
    short = short_chunk_reason(a["query"], a["key"])
    if short is not None:
        return AttentionSite(node, "sdpa", layer, module, module_type, reason=short)
    if mask is None and not a["is_causal"]:
        return AttentionSite(node, "sdpa", layer, module, module_type, reason="non-causal attention (no mask)")
    if mask is not None and a["is_causal"]:
        return AttentionSite(node, "sdpa", layer, module, module_type, reason="both attn_mask and is_causal")
    additive = mask is not None and example(mask) is not None and example(mask).dtype != torch.bool
    return _site(node, "sdpa", a["query"], a["key"], a["value"], a["scale"], mask, additive)


def _single_user(node: fx.Node) -> Optional[fx.Node]:
    users = list(node.users)
    return users[0] if len(users) == 1 else None


def match_eager(softmax: fx.Node) -> Optional[AttentionSite]:
    """Anchor: softmax over the last dim of matmul(q, k^T) * scale (+ mask)."""
    if _fn(softmax) != "softmax":
        return None
    dim = softmax.args[1] if len(softmax.args) > 1 else softmax.kwargs.get("dim")
    if dim not in (-1, 3):
        return None
    scores, mask = softmax.args[0], None
    if _fn(scores) in ("add", "__add__", "iadd"):
        scores, mask = scores.args
        if _fn(scores) not in ("mul", "__mul__", "div", "truediv", "matmul"):
            scores, mask = mask, scores
    scale = 1.0
    if _fn(scores) in ("mul", "__mul__"):
        scores, scale = scores.args
        if isinstance(scores, (int, float)):
            scores, scale = scale, scores
    elif _fn(scores) in ("div", "truediv"):
        scores, div = scores.args
        scale = 1.0 / div if isinstance(div, (int, float)) and div else None
    if _fn(scores) != "matmul":
        return None
    q, kt = scores.args
    if _fn(kt) != "transpose" or sorted(kt.args[1:3]) not in ([2, 3], [-2, -1]):
        return None
    k = kt.args[0]
    # Forward: softmax -> [.to] -> [dropout] -> matmul(., v)
    layer, module, module_type = _module_info(softmax)
    chain, cur = [softmax], softmax
    while True:
        nxt = _single_user(cur)
        if nxt is None:
            return AttentionSite(softmax, "eager", layer, module, module_type,
                                 reason="attention weights are used elsewhere (output_attentions?)")
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
        return AttentionSite(out, "eager", layer, module, module_type, reason="non-causal attention (no mask)")
    if scale is None:
        return AttentionSite(out, "eager", layer, module, module_type, reason="the softmax scale is not a float")
    site = _site(out, "eager", q, k, v, scale, mask, additive=True, dead=chain)
    eo = example(out)
    eq = example(q)
    if site.reason is None and eo is not None and eq is not None and eo.dtype != eq.dtype:
        return AttentionSite(out, "eager", layer, module, module_type, reason="output dtype differs from query dtype")
    return site


def find_attention(gm: fx.GraphModule) -> list[AttentionSite]:
    """Every attention of the graph, in graph order, with its rewrite decision."""
    sites = []
    for node in gm.graph.nodes:
        site = match_sdpa(node) or match_eager(node)
        if site is not None:
            sites.append(site)
    return sites
