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

- ``Positions(dim, offset, length)``: an integer tensor equal to ``index along dim + offset``
  for ``length`` indices (``dim`` None while it is still a 1-D range, before it is broadcast
  into place); offsets and lengths are ints or SymInts (graph values such as the cached length).
- ``Predicate(bounds, padding)``: a boolean tensor, the conjunction of ``key - query <= c``
  bounds (``c = P`` is causal), ``key - query >= c`` bounds (sliding windows: a constant
  ``P - c`` is a window of ``P - c + 1`` keys, which the proof returns), and
  ``padding[b, key]`` for 2-D mask nodes. ``Predicate()`` is all-true.
- ``Additive(predicate)``: ``where(predicate, 0, very negative)``, the float form of a mask.

The attention mask has layout (B, H, Q, K): dim 0 is the batch, 2 the query, 3 the key. A mask
of fewer dims ((Q, K), (H, Q, K)) is aligned from the right, as broadcasting aligns it.

What the proof checks besides the values, each a way a mask can look causal and not be:

- Nothing changes the mask, anything it is built from, or a view of either, in place
  (``mask[..., :16] = True``, ``masked_fill_``, ``|=``, ``copy_``: passes/mutation.py).
- A position range is exactly ``start, start + 1, ..., end - 1``: ``arange``'s start, end and
  step are read whether given by position or keyword, and a step other than 1 is not proven.
- Positions keep their values: their dtype holds every one of them exactly (float16 holds the
  integers only up to 2048, int8 up to 127).
- Nothing is broadcast where a position is meant: a query range spans all Nq queries, a key
  range all N keys, a ``tril`` the whole (Nq, N) square, and the mask itself is (.., Nq, N);
  a length-1 range broadcast over the queries would give every query the first one's keys.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Optional, Union

import torch
import torch.fx as fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

from .mutation import built_from, changed_in_place
from .nodes import example, same_size, target_name

Q_DIM, K_DIM, B_DIM, MASK_DIMS = 2, 3, 0, 4
MASKED_BELOW = -1e4  # an additive value at or below this is a masked entry (exp underflows to 0)
# The largest integer each dtype holds exactly, with every integer below it. int32 is accepted at
# any length: 2^31 positions are more keys than any device holds (their K/V alone would be
# hundreds of GiB per head), so its bound is never reached.
EXACT_INTEGERS = {torch.int64: 2 ** 63 - 1, torch.int32: 2 ** 31 - 1, torch.int16: 2 ** 15 - 1, torch.int8: 127,
                  torch.uint8: 255, torch.float64: 2 ** 53, torch.float32: 2 ** 24, torch.bfloat16: 2 ** 8,
                  torch.float16: 2 ** 11, torch.bool: 1}
_ALWAYS_EXACT = 2 ** 31 - 1  # dtypes exact to here are exact for every length (see above)
_ARANGE = inspect.signature(lambda start=None, end=None, step=None, **options: None)


def _is_int(x) -> bool:
    """An integer position or offset: a Python int or a SymInt (never a bool)."""
    return isinstance(x, (int, torch.SymInt)) and not isinstance(x, bool)


@dataclass(frozen=True)
class Positions:
    dim: Optional[int]
    offset: object  # int or SymInt
    length: object  # int or SymInt: how many positions (the range's size along ``dim``)


@dataclass(frozen=True)
class RowPositions:
    """A (B, N) tensor whose value is the column index + offset (``position_ids`` built from
    ``arange``); ``length`` columns."""

    offset: object  # int or SymInt
    length: object


@dataclass(frozen=True)
class Predicate:
    upper: tuple = ()  # c in "key - query <= c" (ints or SymInts)
    lower: tuple = ()  # c in "key - query >= c"
    padding: Optional[fx.Node] = None  # 2-D (B, K) bool node

    def __and__(self, other: "Predicate") -> "Predicate":
        if self.padding is not None and other.padding is not None and self.padding is not other.padding:
            raise _Unproven("it combines two different padding masks")
        return Predicate(self.upper + other.upper, self.lower + other.lower, self.padding or other.padding)


