"""Prove from how a mask was built that it is causal (optionally ANDed with key padding).

Causal means bottom-right aligned: with Nq queries over N keys (a chunk after a cached prefix
of ``P = N - Nq`` tokens), query row i keeps keys ``<= i + P``. transformers builds that as
``kv_idx <= q_idx`` with ``q_idx = arange(Nq) + past`` (5.23: ``q_offset`` from the cache;
5.17: ``cache_position = arange(past, past + Nq)``), ``past`` a SymInt under dynamic shapes.
The proof tracks such offsets symbolically and the caller checks them against ``P``.

The mask of an attention is an FX subgraph over position ranges (``arange``), comparisons,
conjunctions, a 2-D padding mask and broadcasting. ``prove_mask`` interprets that subgraph
abstractly: every node becomes a value of this small domain, and anything outside it stops the
proof with the reason.

- ``Positions(dim, offset)``: an integer tensor equal to ``index along dim + offset``
  (``dim`` None while it is still a 1-D range, before it is broadcast into place); offsets are
  ints or SymInts (a graph value such as the cached length).
- ``Predicate(bounds, padding)``: a boolean tensor, the conjunction of ``key - query <= c``
  bounds (``c = P`` is causal), ``key - query >= c`` bounds (sliding windows), and
  ``padding[b, key]`` for 2-D mask nodes. ``Predicate()`` is all-true.
- ``Additive(predicate)``: ``where(predicate, 0, very negative)``, the float form of a mask.

The attention mask has layout (B, H, Q, K): dim 0 is the batch, 2 the query, 3 the key.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch
import torch.fx as fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

from .nodes import example, target_name

Q_DIM, K_DIM, B_DIM, MASK_DIMS = 2, 3, 0, 4
MASKED_BELOW = -1e4  # an additive value at or below this is a masked entry (exp underflows to 0)


def _is_int(x) -> bool:
    """An integer position or offset: a Python int or a SymInt (never a bool)."""
    return isinstance(x, (int, torch.SymInt)) and not isinstance(x, bool)


@dataclass(frozen=True)
class Positions:
    dim: Optional[int]
    offset: object  # int or SymInt


@dataclass(frozen=True)
class RowPositions:
    """A (B, N) tensor whose value is the column index + offset (``position_ids`` built from
    ``arange``)."""

    offset: object  # int or SymInt


@dataclass(frozen=True)
class Predicate:
    upper: tuple = ()  # c in "key - query <= c" (ints or SymInts)
    lower: tuple = ()  # c in "key - query >= c"
    padding: Optional[fx.Node] = None  # 2-D (B, K) bool node

    def __and__(self, other: "Predicate") -> "Predicate":
        if self.padding is not None and other.padding is not None and self.padding is not other.padding:
            raise _Unproven("two different padding masks")
        return Predicate(self.upper + other.upper, self.lower + other.lower, self.padding or other.padding)


@dataclass(frozen=True)
class Additive:
    predicate: Predicate


@dataclass(frozen=True)
class PaddingSource:
    node: fx.Node  # a 2-D boolean (B, K) tensor from a graph input


Value = Union[Positions, RowPositions, Predicate, Additive, PaddingSource, bool, int, float]


class _Unproven(Exception):
    pass


@dataclass(frozen=True)
class MaskProof:
    """``causal`` is True when the mask keeps exactly key <= query + P (and padding, if any)."""

    causal: bool
    key_padding: Optional[fx.Node] = None
    reason: str = ""


_IDENTITY = {"to", "expand", "contiguous", "bool", "clone", "detach", "expand_as", "_to_copy"}
_AND = {"and_", "__and__", "logical_and", "bitwise_and", "mul", "__mul__"}
_CMP = {"le": (1, 0), "lt": (1, -1), "ge": (-1, 0), "gt": (-1, -1),
        "__le__": (1, 0), "__lt__": (1, -1), "__ge__": (-1, 0), "__gt__": (-1, -1)}


class _Interpreter:
    def __init__(self):
        self.memo: dict = {}

    def value(self, arg) -> Value:
        if isinstance(arg, (bool, int, float, torch.SymInt)):
            return arg
        if not isinstance(arg, fx.Node):
            raise _Unproven(f"unsupported mask argument {arg!r}")
        if arg not in self.memo:
            self.memo[arg] = self._eval(arg)
        return self.memo[arg]

    def _eval(self, node: fx.Node) -> Value:
        ex = example(node)
        if isinstance(ex, torch.SymInt) or (node.op == "placeholder" and _is_int(ex)):
            return ex  # an integer graph value (a length, the cached prefix's length)
        if node.op == "placeholder":
            ex = example(node)
            if ex is not None and ex.dim() == 2:
                return PaddingSource(node)
            raise _Unproven(f"the mask comes from graph input {node.name!r}, whose structure is unknown")
        if node.op not in ("call_function", "call_method"):
            raise _Unproven(f"the mask depends on {node.op} {node.target}")
        name = target_name(node)
        args = node.args
        if name == "arange":
            return self._arange(node)
        if name in ("zeros", "zeros_like", "new_zeros"):
            return 0.0  # the 0 of where(mask, 0, min)
        if name == "tensor" and args and isinstance(args[0], (int, float)) and not isinstance(args[0], bool):
            return float(args[0])  # a scalar constant, e.g. the 0 of where(mask, 0, min)
        if name in _IDENTITY:
            v = self.value(args[0])
            if isinstance(v, PaddingSource) and name == "to":
                return PaddingSource(node)  # the cast node itself is what the kernel reads
            return v
        if name in ("add", "__add__", "iadd") and len(args) == 2:
            return self._add(args[0], args[1])
        if name in ("sub", "__sub__") and len(args) == 2:
            vb = self.value(args[1])
            if _is_int(vb):
                return self._add(args[0], -vb)
        if name == "unsqueeze" and args[1] == 0:
            v = self.value(args[0])
            if isinstance(v, Positions) and v.dim is None:
                return RowPositions(v.offset)
        if name == "diff":
            return self._diff(node)
        if name in ("eq", "__eq__", "ne", "__ne__"):
            a, b = self.value(args[0]), self.value(args[1])
            if isinstance(a, (bool, int)) and isinstance(b, (bool, int)):
                same = a == b
                if name in ("eq", "__eq__"):
                    if not same:
                        raise _Unproven("a mask term that is always false")
                    return Predicate()  # equal constant labels: every pair allowed
                return not same
            raise _Unproven(f"{name} of non-constant values (packed sequences?)")
        if name == "cumsum":
            v = self.value(args[0])
            if v is False or (isinstance(v, int) and not isinstance(v, bool) and v == 0):
                return 0  # cumulative sum of zeros: a constant label
            raise _Unproven("a cumulative sum of non-zero values (packed sequences?)")
        if name in ("new_ones", "ones") and node.kwargs.get("dtype") is torch.bool:
            return Predicate()
        if name in _CMP:
            return self._compare(name, args[0], args[1])
        if name in _AND:
            a, b = self.value(args[0]), self.value(args[1])
            if isinstance(a, Predicate) and isinstance(b, Predicate):
                return a & b
            raise _Unproven(f"{name} of non-boolean mask parts")
        if name in ("getitem", "__getitem__"):
            return self._getitem(args[0], args[1])
        if name == "where":
            return self._where(*args)
        if name == "tril" and len(args) >= 1:
            base = self.value(args[0])
            diag = args[1] if len(args) > 1 else node.kwargs.get("diagonal", 0)
            if isinstance(base, Predicate) and isinstance(diag, int):
                return base & Predicate(upper=(diag,))
        raise _Unproven(f"unrecognised mask operation {name!r} ({node.name})")

    def _arange(self, node: fx.Node) -> Positions:
        args = [a for a in node.args]
        if len(args) == 1:
            return Positions(None, 0)
        start = self.value(args[0]) if len(args) >= 2 else None
        if _is_int(start) and (len(args) < 3 or args[2] == 1):
            return Positions(None, start)  # arange(past, past + n): cache_position
        raise _Unproven("arange with a non-integer start or a step")

    def _add(self, a, b):
        va, vb = self.value(a), self.value(b)
        if _is_int(va) and isinstance(vb, (Positions, RowPositions)):
            va, vb = vb, va
        if _is_int(vb):
            if isinstance(va, Positions):
                return Positions(va.dim, va.offset + vb)
            if isinstance(va, RowPositions):
                return RowPositions(va.offset + vb)
            if _is_int(va):
                return va + vb
        raise _Unproven("positions shifted by a non-constant offset")

    def _diff(self, node: fx.Node) -> int:
        """diff(position_ids, prepend=position_ids[:, :1] - 1) of consecutive positions: all ones."""
        v = self.value(node.args[0])
        prepend = node.kwargs.get("prepend")
        dim = node.kwargs.get("dim", -1)
        if isinstance(v, RowPositions) and dim in (-1, 1) and prepend is not None:
            if statically_known_true(self.value(prepend) == v.offset - 1):
                return 1
        raise _Unproven("a difference of positions that is not constant")

    def _compare(self, name: str, a, b) -> Predicate:
        va, vb = self.value(a), self.value(b)
        if not (isinstance(va, Positions) and isinstance(vb, Positions)):
            raise _Unproven(f"comparison {name} of non-position values")
        sign, shift = _CMP[name]  # a <= b (+shift) when sign > 0; a >= b (+shift) when sign < 0
        dims = {va.dim, vb.dim}
        if dims != {Q_DIM, K_DIM}:
            raise _Unproven(f"comparison between dims {sorted(d for d in dims if d is not None)}, not query/key")
        # Normalise to "key - query <= c" (upper) or "key - query >= c" (lower).
        key_first = va.dim == K_DIM
        key, query = (va, vb) if key_first else (vb, va)
        base = query.offset - key.offset
        upper = (sign > 0) == key_first
        c = base + shift if upper else base - shift
        return Predicate(upper=(c,)) if upper else Predicate(lower=(c,))

    def _getitem(self, base, index) -> Value:
        v = self.value(base)
        if isinstance(v, (bool, int)) and not isinstance(v, float):
            return v  # indexing a constant tensor
        if isinstance(v, RowPositions) and isinstance(index, tuple) and len(index) == 2:
            if index[0] == slice(None) and index[1] in (slice(None, 1, None), slice(0, 1, None)):
                return v.offset  # the first position of every row
            bi, xi = self.value(index[0]), self.value(index[1])
            if isinstance(bi, Positions) and bi.dim == B_DIM and isinstance(xi, Positions) \
                    and xi.dim in (Q_DIM, K_DIM):
                return Positions(xi.dim, xi.offset + v.offset)
            raise _Unproven("position ids indexed in an unrecognised way")
        if isinstance(v, PaddingSource):
            if isinstance(index, tuple) and len(index) == 2:
                bi, ki = self.value(index[0]), self.value(index[1])
                if isinstance(bi, Positions) and isinstance(ki, Positions) and bi.dim == B_DIM \
                        and ki.dim == K_DIM and bi.offset == 0 and ki.offset == 0:
                    return Predicate(padding=v.node)
            raise _Unproven("the 2-D mask is indexed in an unrecognised way")
        if isinstance(v, Positions) and v.dim is None and isinstance(index, tuple):
            if Ellipsis in index or sum(1 for i in index if isinstance(i, slice)) != 1:
                raise _Unproven("a position range indexed in an unrecognised way")
            if len(index) != MASK_DIMS:
                raise _Unproven(f"a position range broadcast to {len(index)} dims")
            pos = next(i for i, s in enumerate(index) if isinstance(s, slice))
            s = index[pos]
            if s != slice(None, None, None):
                raise _Unproven("a sliced position range")
            if not all(i is None or i == slice(None) for i in index):
                raise _Unproven("a position range indexed by values")
            return Positions(pos, v.offset)
        if isinstance(v, (Predicate, Additive)) and isinstance(index, tuple) \
                and all(isinstance(i, slice) and i.start in (None, 0) and i.step in (None, 1) for i in index):
            return v  # the transformers idiom mask[:, :, :, :key_len] keeps the whole mask
        raise _Unproven("an indexed mask")

    def _where(self, cond, a, b) -> Additive:
        pc = self.value(cond)
        vb = self.value(b)
        if not isinstance(pc, Predicate):
            raise _Unproven("where() over a non-boolean condition")
        va = self.value(a)
        if isinstance(va, (int, float)) and va == 0 and isinstance(vb, float) and vb <= MASKED_BELOW:
            return Additive(pc)
        raise _Unproven("where() that is not (mask, 0, -inf)")


def _same(a, b) -> bool:
    """a == b for ints and SymInts, without adding a guard."""
    return bool(statically_known_true(a == b))


def prove_mask(mask: fx.Node, additive: bool, offset=0) -> MaskProof:
    """Is ``mask`` (boolean, or additive if ``additive``) exactly causal with the queries at
    ``offset`` (P = N - Nq, an int or SymInt; 0 for a whole prompt), plus key padding?"""
    interp = _Interpreter()
    try:
        v = interp.value(mask)
    except _Unproven as exc:
        return MaskProof(False, reason=f"mask not proven causal: {exc}")
    if additive:
        if not isinstance(v, Additive):
            return MaskProof(False, reason="additive mask of unknown values")
        v = v.predicate
    elif not isinstance(v, Predicate):
        return MaskProof(False, reason="boolean mask of unknown structure")
    if v.lower:
        behind = [str(offset - c) for c in v.lower]  # key >= query position - (P - c)
        return MaskProof(False, reason=f"sliding-window mask (keys at most {', '.join(behind)} positions behind "
                                       "the query)")
    if not v.upper:
        return MaskProof(False, reason="non-causal mask (bidirectional attention)")
    if not all(_same(c, offset) for c in v.upper):
        shown = ", ".join(str(c) for c in v.upper)
        if _same(offset, 0):
            return MaskProof(False, reason=f"mask shifted from causal (key - query <= {shown})")
        return MaskProof(False, reason=f"mask shifted from causal (key - query <= {shown}; a chunk after a "
                                       f"cached prefix needs {offset}, the key length minus the query length)")
    return MaskProof(True, key_padding=v.padding)
