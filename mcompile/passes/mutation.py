"""Which tensors of a Dynamo graph may be changed in place: the mask proof's side condition.

A mask proven causal from how it was built is causal only if nothing changes it, or any tensor
it was built from, between its construction and its use: ``mask[..., :16] = True`` after the
causal build turns it into a prefix-bidirectional mask that the proof never sees, because the
attention still reads the node the comparison produced. Dynamo keeps such in-place operations
in its graph as they were written (``setitem``, ``masked_fill_``, ``x |= y``, ``copy_``, ...).

``changed_in_place`` answers conservatively for a set of nodes: it follows every alias of them
forward (views, indexing, casts that may return their input: anything not known to produce a
new tensor) and reports the first user that writes to one of them, or that might (a module
call, a higher-order op, a function outside torch). Graph inputs do not alias each other at run
time: Dynamo guards on that and recompiles otherwise.
"""

from __future__ import annotations

from typing import Iterable, Optional

import torch
import torch.fx as fx

from .nodes import example, target_name

# Ops that always return a new tensor (never a view or their input itself), by target name.
# Anything not listed is assumed to possibly alias its tensor inputs: casts (``to``, ``float``,
# ``type_as`` return their input when nothing changes), views, indexing, ``dropout`` in eval mode.
FRESH = frozenset("""
    add sub mul div truediv floordiv mod pow neg abs exp log sqrt rsqrt sin cos tanh sigmoid relu gelu silu
    softmax log_softmax matmul bmm mm linear einsum baddbmm addmm
    le lt ge gt eq ne and_ or_ xor not_ invert
    __add__ __radd__ __sub__ __rsub__ __mul__ __rmul__ __truediv__ __rtruediv__ __floordiv__ __mod__ __pow__
    __neg__ __abs__ __le__ __lt__ __ge__ __gt__ __eq__ __ne__ __and__ __rand__ __or__ __ror__ __xor__
    __invert__ logical_and logical_or logical_not logical_xor bitwise_and bitwise_or bitwise_not bitwise_xor
    where masked_fill cat concat concatenate stack clone cumsum cumprod sum mean amax amin max min argmax argmin
    any all tril triu repeat repeat_interleave index_select gather embedding scaled_dot_product_attention
    arange ones zeros full empty ones_like zeros_like full_like empty_like new_ones new_zeros new_full new_empty
    tensor diff sort topk nonzero isin
""".split())
# Python's in-place operators (``x |= y`` is ``operator.ior``; methods ``__ior__``).
INPLACE_OPERATORS = frozenset({"iadd", "iand", "iconcat", "ifloordiv", "ilshift", "imod", "imul", "imatmul", "ior",
                               "ipow", "irshift", "isub", "itruediv", "ixor", "setitem", "delitem"})
_SAFE_MODULES = ("torch", "_operator", "operator", "builtins", "math")
# Functions of torch.nn.functional with an ``inplace`` flag.
_INPLACE_FLAG = frozenset({"relu", "relu6", "elu", "selu", "celu", "leaky_relu", "hardtanh", "threshold", "dropout",
                           "dropout1d", "dropout2d", "dropout3d", "alpha_dropout", "feature_alpha_dropout", "rrelu",
                           "hardsigmoid", "hardswish", "silu", "mish"})


def _tensor_inputs(node: fx.Node) -> list[fx.Node]:
    return [n for n in node.all_input_nodes if not _is_scalar(n)]


def _is_scalar(node: fx.Node) -> bool:
    """A node whose value is not a tensor (a size, a SymInt, a float): it cannot be changed in place."""
    ex = example(node)
    return ex is not None and not isinstance(ex, (torch.Tensor, tuple, list))


def _flat(value) -> list:
    if isinstance(value, (tuple, list)):
        return [x for v in value for x in _flat(v)]
    return [value]


