"""Attentions the matcher finds but cannot rewrite: what their scores are made of, in words.

An attention, by structure: a softmax over scores that come from a product (``matmul``,
``bmm``, ``baddbmm``, ``einsum``) of two activations, whose weights then multiply a third
tensor in another product. A softmax without both products is not an attention (an MoE router
or gate, a classifier) and is not reported. An attention whose scores are anything but
``matmul(q, kᵀ) (* scale) (+ mask)`` stays dense, and ``describe_scores`` says what was seen
between the product and the softmax, and why the sparse kernels cannot compute it:

    gemma2     matmul -> mul -> truediv -> tanh -> mul -> add -> softmax   (logit soft-capping)
    bloom      baddbmm(alibi, q, kᵀ) -> view -> add -> softmax             (ALiBi inside the product)
    gpt_oss    matmul -> mul -> add -> cat(sinks) -> sub(max) -> softmax   (attention sinks)
    gpt_neo    matmul -> where(bias buffer, ., min) -> add -> softmax      (mask from module state)
    t5         matmul -> mul -> add(position bias) -> add -> softmax       (learned position bias)
"""

from __future__ import annotations

from collections import deque
from typing import Optional

import torch
import torch.fx as fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

from .nodes import example
from .nodes import target_name as _fn

PRODUCTS = {"matmul", "__matmul__", "bmm", "baddbmm", "einsum"}
# Ops that move or re-type values without combining them with anything else.
NEUTRAL = {"to", "type", "type_as", "float", "half", "bfloat16", "_to_copy", "view", "reshape", "contiguous",
           "clone", "detach", "expand", "transpose", "permute", "unsqueeze", "squeeze", "flatten", "getitem"}
BARRIERS = {"linear", "embedding", "softmax", "log_softmax"}  # a score search does not cross these
SCORE_DEPTH = 10  # nodes between the score product and the softmax (gpt_oss: 6)
VALUE_DEPTH = 8  # nodes between the softmax and the value product (bloom: 4)
WEIGHT_SEARCH = 64  # nodes looked at to tell whether a value is computed from model weights
# Ops whose tensor inputs give only a shape, dtype or device, not values.
_SHAPE_ONLY = {"zeros_like", "ones_like", "full_like", "empty_like", "new_zeros", "new_ones", "new_full",
               "new_empty", "size", "sym_size", "dim", "numel", "stride"}


def product_operands(node: fx.Node) -> tuple:
    """The two multiplied tensors of a product node; () for anything else."""
    name = _fn(node)
    if name not in PRODUCTS:
        return ()
    if name == "baddbmm":  # baddbmm(input, batch1, batch2): input + batch1 @ batch2
        args = list(node.args[1:3])
        for i, key in enumerate(("batch1", "batch2")):
            if key in node.kwargs:
                args.insert(i, node.kwargs[key])
        ops = tuple(args[:2])
    elif name == "einsum":
        rest = node.args[1:]
        ops = tuple(rest[0]) if len(rest) == 1 and isinstance(rest[0], (list, tuple)) else tuple(rest)
    else:
        ops = tuple(node.args[:2])
    return ops if len(ops) == 2 and all(isinstance(x, fx.Node) for x in ops) else ()


def value_inputs(node: fx.Node) -> list[fx.Node]:
    """The inputs whose values flow into ``node``'s value: tensors, not the shape or dtype an
    op reads from one (``size``, ``zeros_like``)."""
    if _fn(node) in _SHAPE_ONLY:
        return []
    return [x for x in node.all_input_nodes if isinstance(example(x), torch.Tensor)]


def root(node):
    """``node`` before the moves and casts (NEUTRAL) applied to it."""
    while isinstance(node, fx.Node) and _fn(node) in NEUTRAL and node.args and isinstance(node.args[0], fx.Node):
        node = node.args[0]
    return node


def is_weight(node) -> bool:
    """A model weight, possibly reshaped or re-typed (not an activation)."""
    source = root(node)
    if not isinstance(source, fx.Node):
        return False
    if source.op == "get_attr":
        return True
    declared = source.type if isinstance(source.type, type) else type(None)
    return source.op == "placeholder" and (isinstance(example(source), torch.nn.Parameter)
                                           or issubclass(declared, torch.nn.Parameter))


