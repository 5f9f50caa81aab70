"""Sparse attention inlined into Inductor's code (passes/lowering.py): a torch.cond over the dense
branch and a triton_op, one graph for every length, same results as the opaque op.

On the CPU the triton_op's body runs the PyTorch reference; the Triton launch through
``wrap_triton`` is checked on the GPU (tests/test_gpu.py)."""

import pytest
import torch
from torch._dynamo.utils import counters
from torch._inductor.utils import run_and_get_code

import mcompile
from mcompile.conditional import flat_cond, memory_order
from mcompile.index import SparseIndex
from mcompile.passes import lowering
from mcompile.kernels.sparse_attention import sparse_attention_ref
from mcompile.tools.models import tiny_llama

from .helpers import qkv

VS = {"kind": "vertical_slash", "vertical": 30, "slash": 100}
OPTS = {"dense_below": 200, "pattern_db": None, "default_pattern": VS}


def _ids(n, b=1):
    return torch.randint(0, 128, (b, n), generator=torch.Generator().manual_seed(n))


class _Fused(torch.nn.Module):
    """q, k, v as views of one tensor (a fused projection): 4 query / 2 KV heads, head dim 16."""

    def forward(self, x):
        q, k, v = x[:, :4], x[:, 4:6], x[:, 6:]
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)


def _fused_input(b, n):
    x = torch.randn(b, 8, n, 16, generator=torch.Generator().manual_seed(n))
    torch._dynamo.mark_dynamic(x, 2)
    return x


BLOCK_MASS = {"kind": "block_mass", "recall": 0.9, "samples": 4}


