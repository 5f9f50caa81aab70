"""The two ways a model is compiled for evaluation, and proof of what the sparse one rewrote.

A ``Variant`` is "dense" (plain ``backend="inductor"``, or ``"eager"`` / ``"aot_eager"`` on a CPU
where Inductor takes minutes to compile 30 layers; "eager" runs the module uncompiled, the same
operations without Dynamo's tracing) or "minference" (the ``minference`` backend
with the options under evaluation). ``compiled(module, variant)`` compiles with
``module.compile(backend=..., dynamic=True, options=...)`` (one prefill graph for every length,
as ``cli.demo`` does) and collects the backend's ``RewriteReport`` of every graph, so a result
can say how many attentions its prefill really ran sparse: a run where nothing was rewritten
cannot pass silently.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass, field

import torch

from ...backend import minference_backend
from ...config import MInferenceConfig
from ...passes.rewrite import RewriteReport

DENSE = "dense"
MINFERENCE = "minference"


@dataclass(frozen=True)
class Variant:
    """``name`` is DENSE or MINFERENCE; ``compiler`` runs the graphs (dense: the backend itself)."""

    name: str
    compiler: str = "inductor"
    options: dict = field(default_factory=dict, hash=False)

    def __post_init__(self):
        if self.name not in (DENSE, MINFERENCE):
            raise ValueError(f"variant must be {DENSE!r} or {MINFERENCE!r}, got {self.name!r}")
        if self.name == MINFERENCE:
            MInferenceConfig.from_options({**self.options, "compiler": self.compiler})  # validate early

    @property
    def config(self) -> MInferenceConfig | None:
        if self.name == DENSE:
            return None
        return MInferenceConfig.from_options({**self.options, "compiler": self.compiler})

    def describe(self) -> dict:
        if self.name == DENSE:
            return {"name": DENSE, "backend": self.compiler if self.compiler != "eager" else "eager (not compiled)"}
        c = self.config
        return {"name": MINFERENCE, "compiler": self.compiler, "pattern_db": c.pattern_db,
                "default_pattern": c.default_pattern.to_dict(), "dense_below": c.dense_below,
                "budget_length": c.budget_length, "budget_exponent": c.budget_exponent}


@dataclass
class Compiled:
    """What one compilation produced: the backend's report of every graph (minference only)."""

    variant: Variant
    reports: list = field(default_factory=list)

    @property
    def rewritten(self) -> int:
        """Attentions rewritten in the prefill graph (the graph with the most rewrites)."""
        return max((r.rewritten for r in self.reports), default=0)

    def summary(self) -> dict:
        return {"graphs": [{"attentions": len(r.sites), "rewritten": r.rewritten, "pattern_db": r.pattern_db,
                            "dense_reasons": sorted({s.reason for s in r.sites if not s.rewritten})}
                           for r in self.reports],
                "prefill_rewritten": self.rewritten}


@contextlib.contextmanager
def compiled(module: torch.nn.Module, variant: Variant):
    """Compile ``module`` in place for ``variant``; undo it (and reset Dynamo) on exit."""
    result = Compiled(variant)
    torch._dynamo.reset()
    if variant.name == DENSE:
        if variant.compiler != "eager":  # Dynamo's eager backend runs the module's own operations: run it as is
            module.compile(backend=variant.compiler, dynamic=True)
    else:
        sink: list[RewriteReport] = result.reports
        backend = functools.partial(minference_backend, report_sink=sink.append)
        module.compile(backend=backend, dynamic=True, options={**variant.options, "compiler": variant.compiler})
    try:
        yield result
    finally:
        module._compiled_call_impl = None
        torch._dynamo.reset()
