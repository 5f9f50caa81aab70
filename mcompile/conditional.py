"""A run-time branch on a symbolic size that Inductor lowers into its own code.

``flat_cond(pred, true_fn, false_fn, tensors, extra)`` is ``torch.cond`` with the workarounds the
rewrites need (torch 2.11 and 2.13), shared by the attention lowering and the MLP pass (passes/lowering.py):

- ``pred`` a Python bool or a SymBool (``N >= dense_below``): no guard, one graph for every
  length; known at trace time (static shapes), only the branch taken is traced. Or a 0-dim bool
  tensor (a data-dependent choice: Inductor's wrapper reads it, a host sync).
- ``cond_op``, the operator behind ``torch.cond``, is called directly: ``torch.cond`` re-traces
  the branches with Dynamo, which turns Python floats they close over into tensors.
- ``tensors`` cross the conditional flat: cond's lowering realises its operands in a layout of
  its choosing while the branches were traced with the operands' strides (transposed views of
  q and k), which the branches' input checks reject; a 1-D tensor has one layout. Each is
  flattened in its memory order where that is known without a guard (contiguous, or a
  (B, H, N, D) view of (B, N, H, D) storage, as attention's q/k/v and outputs are in
  transformers), so crossing costs no copy, and the branches see the operand's own strides.
  Operands that share storage (q, k and v may be views of one fused projection) cross as
  fresh copies instead, so that none aliases another.
- The branch graphs are traced on their own and may use only sizes they are handed: the
  symbolic dims of ``tensors`` cross as SymInt operands (the generated code binds its size
  symbols from them). Static dims stay constants. A compound size (a chunk's key length
  ``past + chunk``) binds nothing: the symbols it is made of cross on their own
  (``_free_symbols``), for shared regions too.
- ``extra`` tensors (fixed layouts: weights, custom-op outputs) cross as they are.
- Branches return one tensor; cond's lowering wants tuples, which this wraps.

Also here: ``shared_region`` (``invoke_subgraph`` with regions kept in the tracing context) and
``constant_float`` (a SymFloat specialised the way AOTAutograd's float pass does).

The branches get ``(*tensors, *extra)`` with ``tensors`` in their original shapes and, unless
copied, strides (a copy is contiguous in the same memory order).
"""

from __future__ import annotations

import hashlib
from typing import Callable

import torch
from torch._higher_order_ops.cond import cond_op
from torch.fx.experimental.symbolic_shapes import statically_known_true


def flat_cond(pred, true_fn: Callable, false_fn: Callable, tensors: tuple, extra: tuple = ()) -> torch.Tensor:
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
    sizes = _free_symbols(sizes, extra) + sizes
    copy = _share_storage(tensors)  # cond rejects aliased operands
    orders = [memory_order(t) for t in tensors]
    flat = tuple((t.permute(p).clone(memory_format=torch.contiguous_format) if copy
                  else t.permute(p).contiguous()).view(-1) for t, p in zip(tensors, orders))

    def unflatten(fn):
        def branch(*args):
            bound = dict(zip((s.node.expr for s in sizes), args[:len(sizes)]))
            rest = args[len(sizes):]
            views = []
            for f, shape, p in zip(rest[:len(shapes)], shapes, orders):
                dims = [bound[s.node.expr] if isinstance(s, torch.SymInt) else s for s in shape]
                views.append(f.view(*(dims[i] for i in p)).permute(*_inverse(p)))
            return (fn(*views, *rest[len(shapes):]),)
        return branch

    return cond_op(pred, unflatten(true_fn), unflatten(false_fn), (*sizes, *flat, *extra))[0]


def _free_symbols(sizes: list, tensors: tuple) -> list:
    """SymInts of the plain symbols that compound sizes or strides are made of (a chunk's key
    length ``past + chunk``, the strides of a slice of the cache) and that nothing binds on its
    own: neither one of ``sizes`` (SymInts crossing as operands) nor a whole dim of one of
    ``tensors`` (tensors crossing as they are). The generated code of a conditional's branch or
    a shared region binds its size symbols from its operands and computes compound sizes from
    them, so each symbol must cross on its own. While tracing they are the SymInts the tracer
    knows (it binds the graph's size inputs); outside a trace (AOTAutograd's metadata pass over
    fake tensors) any SymInt of the symbol will do. ``ValueError`` where the tracer knows none."""
    tensors = [t for t in tensors if isinstance(t, torch.Tensor)]
    dims = [d for t in tensors for d in (*t.shape, *t.stride()) if isinstance(d, torch.SymInt)]
    bound = {d.node.expr for d in [*sizes, *(d for t in tensors for d in t.shape if isinstance(d, torch.SymInt))]
             if d.node.expr.is_symbol}
    wanted = list(dict.fromkeys(x for d in [*sizes, *dims] for x in sorted(d.node.expr.free_symbols, key=str)
                                if x not in bound))
    if not wanted:
        return []
    from torch.fx.experimental.proxy_tensor import get_proxy_mode

    mode = get_proxy_mode()
    if mode is None:
        env = [*sizes, *dims][0].node.shape_env
        values = getattr(env, "backed_var_to_val", None)  # var_to_val on older torch (deprecated on 2.13)
        values = env.var_to_val if values is None else values
        unbacked = [x for x in wanted if x not in values]
        if unbacked:
            raise ValueError(f"the size symbols {unbacked} of a conditional's operands have no value "
                             "(data-dependent sizes)")
        return [env.create_symintnode(x, hint=int(values[x])) for x in wanted]
    known = {}
    tracker = mode.tracer.symnode_tracker  # keyed by SymNode (a dict of them since torch 2.5)
    for node in list(getattr(tracker, "sym_node_dict", tracker)):
        # the symbol as traced, not as simplified (``expr`` reads s1 for a node of s2 once s2 == s1 is
        # known, and the generated code would bind s2 from it)
        known.setdefault(getattr(node, "_expr", node.expr), node)
    missing = [x for x in wanted if x not in known]
    if missing:
        raise ValueError(f"the size symbols {missing} of a conditional's operands are not traced values")
    return [torch.SymInt(known[x]) for x in wanted]