@pytest.mark.parametrize("pattern", [VS, BLOCK_MASS], ids=["vertical_slash", "block_mass"])
def test_one_graph_branches_between_dense_and_sparse_at_run_time(pattern):
    """Inlined, the length test is in Inductor's code and a short prompt calls no opaque op;
    block-mass (block lists sized at run time) keeps the kernel in the opaque op but has the
    length test in the graph too. Same logits as the opaque ops, one graph for every length."""
    model = tiny_llama("sdpa")
    lengths = (100, 301, 150, 450)  # dense, sparse, dense, sparse (dense_below=200)
    outputs = {}
    for inlined in (False, True):
        torch._dynamo.reset()
        counters.clear()
        compiled = torch.compile(model, backend="minference", dynamic=True,
                                 options={**OPTS, "default_pattern": pattern, "inline_kernels": inlined})
        with torch.no_grad():
            outputs[inlined], code = [], None
            for n in lengths:
                if code is None:
                    out, code = run_and_get_code(compiled, _ids(n), use_cache=False)
                else:
                    out = compiled(_ids(n), use_cache=False)
                out = out.logits
                outputs[inlined].append(out)
        assert counters["stats"]["unique_graphs"] == 1
        assert counters["mcompile"]["rewritten"] >= 2
        text = "\n".join(code)
        if inlined:  # the length test is in Inductor's wrapper, not in an op
            assert ">= 200:" in text and "torch.ops.mcompile.estimate_index" in text
        else:
            assert "torch.ops.mcompile.sparse_attention.default" in text and ">= 200:" not in text
    for a, b in zip(outputs[False], outputs[True]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("b", [1, 3])
def test_fused_projection_views_and_batches(b):
    compiled = torch.compile(_Fused(), backend="minference", options={**OPTS, "inline_kernels": True})
    for n in (150, 333):
        x = _fused_input(b, n)
        with torch.no_grad():
            out = compiled(x)
        q, k, v = x[:, :4], x[:, 4:6], x[:, 6:]
        index = torch.ops.mcompile.estimate_index(q, k, None, [2] * 4, [30] * 4, [100] * 4, 0.25, 200)
        ref = torch.ops.mcompile.sparse_attention(q, k, v, *index, None, 0.25, 200)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert counters["mcompile"]["rewritten"] >= 1


def test_explain_reports_inlining_and_why_not():
    ids = _ids(300)
    e = mcompile.explain(tiny_llama("sdpa"), ids, options={**OPTS, "inline_kernels": True})
    assert all(s.inlined for s in e.sites) and "+inlined" in e.table()
    # A short prompt calls no opaque op: estimation lives inside the conditional.
    code = e.graph_code()
    assert "mcompile_passes_lowering_sparse_attention(" in code and "estimate_index" not in code
    assert "inlined into Inductor's code" in e.summary()
    # block-mass: the length test in the graph, the kernel in the opaque op (block lists sized at run time)
    bm = mcompile.explain(tiny_llama("sdpa"), ids, options={**OPTS, "default_pattern": BLOCK_MASS,
                                                            "inline_kernels": True})
    assert all(s.conditional and not s.inlined for s in bm.sites) and "+length test inlined" in bm.table()
    assert "length test in Inductor's code, kernel in the opaque op: block-mass" in bm.summary()
    assert "estimate_index" not in bm.graph_code()  # estimation only inside the sparse branch
    auto = mcompile.explain(tiny_llama("sdpa"), ids, options=OPTS)  # auto inlines on CUDA only
    assert not any(s.inlined for s in auto.sites)
    assert all(s.inline_reason.startswith("device cpu") for s in auto.sites)
    assert "not inlined: device cpu" in auto.summary() and "not inlined: device cpu" in auto.table()
    mask = torch.ones(1, 300, dtype=torch.long)
    mask[0, :5] = 0
    padded = mcompile.explain(tiny_llama("sdpa"), ids, attention_mask=mask, options={**OPTS, "inline_kernels": True})
    assert all(s.rewritten and not s.inlined and "padding" in s.inline_reason for s in padded.sites)
    off = mcompile.explain(tiny_llama("sdpa"), ids, options={**OPTS, "inline_kernels": False})
    assert all(s.inline_reason == "inline_kernels=False" for s in off.sites)


def _traced_ops(fn, x):
    from torch.fx.experimental.proxy_tensor import make_fx

    gm = make_fx(fn, tracing_mode="symbolic")(x)
    torch.testing.assert_close(gm(x), fn(x))
    return [n.target for n in gm.graph.nodes if n.op == "call_function"]


def _add_or_sub(q, k):
    return flat_cond(q.shape[2] >= 5, lambda q, k: (q + k).transpose(1, 2).contiguous(),
                     lambda q, k: (q - k).transpose(1, 2).contiguous(), (q, k))


def test_conditional_operands_cross_in_memory_order_without_copies():
    """(B, H, N, D) views of (B, N, H, D) storage (attention's q/k/v in transformers) cross a
    conditional as they are stored: no copy; operands that share storage are copied (cond
    rejects aliased operands)."""
    x = torch.randn(2, 7, 2, 4)  # (B, N, H, D)
    as_heads = lambda t: t.transpose(1, 2)  # noqa: E731
    assert memory_order(as_heads(x)) == (0, 2, 1, 3)
    assert memory_order(x) == (0, 1, 2, 3)
    assert memory_order(x.transpose(0, 3)) == (0, 1, 2, 3)  # not proven: the identity (then a copy)
    separate = _traced_ops(lambda x: _add_or_sub(as_heads(x), as_heads(x * 2)), x)
    assert torch.ops.aten.clone.default not in separate
    shared = _traced_ops(lambda x: _add_or_sub(as_heads(x), as_heads(x)[:, :1].expand(-1, 2, -1, -1)), x)
    assert shared.count(torch.ops.aten.clone.default) == 2


def test_inlined_attention_returns_the_models_layout():
    """The output is a (B, H, N, D) view of (B, N, H, D) storage, so the model's
    ``transpose(1, 2).reshape`` after attention copies nothing; values are the reference's."""
    q, k, v = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in qkv(2, 4, 2, 230, 16))
    for n in (100, 230):  # dense, then sparse (dense_below 200)
        out = lowering.sparse_attention(q[:, :, :n], k[:, :, :n], v[:, :, :n], [2] * 4, [30] * 4, [100] * 4,
                                      0.25, 200)
        assert out.shape == (2, 4, n, 16) and out.transpose(1, 2).is_contiguous()
        index = torch.ops.mcompile.estimate_index(q[:, :, :n], k[:, :, :n], None, [2] * 4, [30] * 4, [100] * 4,
                                                  0.25, 0)
        ref = torch.ops.mcompile.sparse_attention(q[:, :, :n], k[:, :, :n], v[:, :, :n], *index, None, 0.25, 200)
        torch.testing.assert_close(out, ref)


