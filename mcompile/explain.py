"""``mcompile.explain``: what the backend would do to a model, attention by attention.

Explain traces the model as written, with a backend of its own, whether or not the model was
compiled already: ``model.compile(...)`` (which sets ``_compiled_call_impl``) and
``torch.compile(model)`` (an ``OptimizedModule`` around ``_orig_mod``) are looked through, and
the model's own ``_call_impl`` is traced from a function whose code object is new for every
call. Dynamo keeps compiled code per code object, keyed by backend, so the user's compiled
frames are neither used by explain nor disturbed by it: the compiled model runs its code
afterwards without compiling again.
"""

from __future__ import annotations

import functools
import inspect
import itertools
import types
from collections import Counter
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from .backend import minference_backend
from .passes.rewrite import RewriteReport, SiteReport
from .pattern_db.cost import expected_density
from .patterns import scaled_budgets


def _pattern_summary(patterns: tuple) -> str:
    if not patterns:
        return "-"
    counts = Counter(p.describe() for p in patterns)
    return ", ".join(f"{n}x {d}" if n > 1 else d for d, n in counts.most_common())


def _ranges(items: list) -> str:
    """["0", "1", "2", "5"] -> "0-2, 5"."""
    if not all(i.isdigit() for i in items):
        return ", ".join(items)
    nums, out = sorted(set(int(i) for i in items)), []
    start = prev = nums[0]
    for x in nums[1:] + [None]:
        if x is not None and x == prev + 1:
            prev = x
            continue
        out.append(f"{start}-{prev}" if prev > start else str(start))
        if x is not None:
            start = prev = x
    return ", ".join(out)


@dataclass(frozen=True)
class Explanation:
    reports: tuple  # one RewriteReport per compiled graph
    length: Optional[int]
    memory: tuple = ()  # one passes.memory.MemoryReport per compiled graph

    @property
    def sites(self) -> list[SiteReport]:
        return [s for r in self.reports for s in r.sites]

    @property
    def rewritten(self) -> int:
        return sum(r.rewritten for r in self.reports)

    def density(self, site: SiteReport, length: Optional[int] = None) -> Optional[float]:
        """Expected fraction of the causal (query, key) pairs the sparse kernel computes, averaged
        over the site's heads (``pattern_db.cost.expected_density``: the kernel's cost formula at
        the budgets scaled to this length; nominal for vertical-slash, whose real cost depends on
        where the estimated lines fall)."""
        n = length or self.length
        if not site.rewritten or not n:
            return None
        length_ref, exponent = site.budget_scaling
        densities = [expected_density(scaled_budgets(p, n, length_ref, exponent), n) for p in site.patterns]
        if any(d is None for d in densities):
            return None  # block-mass: what it computes depends on the input
        return sum(densities) / len(densities)

    def graph_code(self, graph: int = 0) -> str:
        """The rewritten FX graph (print_readable form)."""
        return self.reports[graph].code

    def nothing_found(self) -> list[str]:
        """A line saying why there is no attention to report, when there is none."""
        if self.sites:
            return []
        if not self.reports:
            return ["no graph reached the backend: Dynamo compiled nothing (the model ran eagerly)"]
        return [f"no attention found in the {len(self.reports)} graph(s): no SDPA call, higher-order attention op, "
                f"or softmax over a product of two activations whose weights multiply a third"]

    def table(self, length: Optional[int] = None) -> str:
        n = length or self.length
        head = f"{'graph':>5} {'layer':>5}  {'attention':<10} {'heads':<9} {'result':<9} {'density@' + str(n):>15}  detail"
        lines = [head, "-" * len(head)]
        for g, report in enumerate(self.reports):
            for s in report.sites:
                d = self.density(s, n)
                dens = f"{100 * d:.1f}%" if d is not None else "-"
                detail = f"{_pattern_summary(s.patterns)} [{s.pattern_source}]" if s.rewritten else s.reason
                if s.key_padding:
                    detail += " +padding"
                if s.inlined:
                    detail += " +inlined"
                heads = f"{s.heads}/{s.kv_heads}x{s.head_dim}" if s.heads else "?"
                layer = "?" if s.layer is None else str(s.layer)
                lines.append(f"{g:>5} {layer:>5}  {s.kind:<10} {heads:<9} {'sparse' if s.rewritten else 'dense':<9} "
                             f"{dens:>15}  {detail}")
        lines.append(f"{self.rewritten} of {len(self.sites)} attentions rewritten in {len(self.reports)} graph(s); "
                     f"pattern database: {', '.join(sorted({r.pattern_db for r in self.reports})) or '-'}")
        lines.extend(self.nothing_found())
        lines.extend(self.inline_lines())
        lines.extend(self.memory_lines())
        return "\n".join(lines)

    def inline_lines(self) -> list[str]:
        """Where the rewritten attentions' sparse kernel runs (passes/lowering.py), one line per
        outcome: launched from Inductor's code, or the opaque op with the reason. The length test
        and the dense branch are in Inductor's code either way."""
        groups: dict = {}
        for s in self.sites:
            if s.rewritten:
                if s.inlined:
                    what = "kernel inlined into Inductor's code"
                else:
                    what = f"kernel in the opaque op: {s.inline_reason}"
                groups.setdefault(what, []).append("?" if s.layer is None else str(s.layer))
        return [f"layers {_ranges(layers)}: {what}" for what, layers in groups.items()]

    def memory_lines(self) -> list[str]:
        """What the memory passes did, one line per place they looked at (with the reason when
        they left it alone)."""
        lines = []
        for g, report in enumerate(self.memory):
            for site in report.sites:
                what = "applied" if site.applied else f"kept: {site.reason}"
                lines.append(f"graph {g} {site.pass_name} {site.module or '?'}: {what}")
        return lines

    def summary(self, length: Optional[int] = None) -> str:
        """One line per distinct outcome, with the layers it applies to."""
        n = length or self.length
        groups: dict = {}
        for s in self.sites:
            d = self.density(s, n)
            what = (f"sparse: {_pattern_summary(s.patterns)} [{s.pattern_source}]"
                    + (f", ~{100 * d:.1f}% of causal pairs computed at {n} tokens" if d is not None else "")
                    if s.rewritten else f"dense: {s.reason}")
            groups.setdefault(what, []).append("?" if s.layer is None else str(s.layer))
        lines = [f"layers {_ranges(layers)}: {what}" for what, layers in groups.items()]
        lines.extend(self.inline_lines())
        lines.append(f"{self.rewritten} of {len(self.sites)} attentions rewritten in {len(self.reports)} graph(s)")
        lines.extend(self.nothing_found())
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


