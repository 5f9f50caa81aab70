"""The one lowering of sparse attention (passes/lowering.py): a torch.cond between dense attention
and estimation + the sparse kernel, one graph for every length, the kernel either a triton_op in
Inductor's code (inlined) or the opaque op, with the same results.

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

from .helpers import exception_notes, qkv

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


def _reference(q, k, v, dense_below=200, kinds=(2,) * 4, p0=(30,) * 4, p1=(100,) * 4, scale=0.25):
    """What the lowering computes, from the ops: dense where ``ops.runs_dense`` says so."""
    from mcompile import ops

    if ops.runs_dense(q.shape[2], k.shape[2], dense_below):
        return ops.dense_attention(q, k, v, None, scale)
    index = torch.ops.mcompile.estimate_index(q, k, None, list(kinds), list(p0), list(p1), scale)
    return torch.ops.mcompile.sparse_attention(q, k, v, *index, None, scale)


@pytest.mark.parametrize("pattern", [VS, BLOCK_MASS], ids=["vertical_slash", "block_mass"])
def test_one_graph_branches_between_dense_and_sparse_at_run_time(pattern):
    """The length test is in Inductor's code with the kernel inlined or in the opaque op (and
    block-mass, whose block lists are sized at run time, always in the opaque op); a short
    prompt runs no estimation. Same logits either way, one graph for every length."""
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
        assert "< 200" in text and "torch.ops.mcompile.estimate_index" in text  # the test in Inductor's wrapper
        assert ("dense_check" in text) == (inlined and pattern is VS)
    for a, b in zip(outputs[False], outputs[True]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


class _Chunk(torch.nn.Module):
    """A chunk of queries after cached keys: the key length is ``past + chunk``, a compound size
    (the chunk's bottom-right causal mask built from positions, as (Nq, N))."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(32, 96, bias=False)

    def forward(self, x, k_past, v_past):
        c = x.shape[1]
        q, k, v = self.proj(x).view(1, c, 6, 16).transpose(1, 2).split([2, 2, 2], dim=1)
        k, v = torch.cat([k_past, k], 2), torch.cat([v_past, v], 2)
        keys, rows = torch.arange(k.shape[2]), torch.arange(c) + (k.shape[2] - c)
        mask = keys[None, :] <= rows[:, None]
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2)


