"""The memory passes (passes/memory.py) on tiny random models (CPU): last-position logits and the
chunked MLP against eager, counters, off switches, refusals with reasons, the O(N^2) check, and
the chunked MLP's bounded peak memory (in a subprocess, by ru_maxrss)."""

import functools
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch._dynamo.utils import counters

from mcompile.backend import minference_backend
from mcompile.kernels.act_mul import ACTIVATIONS
from mcompile.ops import chunked_mlp, mlp_ref
from mcompile.tools.models import tiny_llama

COVER = {"dense_below": 0, "default_pattern": {"kind": "vertical_slash", "vertical": 4096, "slash": 4096}}
CHUNK = 64  # tokens per MLP chunk in these tests: several chunks per prompt, and a ragged last one
LAYERS = 2


def _ids(b=2, n=150, seed=0):
    return torch.randint(0, 128, (b, n), generator=torch.Generator().manual_seed(seed))


def _compile(model, reports=None, dynamic=False, **options):
    backend = functools.partial(minference_backend, options={**COVER, "mlp_chunk": CHUNK, **options},
                                memory_sink=reports.append if reports is not None else None)
    return torch.compile(model, backend=backend, dynamic=dynamic)


FAST = {"compiler": "eager"}  # tests of what the passes decide need no Inductor compile


def _logits(model, ids, **kw):
    with torch.no_grad():
        return model(ids, **kw).logits


@pytest.mark.parametrize("model_type", ["llama", "gemma"])  # SwiGLU; GeGLU (tanh GELU)
def test_last_logits_and_chunked_mlp_equal_eager(model_type):
    """Compiled by Inductor, the rewritten model gives the last logits of the eager model."""
    model = tiny_llama("sdpa", layers=LAYERS, model_type=model_type)
    ids = _ids(2, 150)
    ref = _logits(model, ids)
    reports = []
    out = _logits(_compile(model, reports, logits="last"), ids)
    assert out.shape == (2, 1, ref.shape[-1])
    torch.testing.assert_close(out[:, 0], ref[:, -1], atol=1e-4, rtol=1e-4)
    assert counters["mcompile"]["last_logits"] == 1 and counters["mcompile"]["chunked_mlp"] == LAYERS
    assert reports[-1].applied("chunked_mlp") == LAYERS and reports[-1].applied("last_logits") == 1


def test_dynamic_lengths_one_graph():
    """One graph for every length (no guard on N): chunk counts 2, 5 and 1 (shorter than a chunk)."""
    model = tiny_llama("sdpa", layers=LAYERS)
    compiled = _compile(model, dynamic=True, logits="last")
    for n in (100, 257, 40):
        ids = _ids(1, n, seed=n)
        torch.testing.assert_close(_logits(compiled, ids)[:, 0], _logits(model, ids)[:, -1], atol=1e-4, rtol=1e-4)
    assert counters["stats"]["unique_graphs"] == 1


def test_logits_to_keep_one_is_left_alone():
    model = tiny_llama("sdpa", layers=1)
    ids = _ids(1, 90)
    reports = []
    out = _logits(_compile(model, reports, logits="last", **FAST), ids, logits_to_keep=1)
    torch.testing.assert_close(out, _logits(model, ids, logits_to_keep=1), atol=1e-4, rtol=1e-4)
    assert counters["mcompile"]["last_logits"] == 0
    assert reports[-1].reasons("last_logits") == ["the lm_head already sees one position (logits_to_keep=1)"]


def test_off_switches_keep_the_graph():
    model = tiny_llama("sdpa", layers=LAYERS)
    ids = _ids(1, 120)
    reports = []
    out = _logits(_compile(model, reports, logits="all", chunk_mlp=False, **FAST), ids)
    assert out.shape[1] == 120
    torch.testing.assert_close(out, _logits(model, ids), atol=1e-4, rtol=1e-4)
    assert counters["mcompile"]["last_logits"] == 0 and counters["mcompile"]["chunked_mlp"] == 0
    assert reports[-1].reasons("chunked_mlp") == ["switched off (chunk_mlp=False)"] * LAYERS
    assert reports[-1].reasons("last_logits") == ["switched off (logits='all')"]


