"""The torch internals the package leans on, each in the form the code uses it: when an upstream
release moves or changes one, its test here fails by name instead of a rewrite failing later.
Run on both stacks the package supports (torch 2.13 on CPU in CI; torch 2.11 on the GPU machine).

Where each is used: conditional.py (cond_op, invoke_subgraph, TracingContext, functional
tensors, guard_scalar and SymT for constant_float, the tracer's SymNodes for _free_symbols), cache.py (CustomGraphPass), passes/realize.py (inductor_force_stride_order),
passes/frame.py (InstructionTranslator.current_tx), passes/mutation.py and passes/match.py
(torch._ops classes), backend.py (TensorifyScalarRestartAnalysis, compile_fx, lookup_backend),
config.py (list_mode_options), explain.py (OptimizedModule), ops.py (triton_op, wrap_triton,
custom_op), passes/rewrite.py (trace_structured), the matchers (nn_module_stack)."""

from __future__ import annotations

import inspect

import pytest
import torch


def test_cond_op_called_directly():
    """conditional.flat_cond calls the operator behind torch.cond with (pred, true_fn, false_fn,
    operands) and takes the first of the tuple its branches return."""
    from torch._higher_order_ops.cond import cond_op

    assert isinstance(cond_op, torch._ops.HigherOrderOperator)
    x = torch.arange(4.0)
    out = cond_op(torch.tensor(True), lambda t: (t + 1,), lambda t: (t - 1,), (x,))
    assert torch.equal(out[0], x + 1)
    out = cond_op(False, lambda t: (t + 1,), lambda t: (t - 1,), (x,))
    assert torch.equal(out[0], x - 1)


def test_symfloat_specialised_to_a_constant():
    """conditional.constant_float: a SymFloat over a backed float symbol (SymT.FLOAT) is
    specialised by guard_scalar (a guard is recorded), a constant one is read, others refused;
    and a SymInt comparison combined with ``|`` and ``&`` stays a SymBool (ops.runs_dense)."""
    from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv
    from torch.utils._sympy.symbol import SymT, symbol_is_type

    from mcompile import ops
    from mcompile.conditional import constant_float

    from torch._dynamo.source import ConstantSource

    env = ShapeEnv()
    f = env.create_symfloatnode(env.create_unspecified_symbol(0.125, ConstantSource("scale"), DimDynamic.DYNAMIC),
                                hint=0.125)
    assert all(symbol_is_type(s, SymT.FLOAT) for s in f.node.expr.free_symbols)
    guards = len(env.guards)
    assert constant_float(f) == 0.125 and len(env.guards) == guards + 1
    assert constant_float(f * 2) == 0.25  # now a constant expression
    assert constant_float(0.5) == 0.5 and constant_float(torch.tensor(0.5)) is None
    n = env.create_symintnode(env.create_symbol(300, ConstantSource("n"), DimDynamic.DYNAMIC), hint=300)
    dense = ops.runs_dense(n, n, 200)
    assert isinstance(dense, torch.SymBool) and not env.guards[guards + 1:]


def test_symbols_the_tracer_knows():
    """conditional._free_symbols: under make_fx the proxy mode's tracer keeps its SymInts in
    ``symnode_tracker.sym_node_dict`` keyed by SymNode, a SymNode's ``_expr`` is the symbol as
    traced (``expr`` the simplified one), and outside a trace ``ShapeEnv.create_symintnode``
    makes a SymInt of a backed symbol from ``backed_var_to_val`` (``var_to_val``
    on older torch, deprecated on 2.13)."""
    from torch._dynamo.source import ConstantSource
    from torch.fx.experimental.proxy_tensor import get_proxy_mode, make_fx
    from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv

    seen = {}

    def f(x, y):
        mode = get_proxy_mode()
        seen["exprs"] = {getattr(n, "_expr", None) for n in mode.tracer.symnode_tracker.sym_node_dict}
        seen["symbols"] = {x.shape[0].node.expr, y.shape[0].node.expr}
        return torch.cat([x, y])

    make_fx(f, tracing_mode="symbolic")(torch.randn(3), torch.randn(5))
    assert seen["symbols"] <= seen["exprs"] and len(seen["symbols"]) == 2
    assert get_proxy_mode() is None
    env = ShapeEnv()
    sym = env.create_symbol(300, ConstantSource("n"), DimDynamic.DYNAMIC)
    values = getattr(env, "backed_var_to_val", None)  # the name conditional._free_symbols reads first
    values = env.var_to_val if values is None else values
    n = env.create_symintnode(sym, hint=int(values[sym]))
    assert isinstance(n, torch.SymInt) and n.node.expr == sym and n.node._expr == sym


def test_invoke_subgraph_and_tracing_context():
    """conditional.shared_region: ``TracingContext.try_get()`` (None outside a compile, an
    object with a ``__dict__`` inside), and ``invoke_subgraph(body, identifier, *operands)``."""
    from torch._guards import TracingContext
    from torch._higher_order_ops.invoke_subgraph import invoke_subgraph

    assert TracingContext.try_get() is None
    assert isinstance(invoke_subgraph, torch._ops.HigherOrderOperator)
    params = list(inspect.signature(type(invoke_subgraph).__call__).parameters)
    assert params[1:3] == ["subgraph", "identifier"], params
    seen = []

    def backend(gm, example_inputs):
        ctx = TracingContext.try_get()
        seen.append(ctx is not None and hasattr(ctx, "__dict__"))
        return gm.forward

    torch.compile(lambda t: t * 2, backend=backend)(torch.ones(3))
    assert seen == [True]