@dataclass(frozen=True)
class Additive:
    predicate: Predicate


@dataclass(frozen=True)
class PaddingSource:
    node: fx.Node  # a 2-D (B, K) tensor from a graph input


Value = Union[Positions, RowPositions, Predicate, Additive, PaddingSource, bool, int, float]


class _Unproven(Exception):
    pass


@dataclass(frozen=True)
class MaskProof:
    """``causal`` is True when the mask keeps exactly key <= query + P (and padding, if any),
    and, when ``window`` > 0, also key > query position - ``window`` (a sliding window of
    ``window`` keys, the query's own included)."""

    causal: bool
    key_padding: Optional[fx.Node] = None
    reason: str = ""
    window: int = 0


_CASTS = {"to", "_to_copy", "type", "float", "double", "half", "bfloat16", "int", "long", "short", "char", "byte",
          "bool", "type_as"}
_SAME_VALUES = {"expand", "contiguous", "clone", "detach", "expand_as"}
_AND = {"and_", "__and__", "logical_and", "bitwise_and", "mul", "__mul__"}
_CMP = {"le": (1, 0), "lt": (1, -1), "ge": (-1, 0), "gt": (-1, -1),
        "__le__": (1, 0), "__lt__": (1, -1), "__ge__": (-1, 0), "__gt__": (-1, -1)}
_UNDERSTOOD = ("query and key positions (torch.arange, cache_position) compared with <=, <, >=, >; "
               "their conjunction (&); a 2-D boolean padding mask indexed by batch and key; "
               "torch.where(mask, 0, very negative) for an additive mask")


def describe(v) -> str:
    """What a value of the domain is, in words for a reason."""
    if isinstance(v, Positions):
        return "a position range" if v.dim is None else f"positions along dim {v.dim}"
    if isinstance(v, RowPositions):
        return "per-row positions (position_ids)"
    if isinstance(v, Predicate):
        return "a boolean mask"
    if isinstance(v, Additive):
        return "an additive mask"
    if isinstance(v, PaddingSource):
        return f"the 2-D graph input {v.node.name!r}"
    return f"the constant {v!r}"


def _dims(node: fx.Node) -> Optional[int]:
    ex = example(node)
    return ex.dim() if isinstance(ex, torch.Tensor) else None


