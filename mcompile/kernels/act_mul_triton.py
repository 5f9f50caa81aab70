"""Fused ``g <- act(g) * u`` for the chunked MLP (Triton, CUDA).

Elementwise over contiguous tensors of equal shape: each program loads BLOCK elements of g and
u, computes act(g) * u in fp32, and stores the result (rounded to g's dtype) back into g. It
reads two tensors and writes one, like the kernel Inductor generates for ``silu(g) * u``; the
in-place store saves the chunk's third intermediate. Grid: cdiv(numel, BLOCK) programs; offsets
are int64, so one chunk may exceed 2**31 elements.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .act_mul import ACTIVATIONS, Activation, act_mul_ref

BLOCK = 1024  # elements per program: 4 warps x 32 threads x 8 elements (16-byte bf16 vectors)
_CODES = {Activation.SILU.value: 0, Activation.GELU_TANH.value: 1, Activation.GELU.value: 2}
# Constants of the GELU forms (constexpr: Triton reads only constexpr globals in a kernel).
SQRT_2_OVER_PI = tl.constexpr(0.7978845608028654)  # tanh GELU: tanh(sqrt(2/pi) (x + 0.044715 x^3))
GELU_CUBIC = tl.constexpr(0.044715)
INV_SQRT_2 = tl.constexpr(0.7071067811865476)  # exact GELU: 0.5 x (1 + erf(x / sqrt(2)))


@triton.jit
def _act_mul_kernel(G, U, numel, ACT: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < numel
    g = tl.load(G + offs, mask=ok, other=0.0).to(tl.float32)
    u = tl.load(U + offs, mask=ok, other=0.0).to(tl.float32)
    if ACT == 0:
        a = g * tl.sigmoid(g)
    elif ACT == 1:
        inner = SQRT_2_OVER_PI * (g + GELU_CUBIC * g * g * g)
        a = 0.5 * g * (2.0 * tl.sigmoid(2.0 * inner))  # 1 + tanh(t) = 2 sigmoid(2t)
    else:
        a = 0.5 * g * (1.0 + tl.erf(g * INV_SQRT_2))
    tl.store(G + offs, (a * u).to(G.dtype.element_ty), mask=ok)


def act_mul_triton(g: torch.Tensor, u: torch.Tensor, activation: str) -> torch.Tensor:
    """act(g) * u written into g (returned); falls back to the reference for layouts it does not
    take (non-contiguous or mismatched tensors)."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {list(ACTIVATIONS)}, got {activation!r}")
    if not (g.is_contiguous() and u.is_contiguous() and g.shape == u.shape and g.dtype == u.dtype):
        return act_mul_ref(g, u, activation)
    numel = g.numel()
    if numel:
        _act_mul_kernel[(triton.cdiv(numel, BLOCK),)](g, u, numel, ACT=_CODES[activation], BLOCK=BLOCK)
    return g