def memory_order(t: torch.Tensor) -> tuple:
    """A permutation ``p`` with ``t.permute(p)`` contiguous, proven without adding a guard: the
    identity, or for a 4-D tensor dims 1 and 2 swapped (a (B, H, N, D) view of (B, N, H, D)
    storage). The identity when neither is proven (``contiguous()`` then copies)."""
    identity = tuple(range(t.dim()))
    for p in (identity, (0, 2, 1, 3)) if t.dim() == 4 else (identity,):
        expected, dense = 1, True
        for d in reversed(p):
            if not (statically_known_true(t.size(d) == 1) or statically_known_true(t.stride(d) == expected)):
                dense = False
                break
            expected = expected * t.size(d)
        if dense:
            return p
    return identity


def _inverse(p: tuple) -> tuple:
    inv = [0] * len(p)
    for i, d in enumerate(p):
        inv[d] = i
    return tuple(inv)


def _storage(t: torch.Tensor):
    """The storage of ``t`` or, while tracing, of the fake tensor under its functional wrappers
    (what cond's aliasing check compares)."""
    from torch._subclasses.functional_tensor import FunctionalTensor
    from torch.multiprocessing.reductions import StorageWeakRef

    if isinstance(t, FunctionalTensor):
        t = torch._from_functional_tensor(t.elem)
    while torch._C._functorch.is_functionaltensor(t) or torch._C._functorch.is_batchedtensor(t):
        t = torch._C._functorch.get_unwrapped(t)
    return StorageWeakRef(t.untyped_storage())


def _share_storage(tensors: tuple) -> bool:
    """Whether two of ``tensors`` may share storage (True where storage cannot be inspected)."""
    seen = set()
    for t in tensors:
        try:
            ref = _storage(t)
        except Exception:  # a tensor without inspectable storage: assume the worst
            return True
        if ref in seen:
            return True
        seen.add(ref)
    return False


def _operand_key(x) -> str:
    if isinstance(x, torch.Tensor):
        return f"T({tuple(x.shape)},{tuple(x.stride())},{x.storage_offset()},{x.dtype},{x.device})"
    return f"I({x})"


def shared_region(name: str, fn: Callable, operands: tuple, key: tuple) -> torch.Tensor:
    """``fn(*operands)`` (one tensor) as an ``invoke_subgraph`` region: AOTAutograd traces it once
    per distinct ``key`` and operand layout, and Inductor lowers and generates its code once, for
    every layer that calls it with the same key. Without it every layer's conditionals are traced
    (several times each) and lowered on their own: compile time grew with the layer count well
    past plain Inductor's (benchmarks/compile_time.py, docs/BENCHMARKS.md). ``fn`` may use only
    ``operands`` and the values in ``key`` (it is called for the first call of a key, standing in
    for the rest). Outside a compile (eager) it is ``fn(*operands)``."""
    from torch._guards import TracingContext

    ctx = TracingContext.try_get()
    if ctx is None:
        return fn(*operands)
    from torch._higher_order_ops.invoke_subgraph import invoke_subgraph

    # the symbols compound sizes are made of cross on their own, as for flat_cond (_free_symbols)
    symbols = tuple(_free_symbols([], operands))
    text = repr((name, key, len(symbols), tuple(_operand_key(x) for x in operands)))
    ident = f"mcompile_{name}_{hashlib.sha1(text.encode()).hexdigest()[:16]}"
    regions = ctx.__dict__.setdefault("_mcompile_regions", {})
    if ident not in regions:
        def body(*args):
            return (fn(*args[len(symbols):]),)
        regions[ident] = body
    return invoke_subgraph(regions[ident], ident, *symbols, *operands)[0]


def constant_float(value) -> float | None:
    """``value`` (a float or a SymFloat) as a Python float, or None where that needs more than a
    guard. A SymFloat whose expression is a constant (Dynamo restarts its analysis with a float
    specialised) is that constant; one over backed float symbols (``dynamic=True`` traces a float
    attribute as a graph input) is specialised to its value with a guard, as AOTAutograd's
    ``tensorify_python_scalars`` pass does for the floats it cannot turn into tensors."""
    if isinstance(value, float):
        return value
    if not isinstance(value, torch.SymFloat):
        return None
    from torch.fx.experimental.symbolic_shapes import guard_scalar
    from torch.utils._sympy.symbol import SymT, symbol_is_type

    free = value.node.expr.free_symbols
    if not free:
        return float(value.node.expr)
    if all(symbol_is_type(s, SymT.FLOAT) for s in free):
        return float(guard_scalar(value))
    return None


__all__ = ["flat_cond", "shared_region", "constant_float"]
