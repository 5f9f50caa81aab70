"""The graph builders the rewrites insert: what Inductor sees of sparse attention and of the chunked
MLP. Each is a ``torch.cond`` on a symbolic size (``conditional.flat_cond``) inside a shared
region (``conditional.shared_region``), over the ops of ops.py.

Sparse attention (``sparse_attention``) is lowered one way, for every rewritten attention on every
device; dense or sparse is decided here, in the graph, by ``ops.runs_dense`` on the symbolic
lengths::

    out = cond(runs_dense(Nq, N, dense_below),          # a SymBool: no guard, one graph
               dense:  SDPA(is_causal)                   # whole prompt, no key padding
                       | mcompile::dense_attention      # otherwise (bottom-right causal, padding)
               sparse: index = mcompile::estimate_index(q, k, padding)   # only on this branch
                       kernel in the graph:
                           cond(mcompile::dense_check(index),    # 0-dim bool: run-time density check
                                dense:  SDPA(is_causal)
                                sparse: mcompile::sparse_attention_kernel)   (triton_op)
                       else:
                           mcompile::sparse_attention(q, k, v, index, padding))  (opaque op)

AOTAutograd traces both branches (``conditional.flat_cond``: ``torch.cond`` with the workarounds
it needs), once per distinct pattern set: the whole structure is a ``conditional.shared_region``
(``invoke_subgraph``), so layers with the same patterns share one traced and lowered subgraph.
The dense branches' SDPA is lowered as it would be for plain ``backend="inductor"``.

Where the kernel sits (``kernel_reason``, option ``inline_kernels``): ``mcompile::sparse_attention_kernel``
is a ``torch.library.triton_op`` whose body launches the kernel through ``wrap_triton``, so Inductor
copies the Triton source into its output code and launches it from its wrapper, with no Python op
in between. That needs a whole prompt (query length == key length, known from the shapes), no key
padding, static head counts and head dims, a positive constant scale, an index whose block lists
are sized when compiled (not block-mass), and on CUDA a dtype and head dim the Triton kernel
supports; by default only CUDA graphs put it there. Otherwise the sparse branch calls the opaque op
``mcompile::sparse_attention``, which runs the same kernel (or the PyTorch reference off CUDA)
and makes the density check itself. Either way the result is the same.

Layouts: transformers hands attention q/k/v as (B, H, N, D) views of (B, N, H, D) storage and
reshapes the output back to (B, N, H * D). The operands cross the region and the conditionals
in that memory order (``conditional.flat_cond``), and every branch returns (B, N, H, D)
storage (the kernel writes it; cuDNN's SDPA already does), so neither side costs a copy (what
the copies cost: docs/BENCHMARKS.md).

Launch configuration: a traced launch is not autotuned (Inductor would tune once, at whatever
length it sees first). It uses ``sparse_attention_triton.fixed_config`` (docs/BENCHMARKS.md,
"Launch configurations" and "One loop over short runs").

The gated MLP (``gated_mlp``): ``mcompile::chunked_mlp`` when x holds more than ``chunk``
tokens, else the MLP as written, which Inductor lowers and fuses as it would without the pass,
so short prompts pay nothing measurable.

Plain tensors only: a weight that is a tensor subclass (torchao's quantized ``Int8Tensor``, a
DTensor) computes ``linear`` through its own ``__torch_dispatch__``, which has no rule for this op
nor for the conditional and shared region around ``chunked_mlp`` (``torch.cond`` and ``invoke_subgraph`` reject
subclass operands). ``operand_reason`` says so before the memory pass inserts anything.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensor
from torch.fx.experimental.symbolic_shapes import statically_known_true

from .. import ops
from ..conditional import flat_cond, shared_region
from ..kernels.act_mul import activate
from ..patterns import DEFAULT_BUDGET_EXPONENT


def _causal(q, k, v, scale):
    gqa = q.shape[1] != k.shape[1]
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)


def _bnhd(x: torch.Tensor) -> torch.Tensor:
    """(B, H, N, D) -> contiguous (B, N, H, D): what every branch returns, so that both agree on
    one layout, the one the model's ``transpose(1, 2).reshape`` reads without a copy (cuDNN
    SDPA and the kernel write it directly; then this is a view)."""
    return x.transpose(1, 2).contiguous()


def whole_prompt(q: torch.Tensor, k: torch.Tensor, key_padding, window: int = 0) -> bool:
    """Whether the attention is plain causal SDPA when dense: every key a query (Nq == N, known
    from the shapes), no key padding and no sliding window."""
    return key_padding is None and not window and statically_known_true(q.shape[2] == k.shape[2])


def sparse_attention(q, k, v, key_padding, kinds: list[int], p0: list[int], p1: list[int], scale: float,
                     dense_below: int, budget_length: int = 0, budget_exponent: float = DEFAULT_BUDGET_EXPONENT,
                     kernel_in_graph: bool = True, window: int = 0) -> torch.Tensor:
    """Causal attention of q (B, H, Nq, D) over k/v (B, Hk, N, D) (Nq <= N, bottom-right aligned;
    ``key_padding`` (B, N) or None), sparse where ``ops.runs_dense`` says so, as conditionals the
    compiler traces (module docstring). ``kernel_in_graph``: the Triton kernel as a triton_op in
    the graph (``kernel_reason`` allows it), else the opaque ``mcompile::sparse_attention``.
    ``window`` > 0: a sliding window of that many keys, applied exactly on both branches (the
    patterns are then the window's own band, A-shape with no sink)."""
    plain = whole_prompt(q, k, key_padding, window)
    padded = key_padding is not None

    def attention(q, k, v, *pad):
        def dense(q, k, v, *rest):
            if plain:
                return _bnhd(_causal(q, k, v, scale))
            return _bnhd(torch.ops.mcompile.dense_attention(q, k, v, rest[0] if padded else None, scale, window))

        def kernel(q, k, v, *index):
            return _bnhd(torch.ops.mcompile.sparse_attention_kernel(q, k, v, *index, scale, window))

        def sparse(q, k, v, *pad):
            kp = pad[0] if padded else None
            index = torch.ops.mcompile.estimate_index(q, k, kp, kinds, p0, p1, scale, budget_length, budget_exponent)
            if not kernel_in_graph:
                return _bnhd(torch.ops.mcompile.sparse_attention(q, k, v, *index, kp, scale, window))
            runs, run_count, _, _, column_count, _, block_count = index
            check = torch.ops.mcompile.dense_check(runs, run_count, column_count, block_count, k.shape[2])
            return flat_cond(check, dense, kernel, (q, k, v), index)

        return flat_cond(ops.runs_dense(q.shape[2], k.shape[2], dense_below), dense, sparse, (q, k, v, *pad))

    pad = (key_padding,) if padded else ()
    out = shared_region("sparse_attention", attention, (q, k, v, *pad),
                        (kinds, p0, p1, scale, dense_below, budget_length, budget_exponent, kernel_in_graph, plain,
                         padded, window))
    return out.transpose(1, 2)  # (B, H, Nq, Dv), stored as (B, Nq, H, Dv)


def kernel_reason(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_padding, scale,
                  sized_at_run_time: bool) -> str | None:
    """None when the sparse branch can launch the Triton kernel from Inductor's code (the
    triton_op) for these (fake) inputs on this device; else why it calls the opaque op."""
    if key_padding is not None:
        return "key padding (the opaque op masks it)"
    if not statically_known_true(q.shape[2] == k.shape[2]):
        return "queries are not the whole prompt (a chunk after a cached prefix)"
    if not all(isinstance(x, int) for x in (k.shape[1], q.shape[3], v.shape[3])):
        return "symbolic head count or head dim"
    if not isinstance(scale, float) or not math.isfinite(scale) or scale <= 0:
        return "the softmax scale is not a positive constant"
    if sized_at_run_time:
        return ("block-mass or a block budget above the static block budget: the block list is sized at run time, "
                "the in-graph kernel sizes it when compiled")
    if q.device.type == "cuda":
        from ..kernels.dispatch import triton_reason

        reason = triton_reason(q)
        if reason is not None:
            return reason
    return None


# Tensor types the op, torch.cond and invoke_subgraph take as they are (FakeTensor: what Dynamo
# records for a plain tensor); any other subclass computes through its own __torch_dispatch__.
PLAIN_TENSORS = (torch.Tensor, torch.nn.Parameter, FakeTensor)


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


def gated_mlp(x, w_gate, w_up, w_down, b_gate, b_up, b_down, activation: str, chunk: int) -> torch.Tensor:
    """What the memory pass puts in the graph: ``chunked_mlp`` when x holds more than ``chunk``
    tokens, else the MLP as written (``down(act(gate(x)) * up(x))``), which Inductor lowers and
    fuses as it would without the pass, with no opaque op on a short prompt's path. The choice is
    a conditional on the symbolic token count (``conditional.flat_cond``): no guard, one graph."""
    has_bias = tuple(t is not None for t in (b_gate, b_up, b_down))
    biases = tuple(t for t in (b_gate, b_up, b_down) if t is not None)

    def weights(rest):
        wg, wu, wd, *bs = rest
        bs = iter(bs)
        return (wg, wu, wd, *(next(bs) if h else None for h in has_bias))

    def plain(x, *rest):
        wg, wu, wd, bg, bu, bd = weights(rest)
        return F.linear(activate(F.linear(x, wg, bg), activation) * F.linear(x, wu, bu), wd, bd)

    def chunked(x, *rest):
        return torch.ops.mcompile.chunked_mlp(x, *weights(rest), activation, chunk)

    def mlp(x, *rest):
        tokens = x.numel() // x.shape[-1]
        return flat_cond(tokens > chunk, chunked, plain, (x,), rest)

    return shared_region("gated_mlp", mlp, (x, w_gate, w_up, w_down, *biases), (activation, chunk, has_bias))
