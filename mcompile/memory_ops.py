"""``mcompile::chunked_mlp``: a gated MLP run over the tokens a chunk at a time.

    out = down(act(gate(x)) * up(x))        x: (..., hidden) -> out: (..., hidden_out)

Inductor compiles a gated MLP into gate and up matmuls whose outputs are N x intermediate_size
each (Llama-3-8B at 1M tokens: 28 GiB apiece in bf16). This op computes the same function
``chunk`` tokens at a time (tokens of all batch rows flattened), writing each chunk's result into
its rows of the output, so the largest temporaries are chunk x intermediate_size.

The op is opaque to the compiler and its fake uses symbolic sizes only, so one compiled graph
serves every length and the loop over chunks is a run-time loop, not a guard. A prompt of at
most ``chunk`` tokens runs as one chunk: the same matmuls Inductor would launch, plus one fused
activation-multiply (a Triton kernel on CUDA, the same one Inductor would generate), so short
prompts pay nothing measurable. Inference only: the op has no backward.

Plain tensors only: a weight that is a tensor subclass (torchao's quantized ``Int8Tensor``, a
DTensor) computes ``linear`` through its own ``__torch_dispatch__``, which has no rule for this op
nor for the conditional and shared region around it (``torch.cond`` and ``invoke_subgraph`` reject
subclass operands). ``operand_reason`` says so before the memory pass inserts anything.
"""

from __future__ import annotations

import enum
import functools
import logging
from typing import Optional

import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensor

log = logging.getLogger(__name__)

# Tensor types the op, torch.cond and invoke_subgraph take as they are (FakeTensor: what Dynamo
# records for a plain tensor); any other subclass computes through its own __torch_dispatch__.
PLAIN_TENSORS = (torch.Tensor, torch.nn.Parameter, FakeTensor)


class Activation(str, enum.Enum):
    """Activations of gated MLPs that the op implements (transformers' ``hidden_act`` names map
    onto these in passes/memory.py)."""

    SILU = "silu"  # Llama, Mistral, Qwen: SwiGLU
    GELU_TANH = "gelu_tanh"  # Gemma: GeGLU with the tanh approximation
    GELU = "gelu"  # exact (erf) GeGLU


ACTIVATIONS = tuple(a.value for a in Activation)


def _act(g: torch.Tensor, activation: str) -> torch.Tensor:
    if activation == Activation.SILU:
        return F.silu(g)
    return F.gelu(g, approximate="tanh" if activation == Activation.GELU_TANH else "none")


def act_mul_ref(g: torch.Tensor, u: torch.Tensor, activation: str) -> torch.Tensor:
    """act(g) * u, computed in fp32 and rounded once (as Inductor's fused kernel does)."""
    return (_act(g.float(), activation) * u.float()).to(g.dtype)


@functools.lru_cache(maxsize=1)
def _triton_act_mul():
    try:
        from .act_mul_triton import act_mul_triton

        return act_mul_triton
    except ImportError as exc:  # Triton missing: the PyTorch path serves
        log.info("mcompile: Triton unavailable for the chunked MLP (%s); using PyTorch", exc)
        return None


def act_mul(g: torch.Tensor, u: torch.Tensor, activation: str) -> torch.Tensor:
    """act(g) * u: in place into ``g`` by a Triton kernel on CUDA, the reference elsewhere."""
    if g.is_cuda:
        kernel = _triton_act_mul()
        if kernel is not None:
            return kernel(g, u, activation)
    return act_mul_ref(g, u, activation)


def operand_reason(operands: dict) -> Optional[str]:
    """Why ``gated_mlp`` cannot take ``operands`` (name -> tensor or example value, None for an
    absent bias), or None. A tensor subclass has no rule for the op, torch.cond or
    invoke_subgraph, and its own arithmetic (a quantized matmul) is not this op's."""
    for name, t in operands.items():
        if not isinstance(t, torch.Tensor) or type(t) in PLAIN_TENSORS:
            continue
        cls = type(t)
        return (f"{name} is a {cls.__module__.split('.', 1)[0]} {cls.__name__} (a tensor subclass, e.g. a "
                "quantized weight): chunked_mlp runs plain tensors only, so this MLP runs as written, unchunked, "
                "with its N x intermediate_size temporaries; to chunk it, keep the MLP's weights plain (e.g. "
                "leave its Linear layers out of the quantization)")
    return None