def from_weights(node) -> bool:
    """Whether ``node`` is computed from a model weight (an embedding table, a learned bias)."""
    seen, work = set(), deque([node])
    while work and len(seen) < WEIGHT_SEARCH:
        n = work.popleft()
        if not isinstance(n, fx.Node) or n in seen:
            continue
        seen.add(n)
        if is_weight(n):
            return True
        work.extend(value_inputs(n))
    return False


def _activation_product(node: fx.Node) -> bool:
    ops = product_operands(node)
    return bool(ops) and not any(is_weight(x) for x in ops)


def score_product(softmax: fx.Node) -> Optional[fx.Node]:
    """The nearest product of two activations the softmax's input is computed from."""
    start = softmax.args[0] if softmax.args else None
    seen, work = set(), deque([(start, 0)])
    while work:
        n, depth = work.popleft()
        if not isinstance(n, fx.Node) or n in seen or depth > SCORE_DEPTH:
            continue
        seen.add(n)
        if _fn(n) in PRODUCTS:
            if _activation_product(n):
                return n
            continue
        if n.op not in ("call_function", "call_method") or _fn(n) in BARRIERS:
            continue
        work.extend((x, depth + 1) for x in value_inputs(n))
    return None


def value_product(softmax: fx.Node) -> tuple[Optional[fx.Node], Optional[fx.Node]]:
    """The nearest product that multiplies the softmax's weights by another activation, and that
    activation (v); (None, None) when there is none."""
    derived, work = {softmax}, deque([(softmax, 0)])
    while work:
        n, depth = work.popleft()
        for user in n.users:
            if user in derived or depth + 1 > VALUE_DEPTH:
                continue
            derived.add(user)
            ops = product_operands(user)
            if ops:
                other = [x for x in ops if x not in derived]
                if len(other) == 1 and not is_weight(other[0]):
                    return user, other[0]
                continue
            if user.op in ("call_function", "call_method") and _fn(user) not in BARRIERS | _SHAPE_ONLY \
                    and isinstance(example(user), torch.Tensor):
                work.append((user, depth + 1))
    return None, None


def _between(start: fx.Node, end: fx.Node) -> list[fx.Node]:
    """Nodes on the paths from ``start`` to ``end`` (both included; ``start`` at most SCORE_DEPTH
    nodes up), in graph order."""
    ancestors, work = set(), deque([(end, 0)])
    while work:
        n, depth = work.popleft()
        if n in ancestors or depth > SCORE_DEPTH:
            continue
        ancestors.add(n)
        if n is not start:
            work.extend((x, depth + 1) for x in value_inputs(n))
    on_path = {start}
    order = {n: i for i, n in enumerate(end.graph.nodes)}
    for n in sorted(ancestors, key=order.__getitem__):
        if n is not start and any(x in on_path for x in value_inputs(n)):
            on_path.add(n)
    return sorted(on_path, key=order.__getitem__)


PROJECTION_DEPTH = 12  # nodes between a projection and q or k (RoPE, a cache concat, repeat_kv)


def _projected(node: fx.Node) -> set:
    """What the nearest linear projections upstream of ``node`` read (their input activations)."""
    sources, seen, work = set(), set(), deque([(node, 0)])
    while work:
        n, depth = work.popleft()
        if not isinstance(n, fx.Node) or n in seen or depth > PROJECTION_DEPTH:
            continue
        seen.add(n)
        if _fn(n) == "linear":
            if n.args and isinstance(n.args[0], fx.Node):
                sources.add(root(n.args[0]))
            continue
        work.extend((x, depth + 1) for x in value_inputs(n))
    return sources


def _cached(k) -> bool:
    """Whether k holds keys of a cache: a graph input, written into in place, or new keys
    concatenated to past ones (an empty past, a cache's first step, does not count)."""
    node = root(k)
    if not isinstance(node, fx.Node):
        return False
    if node.op == "placeholder" or _fn(node) in ("index_copy", "index_copy_", "index_put", "index_put_"):
        return True
    if _fn(node) == "cat" and node.args and isinstance(node.args[0], (list, tuple)):
        parts = [x for x in node.args[0] if not (isinstance(example(x), torch.Tensor)
                                                and statically_known_true(example(x).numel() == 0))]
        return len(parts) > 1 or (len(parts) == 1 and _cached(parts[0]))
    return False