class _Interpreter:
    def __init__(self, batch, nq, n):
        self.memo: dict = {}
        self.batch, self.nq, self.n = batch, nq, n

    def value(self, arg) -> Value:
        if isinstance(arg, (bool, int, float, torch.SymInt)):
            return arg
        if not isinstance(arg, fx.Node):
            raise _Unproven(f"it uses the value {arg!r}")
        if arg not in self.memo:
            v = self._eval(arg)
            self._check_dtype(arg, v)
            self.memo[arg] = v
        return self.memo[arg]

    def _check_dtype(self, node: fx.Node, v: Value) -> None:
        """Positions must hold their values exactly; boolean masks must be boolean, additive ones
        floating point."""
        ex = example(node)
        if not isinstance(v, (Positions, RowPositions, Predicate, Additive)):
            return
        if not isinstance(ex, torch.Tensor):
            raise _Unproven(f"{node.name} has no recorded value (dtype and shape unknown)")
        if isinstance(v, Predicate) and ex.dtype != torch.bool:
            raise _Unproven(f"a boolean mask is cast to {ex.dtype} ({node.name}), whose 0/1 values are not a mask")
        if isinstance(v, Additive) and not ex.dtype.is_floating_point:
            raise _Unproven(f"an additive mask is cast to {ex.dtype} ({node.name})")
        if isinstance(v, (Positions, RowPositions)):
            limit = EXACT_INTEGERS.get(ex.dtype)
            lo, hi = v.offset, v.offset + v.length - 1
            if limit is None or (limit < _ALWAYS_EXACT and not (statically_known_true(lo >= -limit)
                                                                   and statically_known_true(hi <= limit))):
                exact = f"exact only for integers up to {limit}" if limit else "not an integer or float type"
                raise _Unproven(f"positions are held in {ex.dtype} ({node.name}), {exact}: positions up to {hi} "
                                "may not survive")

    def _eval(self, node: fx.Node) -> Value:
        ex = example(node)
        if isinstance(ex, torch.SymInt) or (node.op == "placeholder" and _is_int(ex)):
            return ex  # an integer graph value (a length, the cached prefix's length)
        if node.op == "placeholder":
            if isinstance(ex, torch.Tensor) and ex.dim() == 2:
                return PaddingSource(node)
            raise _Unproven(f"it is read from the graph input {node.name!r}, whose content is unknown")
        if node.op not in ("call_function", "call_method"):
            raise _Unproven(f"it depends on {node.op} {node.target}")
        name = target_name(node)
        args = node.args
        if name == "arange":
            return self._arange(node)
        if name in ("zeros", "zeros_like", "new_zeros"):
            return 0.0  # the 0 of where(mask, 0, min)
        if name == "tensor" and args and isinstance(args[0], (int, float)) and not isinstance(args[0], bool):
            return float(args[0])  # a scalar constant, e.g. the 0 of where(mask, 0, min)
        if name in _CASTS or name in _SAME_VALUES:
            return self._same_values(node, name)
        if name in ("add", "__add__", "__radd__") and len(args) == 2:
            return self._add(args[0], args[1])
        if name in ("sub", "__sub__") and len(args) == 2:
            vb = self.value(args[1])
            if _is_int(vb):
                return self._add(args[0], -vb)
        if name == "unsqueeze" and args[1] == 0:
            v = self.value(args[0])
            if isinstance(v, Positions) and v.dim is None:
                return RowPositions(v.offset, v.length)
        if name == "diff":
            return self._diff(node)
        if name in ("eq", "__eq__", "ne", "__ne__"):
            a, b = self.value(args[0]), self.value(args[1])
            if isinstance(a, (bool, int)) and isinstance(b, (bool, int)):
                same = a == b
                if name in ("eq", "__eq__"):
                    if not same:
                        raise _Unproven("a mask term is always false")
                    return Predicate()  # equal constant labels: every pair allowed
                return not same
            raise _Unproven(f"it tests {describe(a)} {'==' if 'eq' in name else '!='} {describe(b)} "
                            "(packed sequences or document ids?): a block-diagonal mask is not causal")
        if name == "cumsum":
            v = self.value(args[0])
            if v is False or (isinstance(v, int) and not isinstance(v, bool) and v == 0):
                return 0  # cumulative sum of zeros: a constant label
            raise _Unproven("it takes a cumulative sum of non-zero values (packed sequences?)")
        if name in ("new_ones", "ones") and node.kwargs.get("dtype") is torch.bool:
            return Predicate()
        if name in _CMP:
            return self._compare(name, args[0], args[1])
        if name in _AND:
            a, b = self.value(args[0]), self.value(args[1])
            if isinstance(a, Predicate) and isinstance(b, Predicate):
                return a & b
            raise _Unproven(f"it combines {describe(a)} and {describe(b)} with {name}")
        if name in ("getitem", "__getitem__"):
            return self._getitem(node, args[0], args[1])
        if name == "where":
            return self._where(*args)
        if name == "tril" and len(args) >= 1:
            return self._tril(node)
        raise _Unproven(f"it uses {name or node.op} ({node.name}), which the proof does not interpret")

    def _same_values(self, node: fx.Node, name: str) -> Value:
        """Casts and copies: the value is unchanged (``_check_dtype`` then checks the new dtype).
        Positions keep their meaning only where the number of dims does not change."""
        v = self.value(node.args[0])
        if isinstance(v, PaddingSource):
            if name in _CASTS:
                return PaddingSource(node)  # the cast node itself is what the kernel reads
            return v
        if isinstance(v, (Positions, RowPositions)) and _dims(node) != _dims(node.args[0]):
            raise _Unproven(f"positions are reshaped by {name} ({node.name})")
        if isinstance(v, (bool, int, float)) and name in _CASTS:
            raise _Unproven(f"a constant is cast by {name} ({node.name})")
        return v

    def _arange(self, node: fx.Node) -> Positions:
        """``arange(end)``, ``arange(start, end[, step])``, with any of them given by keyword."""
        args, kwargs = list(node.args), dict(node.kwargs)
        if len(args) == 1 and not {"start", "end"} & set(kwargs):
            args = [0, args[0]]  # arange(end)
        try:
            bound = _ARANGE.bind(*args, **kwargs).arguments
        except TypeError:
            raise _Unproven(f"arange with arguments {args} {kwargs}") from None
        start = self.value(bound.get("start") if bound.get("start") is not None else 0)
        end = self.value(bound.get("end"))
        step = self.value(bound.get("step") if bound.get("step") is not None else 1)
        if not (_is_int(start) and _is_int(end)):
            raise _Unproven("arange with a non-integer start or end")
        if not (_is_int(step) and same_size(step, 1)):
            raise _Unproven(f"arange with step {step} (positions must be consecutive)")
        return Positions(None, start, end - start)

    def _add(self, a, b):
        va, vb = self.value(a), self.value(b)
        if _is_int(va) and isinstance(vb, (Positions, RowPositions)):
            va, vb = vb, va
        if _is_int(vb):
            if isinstance(va, Positions):
                return Positions(va.dim, va.offset + vb, va.length)
            if isinstance(va, RowPositions):
                return RowPositions(va.offset + vb, va.length)
            if _is_int(va):
                return va + vb
        raise _Unproven(f"it adds {describe(va)} and {describe(vb)} (positions may be shifted by integers only)")

    def _diff(self, node: fx.Node) -> int:
        """diff(position_ids, prepend=position_ids[:, :1] - 1) of consecutive positions: all ones."""
        v = self.value(node.args[0])
        prepend = node.kwargs.get("prepend")
        dim = node.kwargs.get("dim", -1)
        if isinstance(v, RowPositions) and dim in (-1, 1) and prepend is not None:
            if statically_known_true(self.value(prepend) == v.offset - 1):
                return 1
        raise _Unproven(f"it takes differences of {describe(v)}, which are not known to be consecutive "
                        "(position_ids passed in by the caller, packed sequences?)")

    def _compare(self, name: str, a, b) -> Predicate:
        va, vb = self.value(a), self.value(b)
        if not (isinstance(va, Positions) and isinstance(vb, Positions)):
            raise _Unproven(f"it compares {describe(va)} with {describe(vb)} ({name}); understood are {_UNDERSTOOD}")
        sign, shift = _CMP[name]  # a <= b (+shift) when sign > 0; a >= b (+shift) when sign < 0
        dims = {va.dim, vb.dim}
        if dims != {Q_DIM, K_DIM}:
            raise _Unproven(f"it compares positions along dims {sorted(d for d in dims if d is not None)}, "
                            "not the query dim with the key dim")
        # Normalise to "key - query <= c" (upper) or "key - query >= c" (lower).
        key_first = va.dim == K_DIM
        key, query = (va, vb) if key_first else (vb, va)
        if not (same_size(query.length, self.nq) and same_size(key.length, self.n)):
            raise _Unproven(f"it compares {query.length} query positions with {key.length} key positions; the "
                            f"attention has {self.nq} queries and {self.n} keys (a broadcast range repeats positions)")
        base = query.offset - key.offset
        upper = (sign > 0) == key_first
        c = base + shift if upper else base - shift
        return Predicate(upper=(c,)) if upper else Predicate(lower=(c,))

    def _tril(self, node: fx.Node) -> Predicate:
        base = self.value(node.args[0])
        diag = node.args[1] if len(node.args) > 1 else node.kwargs.get("diagonal", 0)
        ex = example(node)
        if not (isinstance(base, Predicate) and isinstance(diag, int) and isinstance(ex, torch.Tensor)
                and ex.dim() >= 2):
            raise _Unproven("tril of something other than a boolean mask, or with a non-constant diagonal")
        if not (same_size(ex.shape[-2], self.nq) and same_size(ex.shape[-1], self.n)):
            raise _Unproven(f"tril over a {tuple(ex.shape[-2:])} square; the attention is {self.nq} x {self.n}")
        return base & Predicate(upper=(diag,))

    def _getitem(self, node: fx.Node, base, index) -> Value:
        v = self.value(base)
        if isinstance(v, (bool, int)) and not isinstance(v, float):
            return v  # indexing a constant tensor
        if isinstance(v, RowPositions) and isinstance(index, tuple) and len(index) == 2:
            if index[0] == slice(None) and index[1] in (slice(None, 1, None), slice(0, 1, None)):
                return v.offset  # the first position of every row
            bi, xi = self.value(index[0]), self.value(index[1])
            if isinstance(bi, Positions) and bi.dim == B_DIM and isinstance(xi, Positions) \
                    and xi.dim in (Q_DIM, K_DIM) and statically_known_true(xi.offset >= 0) \
                    and statically_known_true(xi.offset + xi.length <= v.length):
                return Positions(xi.dim, xi.offset + v.offset, xi.length)
            raise _Unproven("position ids indexed in an unrecognised way")
        if isinstance(v, PaddingSource):
            return self._padding(node, v, index)
        if isinstance(v, Positions) and v.dim is None and isinstance(index, tuple):
            if Ellipsis in index or sum(1 for i in index if isinstance(i, slice)) != 1:
                raise _Unproven("a position range indexed in an unrecognised way")
            if len(index) > MASK_DIMS:
                raise _Unproven(f"a position range broadcast to {len(index)} dims")
            at = next(i for i, s in enumerate(index) if isinstance(s, slice))
            if index[at] != slice(None, None, None):
                raise _Unproven("a sliced position range")
            if not all(i is None or i == slice(None) for i in index):
                raise _Unproven("a position range indexed by values")
            # broadcasting aligns dims from the right: (Nq, N) and (B, H, Nq, N) masks alike
            return Positions(at + MASK_DIMS - len(index), v.offset, v.length)
        if isinstance(v, (Predicate, Additive)) and isinstance(index, tuple) \
                and all(isinstance(i, slice) and i.start in (None, 0) and i.step in (None, 1) for i in index):
            before, after = example(base), example(node)
            if isinstance(before, torch.Tensor) and isinstance(after, torch.Tensor) and before.dim() == after.dim() \
                    and all(same_size(x, y) for x, y in zip(before.shape, after.shape)):
                return v  # the transformers idiom mask[:, :, :, :key_len] keeps the whole mask
            raise _Unproven(f"the mask is sliced ({node.name}) to a part of it")
        raise _Unproven(f"{describe(v)} is indexed ({node.name}) in a way the proof does not interpret")

    def _padding(self, node: fx.Node, v: PaddingSource, index) -> Predicate:
        """``padding[batch_idx, kv_idx]``: key k of batch b is kept where padding[b, k]."""
        ex = example(v.node)
        if not (isinstance(index, tuple) and len(index) == 2):
            raise _Unproven("the 2-D mask is indexed in an unrecognised way")
        if ex.dtype != torch.bool and any(target_name(u) in _CMP for u in node.users):
            raise _Unproven(f"it compares positions read from the graph input {v.node.name!r} (position_ids passed "
                            "by the caller?), whose values are unknown here: packed sequences and custom positions "
                            "are not provably causal; leave position_ids out to let the model number the tokens")
        bi, ki = self.value(index[0]), self.value(index[1])
        if not (isinstance(bi, Positions) and isinstance(ki, Positions) and bi.dim == B_DIM and ki.dim == K_DIM
                and same_size(bi.offset, 0) and same_size(ki.offset, 0)):
            raise _Unproven(f"the 2-D mask {v.node.name!r} is indexed by {describe(bi)} and {describe(ki)}, not by "
                            "batch and key positions")
        if ex.dtype != torch.bool:
            raise _Unproven(f"the 2-D mask {v.node.name!r} is {ex.dtype}, not boolean (only 0/1 is a padding mask)")
        if not (same_size(bi.length, self.batch) and same_size(ki.length, self.n)):
            raise _Unproven(f"the 2-D mask is read for {bi.length} batch rows and {ki.length} keys; the attention "
                            f"has {self.batch} and {self.n}")
        return Predicate(padding=v.node)

    def _where(self, cond, a, b) -> Additive:
        pc = self.value(cond)
        vb = self.value(b)
        if not isinstance(pc, Predicate):
            raise _Unproven(f"where() over {describe(pc)}")
        va = self.value(a)
        if isinstance(va, (int, float)) and va == 0 and isinstance(vb, float) and vb <= MASKED_BELOW:
            return Additive(pc)
        raise _Unproven("where() that is not (mask, 0, very negative)")