@pytest.mark.parametrize("model_type,overrides,reason", [
    ("phi3", {"pad_token_id": 0}, "not a gated MLP: 2 Linear layer(s)"),  # fused gate_up_proj + chunk
    ("llama", {"hidden_act": "relu"}, "activation ['relu'] not supported"),
])
def test_unsupported_mlp_kept_with_reason(model_type, overrides, reason):
    model = tiny_llama("sdpa", layers=1, model_type=model_type, **overrides)
    ids = _ids(1, 100)
    reports = []
    out = _logits(_compile(model, reports, **FAST), ids)
    torch.testing.assert_close(out, _logits(model, ids), atol=1e-4, rtol=1e-4)
    assert counters["mcompile"]["chunked_mlp"] == 0 and counters["mcompile"]["mlp_kept"] == 1
    assert reports[-1].reasons("chunked_mlp")[0].startswith(reason)


def test_logits_feeding_a_loss_are_not_sliced():
    model = tiny_llama("sdpa", layers=1)
    ids = _ids(1, 100)
    reports = []
    with torch.no_grad():
        out = _compile(model, reports, logits="last", **FAST)(ids, labels=ids)
        ref = model(ids, labels=ids)
    torch.testing.assert_close(out.loss, ref.loss, atol=1e-4, rtol=1e-4)
    assert counters["mcompile"]["last_logits"] == 0
    assert "may need every position" in reports[-1].reasons("last_logits")[0]


def test_grad_enabled_keeps_mlp():
    model = tiny_llama("sdpa", layers=1)
    reports = []
    _compile(model, reports, **FAST)(_ids(1, 100))  # autograd on: the ops are inference-only
    assert counters["mcompile"]["chunked_mlp"] == 0
    assert reports[-1].reasons("chunked_mlp") == ["gradients are enabled: the chunked MLP is inference-only"]


def test_quadratic_tensors_reported_only_when_attention_stays_dense():
    model = tiny_llama("eager", layers=1)
    ids = _ids(1, 100)
    reports = []
    _logits(_compile(model, reports, default_pattern={"kind": "dense"}, **FAST), ids)
    dense = [s.reason for s in reports[-1].sites if s.pass_name == "quadratic"]
    assert any("(1, 4, 100, 100)" in r for r in dense), dense  # the eager attention scores
    torch._dynamo.reset()
    reports.clear()
    _logits(_compile(model, reports, **FAST), ids)
    assert [s for s in reports[-1].sites if s.pass_name == "quadratic"] == []


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("shape,chunk", [((2, 97, 24), 16), ((1, 33, 24), 64), ((5, 24), 5)])
def test_chunked_mlp_op_equals_reference(activation, shape, chunk):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(*shape, generator=g)
    wg, wu, wd = torch.randn(40, 24, generator=g), torch.randn(40, 24, generator=g), torch.randn(24, 40, generator=g)
    biases = [torch.randn(40, generator=g), torch.randn(40, generator=g), torch.randn(24, generator=g)]
    out = chunked_mlp(x, wg, wu, wd, *biases, activation, chunk)
    torch.testing.assert_close(out, mlp_ref(x, wg, wu, wd, *biases, activation=activation), atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="activation must be one of"):
        chunked_mlp(x, wg, wu, wd, None, None, None, "relu", chunk)


def test_config_validates_memory_options():
    from mcompile.config import MInferenceConfig

    with pytest.raises(ValueError, match=r"logits must be one of \['all', 'last'\]"):
        MInferenceConfig(logits="first")
    with pytest.raises(ValueError, match=r"mlp_chunk must be an int in \[1, 2\*\*63 - 1\]"):
        MInferenceConfig(mlp_chunk=0)