def cross_attention(q, k) -> bool:
    """Whether q and k look like a decoder's queries over an encoder's output: of different
    lengths, k not a cache (a concatenation, or a graph input), and the nearest projections of q
    and k read different activations. A heuristic (a model whose keys come from a low-rank or
    shared projection may look the same): it only words the reason of an attention that stays
    dense for another reason, and never decides a rewrite."""
    eq, ek = example(q), example(k)
    if not (isinstance(q, fx.Node) and isinstance(k, fx.Node) and isinstance(eq, torch.Tensor)
            and isinstance(ek, torch.Tensor) and eq.dim() == ek.dim() >= 2):
        return False
    if statically_known_true(eq.shape[-2] == ek.shape[-2]) or _cached(k):
        return False
    qs, ks = _projected(q), _projected(k)
    return bool(qs) and bool(ks) and not (qs & ks)


def chain_text(nodes: list[fx.Node]) -> str:
    return " -> ".join(_fn(n) or n.op for n in nodes)


def _product_words(product: fx.Node) -> list[str]:
    name = _fn(product)
    words = []
    if name == "baddbmm":
        words.append("baddbmm (a bias added to q·kᵀ inside the product, as ALiBi adds its position bias)")
    elif name == "bmm":
        words.append("bmm over (batch x heads, length, head dim) tensors")
    elif name == "einsum":
        words.append(f"einsum {product.args[0]!r}")
    for x in product_operands(product):
        if _fn(x) in ("to", "float", "_to_copy", "type"):
            src, ex = example(x.args[0]) if x.args else None, example(x)
            if src is not None and ex is not None and src.dtype != ex.dtype:
                words.append(f"q and k cast from {src.dtype} to {ex.dtype} before the product")
                break
    return words


def _node_words(node: fx.Node, path: set) -> Optional[str]:
    """What ``node`` does to the scores, in words; None for what the sparse kernels also do
    (a constant scale, a mask added once, moves and casts)."""
    name = _fn(node)
    off = [x for x in value_inputs(node) if x not in path]
    if name in NEUTRAL:
        return None
    if name == "tanh":
        return "tanh (logit soft-capping)"
    if name == "cat":
        if any(from_weights(x) for x in off):
            return "cat with a learned logit per head (attention sinks)"
        return "cat with other logits"
    if name == "where":
        condition = root(node.args[0]) if node.args else None
        if isinstance(condition, fx.Node) and condition.op in ("placeholder", "get_attr"):
            return ("torch.where masking them with a tensor read from the module's state or inputs, not built "
                    "from positions")
        return "torch.where masking them (a mask given as a condition, not added)"
    if name in ("add", "__add__", "iadd", "sub", "__sub__", "isub"):
        if any(from_weights(x) for x in off):
            return "an added bias computed from model weights (a learned position bias, e.g. T5's relative buckets)"
        if name in ("sub", "__sub__", "isub"):
            return "a subtracted term (e.g. the row maximum of a hand-written softmax)"
        return None  # a mask: the matcher says when more than one is added
    if name in ("mul", "__mul__", "imul", "div", "truediv", "__truediv__", "itruediv"):
        tensors = [x for x in off if isinstance(example(x), torch.Tensor)]
        return f"{name} by a tensor (not a constant scale)" if tensors else None
    if name in ("max", "amax", "logsumexp"):
        return None
    return name or node.op


def describe_scores(product: fx.Node, softmax: fx.Node, why: str = "") -> str:
    """Why an attention whose scores are not ``matmul(q, kᵀ) (* scale) (+ mask)`` stays dense."""
    path = _between(product, softmax.args[0])
    words = _product_words(product)
    for n in path[1:]:
        w = _node_words(n, set(path))
        if w is not None and w not in words:
            words.append(w)
    added = [n for n in path if _fn(n) in ("add", "__add__", "iadd") and any(x not in path for x in value_inputs(n))]
    if len(added) > 1 and not words:
        words.append(f"{len(added)} added terms (a bias besides the mask)")
    seen = chain_text(path + [softmax])
    what = ", ".join(words) or why or "an expression the matcher does not recognise"
    return (f"softmax over scores computed by {what}: not matched (seen: {seen}; the sparse kernels compute "
            f"softmax(q·kᵀ·scale + causal mask)·v and nothing else)")
