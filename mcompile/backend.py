"""The ``minference`` torch.compile backend: rewrite attention, then hand the graph to Inductor.

    model = torch.compile(model, backend="minference", options={"dense_below": 24576})

Registered through the ``torch_dynamo_backends`` entry point, so the name works after
``pip install`` without importing mcompile. Dynamo calls ``minference_backend(gm, example_inputs)``
plus ``options=`` or ``mode=`` when the user gave one.
"""

from __future__ import annotations

import logging
from typing import Callable, Optional

import torch

from .config import Compiler, MInferenceConfig
from .passes import lowering
from .passes.memory import apply_memory_passes
from .passes.memory_report import MemoryReport
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


def _compile_note(gm: torch.fx.GraphModule) -> str:
    """What a failed compile of a rewritten graph may come from, and the options that leave it out."""
    parts = {lowering.sparse_attention: "sparse attention (options={'inline_kernels': False} keeps its kernel out of "
                                        "the graph)",
             lowering.gated_mlp: "the chunked MLP (options={'chunk_mlp': False} keeps the MLPs as written)"}
    found = sorted({parts[n.target] for n in gm.graph.nodes if n.op == "call_function" and n.target in parts})
    if not found:
        return ""
    return ("mcompile: the graph holds conditionals (torch.cond in a shared invoke_subgraph region, "
            "mcompile/conditional.py) for " + "; ".join(found) + ". Please report this failure with your torch version.")


def minference_backend(gm: torch.fx.GraphModule, example_inputs, options: Optional[dict] = None,
                       mode: Optional[str] = None,
                       report_sink: Optional[Callable[[RewriteReport], None]] = None,
                       memory_sink: Optional[Callable[[MemoryReport], None]] = None) -> Callable:
    """torch.compile backend: sparse attention for long prefill, memory-bounding passes (last-position
    logits, chunked MLP; passes/memory.py), Inductor for everything."""
    config = MInferenceConfig.from_options(options, mode)
    grad = torch.is_grad_enabled() and any(isinstance(x, torch.Tensor) and x.requires_grad for x in example_inputs)
    report = rewrite_attention(gm, config, grad_enabled=grad)
    memory = apply_memory_passes(gm, config, grad_enabled=grad)
    note = _compile_note(gm)  # before compiling: Inductor's passes may rewrite the graph
    try:
        compiled = compile_graph(gm, example_inputs, config)
    except torch._dynamo.exc.TensorifyScalarRestartAnalysis:
        raise  # Dynamo's own restart, not a failure
    except Exception as exc:
        if note:  # Dynamo wraps the error; the log line is what every user sees
            log.error("%s (%s: %s)", note, type(exc).__name__, (str(exc).splitlines() or [""])[0][:200])
            exc.add_note(note)
        raise
    log.info("mcompile: %d of %d attentions rewritten (pattern database: %s)", report.rewritten,
             len(report.sites), report.pattern_db)
    if report_sink is not None:
        report_sink(report)
    if memory_sink is not None:
        memory_sink(memory)
    return compiled
