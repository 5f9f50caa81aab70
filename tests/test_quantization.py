"""Quantized models through the minference backend (CPU): torchao's int8 weight-only and int8
dynamic-activation Linear layers are tensor subclasses, which the chunked MLP cannot take (its op,
torch.cond and invoke_subgraph have no rule for them). The attention is still rewritten (it has no
weights), the MLPs are kept with a reason, and the logits match the eagerly run quantized model
under dynamic and static shapes, with Inductor. Plus a failed compile's note naming the MLP."""

import functools
import logging

import pytest
import torch
from torch._dynamo.utils import counters

from mcompile.passes import lowering
from mcompile.backend import minference_backend
from mcompile.explain import explain
from mcompile.tools.models import tiny_llama

from .helpers import exception_notes

torchao_quant = pytest.importorskip("torchao.quantization")

# The pattern covers every key at these lengths, so sparse attention equals dense exactly.
COVER = {"dense_below": 0, "default_pattern": {"kind": "vertical_slash", "vertical": 4096, "slash": 4096}}
LENGTHS = (37, 70)  # two prompt lengths through one dynamic graph (odd, and above 64)
LAYERS = 1  # one decoder layer: Inductor compiles of quantized models take seconds each on a CPU
EXACT_TOL = dict(atol=1e-5, rtol=1e-5)  # the same quantized arithmetic: float rounding only
KEPT = "is a torchao "  # then the class: Int8Tensor (torchao 0.18), AffineQuantizedTensor (older)


def _configs():
    return {"int8_weight_only": torchao_quant.Int8WeightOnlyConfig(),
            "int8_dynamic_activation": torchao_quant.Int8DynamicActivationInt8WeightConfig()}


def _quantized(config_name: str) -> torch.nn.Module:
    model = tiny_llama("sdpa", layers=LAYERS).eval()
    torchao_quant.quantize_(model, _configs()[config_name])
    return model


def _ids(n: int) -> torch.Tensor:
    return torch.randint(0, 128, (1, n), generator=torch.Generator().manual_seed(n))


def _logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(ids, use_cache=False).logits


def _minference(model, memory: list, dynamic: bool, **options):
    backend = functools.partial(minference_backend, options={**COVER, **options}, memory_sink=memory.append)
    return torch.compile(model, backend=backend, dynamic=dynamic)


def _assert_mlps_kept(memory: list) -> None:
    """Every MLP of every compiled graph kept, with the reason naming the quantized weight."""
    assert memory and all(r.applied("chunked_mlp") == 0 for r in memory)
    reasons = [reason for r in memory for reason in r.reasons("chunked_mlp")]
    assert len(reasons) == len(memory) * LAYERS, reasons
    assert all(KEPT in reason and "tensor subclass" in reason for reason in reasons), reasons
    assert counters["mcompile"]["chunked_mlp"] == 0


@pytest.mark.parametrize("config_name", ["int8_weight_only", "int8_dynamic_activation"])
def test_quantized_model_dynamic_shapes_equal_eager(config_name, caplog):
    """Inductor, dynamic=True: one graph serves both lengths, attention rewritten, MLPs kept, no
    fallback warning. Weight-only matches eager to rounding. Dynamic activation quantization
    rounds x / scale in Inductor's fused kernel, where a tie can land one int8 step away from
    eager's: there the logits equal plain Inductor's, and eager's within what Inductor's own are."""
    model = _quantized(config_name)
    memory = []
    compiled = _minference(model, memory, dynamic=True)
    inductor = torch.compile(model, backend="inductor", dynamic=True)
    with caplog.at_level(logging.WARNING, logger="mcompile"):
        for n in LENGTHS:
            ids = _ids(n)
            ref, out = _logits(model, ids), _logits(compiled, ids)
            if config_name == "int8_weight_only":
                torch.testing.assert_close(out, ref, **EXACT_TOL)
            else:
                plain = _logits(inductor, ids)
                torch.testing.assert_close(out, plain, **EXACT_TOL)
                assert (out - ref).abs().max() <= (plain - ref).abs().max() + EXACT_TOL["atol"]
    assert len(memory) == 1  # no recompile for the second length
    assert counters["mcompile"]["rewritten"] >= LAYERS and counters["mcompile"]["kept_dense"] == 0
    _assert_mlps_kept(memory)
    assert not [r for r in caplog.records if "failed" in r.getMessage()]


def test_quantized_model_static_shapes_equal_eager():
    """dynamic=False (a graph per length, the conditional known at trace time): same outcome."""
    model = _quantized("int8_weight_only")
    memory = []
    compiled = _minference(model, memory, dynamic=False, compiler="aot_eager")
    for n in LENGTHS:
        ids = _ids(n)
        torch.testing.assert_close(_logits(compiled, ids), _logits(model, ids), **EXACT_TOL)
    assert len(memory) == len(LENGTHS) and counters["mcompile"]["rewritten"] == len(LENGTHS) * LAYERS
    _assert_mlps_kept(memory)


def test_explain_names_the_quantized_weight():
    model = _quantized("int8_dynamic_activation")
    lines = explain(model, _ids(LENGTHS[0]), options=COVER, use_cache=False).memory_lines()
    mlp = [line for line in lines if " chunked_mlp " in line]
    assert len(mlp) == LAYERS and all(f"kept: the weight of gate_proj {KEPT}" in line for line in mlp), lines


def test_plain_mlp_still_chunked():
    """Negative case of the refusal: the same model unquantized has its MLPs chunked."""
    model = tiny_llama("sdpa", layers=LAYERS).eval()
    memory = []
    ids = _ids(LENGTHS[0])
    out = _logits(_minference(model, memory, dynamic=True, compiler="aot_eager"), ids)
    torch.testing.assert_close(out, _logits(model, ids), **EXACT_TOL)
    assert memory[-1].applied("chunked_mlp") == LAYERS and counters["mcompile"]["chunked_mlp"] >= LAYERS


def test_failed_mlp_compile_is_raised_with_a_note(monkeypatch):
    """A compile that fails in the chunked MLP's conditional is the user's to see (no second
    compile behind their back), with a note naming the MLP and the option that leaves it out."""
    def fail(*args, **kwargs):
        raise RuntimeError("simulated conditional failure")

    monkeypatch.setattr(lowering, "gated_mlp", fail)
    model = tiny_llama("sdpa", layers=LAYERS).eval()
    with pytest.raises(Exception, match="simulated conditional failure") as info:
        _logits(_minference(model, [], dynamic=False, compiler="aot_eager"), _ids(LENGTHS[0]))
    notes = exception_notes(info.value)
    assert "the chunked MLP (options={'chunk_mlp': False}" in notes
