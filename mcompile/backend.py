"""The ``minference`` torch.compile backend: rewrite attention, then hand the graph to Inductor.

    model = torch.compile(model, backend="minference", options={"dense_below": 24576})

Registered through the ``torch_dynamo_backends`` entry point, so the name works after
``pip install`` without importing mcompile. Dynamo calls ``minference_backend(gm, example_inputs)``
plus ``options=`` or ``mode=`` when the user gave one.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from typing import Callable, Optional

import torch
from torch._dynamo.utils import counters

from .conditional import shared_regions
from .config import Compiler, MInferenceConfig
from .passes import lowering
from .passes.memory import apply_memory_passes
from .passes.memory_report import MemoryReport
from .passes.rewrite import RewriteReport, rewrite_attention

log = logging.getLogger(__name__)

# The parts of a rewritten graph a failed compile may come from, as the fallback warning names them.
INLINED_ATTENTION = "the inlined sparse attention"
CHUNKED_MLP = "the chunked MLP's conditional (passes/lowering.py: gated_mlp)"
ERROR_CHARS = 200  # of the error's first line, quoted in the fallback warning


def compile_graph(gm: torch.fx.GraphModule, example_inputs, config: MInferenceConfig) -> Callable:
    """Lower the rewritten graph with the configured compiler."""
    if config.compiler == Compiler.EAGER:
        return gm.forward
    if config.compiler == Compiler.AOT_EAGER:
        return torch._dynamo.lookup_backend("aot_eager")(gm, example_inputs)
    from torch._inductor.compile_fx import compile_fx

    from .cache import cache_patches

    return compile_fx(gm, example_inputs, config_patches=cache_patches(config.inductor_patches()))


def _conditional_parts(gm: torch.fx.GraphModule) -> dict[str, str]:
    """Node name -> what the node is, for the nodes the passes inserted that lean on torch.cond's
    and invoke_subgraph's lowering: what a failed compile may come from."""
    parts = {lowering.sparse_attention: INLINED_ATTENTION, lowering.gated_mlp: CHUNKED_MLP}
    return {n.name: parts[n.target] for n in gm.graph.nodes if n.op == "call_function" and n.target in parts}


def _failed_part(exc: Exception, parts: dict[str, str]) -> str:
    """What a failed compile was running: the part whose node FX's interpreter names in the error
    ("While executing %node"), else every part the graph holds."""
    text = str(exc)
    named = {part for name, part in parts.items() if f"While executing %{name} " in text}
    return " and ".join(sorted(named or set(parts.values())))


def _fall_back(original: torch.fx.GraphModule, example_inputs, config: MInferenceConfig, grad: bool,
               report: RewriteReport, exc: Exception, parts: dict[str, str]):
    """Compile ``original`` again after ``exc``, saying what failed: with the opaque attention ops
    and without shared regions (same results); if that fails too while MLPs are chunked, with the
    MLPs kept as written. Returns (compiled, rewrite report, memory report)."""
    had_conditional = [s.conditional for s in report.sites]  # inlined kernel or not, the conditional failed
    inline_reason = f"the inlined compile failed ({type(exc).__name__}) in {_failed_part(exc, parts)}"
    config = dataclasses.replace(config, inline_kernels=False)
    mlp_reason = ""  # set for the last attempt: the MLPs kept as written
    while True:  # two attempts at most: the second has no chunked MLP, so its failure is raised
        change = ("keeping the MLPs as written (chunk_mlp=False)" if mlp_reason
                  else "with the opaque ops and without shared regions (inline_kernels=False)")
        log.warning("mcompile: compiling %s failed (%s: %s); compiling again %s", _failed_part(exc, parts),
                    type(exc).__name__, (str(exc).splitlines() or [""])[0][:ERROR_CHARS], change)
        counters["mcompile"]["chunked_mlp_failed" if mlp_reason else "inline_failed"] += 1
        gm = copy.deepcopy(original) if config.chunk_mlp else original  # a later attempt needs the original
        report = rewrite_attention(gm, config, grad_enabled=grad)
        report = dataclasses.replace(report, sites=tuple(
            dataclasses.replace(s, inline_reason=inline_reason) if conditional else s
            for s, conditional in zip(report.sites, had_conditional)))
        with shared_regions(False):
            memory = apply_memory_passes(gm, config, grad_enabled=grad)
            if mlp_reason:
                memory = MemoryReport(tuple(dataclasses.replace(s, reason=mlp_reason) if s.pass_name == "chunked_mlp"
                                            else s for s in memory.sites))
            parts = _conditional_parts(gm)
            try:
                return compile_graph(gm, example_inputs, config), report, memory
            except torch._dynamo.exc.TensorifyScalarRestartAnalysis:
                raise
            except Exception as again:
                if not memory.applied("chunked_mlp"):
                    raise
                exc = again
                mlp_reason = f"compiling the chunked MLP failed ({type(again).__name__}): kept as written"
                config = dataclasses.replace(config, chunk_mlp=False)


def minference_backend(gm: torch.fx.GraphModule, example_inputs, options: Optional[dict] = None,
                       mode: Optional[str] = None,
                       report_sink: Optional[Callable[[RewriteReport], None]] = None,
                       memory_sink: Optional[Callable[[MemoryReport], None]] = None) -> Callable:
    """torch.compile backend: sparse attention for long prefill, memory-bounding passes (last-position
    logits, chunked MLP; passes/memory.py), Inductor for everything."""
    config = MInferenceConfig.from_options(options, mode)
    grad = torch.is_grad_enabled() and any(isinstance(x, torch.Tensor) and x.requires_grad for x in example_inputs)
    # Inlined attention (passes/lowering.py) and the MLP pass lean on torch.cond's and
    # invoke_subgraph's lowering, which change between torch releases: when inlining was chosen
    # automatically and the compile fails, compile again without what failed (_fall_back; same
    # results), saying what it was, rather than failing the user's model.
    original = None
    if config.inline_kernels is None:
        try:
            original = copy.deepcopy(gm)
        except Exception as exc:  # a graph that cannot be copied compiles without the safety net
            log.debug("mcompile: graph not copied for the inline fallback: %s", exc)
    report = rewrite_attention(gm, config, grad_enabled=grad)
    memory = apply_memory_passes(gm, config, grad_enabled=grad)
    parts = _conditional_parts(gm)  # before compiling: Inductor's passes may rename nodes
    try:
        compiled = compile_graph(gm, example_inputs, config)
    except torch._dynamo.exc.TensorifyScalarRestartAnalysis:
        raise  # Dynamo's own restart, not a failure
    except Exception as exc:
        if original is None or not parts:
            raise
        compiled, report, memory = _fall_back(original, example_inputs, config, grad, report, exc, parts)
    log.info("mcompile: %d of %d attentions rewritten (pattern database: %s)", report.rewritten,
             len(report.sites), report.pattern_db)
    if report_sink is not None:
        report_sink(report)
    if memory_sink is not None:
        memory_sink(memory)
    return compiled
