"""act(g) * u, the activation-multiply of gated MLPs: the PyTorch reference of
kernels/act_mul_triton.py, and the activations the chunked MLP implements."""

from __future__ import annotations

import enum

import torch
import torch.nn.functional as F


class Activation(str, enum.Enum):
    """Activations of gated MLPs that the op implements (transformers' ``hidden_act`` names map
    onto these in passes/memory.py)."""

    SILU = "silu"  # Llama, Mistral, Qwen: SwiGLU
    GELU_TANH = "gelu_tanh"  # Gemma: GeGLU with the tanh approximation
    GELU = "gelu"  # exact (erf) GeGLU


ACTIVATIONS = tuple(a.value for a in Activation)


def activate(g: torch.Tensor, activation: str) -> torch.Tensor:
    """act(g) in g's dtype."""
    if activation == Activation.SILU:
        return F.silu(g)
    return F.gelu(g, approximate="tanh" if activation == Activation.GELU_TANH else "none")


def act_mul_ref(g: torch.Tensor, u: torch.Tensor, activation: str) -> torch.Tensor:
    """act(g) * u, computed in fp32 and rounded once (as Inductor's fused kernel does)."""
    return (activate(g.float(), activation) * u.float()).to(g.dtype)