_CALLS = itertools.count()  # numbers the traced functions: Dynamo keys compile state by a code's name
_ISOLATE = "isolate_recompiles" in inspect.signature(torch.compile).parameters  # newer torch releases


def as_written(model: Callable) -> Callable:
    """``model`` without the compiled wrappers around it: an ``OptimizedModule``'s ``_orig_mod``,
    a compiled function's original. (A module's ``_compiled_call_impl`` is looked through by
    calling its ``_call_impl``: ``traced_call``.)"""
    while True:
        if isinstance(model, torch._dynamo.eval_frame.OptimizedModule):
            model = model._orig_mod
        elif getattr(model, "_torchdynamo_orig_callable", None) is not None:
            model = model._torchdynamo_orig_callable
        else:
            return model


def traced_call(model: Callable) -> Callable:
    """A function ``run(model, *args, **kwargs)`` that runs ``model`` as written (a module's hooks
    and forward, never its ``_compiled_call_impl``), with a code object no other call shares:
    Dynamo's cache entries and automatic-dynamic state for it are explain's alone, and go with it.
    The model is an argument, as ``self`` is for a compiled module, so the frame holds it."""

    def run(model, /, *args, **kwargs):
        if isinstance(model, torch.nn.Module):
            return model._call_impl(*args, **kwargs)
        return model(*args, **kwargs)

    code = run.__code__.replace(co_name=f"mcompile_explain_{next(_CALLS)}")
    return types.FunctionType(code, run.__globals__, code.co_name)


def prompt_length(args: tuple, kwargs: dict) -> Optional[int]:
    """The sequence length of a model's input: ``input_ids``' last dim, ``inputs_embeds``' dim -2;
    for a first positional tensor, the last dim of token ids and dim -2 of floating values
    (embeddings (B, N, hidden), or q (B, H, N, D))."""
    ids, embeds = kwargs.get("input_ids"), kwargs.get("inputs_embeds")
    if isinstance(ids, torch.Tensor) and ids.dim() >= 1:
        return int(ids.shape[-1])
    if isinstance(embeds, torch.Tensor) and embeds.dim() >= 2:
        return int(embeds.shape[-2])
    first = args[0] if args and isinstance(args[0], torch.Tensor) else None
    if first is None or first.dim() < 1:
        return None
    if first.is_floating_point():
        return int(first.shape[-2]) if first.dim() >= 2 else None
    return int(first.shape[-1])


def explain(model: torch.nn.Module, *args, options: Optional[dict] = None, length: Optional[int] = None,
            dynamic: Optional[bool] = None, **kwargs) -> Explanation:
    """Compile ``model`` with the minference backend on ``args``/``kwargs`` and report, per
    attention: rewritten or not and why, layer, patterns per head, and the expected share of
    causal pairs the kernel computes at ``length`` (default: the prompt length of the input,
    ``prompt_length``); then what the memory passes did, with their reasons.

    ``model`` may be compiled already (``model.compile(...)``, ``torch.compile(model)``): explain
    traces it as written and leaves its compiled code as it was (module docstring). The
    rewritten graph runs once, uncompiled, to let Dynamo finish tracing.
    """
    reports: list[RewriteReport] = []
    memory: list = []
    opts = dict(options or {})
    opts["compiler"] = "eager"
    backend = functools.partial(minference_backend, options=opts, report_sink=reports.append,
                                memory_sink=memory.append)
    isolate = {"isolate_recompiles": True} if _ISOLATE else {}  # graph-break frames: out of the user's count
    compiled = torch.compile(traced_call(model), backend=backend, dynamic=dynamic, **isolate)
    with torch.no_grad():
        compiled(as_written(model), *args, **kwargs)
    if length is None:
        length = prompt_length(args, kwargs)
    return Explanation(tuple(reports), length, tuple(memory))