@pytest.mark.parametrize("dense_below", [0, 300])
def test_chunk_after_cached_keys_compiles_with_its_compound_key_length(dense_below):
    """The key length ``past + chunk`` is no size of its own: the conditional and the shared region
    take its symbols as operands (conditional._free_symbols), else Inductor cannot generate the
    branches' code. Inductor's output equals the rewritten graph run eagerly at every (past, chunk),
    dense (under ``dense_below``) and sparse, and dense attention where the pattern covers every key."""
    torch.manual_seed(0)
    module = _Chunk()
    cases = [(200, 150), (300, 170), (40, 100)]  # sparse, sparse, dense under 300 keys
    outs = {}
    for pattern in ({"kind": "a_shape", "sink": 64, "local": 128}, {"kind": "a_shape", "sink": 1000, "local": 1000}):
        for compiler in ("inductor", "eager"):
            torch._dynamo.reset()
            counters.clear()
            compiled = torch.compile(module, backend="minference", dynamic=True,
                                     options={"dense_below": dense_below, "pattern_db": None,
                                              "default_pattern": pattern, "compiler": compiler})
            for past, chunk in cases:
                g = torch.Generator().manual_seed(past)
                x, k_past, v_past = torch.randn(1, chunk, 32, generator=g), *torch.randn(2, 1, 2, past, 16, generator=g)
                with torch.no_grad():
                    outs[pattern["sink"], compiler, past] = (compiled(x, k_past, v_past), module(x, k_past, v_past))
            assert counters["mcompile"]["rewritten"] == 1
    for past, _ in cases:
        inductor, dense = outs[64, "inductor", past]
        torch.testing.assert_close(inductor, outs[64, "eager", past][0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(outs[1000, "inductor", past][0], dense, rtol=1e-5, atol=1e-5)
        if past == 40:  # 140 keys: under dense_below, or all within 64 sink + 128 local keys
            torch.testing.assert_close(inductor, dense, rtol=1e-5, atol=1e-5)
        else:
            assert (inductor - dense).abs().max() > 1e-2  # sparse: keys the A-shape leaves out


@pytest.mark.parametrize("b", [1, 3])
def test_fused_projection_views_and_batches(b):
    compiled = torch.compile(_Fused(), backend="minference", options={**OPTS, "inline_kernels": True})
    for n in (150, 333):
        x = _fused_input(b, n)
        with torch.no_grad():
            out = compiled(x)
        q, k, v = x[:, :4], x[:, 4:6], x[:, 6:]
        torch.testing.assert_close(out, _reference(q, k, v), rtol=1e-5, atol=1e-5)
    assert counters["mcompile"]["rewritten"] >= 1


def test_explain_reports_inlining_and_why_not():
    ids = _ids(300)
    e = mcompile.explain(tiny_llama("sdpa"), ids, options={**OPTS, "inline_kernels": True})
    assert all(s.inlined for s in e.sites) and "+inlined" in e.table()
    # Estimation lives inside the conditional's sparse branch.
    code = e.graph_code()
    assert "mcompile_passes_lowering_sparse_attention(" in code and "estimate_index" not in code
    assert "kernel inlined into Inductor's code" in e.summary()
    # block-mass: the kernel in the opaque op (block lists sized at run time)
    bm = mcompile.explain(tiny_llama("sdpa"), ids, options={**OPTS, "default_pattern": BLOCK_MASS,
                                                            "inline_kernels": True})
    assert all(s.rewritten and not s.inlined for s in bm.sites) and "+inlined" not in bm.table()
    assert "kernel in the opaque op: block-mass" in bm.summary()
    auto = mcompile.explain(tiny_llama("sdpa"), ids, options=OPTS)  # auto inlines on CUDA only
    assert not any(s.inlined for s in auto.sites)
    assert all(s.inline_reason.startswith("device cpu") for s in auto.sites)
    assert "kernel in the opaque op: device cpu" in auto.summary()
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
        out = lowering.sparse_attention(q[:, :, :n], k[:, :, :n], v[:, :, :n], None, [2] * 4, [30] * 4, [100] * 4,
                                        0.25, 200)
        assert out.shape == (2, 4, n, 16) and out.transpose(1, 2).is_contiguous()
        torch.testing.assert_close(out, _reference(q[:, :, :n], k[:, :, :n], v[:, :, :n]))


def test_kernel_op_is_the_reference_off_cuda():
    q, k, v = qkv(2, 4, 2, 200, 16)
    index = torch.ops.mcompile.estimate_index(q, k, None, [2] * 4, [30] * 4, [100] * 4, 0.25)
    out = torch.ops.mcompile.sparse_attention_kernel(q, k, v, *index, 0.25)
    torch.testing.assert_close(out, sparse_attention_ref(q, k, v, SparseIndex(*index), 0.25))
    assert not bool(torch.ops.mcompile.dense_check(index[0], index[1], index[4], index[6], 200))


def test_bad_option_is_a_clear_error():
    with pytest.raises(ValueError, match="inline_kernels must be None, True or False"):
        mcompile.MInferenceConfig(inline_kernels="yes")


def test_kernel_reason_needs_whole_prompt_and_constant_scale():
    q, k, v = qkv(1, 4, 2, 100, 16)
    assert lowering.kernel_reason(q, k, v, None, 0.25, False) is None
    assert "prefix" in lowering.kernel_reason(q[:, :, -70:], k, v, None, 0.25, False)
    assert "scale" in lowering.kernel_reason(q, k, v, None, -1.0, False)
    assert "padding" in lowering.kernel_reason(q, k, v, torch.ones(1, 100, dtype=torch.bool), 0.25, False)
    assert "sized at run time" in lowering.kernel_reason(q, k, v, None, 0.25, True)


def test_failed_compile_is_raised_with_a_note(monkeypatch):
    """No second compile behind the user's back: a failure inside the lowering reaches the user,
    with a note naming the rewritten parts and the options that leave them out."""
    def fail(*args, **kwargs):
        raise RuntimeError("simulated lowering failure")

    monkeypatch.setattr(lowering, "sparse_attention", fail)
    compiled = torch.compile(tiny_llama("sdpa"), backend="minference", options=OPTS)
    with pytest.raises(Exception, match="simulated lowering failure") as info, torch.no_grad():
        compiled(_ids(300), use_cache=False)
    notes = exception_notes(info.value)
    assert "inline_kernels" in notes and "chunk_mlp" in notes


def test_layers_share_one_compiled_region():
    """Every layer's attention conditionals (and MLP conditional) are one shared region: Inductor
    generates each once and calls it per layer (compile time); the logits are those of the graph
    run as written (compiler="eager", no region)."""
    import re

    model = tiny_llama("sdpa", layers=3)
    compiled = torch.compile(model, backend="minference", dynamic=True, options={**OPTS, "inline_kernels": True})
    with torch.no_grad():
        out, code = run_and_get_code(compiled, _ids(300), use_cache=False)
        torch._dynamo.reset()
        plain = torch.compile(model, backend="minference", options={**OPTS, "inline_kernels": True, "compiler": "eager"})
        ref = plain(_ids(300), use_cache=False).logits
    calls = re.findall(r"= (repeated_subgraph\d+)\(repeated_subgraph\d+_args\)", "\n".join(code))
    torch.testing.assert_close(out.logits, ref, rtol=1e-5, atol=1e-5)
    assert len(calls) == 6 and len(set(calls)) == 2  # attention and MLP, 3 layers each
