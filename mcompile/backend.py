"""The ``minference`` torch.compile backend: rewrite attention, then hand the graph to Inductor.

    model = torch.compile(model, backend="minference", options={"dense_below": 81920})

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
from .passes.memory import MemoryReport, apply_memory_passes
from .passes.rewrite import RewriteReport, rewrite_attention

log = logging.getLogger(__name__)


def compile_graph(gm: torch.fx.GraphModule, example_inputs, config: MInferenceConfig) -> Callable:
    """Lower the rewritten graph with the configured compiler."""
    if config.compiler == Compiler.EAGER:
        return gm.forward
    if config.compiler == Compiler.AOT_EAGER:
        return torch._dynamo.lookup_backend("aot_eager")(gm, example_inputs)
    from torch._inductor.compile_fx import compile_fx

    from .cache import cache_patches

    return compile_fx(gm, example_inputs, config_patches=cache_patches(config.inductor_patches()))


def minference_backend(gm: torch.fx.GraphModule, example_inputs, options: Optional[dict] = None,
                       mode: Optional[str] = None,
                       report_sink: Optional[Callable[[RewriteReport], None]] = None,
                       memory_sink: Optional[Callable[[MemoryReport], None]] = None) -> Callable:
    """torch.compile backend: sparse attention for long prefill, memory-bounding passes (last-position
    logits, chunked MLP; passes/memory.py), Inductor for everything."""
    config = MInferenceConfig.from_options(options, mode)
    grad = torch.is_grad_enabled() and any(isinstance(x, torch.Tensor) and x.requires_grad for x in example_inputs)
    # Inlined attention (kernels/inline.py) and the MLP pass lean on torch.cond's and
    # invoke_subgraph's lowering, which change between torch releases: when inlining was chosen
    # automatically and the compile fails, compile again with the opaque ops and without shared
    # regions (same results), saying why, rather than failing the user's model.
    original = None
    if config.inline_kernels is None:
        try:
            original = copy.deepcopy(gm)
        except Exception as exc:  # a graph that cannot be copied compiles without the safety net
            log.debug("mcompile: graph not copied for the inline fallback: %s", exc)
    report = rewrite_attention(gm, config, grad_enabled=grad)
    memory = apply_memory_passes(gm, config, grad_enabled=grad)
    try:
        compiled = compile_graph(gm, example_inputs, config)
    except torch._dynamo.exc.TensorifyScalarRestartAnalysis:
        raise  # Dynamo's own restart, not a failure
    except Exception as exc:
        if original is None or not (any(s.inlined for s in report.sites) or memory.applied("chunked_mlp")):
            raise
        log.warning("mcompile: compiling the inlined sparse attention failed (%s: %s); compiling with the opaque "
                    "ops and without shared regions instead (inline_kernels=False)", type(exc).__name__,
                    str(exc).splitlines()[0][:200])
        counters["mcompile"]["inline_failed"] += 1
        config = dataclasses.replace(config, inline_kernels=False)
        gm, was_inlined = original, [s.inlined for s in report.sites]
        report = rewrite_attention(gm, config, grad_enabled=grad)
        reason = f"the inlined compile failed ({type(exc).__name__})"
        report = dataclasses.replace(report, sites=tuple(
            dataclasses.replace(s, inline_reason=reason) if inlined else s
            for s, inlined in zip(report.sites, was_inlined)))
        with shared_regions(False):
            memory = apply_memory_passes(gm, config, grad_enabled=grad)
            compiled = compile_graph(gm, example_inputs, config)
    log.info("mcompile: %d of %d attentions rewritten (pattern database: %s)", report.rewritten,
             len(report.sites), report.pattern_db)
    if report_sink is not None:
        report_sink(report)
    if memory_sink is not None:
        memory_sink(memory)
    return compiled
