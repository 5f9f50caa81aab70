"""A run-time branch on a symbolic size that Inductor lowers into its own code.

``flat_cond(pred, true_fn, false_fn, tensors, extra)`` is ``torch.cond`` with the workarounds the
rewrites need (torch 2.11 and 2.13), shared by the inlined attention (kernels/inline.py) and the
MLP pass (memory_ops.gated_mlp):

- ``pred`` a Python bool or a SymBool (``N >= dense_below``): no guard, one graph for every
  length; known at trace time (static shapes), only the branch taken is traced. Or a 0-dim bool
  tensor (a data-dependent choice: Inductor's wrapper reads it, a host sync).
- ``cond_op``, the operator behind ``torch.cond``, is called directly: ``torch.cond`` re-traces
  the branches with Dynamo, which turns Python floats they close over into tensors.
- ``tensors`` cross the conditional flat: cond's lowering realises its operands in a layout of
  its choosing while the branches were traced with the operands' strides (transposed views of
  q and k), which the branches' input checks reject; a 1-D tensor has one layout. With
  ``copy=True`` they cross as fresh copies, so no operand aliases another (q, k and v may be
  views of one fused projection); the copy fuses into the producer where Inductor can.
- The branch graphs are traced on their own and may use only sizes they are handed: the
  symbolic dims of ``tensors`` cross as SymInt operands (the generated code binds its size
  symbols from them). Static dims stay constants.
- ``extra`` tensors (fixed layouts: weights, custom-op outputs) cross as they are.
- Branches return one tensor; cond's lowering wants tuples, which this wraps.

The branches get ``(*tensors, *extra)`` with ``tensors`` in their original shapes (contiguous).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch._higher_order_ops.cond import cond_op
from torch.fx.experimental.symbolic_shapes import statically_known_true


def flat_cond(pred, true_fn: Callable, false_fn: Callable, tensors: tuple, extra: tuple = (),
              copy: bool = True) -> torch.Tensor:
    if not isinstance(pred, torch.Tensor):  # a bool tensor (data-dependent) is never known here
        if statically_known_true(pred):
            return true_fn(*tensors, *extra)
        if statically_known_true(torch.sym_not(pred)):
            return false_fn(*tensors, *extra)
    shapes = [tuple(t.shape) for t in tensors]
    sizes: list = []  # distinct symbolic dims, in order of appearance
    for shape in shapes:
        for s in shape:
            if isinstance(s, torch.SymInt) and not any(s.node.expr == t.node.expr for t in sizes):
                sizes.append(s)
    flat = tuple((t.clone(memory_format=torch.contiguous_format) if copy else t.contiguous()).view(-1)
                 for t in tensors)

    def unflatten(fn):
        def branch(*args):
            bound = dict(zip((s.node.expr for s in sizes), args[:len(sizes)]))
            rest = args[len(sizes):]
            views = tuple(f.view(*(bound[s.node.expr] if isinstance(s, torch.SymInt) else s for s in shape))
                          for f, shape in zip(rest[:len(shapes)], shapes))
            return (fn(*views, *rest[len(shapes):]),)
        return branch

    return cond_op(pred, unflatten(true_fn), unflatten(false_fn), (*sizes, *flat, *extra))[0]


__all__ = ["flat_cond"]