def test_act_mul_triton_kernel_under_interpreter():
    """The CUDA activation-multiply kernel, run by Triton's interpreter on CPU."""
    triton = pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    code = textwrap.dedent("""
        import torch
        from mcompile.kernels.act_mul_triton import act_mul_triton
        from mcompile.kernels.act_mul import ACTIVATIONS, act_mul_ref
        g, u = torch.randn(3, 1000) * 3, torch.randn(3, 1000)
        for act in ACTIVATIONS:
            err = (act_mul_triton(g.clone(), u, act) - act_mul_ref(g, u, act)).abs().max().item()
            assert err < 1e-5, (act, err)
        print("ok")
    """)
    assert triton is not None
    run = subprocess.run([sys.executable, "-c", code], check=False, env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and "ok" in run.stdout, run.stderr[-2000:]


MEMORY_SCRIPT = """
import functools, re, sys, torch
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaMLP
from mcompile.backend import minference_backend

class Block(torch.nn.Module):  # a decoder layer's MLP, under the module name the pass looks for
    def __init__(self):
        super().__init__()
        self.mlp = LlamaMLP(LlamaConfig(hidden_size={hidden}, intermediate_size={inter}))
    def forward(self, x):
        return x + self.mlp(x)

block = Block().eval()
backend = functools.partial(minference_backend, options={{"chunk_mlp": {chunked}, "mlp_chunk": {chunk}}})
f = torch.compile(block, backend=backend, dynamic=True)
with torch.no_grad():
    f(torch.randn(1, {warm}, {hidden}))  # compiles, and sizes the matmul library's buffers for a chunk
    x = torch.randn(1, {tokens}, {hidden})
    kib = lambda key: int(re.search(key + r":\s+(\d+) kB", open("/proc/self/status").read()).group(1))
    # Reset the peak (VmHWM) to the current RSS: a cold Inductor compile above can peak higher
    # than the run being measured, which would hide it under a high-water mark.
    open("/proc/self/clear_refs", "w").write("5")
    before = kib("VmRSS")
    f(x)
    after = kib("VmHWM")
print((after - before) // 1024)  # MiB of new peak
"""
MEM_TOKENS, MEM_HIDDEN, MEM_INTER, MEM_CHUNK = 16384, 64, 4096, 1024
MIB = 2 ** 20
# glibc serves blocks above this from mmap and unmaps them when freed. Fixing it stops glibc from
# raising the threshold after the first large free, which keeps later freed chunks in the heap
# and made the chunked run's high-water mark vary (27-160 MiB) with no change of live memory.
MMAP_THRESHOLD = 1 << 20
INTERMEDIATE_MIB = MEM_TOKENS * MEM_INTER * 4 // MIB  # one fp32 N x intermediate_size tensor: 256 MiB


def _peak_mib(chunked: bool) -> int:
    code = MEMORY_SCRIPT.format(hidden=MEM_HIDDEN, inter=MEM_INTER, chunked=chunked, chunk=MEM_CHUNK,
                                tokens=MEM_TOKENS, warm=2 * MEM_CHUNK)
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD)}
    run = subprocess.run([sys.executable, "-c", code], check=False, env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    return int(run.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(sys.platform != "linux", reason="reads and resets the peak RSS through /proc (Linux)")
def test_chunked_mlp_bounds_peak_memory():
    """Unchunked, Inductor's run raises the process's peak by more than one N x intermediate_size
    tensor (N x 4096 fp32, 256 MiB; measured 511 MiB: gate and up live at once); chunked, by
    less than half of one (measured 67 MiB: a 1024-token chunk's gate, up and product are 16 MiB
    each, plus the output and the allocator's slack)."""
    unchunked, chunked = _peak_mib(False), _peak_mib(True)
    assert unchunked > INTERMEDIATE_MIB, (unchunked, chunked)
    assert chunked < INTERMEDIATE_MIB // 2 and 3 * chunked < unchunked, (unchunked, chunked)


def _trig_calls(compiled, ids) -> tuple:
    """(logits, number of cos calls and of sin calls in Inductor's generated code)."""
    import re

    from torch._inductor.utils import run_and_get_code

    with torch.no_grad():
        out, code = run_and_get_code(compiled, ids)
    src = "\n".join(code)
    return out.logits, len(re.findall(r"\bcos\(", src)), len(re.findall(r"\bsin\(", src))


def test_rope_tables_computed_once():
    """The cos / sin tables that every layer reads are stored once (one cos and one sin in the
    generated code) instead of recomputed in each reader, with the eager model's logits at two
    lengths of one dynamic graph; rope_once=False leaves Inductor recomputing them."""
    model = tiny_llama("sdpa", layers=3)
    reports = []
    compiled = _compile(model, reports, dynamic=True)
    for n in (150, 77):
        ids = _ids(2, n, seed=n)
        logits, cos, sin = _trig_calls(compiled, ids)
        torch.testing.assert_close(logits, _logits(model, ids), atol=1e-4, rtol=1e-4)
    assert (cos, sin) == (1, 1)
    assert reports[-1].applied("rope_once") == 2
    assert counters["mcompile"]["rope_once"] > 0 and counters["mcompile"]["rope_once"] % 2 == 0
    assert {s.module for s in reports[-1].sites if s.pass_name == "rope_once"} == {"model.rotary_emb"}
    torch._dynamo.reset()
    reports.clear()
    ids = _ids(2, 150, seed=150)
    logits, cos, sin = _trig_calls(_compile(model, reports, rope_once=False), ids)
    torch.testing.assert_close(logits, _logits(model, ids), atol=1e-4, rtol=1e-4)
    assert cos > 1 and sin > 1  # what the pass removes: one computation per reading kernel
    assert reports[-1].reasons("rope_once") == ["switched off (rope_once=False)"] * 2


def test_stored_values_are_no_ops_under_other_compilers():
    """Run as written (compiler="eager", what explain uses), the store prim returns its input:
    the passes apply as under Inductor and the output is the eager model's, at two lengths."""
    model = tiny_llama("sdpa", layers=2)
    reports = []
    compiled = _compile(model, reports, dynamic=True, **FAST)
    for n in (100, 63):
        ids = _ids(1, n, seed=n)
        torch.testing.assert_close(_logits(compiled, ids), _logits(model, ids), atol=1e-4, rtol=1e-4)
    assert reports[-1].applied("rope_once") == 2 and reports[-1].applied("store_residual") == 3


def test_residual_stream_stored_once_per_add():
    """Every residual add of a decoder layer that is read twice (the next norm and the next add)
    is stored: 2 per layer but the last layer's MLP add (read by the final norm only); the logits
    are the eager model's, and store_residual=False leaves them to Inductor."""
    model = tiny_llama("sdpa", layers=3)
    ids = _ids(2, 150)
    reports = []
    logits, _, _ = _trig_calls(_compile(model, reports, dynamic=True), ids)
    torch.testing.assert_close(logits, _logits(model, ids), atol=1e-4, rtol=1e-4)
    sites = [s for s in reports[-1].sites if s.pass_name == "store_residual"]
    assert [s.module for s in sites] == [f"model.layers.{i}" for i in (0, 0, 1, 1, 2)]
    assert all(s.applied for s in sites)
    count = counters["mcompile"]["store_residual"]  # per backend call (Dynamo may call it twice)
    assert count > 0 and count % 5 == 0
    torch._dynamo.reset()
    reports.clear()
    logits, _, _ = _trig_calls(_compile(model, reports, store_residual=False), ids)
    torch.testing.assert_close(logits, _logits(model, ids), atol=1e-4, rtol=1e-4)
    assert reports[-1].reasons("store_residual") == ["switched off (store_residual=False)"] * 5


def test_torch_without_the_store_prim_keeps_values_with_reason(monkeypatch):
    from mcompile.passes import realize

    monkeypatch.setattr(realize, "_realize_op", lambda: None)
    model = tiny_llama("sdpa", layers=2)
    ids = _ids(1, 90)
    reports = []
    torch.testing.assert_close(_logits(_compile(model, reports), ids), _logits(model, ids), atol=1e-4, rtol=1e-4)
    reasons = reports[-1].reasons("rope_once") + reports[-1].reasons("store_residual")
    assert reasons == ["this torch has no prims.inductor_force_stride_order"] * 5