def test_functional_tensor_unwrapping():
    """conditional._storage: FunctionalTensor.elem, torch._from_functional_tensor and the
    functorch wrapper predicates."""
    from torch._subclasses.functional_tensor import FunctionalTensor

    assert hasattr(FunctionalTensor, "__torch_dispatch__")
    for name in ("is_functionaltensor", "is_batchedtensor", "get_unwrapped"):
        assert callable(getattr(torch._C._functorch, name)), name
    assert callable(torch._from_functional_tensor)


def test_custom_graph_pass_for_the_cache_key():
    """cache.py: a CustomGraphPass subclass with ``__call__`` and ``uuid``; get_hash_for_files."""
    from torch._inductor import config
    from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files

    from mcompile.cache import CACHE_HOOK

    assert {"__call__", "uuid"} <= set(getattr(CustomGraphPass, "__abstractmethods__", ()))
    assert isinstance(get_hash_for_files((__file__,)), bytes)
    assert hasattr(config, CACHE_HOOK)


def test_force_stride_order_prim():
    """passes/realize.py stores a value through ``prims.inductor_force_stride_order(x, strides)``."""
    from mcompile.passes.realize import _realize_op

    op = _realize_op()
    assert op is not None
    x = torch.randn(2, 3)
    assert torch.equal(op(x, x.stride()), x)


def test_dynamo_frame_and_errors():
    """passes/frame.py reads the traced frame's locals through InstructionTranslator.current_tx;
    backend.py lets Dynamo's TensorifyScalarRestartAnalysis through; explain.py recognises
    compiled modules as OptimizedModule."""
    from torch._dynamo.symbolic_convert import InstructionTranslator

    assert callable(InstructionTranslator.current_tx)
    assert issubclass(torch._dynamo.exc.TensorifyScalarRestartAnalysis, Exception)
    assert isinstance(torch.compile(torch.nn.Linear(2, 2), backend="eager"), torch._dynamo.eval_frame.OptimizedModule)
    assert callable(torch._dynamo.lookup_backend("aot_eager"))


def test_frame_locals_inside_a_compile():
    """The model is found among the traced frame's locals while the backend runs."""
    from mcompile.passes.frame import _frame_locals

    found = []
    model = torch.nn.Linear(2, 2)

    def backend(gm, example_inputs):
        found.append(any(v is model for v in _frame_locals().values()))
        return gm.forward

    def run(m, x):
        return m(x)

    torch.compile(run, backend=backend)(model, torch.ones(1, 2))
    assert found == [True]


def test_op_classes_and_registration():
    """passes/mutation.py and match.py test node targets against torch._ops' classes; ops.py
    registers with torch.library.custom_op / triton_op / wrap_triton."""
    assert isinstance(torch.ops.aten.add.Tensor, torch._ops.OpOverload)
    assert isinstance(torch.ops.aten.add, torch._ops.OpOverloadPacket)
    assert torch.ops.aten.add.Tensor.overloadpacket is torch.ops.aten.add
    for name in ("custom_op", "triton_op", "wrap_triton"):
        assert callable(getattr(torch.library, name)), name
    import mcompile.ops  # noqa: F401

    for op in ("estimate_index", "sparse_attention", "sparse_attention_kernel", "dense_check", "chunked_mlp"):
        assert hasattr(torch.ops.mcompile, op), op


def test_inductor_entry_points():
    """backend.py compiles with compile_fx(gm, example_inputs, config_patches=...); config.py
    lists modes with list_mode_options; rewrite.py logs with trace_structured."""
    from torch._inductor.compile_fx import compile_fx

    assert "config_patches" in inspect.signature(compile_fx).parameters
    modes = torch._inductor.list_mode_options()
    assert {"default", "reduce-overhead", "max-autotune"} <= set(modes)
    assert isinstance(torch._inductor.list_mode_options("max-autotune"), dict)
    params = inspect.signature(torch._logging.trace_structured).parameters
    assert {"metadata_fn", "payload_fn"} <= set(params)


@pytest.mark.parametrize("call", ["module", "function"])
def test_nn_module_stack_names(call):
    """The matchers read module paths from ``nn_module_stack`` (passes/nodes.module_path): the
    source names differ between torch releases and call styles, the paths users see must not."""
    from mcompile.passes.nodes import module_path

    class Inner(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(2, 2)

        def forward(self, x):
            return self.proj(x)

    class Outer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = torch.nn.ModuleList([Inner(), Inner()])

        def forward(self, x):
            return self.layers[1](x)

    paths = []

    def backend(gm, example_inputs):
        for node in gm.graph.nodes:
            stack = node.meta.get("nn_module_stack") or {}
            if stack:
                paths.append(module_path(list(stack.values())[-1][0]))
        return gm.forward

    model = Outer()
    fn = torch.compile(model, backend=backend) if call == "module" else torch.compile(lambda m, x: m(x), backend=backend)
    fn(torch.ones(1, 2)) if call == "module" else fn(model, torch.ones(1, 2))
    assert "layers.1.proj" in paths, paths
