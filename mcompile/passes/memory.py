"""Graph passes that bound prefill memory at long lengths (MInference's 1M-token tricks).

- ``slice_last_logits`` (option ``logits="last"``): the lm_head sees the last position only,

      logits = linear(h, W)            ->   logits = linear(h[..., -1:, :], W)      # (B, 1, vocab)

  and nothing happens when it already sees one position (``logits_to_keep=1``, which
  ``generate()`` passes). Refused when the logits feed anything but the graph output through
  elementwise ops (a loss would need every position).
- ``chunk_mlps`` (option ``chunk_mlp``): every gated MLP of a ``...mlp`` module,

      down(act(gate(x)) * up(x))       ->   cond(tokens > chunk,
                                                  mcompile.chunked_mlp(x, Wg, Wu, Wd, ..., act, chunk),
                                                  down(act(gate(x)) * up(x)))

  so no N x intermediate_size tensor exists, and a prompt of at most ``chunk`` tokens runs the MLP
  as Inductor compiles it, with no opaque op (lowering.gated_mlp). An MLP whose weights are
  tensor subclasses (torchao's quantized weights) is kept, with the reason
  (``lowering.operand_reason``). Norms need no pass: Inductor fuses an RMSNorm into one kernel
  per row, whose only N-sized tensor is the normalised output the next matmul reads anyway.
- ``rope_once``, ``store_residual`` (options of the same names; passes/realize.py): not memory
  passes but of the same kind: RoPE's shared cos / sin tables and the residual stream are stored
  once instead of recomputed inside every kernel that reads them.
- ``find_quadratic``: a check, not a rewrite: tensors with two sequence-length dimensions that
  survive the rewrites (the N x N mask of an attention kept dense, eager attention scores).

Each pass reports one ``MemorySite`` per place it looked at, with the reason when it left the
graph alone, and counts into ``torch._dynamo.utils.counters["mcompile"]``.
"""

from __future__ import annotations

import logging
import operator
from dataclasses import dataclass
from typing import Optional

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch._dynamo.utils import counters
from torch.fx.experimental.symbolic_shapes import statically_known_true

from ..config import Logits, MInferenceConfig
from ..kernels.act_mul import Activation
from . import lowering
from .memory_report import MemoryReport, MemorySite
from .nodes import example, module_path, node_module, same_size, target_name
from .realize import rope_once, store_residual
from .rewrite import erase_dead

log = logging.getLogger(__name__)

LINEAR_TARGETS = (torch._C._nn.linear, F.linear)
LM_HEAD = "lm_head"  # transformers' name of the output embedding of *ForCausalLM models
MLP_MODULE = "mlp"  # transformers' attribute name of a decoder layer's MLP
# Ops that may sit between the lm_head and the graph output without needing every position:
# casts and the elementwise logit soft-capping of Gemma-2 (divide, tanh, multiply by a scalar).
LOGIT_PASSTHROUGH = {"to", "float", "contiguous", "tanh", "truediv", "div", "mul", "__truediv__", "__mul__"}
GRAD_REASON = "gradients are enabled: the chunked MLP is inference-only"