def _check(x, w_gate, w_up, w_down, activation: str, chunk: int) -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(f"chunked_mlp: activation must be one of {list(ACTIVATIONS)}, got {activation!r}")
    if chunk < 1:
        raise ValueError(f"chunked_mlp: chunk must be >= 1 token, got {chunk}")
    if w_gate.shape != w_up.shape or w_gate.shape[1] != x.shape[-1] or w_down.shape[1] != w_gate.shape[0]:
        raise ValueError(f"chunked_mlp: weights gate {tuple(w_gate.shape)}, up {tuple(w_up.shape)}, down "
                         f"{tuple(w_down.shape)} do not fit x (..., {x.shape[-1]})")


@torch.library.custom_op("mcompile::chunked_mlp", mutates_args=())
def chunked_mlp(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor,
                b_gate: Optional[torch.Tensor], b_up: Optional[torch.Tensor], b_down: Optional[torch.Tensor],
                activation: str, chunk: int) -> torch.Tensor:
    """down(act(gate(x)) * up(x)) over ``chunk`` tokens at a time; x (..., hidden)."""
    _check(x, w_gate, w_up, w_down, activation, chunk)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])  # (T, hidden): tokens of every batch row
    tokens = x2.shape[0]
    out = x2.new_empty(tokens, w_down.shape[0])  # (T, hidden_out)
    w_down_t = w_down.t()
    for start in range(0, tokens, chunk):
        xs = x2[start:start + chunk]
        h = act_mul(F.linear(xs, w_gate, b_gate), F.linear(xs, w_up, b_up), activation)  # (chunk, inter)
        rows = out[start:start + chunk]  # contiguous: whole rows of a contiguous tensor
        if b_down is None:
            torch.mm(h, w_down_t, out=rows)
        else:
            torch.addmm(b_down, h, w_down_t, out=rows)
        del h
    return out.view(*lead, w_down.shape[0])


@chunked_mlp.register_fake
def _(x, w_gate, w_up, w_down, b_gate, b_up, b_down, activation, chunk):
    return x.new_empty(*x.shape[:-1], w_down.shape[0])


def gated_mlp(x, w_gate, w_up, w_down, b_gate, b_up, b_down, activation: str, chunk: int) -> torch.Tensor:
    """What the memory pass puts in the graph: ``chunked_mlp`` when x holds more than ``chunk``
    tokens, else the MLP as written (``down(act(gate(x)) * up(x))``), which Inductor lowers and
    fuses as it would without the pass, with no opaque op on a short prompt's path. The choice is
    a conditional on the symbolic token count (``conditional.flat_cond``): no guard, one graph."""
    from .conditional import flat_cond, shared_region

    has_bias = tuple(t is not None for t in (b_gate, b_up, b_down))
    biases = tuple(t for t in (b_gate, b_up, b_down) if t is not None)

    def weights(rest):
        wg, wu, wd, *bs = rest
        bs = iter(bs)
        return (wg, wu, wd, *(next(bs) if h else None for h in has_bias))

    def plain(x, *rest):
        wg, wu, wd, bg, bu, bd = weights(rest)
        return F.linear(_act(F.linear(x, wg, bg), activation) * F.linear(x, wu, bu), wd, bd)

    def chunked(x, *rest):
        return torch.ops.mcompile.chunked_mlp(x, *weights(rest), activation, chunk)

    def mlp(x, *rest):
        tokens = x.numel() // x.shape[-1]
        return flat_cond(tokens > chunk, chunked, plain, (x,), rest)

    return shared_region("gated_mlp", mlp, (x, w_gate, w_up, w_down, *biases), (activation, chunk, has_bias))


def mlp_ref(x, w_gate, w_up, w_down, b_gate=None, b_up=None, b_down=None, activation: str = "silu"):
    """The unchunked MLP, for tests."""
    return F.linear(act_mul_ref(F.linear(x, w_gate, b_gate), F.linear(x, w_up, b_up), activation), w_down, b_down)


__all__ = ["Activation", "ACTIVATIONS", "chunked_mlp", "gated_mlp", "operand_reason", "act_mul", "act_mul_ref",
           "mlp_ref"]