def _known_target(node: fx.Node) -> bool:
    """A torch function, a Tensor method or a Python operator: its effect is known by its name."""
    if node.op == "call_method":
        return hasattr(torch.Tensor, node.target)
    module = getattr(node.target, "__module__", None) or ""
    return module.split(".")[0] in _SAFE_MODULES and not isinstance(node.target, torch._ops.HigherOrderOperator)


def writes(user: fx.Node, node: fx.Node) -> Optional[str]:
    """How ``user`` changes ``node`` in place, or may, or None when it does not."""
    if user.op == "call_module":
        return f"the module call {user.target}"
    if user.op not in ("call_function", "call_method"):
        return None
    name = target_name(user)
    if any(x is node for x in _flat(user.kwargs.get("out"))):
        return f"{name}(out=...)"
    target = user.target
    if isinstance(target, torch._ops.OpOverload):
        return name if target._schema.is_mutable else None
    if isinstance(target, torch._ops.OpOverloadPacket):
        return name if any(getattr(target, o)._schema.is_mutable for o in target.overloads()) else None
    if not _known_target(user):
        return f"{name or user.target!r}, which may change its inputs"
    first = _flat(user.args[0]) if user.args else []
    on_self = any(x is node for x in first)
    if name in INPLACE_OPERATORS or name in ("__setitem__", "__delitem__"):
        return (f"an indexed assignment ({name})" if "setitem" in name else f"the in-place operator {name}") \
            if on_self else None
    if name.startswith("__i") and name.endswith("__"):  # __ior__, __iadd__, ...
        return f"the in-place operator {name}" if on_self else None
    if getattr(target, "__module__", None) in ("_operator", "operator"):
        return None  # operator.and_, operator.not_: not in place (those are INPLACE_OPERATORS)
    if name.endswith("_") and not name.startswith("__"):
        return f"{name}" if on_self else None
    # F.relu(x, True), F.dropout(x, p, training, True), ...: an in-place flag given by position
    if user.kwargs.get("inplace") is True or (name in _INPLACE_FLAG and any(a is True for a in user.args[1:])):
        return f"{name}(inplace=True)"
    return None


def _aliases(user: fx.Node) -> bool:
    """Whether ``user``'s value may share memory with one of its tensor inputs."""
    if user.op not in ("call_function", "call_method"):
        return user.op == "call_module"
    if _is_scalar(user):
        return False
    if isinstance(user.target, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
        packet = user.target if isinstance(user.target, torch._ops.OpOverloadPacket) else user.target.overloadpacket
        return any(r.alias_info is not None for o in packet.overloads() for r in getattr(packet, o)._schema.returns)
    return target_name(user) not in FRESH


def changed_in_place(nodes: Iterable[fx.Node]) -> Optional[tuple[fx.Node, fx.Node, str]]:
    """(node, user, how) for the first of ``nodes``, or of their aliases, that a user of the graph
    changes in place (or may); None when none is."""
    seen: set = set()
    work = [n for n in nodes if not _is_scalar(n)]
    while work:
        node = work.pop()
        if node in seen:
            continue
        seen.add(node)
        for user in node.users:
            how = writes(user, node)
            if how is not None:
                return node, user, how
            if _aliases(user):
                work.append(user)
    return None


def built_from(root: fx.Node) -> list[fx.Node]:
    """``root`` and every tensor it is computed from (sizes and other scalars end the walk: their
    values cannot change in place)."""
    seen, order, work = set(), [], [root]
    while work:
        node = work.pop()
        if node in seen or _is_scalar(node):
            continue
        seen.add(node)
        order.append(node)
        work.extend(_tensor_inputs(node))
    return order


def mutates(node: fx.Node) -> bool:
    """Whether ``node`` may change one of its inputs in place (dead-code elimination keeps it)."""
    return any(writes(node, x) is not None for x in node.all_input_nodes) or node.op == "call_module" or (
        node.op in ("call_function", "call_method") and not _known_target(node))


__all__ = ["changed_in_place", "built_from", "mutates", "writes", "FRESH", "INPLACE_OPERATORS"]