def test_kernel_op_is_the_reference_off_cuda():
    q, k, v = qkv(2, 4, 2, 200, 16)
    index = torch.ops.mcompile.estimate_index(q, k, None, [2] * 4, [30] * 4, [100] * 4, 0.25, 0)
    out = torch.ops.mcompile.sparse_attention_kernel(q, k, v, *index, 0.25)
    torch.testing.assert_close(out, sparse_attention_ref(q, k, v, SparseIndex(*index), 0.25))
    assert not bool(torch.ops.mcompile.dense_check(index[0], index[1], index[4], index[6], 200))


def test_bad_option_is_a_clear_error():
    with pytest.raises(ValueError, match="inline_kernels must be None, True or False"):
        mcompile.MInferenceConfig(inline_kernels="yes")


def test_inline_reason_needs_whole_prompt_and_constant_scale():
    q, k, v = qkv(1, 4, 2, 100, 16)
    assert lowering.inline_reason(q, k, v, None, 0.25) is None
    assert "prefix" in lowering.inline_reason(q[:, :, -70:], k, v, None, 0.25)
    assert "scale" in lowering.inline_reason(q, k, v, None, -1.0)


@pytest.mark.parametrize("pattern", [VS, BLOCK_MASS], ids=["vertical_slash", "block_mass"])
def test_failed_inlined_compile_falls_back_to_the_opaque_ops(monkeypatch, pattern):
    """Auto-inlining depends on torch.cond's lowering: if compiling it fails, the backend compiles
    the opaque ops instead, says why in the report and counts it, and the model still runs (also
    for block-mass, whose conditional holds the opaque kernel op)."""
    import functools

    from mcompile.backend import minference_backend
    from mcompile.passes import rewrite

    def fail(*args, **kwargs):
        raise RuntimeError("simulated lowering failure")

    # Inline on the CPU as auto would on CUDA; the inlined attention fails to trace.
    monkeypatch.setattr(rewrite, "inline_decision", lambda site, config: (config.inline_kernels is not False, ""))
    monkeypatch.setattr(lowering, "sparse_attention", fail)
    reports = []
    model = tiny_llama("sdpa")
    backend = functools.partial(minference_backend, options={**OPTS, "default_pattern": pattern},
                                report_sink=reports.append)
    compiled = torch.compile(model, backend=backend)
    ids = _ids(300)
    with torch.no_grad():
        out = compiled(ids, use_cache=False).logits
    ref = torch.compile(model, backend="minference", options={**OPTS, "default_pattern": pattern, "inline_kernels": False})
    with torch.no_grad():
        torch.testing.assert_close(out, ref(ids, use_cache=False).logits)
    assert counters["mcompile"]["inline_failed"] >= 1
    site = reports[-1].sites[0]
    assert site.rewritten and not site.inlined and "inlined compile failed (RuntimeError)" in site.inline_reason
    # Asked for explicitly, the failure is the user's to see.
    torch._dynamo.reset()
    forced = torch.compile(model, backend="minference", options={**OPTS, "default_pattern": pattern, "inline_kernels": True})
    with pytest.raises(Exception, match="simulated lowering failure"), torch.no_grad():
        forced(ids, use_cache=False)


def test_layers_share_one_compiled_region():
    """Every layer's attention conditionals (and MLP conditional) are one shared region: Inductor
    generates each once and calls it per layer (compile time); off, each layer has its own."""
    import re

    from mcompile.conditional import shared_regions

    model = tiny_llama("sdpa", layers=3)
    calls, logits = {}, {}
    for enabled in (True, False):
        torch._dynamo.reset()
        compiled = torch.compile(model, backend="minference", dynamic=True, options={**OPTS, "inline_kernels": True})
        with shared_regions(enabled), torch.no_grad():
            out, code = run_and_get_code(compiled, _ids(300), use_cache=False)
        calls[enabled] = re.findall(r"= (repeated_subgraph\d+)\(repeated_subgraph\d+_args\)", "\n".join(code))
        logits[enabled] = out.logits
    torch.testing.assert_close(logits[True], logits[False], rtol=1e-5, atol=1e-5)
    assert len(calls[True]) == 6 and len(set(calls[True])) == 2  # attention and MLP, 3 layers each
    assert calls[False] == []