def _is_linear(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target in LINEAR_TARGETS


def _linear_parts(node: fx.Node) -> tuple:
    """(input, weight, bias) of a linear call."""
    args = list(node.args) + [None] * (3 - len(node.args))
    return args[0], args[1], node.kwargs.get("bias", args[2])


# ----------------------------------------------------------------------------- last-position logits

def _logits_reason(lm_head: fx.Node) -> Optional[str]:
    """None when every use of the logits reaches the output through elementwise ops with
    scalars only (casts, soft-capping)."""
    work = [(lm_head, u) for u in lm_head.users]
    while work:
        producer, user = work.pop()
        if user.op == "output":
            continue
        name = target_name(user)
        if name not in LOGIT_PASSTHROUGH:
            return f"the logits feed {name or user.op} ({user.name}), which may need every position (a loss?)"
        others = [a for a in (*user.args, *user.kwargs.values()) if isinstance(a, fx.Node) and a is not producer]
        if any(isinstance(example(a), torch.Tensor) and example(a).dim() > 0 for a in others):
            return f"the logits are combined with another tensor in {user.name}"
        work.extend((user, u) for u in user.users)
    return None


def slice_last_logits(gm: fx.GraphModule, config: MInferenceConfig) -> list[MemorySite]:
    """Feed the lm_head only the last position when ``config.logits == "last"``."""
    heads = [n for n in gm.graph.nodes if _is_linear(n) and node_module(n).rsplit(".", 1)[-1] == LM_HEAD]
    if config.logits != Logits.LAST:
        return [MemorySite("last_logits", node_module(n), False, "switched off (logits='all')") for n in heads]
    if not heads:
        return [MemorySite("last_logits", "", False, f"no Linear named {LM_HEAD!r} in the graph")]
    sites = []
    for head in heads:
        hidden, _, _ = _linear_parts(head)
        ex = example(hidden)
        reason = None
        if ex is None or ex.dim() < 2:
            reason = "the lm_head input has no sequence dimension"
        elif statically_known_true(ex.shape[-2] == 1):
            reason = "the lm_head already sees one position (logits_to_keep=1)"
        else:
            reason = _logits_reason(head)
        if reason is None:
            with gm.graph.inserting_before(head):
                last = gm.graph.call_function(operator.getitem, (hidden, (Ellipsis, slice(-1, None), slice(None))))
            last.meta.update({k: head.meta[k] for k in ("nn_module_stack", "stack_trace") if k in head.meta})
            head.replace_input_with(hidden, last)
            counters["mcompile"]["last_logits"] += 1
        sites.append(MemorySite("last_logits", node_module(head), reason is None, reason or ""))
    return sites


# ----------------------------------------------------------------------------- chunked MLP

@dataclass(frozen=True)
class MLPMatch:
    x: fx.Node
    gate: fx.Node
    up: fx.Node
    act: fx.Node
    prod: fx.Node
    down: fx.Node
    activation: Activation


def _activation(node: fx.Node) -> Optional[Activation]:
    name = target_name(node)
    if name == "silu":
        return Activation.SILU
    if name == "gelu":
        approx = node.kwargs.get("approximate", node.args[1] if len(node.args) > 1 else "none")
        return Activation.GELU_TANH if approx == "tanh" else Activation.GELU if approx == "none" else None
    return None


def _mlp_groups(graph: fx.Graph) -> dict[str, list[fx.Node]]:
    """Call nodes grouped by the innermost ``...mlp`` module that runs them, in graph order."""
    groups: dict[str, list[fx.Node]] = {}
    for node in graph.nodes:
        if node.op not in ("call_function", "call_method"):
            continue
        paths = [module_path(p) for p, _ in (node.meta.get("nn_module_stack") or {}).values()]
        mlp = [p for p in paths if p.rsplit(".", 1)[-1] == MLP_MODULE]
        if mlp:
            groups.setdefault(mlp[-1], []).append(node)
    return groups


def match_mlp(nodes: list[fx.Node]) -> tuple[Optional[MLPMatch], str]:
    """The gated MLP ``down(act(gate(x)) * up(x))`` made of exactly ``nodes``, or why not."""
    inside = set(nodes)
    linears = [n for n in nodes if _is_linear(n)]
    if len(linears) != 3:
        return None, f"not a gated MLP: {len(linears)} Linear layer(s), expected gate, up and down"
    leaving = [n for n in nodes if any(u not in inside for u in n.users)]
    if len(leaving) != 1 or not _is_linear(leaving[0]):
        return None, "the MLP has intermediates used outside it, or its output is not a Linear"
    down = leaving[0]
    prod = _linear_parts(down)[0]
    if target_name(prod) not in ("mul", "__mul__") or len(prod.args) != 2:
        return None, f"the down projection reads {target_name(prod) or prod}, not act(gate) * up"
    a, b = prod.args
    act, up = (a, b) if _activation(a) is not None else (b, a)
    activation = _activation(act) if isinstance(act, fx.Node) else None
    if activation is None:
        names = [target_name(n) or str(n) for n in (a, b) if not (isinstance(n, fx.Node) and _is_linear(n))]
        return None, f"activation {names} not supported (supported: {[x.value for x in Activation]})"
    gate = act.args[0]
    if not (isinstance(gate, fx.Node) and _is_linear(gate) and isinstance(up, fx.Node) and _is_linear(up)):
        return None, "act(gate) * up is not made of two Linear layers"
    x = _linear_parts(gate)[0]
    if _linear_parts(up)[0] is not x or x in inside:
        return None, "gate and up projections read different inputs"
    extra = inside - {gate, up, act, prod, down}
    if extra:
        return None, f"unrecognised MLP node(s) {sorted(n.name for n in extra)}"
    return MLPMatch(x, gate, up, act, prod, down, activation), ""


def _operand_reason(m: MLPMatch) -> Optional[str]:
    """Why ``lowering.gated_mlp`` cannot take the MLP's tensors as Dynamo recorded them (tensor
    subclasses: torchao's quantized weights), or None."""
    operands = {"the MLP input": example(m.x)}
    for lin in (m.gate, m.up, m.down):
        _, w, b = _linear_parts(lin)
        proj = node_module(lin).rsplit(".", 1)[-1] or lin.name
        operands[f"the weight of {proj}"] = example(w)
        operands[f"the bias of {proj}"] = example(b)
    return lowering.operand_reason(operands)


def _shape_reason(m: MLPMatch) -> Optional[str]:
    ex = example(m.x)
    if ex is None or ex.dim() < 2 or not ex.is_floating_point():
        return "MLP input shape or dtype unknown"
    for lin in (m.gate, m.up, m.down):
        w = example(_linear_parts(lin)[1])
        if w is None or w.dim() != 2 or not all(isinstance(s, int) for s in w.shape):
            return f"weight of {lin.name} is not a static 2-D tensor"
    return None


def chunk_mlps(gm: fx.GraphModule, config: MInferenceConfig, grad_enabled: bool = False) -> list[MemorySite]:
    """Replace every gated MLP by ``lowering.gated_mlp``: ``mcompile::chunked_mlp`` above
    ``config.mlp_chunk`` tokens, the MLP as written below (``config.chunk_mlp``)."""
    sites = []
    for module, nodes in _mlp_groups(gm.graph).items():
        if not config.chunk_mlp:
            sites.append(MemorySite("chunked_mlp", module, False, "switched off (chunk_mlp=False)"))
            continue
        match, reason = match_mlp(nodes)
        reason = reason or _operand_reason(match) or _shape_reason(match) or (GRAD_REASON if grad_enabled else "")
        if reason:
            counters["mcompile"]["mlp_kept"] += 1
            log.info("mcompile: kept MLP %s: %s", module, reason)
            sites.append(MemorySite("chunked_mlp", module, False, reason))
            continue
        _, wg, bg = _linear_parts(match.gate)
        _, wu, bu = _linear_parts(match.up)
        _, wd, bd = _linear_parts(match.down)
        with gm.graph.inserting_before(match.down):
            new = gm.graph.call_function(lowering.gated_mlp,
                                         (match.x, wg, wu, wd, bg, bu, bd, match.activation.value, config.mlp_chunk))
        new.meta.update({k: match.prod.meta[k] for k in ("nn_module_stack", "stack_trace") if k in match.prod.meta})
        if example(match.down) is not None:
            new.meta["example_value"] = example(match.down)
        match.down.replace_all_uses_with(new)
        erase_dead(gm.graph, [match.down])
        counters["mcompile"]["chunked_mlp"] += 1
        sites.append(MemorySite("chunked_mlp", module, True))
    return sites


# ----------------------------------------------------------------------------- O(N^2) check

def _sequence_lengths(graph: fx.Graph) -> list:
    """Sequence lengths of the graph's inputs: dim 1 of 2-D integer inputs (input_ids) and of
    3-D floating inputs (inputs_embeds)."""
    lengths = []
    for node in graph.find_nodes(op="placeholder"):
        ex = example(node)
        if isinstance(ex, torch.Tensor) and ((ex.dim() == 2 and not ex.is_floating_point())
                                             or (ex.dim() == 3 and ex.is_floating_point())):
            lengths.append(ex.shape[1])
    return lengths


def find_quadratic(gm: fx.GraphModule) -> list[MemorySite]:
    """Nodes whose value has two dimensions equal to a sequence length of the inputs. A static
    length that equals a dimension of a parameter (hidden size, head dim, ...) cannot be told
    apart from it and is not checked; symbolic lengths always are."""
    lengths = [n for n in _sequence_lengths(gm.graph) if not (isinstance(n, int) and n <= 1)]
    weight_dims = {d for node in gm.graph.find_nodes(op="placeholder")
                   if isinstance(ex := example(node), torch.nn.Parameter) for d in ex.shape if isinstance(d, int)}
    lengths = [n for n in lengths if not (isinstance(n, int) and n in weight_dims)]
    sites = []
    for node in gm.graph.nodes:
        ex = example(node)
        if not isinstance(ex, torch.Tensor) or node.op == "placeholder":
            continue
        for n in lengths:
            if sum(same_size(d, n) for d in ex.shape) >= 2:
                shape = tuple(str(d) for d in ex.shape)
                counters["mcompile"]["quadratic_tensors"] += 1
                sites.append(MemorySite("quadratic", node_module(node), False,
                                        f"{node.name} has shape ({', '.join(shape)}): O(N^2) in the sequence length"))
                break
    return sites


def apply_memory_passes(gm: fx.GraphModule, config: MInferenceConfig, grad_enabled: bool = False) -> MemoryReport:
    """Run the memory passes in place (after the attention rewrite) and report what they did."""

    sites = slice_last_logits(gm, config) + chunk_mlps(gm, config, grad_enabled)
    sites += rope_once(gm, config, grad_enabled) + store_residual(gm, config, grad_enabled)
    gm.graph.lint()
    gm.recompile()
    quadratic = find_quadratic(gm)
    if quadratic:
        log.warning("mcompile: %d tensor(s) grow as N^2 with the prompt: %s", len(quadratic),
                    "; ".join(s.reason for s in quadratic[:3]))
    report = MemoryReport(tuple(sites + quadratic))
    log.info("mcompile: last-position logits %d, chunked MLPs %d of %d", report.applied("last_logits"),
             report.applied("chunked_mlp"), sum(s.pass_name == "chunked_mlp" for s in sites))
    return report
