"""Values Inductor should store once rather than recompute in every reader.

Inductor inlines a cheap pointwise value into each kernel that reads it instead of storing it.
Two such values cost long prefills much time (profiles by ``benchmarks/e2e.py --profile`` in
docs/BENCHMARKS.md):

- ``rope_once`` (option ``rope_once``): a transformers model computes RoPE's cos / sin tables once
  per forward (``model.rotary_emb``) and hands them to every layer; inlined, every layer's RoPE
  kernel recomputes ``cos(position * inv_freq)`` and ``sin(...)`` for each element of q and k
  (stored, the tables are read instead). The pass finds each value computed by
  ``cos`` or ``sin`` and carried through scalar elementwise ops (the attention scaling, the cast
  to the model's dtype) to a node read by more than one node.
- ``store_residual`` (option ``store_residual``): the residual stream ``h = h + sublayer(h)``
  is read twice (the next norm, the next residual add); inlined, each norm kernel recomputes the
  stream from the last few stored sums, reading up to five N x hidden tensors per norm. The pass
  stores every residual add of a decoder layer that is read more than once.

Each stored value goes through ``prims.inductor_force_stride_order`` with its own strides: a
no-op that makes Inductor store the value (the same values the eager model computes, in its
dtype) and lets every reader load it. Run by other compilers (``compiler="eager"``, as
``mcompile.explain`` uses), the prim returns its input: the strides always match.
"""

from __future__ import annotations

import logging
from typing import Optional

import torch
import torch.fx as fx
from torch._dynamo.utils import counters

from ..config import MInferenceConfig
from .memory_report import MemorySite
from .nodes import LAYER_RE, example, module_info, node_module, same_size, target_name

log = logging.getLogger(__name__)

TRIG = {"cos", "sin"}
# Ops a table may pass through on its way to its readers, with Python scalars or 0-d tensors only.
PASSTHROUGH = {"mul", "__mul__", "truediv", "__truediv__", "to", "float", "half", "bfloat16", "type"}


def _realize_op():
    """The Inductor prim that stores a value with given strides, or None in a torch without it."""
    import torch._inductor.inductor_prims  # noqa: F401  (registers the prims)

    packet = getattr(torch.ops.prims, "inductor_force_stride_order", None)
    return getattr(packet, "default", None)


def _scalar_only(node: fx.Node, producer: fx.Node) -> bool:
    for a in (*node.args, *node.kwargs.values()):
        if a is producer:
            continue
        if isinstance(a, fx.Node):
            ex = example(a)
            if isinstance(ex, torch.Tensor) and ex.dim() > 0:
                return False
    return True


def _table(trig: fx.Node) -> fx.Node:
    """The last node of ``trig``'s single-reader chain of scalar elementwise ops."""
    node = trig
    while len(node.users) == 1:
        (user,) = node.users
        if target_name(user) not in PASSTHROUGH or not _scalar_only(user, node):
            break
        if not isinstance(example(user), torch.Tensor):
            break
        node = user
    return node


def shared_tables(graph: fx.Graph) -> list[fx.Node]:
    """Nodes holding a cos / sin table that several nodes read."""
    tables = []
    for node in graph.nodes:
        if target_name(node) not in TRIG:
            continue
        ex = example(node)
        if not isinstance(ex, torch.Tensor) or not ex.is_floating_point() or ex.dim() == 0:
            continue
        table = _table(node)
        if len(table.users) > 1 and table not in tables:
            tables.append(table)
    return tables


def realize(graph: fx.Graph, table: fx.Node, op) -> fx.Node:
    """Insert ``op(table, table's strides)`` after ``table`` and make its readers read that."""
    ex = example(table)
    with graph.inserting_before(table.next):
        strides = []
        for dim in range(ex.dim()):
            stride = ex.stride(dim)
            if not isinstance(stride, int):  # symbolic (dynamic shapes): read it from the tensor
                node = graph.call_method("stride", (table, dim))
                node.meta["example_value"] = stride
                stride = node
            strides.append(stride)
        stored = graph.call_function(op, (table, strides))
    stored.meta.update({k: table.meta[k] for k in ("nn_module_stack", "stack_trace") if k in table.meta})
    stored.meta["example_value"] = ex
    new = {stored} | {s for s in strides if isinstance(s, fx.Node)}
    table.replace_all_uses_with(stored, delete_user_cb=lambda user: user not in new)
    return stored


def residual_adds(graph: fx.Graph) -> list[fx.Node]:
    """``a + b`` of two tensors of one shape, computed by a decoder layer itself (not one of its
    submodules) and read by more than one node: the residual stream."""
    adds = []
    for node in graph.nodes:
        if target_name(node) not in ("add", "__add__") or len(node.users) < 2 or len(node.args) != 2:
            continue
        a, b = node.args
        ea, eb, out = example(a), example(b), example(node)
        if not all(isinstance(x, torch.Tensor) for x in (ea, eb, out)) or not out.is_floating_point():
            continue
        if out.dim() < 2 or not (ea.dim() == eb.dim() == out.dim()) or not all(
                same_size(x, y) and same_size(x, z) for x, y, z in zip(ea.shape, eb.shape, out.shape)):
            continue  # compared without guards: a symbolic length must not specialise the graph
        path = module_info(node)[1].replace("[", ".").replace("]", ".") + "."
        layer = LAYER_RE.search(path)
        if layer and layer.end() == len(path.rstrip(".")) + 1:  # the layer's own code, not a submodule's
            adds.append(node)
    return adds


GRAD_REASON = "gradients are enabled and the value requires grad (the store has no backward)"


def _store(gm: fx.GraphModule, pass_name: str, nodes: list, switched_on: bool, grad_enabled: bool) -> list:
    """Store ``nodes`` (one site each), or say why not."""
    if not nodes:
        return []
    reason: Optional[str] = None
    op = None
    if not switched_on:
        reason = f"switched off ({pass_name}=False)"
    else:
        op = _realize_op()
        if op is None:
            reason = "this torch has no prims.inductor_force_stride_order"
    sites = []
    for node in nodes:
        why = reason
        if why is None and grad_enabled and example(node).requires_grad:
            why = GRAD_REASON
        if why is None:
            realize(gm.graph, node, op)
            counters["mcompile"][pass_name] += 1
        sites.append(MemorySite(pass_name, node_module(node), why is None, why or ""))
    stored = sum(site.applied for site in sites)
    if stored:
        log.info("mcompile: %s: %d value(s) stored once", pass_name, stored)
    return sites


def rope_once(gm: fx.GraphModule, config: MInferenceConfig, grad_enabled: bool = False) -> list:
    """Store every shared cos / sin table once (``config.rope_once``); one site per table."""
    return _store(gm, "rope_once", shared_tables(gm.graph), config.rope_once, grad_enabled)


def store_residual(gm: fx.GraphModule, config: MInferenceConfig, grad_enabled: bool = False) -> list:
    """Store every residual add of a decoder layer (``config.store_residual``); one site each."""
    return _store(gm, "store_residual", residual_adds(gm.graph), config.store_residual, grad_enabled)