def _shape_reason(mask: fx.Node, nq, n) -> Optional[str]:
    """The mask must be (.., Nq, N): a broadcast query or key dim repeats one row or column."""
    ex = example(mask)
    if not isinstance(ex, torch.Tensor) or ex.dim() < 2 or ex.dim() > MASK_DIMS:
        return "the mask's shape is unknown or not (B, H, Nq, N)"
    if not (same_size(ex.shape[-2], nq) and same_size(ex.shape[-1], n)):
        return f"the mask is {tuple(ex.shape)}, broadcast over {nq} queries and {n} keys"
    return None


def prove_mask(mask: fx.Node, additive: bool, offset=0, lengths: Optional[tuple] = None) -> MaskProof:
    """Is ``mask`` (boolean, or additive if ``additive``) exactly causal with the queries at
    ``offset`` (P = N - Nq, an int or SymInt; 0 for a whole prompt), plus key padding?
    ``lengths``: (B, Nq, N) of the attention (ints or SymInts)."""
    if lengths is None:
        return MaskProof(False, reason="mask not proven causal: the attention's batch, query and key lengths are "
                                       "unknown")
    batch, nq, n = lengths
    shape = _shape_reason(mask, nq, n)
    if shape is not None:
        return MaskProof(False, reason=f"mask not proven causal: {shape}")
    changed = changed_in_place(built_from(mask))
    if changed is not None:
        node, user, how = changed
        what = "the mask" if node is mask else f"{node.name}, which the mask is built from (or a view of it),"
        return MaskProof(False, reason=f"mask not proven causal: {what} is changed in place by {how} ({user.name})")
    interp = _Interpreter(batch, nq, n)
    try:
        v = interp.value(mask)
    except _Unproven as exc:
        return MaskProof(False, reason=f"mask not proven causal: {exc}")
    if additive:
        if not isinstance(v, Additive):
            return MaskProof(False, reason=f"additive mask that is {describe(v)}, not where(mask, 0, very negative)")
        v = v.predicate
    elif not isinstance(v, Predicate):
        return MaskProof(False, reason=f"boolean mask that is {describe(v)}")
    window = 0
    if v.lower:
        behind = [_constant(offset - c) for c in v.lower]  # key >= query position - (P - c)
        if any(b is None for b in behind):
            shown = ", ".join(str(offset - c) for c in v.lower)
            return MaskProof(False, reason=f"sliding-window mask whose width ({shown} positions behind the query) "
                                           "is not a constant")
        window = min(behind) + 1  # the tightest bound; the query's own key included
        if window < 1:
            return MaskProof(False, reason=f"mask that keeps no key (keys at least {1 - window} positions ahead of "
                                           "the query)")
    if not v.upper:
        return MaskProof(False, reason="non-causal mask (bidirectional attention)")
    if not all(same_size(c, offset) for c in v.upper):
        shown = ", ".join(str(c) for c in v.upper)
        if same_size(offset, 0):
            return MaskProof(False, reason=f"mask shifted from causal (key - query <= {shown})")
        return MaskProof(False, reason=f"mask shifted from causal (key - query <= {shown}; a chunk after a "
                                       f"cached prefix needs {offset}, the key length minus the query length)")
    return MaskProof(True, key_padding=v.padding, window=window)


def _constant(x) -> Optional[int]:
    """``x`` as a Python int when it is one or a SymInt whose expression is a constant."""
    if isinstance(x, int):
        return x
    if isinstance(x, torch.SymInt) and not x.node.expr.free_symbols:
        return int(x.node.expr)
    return None
