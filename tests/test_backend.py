"""The backend on tiny random models (CPU): rewrite counters, compiled vs eager, negative cases,
options, dynamic shapes, generate(), regional compilation, explain."""

import functools

import pytest
import torch
from torch._dynamo.utils import counters

import mcompile
from mcompile.kernels import dispatch
from mcompile.tools.models import tiny_llama

from .helpers import masked_dense

# Tests of what the rewrite does compile the rewritten graph with aot_eager (AOTAutograd traces the
# ops as Inductor's front end does, without minutes of code generation on the CPU); INDUCTOR marks
# the tests that check Inductor's lowering and caching.
COVER = {"dense_below": 0, "compiler": "aot_eager",
         "default_pattern": {"kind": "vertical_slash", "vertical": 4096, "slash": 4096}}
SPARSE = {"dense_below": 0, "compiler": "aot_eager",
          "default_pattern": {"kind": "vertical_slash", "vertical": 30, "slash": 100}}
INDUCTOR = {"compiler": "inductor"}


def _ids(b=1, n=300, seed=0):
    return torch.randint(0, 128, (b, n), generator=torch.Generator().manual_seed(seed))


def _logits(model, ids, **kw):
    with torch.no_grad():
        return model(ids, **kw).logits


def test_backend_is_registered_by_entry_point():
    assert "minference" in torch._dynamo.list_backends()


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("padded", [False, True], ids=["nopad", "pad"])
def test_covering_budgets_equal_eager(impl, padded):
    model = tiny_llama(impl)
    ids, kw = _ids(2, 150), {}
    if padded:
        kw["attention_mask"] = torch.ones_like(ids)
        kw["attention_mask"][0, :20] = 0
    ref = _logits(model, ids, **kw)
    out = _logits(torch.compile(model, backend="minference", options={**COVER, **INDUCTOR}), ids, **kw)
    assert counters["mcompile"]["rewritten"] == 2 and counters["mcompile"]["kept_dense"] == 0
    rows = (slice(None), slice(20, None)) if padded else (slice(None), slice(None))
    torch.testing.assert_close(out[0][rows[1]], ref[0][rows[1]], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out[1], ref[1], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_sparse_budgets_equal_masked_dense_model(impl, monkeypatch):
    """With real (sparse) budgets, the compiled model equals the same model whose attention is
    dense with the index's mask materialised."""
    model = tiny_llama(impl, layers=2)
    ids = _ids(2, 400)
    out = _logits(torch.compile(model, backend="minference", options=SPARSE), ids)
    torch._dynamo.reset()

    def masked_impl(q):
        return lambda q, k, v, index, scale, kp, window=0: masked_dense(q, k, v, index, scale, kp).to(q.dtype)

    monkeypatch.setattr(dispatch, "attention_impl", masked_impl)
    ref = _logits(torch.compile(model, backend="minference", options=SPARSE), ids)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    dense = _logits(model, ids)
    assert (out - dense).abs().max() > 1e-3  # the pattern really dropped keys


def test_rewritten_graph_has_no_quadratic_mask():
    model = tiny_llama("sdpa", layers=1)
    ids = _ids(2, 100)
    mask = torch.ones_like(ids)
    mask[0, :7] = 0
    e = mcompile.explain(model, ids, attention_mask=mask, options={"dense_below": 0})
    code = "\n".join(line for line in e.graph_code().splitlines() if not line.strip().startswith("#"))
    assert "mcompile_passes_lowering_sparse_attention(" in code and "scaled_dot_product_attention" not in code
    assert "100, 100]" not in code  # no (.., N, N) tensor survives
    assert ".expand(2, 2, 2, 100, 16)" not in code  # repeat_kv is gone: K/V stay at KV-head count
    assert e.sites[0].key_padding


def test_dynamic_lengths_share_one_graph():
    model = tiny_llama("sdpa")
    compiled = torch.compile(model, backend="minference", dynamic=True, options=SPARSE)
    for n in (70, 150, 301):
        ref = _logits(model, _ids(1, n))
        out = _logits(compiled, _ids(1, n), use_cache=False)
        assert out.shape == ref.shape
    assert counters["stats"]["unique_graphs"] == 1
    assert counters["mcompile"]["rewritten"] >= 2  # Dynamo may restart once to specialise float scalars


def test_generate_tokens_equal_eager():
    model = tiny_llama("sdpa")
    prompts = [_ids(1, n, seed=n) for n in (90, 170, 250)]
    graphs = []
    with torch.no_grad():
        refs = [model.generate(p, max_new_tokens=6, do_sample=False) for p in prompts]
        model.compile(backend="minference", dynamic=True, options=COVER)
        outs = []
        for p in prompts:
            outs.append(model.generate(p, max_new_tokens=6, do_sample=False))
            graphs.append(counters["stats"]["unique_graphs"])
    for r, o in zip(refs, outs):
        assert torch.equal(r, o)
    assert graphs[0] == graphs[1] == graphs[2]  # no new graph for a new prompt length
    assert counters["mcompile"]["rewritten"] >= 2 and counters["mcompile"]["kept_dense"] >= 2


def test_decode_step_stays_dense_with_reason():
    reports = []
    model = tiny_llama("sdpa")
    with torch.no_grad():
        out = model(_ids(1, 50), use_cache=True)
        compiled = torch.compile(model, backend=functools.partial(
            mcompile.minference_backend, options={"dense_below": 0, "compiler": "aot_eager"},
            report_sink=reports.append))
        compiled(_ids(1, 1), past_key_values=out.past_key_values)
    reasons = {s.reason for r in reports for s in r.sites}
    assert any("query length differs from key length" in r for r in reasons), reasons


def test_regional_compilation_shares_one_graph():
    model = tiny_llama("sdpa", layers=4)
    ids = _ids(1, 120)
    ref = _logits(model, ids, use_cache=False)
    for layer in model.model.layers:
        layer.compile(backend="minference", options=COVER)
    out = _logits(model, ids, use_cache=False)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    assert counters["stats"]["unique_graphs"] == 1 and counters["mcompile"]["rewritten"] == 1


def test_regional_compilation_with_a_per_layer_database_says_what_to_do(tmp_path):
    from mcompile.pattern_db import ModelFingerprint, save, uniform
    from mcompile.patterns import DEFAULT_VERTICAL_SLASH

    db = tmp_path / "db.json"
    save(uniform(ModelFingerprint("llama", 2, 4, 2, 16), DEFAULT_VERTICAL_SLASH), db)
    model = tiny_llama("sdpa")
    model.model.layers[0].compile(backend="minference", options={"pattern_db": str(db)})
    with pytest.raises(Exception, match="compile the whole model"):
        _logits(model, _ids(1, 64), use_cache=False)


@pytest.mark.parametrize("options,message", [
    ({"sparsity": 0.5}, "unknown minference option"),
    ({"compiler": "tvm"}, "compiler must be one of"),
    ({"default_pattern": {"kind": "diagonal"}}, "unknown pattern kind"),
    ({"default_pattern": {"kind": "vertical_slash", "vertical": 10, "slash": 6096}}, "vertical must be >= 30"),
    ({"dense_below": -1}, r"dense_below must be an int in \[0, 2\*\*63 - 1\]"),
    ({"mode": "fastest"}, "mode must be one of"),
    ({"pattern_db": "no_such_db"}, "no pattern database"),
    ({"budget_length": -5}, r"budget_length must be an int in \[0, 2\*\*63 - 1\]"),
    ({"budget_exponent": 3.0}, r"budget_exponent must be a number in \[0, 2\]"),
    ({"logits": "first"}, "logits must be one of"),
    ({"rope_once": "yes"}, "rope_once must be True or False"),
    ({"store_residual": 1}, "store_residual must be True or False"),
])
def test_bad_options_are_clear_errors(options, message):
    model = tiny_llama("sdpa", layers=1)
    with pytest.raises(Exception, match=message):
        _logits(torch.compile(model, backend="minference", options=options), _ids(1, 10))


def test_mode_and_inductor_config_pass_through():
    cfg = mcompile.MInferenceConfig.from_options({"inductor_config": {"max_autotune": False}}, mode="max-autotune")
    patches = cfg.inductor_patches()
    assert patches["max_autotune"] is False  # explicit patches win over the mode's
    model = tiny_llama("sdpa", layers=1)
    out = _logits(torch.compile(model, backend="minference", mode="max-autotune-no-cudagraphs"), _ids(1, 20))
    assert torch.isfinite(out).all()


class _Encoder(torch.nn.Module):
    def forward(self, q, k, v):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v)


class _Window(torch.nn.Module):
    def forward(self, q, k, v):
        n = q.shape[2]
        i = torch.arange(n)
        mask = (i[None, None, None, :] <= i[None, None, :, None]) & (i[None, None, None, :] > i[None, None, :, None] - 16)
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)


class _Dropout(torch.nn.Module):
    def forward(self, q, k, v):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, dropout_p=0.1, is_causal=True)


class _Causal(torch.nn.Module):
    def forward(self, q, k, v):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)


@pytest.mark.parametrize("module,reason", [
    (_Encoder(), "non-causal"), (_Window(), None), (_Dropout(), "dropout_p=0.1"), (_Causal(), None)])
def test_only_provably_causal_attention_is_rewritten(module, reason):
    q, k, v = (torch.randn(1, 2, 80, 16) for _ in range(3))
    e = mcompile.explain(module, q, k, v, options={"dense_below": 0})
    (site,) = e.sites
    if reason is None:
        assert site.rewritten
        if isinstance(module, _Window):  # the window is the pattern, computed exactly
            assert "sliding window of 16 keys" in site.pattern_source
    else:
        assert not site.rewritten and reason in site.reason
    torch.manual_seed(0)
    if not isinstance(module, _Dropout):
        out = torch.compile(module, backend="minference", options={"dense_below": 0, "compiler": "aot_eager"})(q, k, v)
        torch.testing.assert_close(out, module(q, k, v), atol=1e-5, rtol=1e-5)


def test_autograd_graphs_stay_dense_with_reason():
    model = tiny_llama("sdpa")
    ids = _ids(1, 100)
    out = torch.compile(model, backend="minference", options=COVER)(ids).logits  # grad mode on
    torch.testing.assert_close(out, model(ids).logits, atol=1e-4, rtol=1e-4)
    assert counters["mcompile"]["kept_dense"] == 2 and counters["mcompile"]["rewritten"] == 0
    out.sum().backward()  # still trainable: the graph is dense
    assert model.lm_head.weight.grad is not None
    assert counters["mcompile"]["store_residual"] == 0  # the residual stream requires grad
    assert counters["mcompile"]["rope_once"] > 0  # RoPE's tables do not: stored, and backward runs


def test_explain_reports_layers_patterns_and_density():
    model = tiny_llama("sdpa")
    e = mcompile.explain(model, _ids(1, 200), options=SPARSE)
    text = str(e)
    assert e.rewritten == 2 and [s.layer for s in e.sites] == [0, 1]
    assert "vertical_slash(vertical=30, slash=100)" in text and "default pattern" in text
    assert e.density(e.sites[0], 100_000) < 0.01


def test_packed_sequences_stay_dense():
    """position_ids that restart (packed documents) make a block-diagonal mask: not causal."""
    model = tiny_llama("sdpa")
    ids = _ids(1, 120)
    pos = torch.cat([torch.arange(60), torch.arange(60)])[None]
    e = mcompile.explain(model, ids, position_ids=pos, use_cache=False, dynamic=True, options=COVER)
    assert e.rewritten == 0 and "position_ids" in e.sites[0].reason, e.sites[0].reason  # what the user passed
    out = _logits(torch.compile(model, backend="minference", dynamic=True, options=COVER), ids,
                  position_ids=pos, use_cache=False)
    torch.testing.assert_close(out, _logits(model, ids, position_ids=pos, use_cache=False), atol=1e-4, rtol=1e-4)


def test_rewritten_graph_is_a_structured_trace_artifact():
    """The rewritten graph reaches TORCH_TRACE / tlparse as the artifact mcompile_rewritten_graph."""
    import logging

    from torch._logging._internal import trace_log

    records = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage() + str(getattr(record, "metadata", "")))

    handler, level = Keep(), trace_log.level
    trace_log.addHandler(handler)
    trace_log.setLevel(logging.DEBUG)
    try:
        _logits(torch.compile(tiny_llama("sdpa", layers=1), backend="minference", options=COVER), _ids(1, 40))
    finally:
        trace_log.removeHandler(handler)
        trace_log.setLevel(level)
    assert any("mcompile_rewritten_graph" in r for r in records)


@pytest.mark.parametrize("model_type,extra,rewritten", [
    ("qwen2", {}, 2), ("qwen3", {}, 2), ("mistral", {"sliding_window": None}, 2), ("phi3", {"pad_token_id": 0}, 2),
    ("gemma", {}, 2), ("mistral", {"sliding_window": 64}, 2)])
def test_models_beyond_llama(model_type, extra, rewritten):
    model = tiny_llama("sdpa", model_type=model_type, **extra)
    ids = _ids(2, 150)
    e = mcompile.explain(model, ids, options=SPARSE)
    assert e.rewritten == rewritten
    if extra.get("sliding_window"):
        assert all("sliding window of 64 keys" in s.pattern_source for s in e.sites)
    torch._dynamo.reset()
    out = _logits(torch.compile(model, backend="minference", options=COVER), ids)
    torch.testing.assert_close(out, _logits(model, ids), atol=1e-4, rtol=1e-4)


def test_returned_attention_weights_stay_dense_with_reason():
    """output_attentions=True returns the softmax: the eager chain cannot be replaced."""
    model = tiny_llama("eager")
    ids = _ids(1, 80)
    e = mcompile.explain(model, ids, options=COVER, output_attentions=True)
    assert e.rewritten == 0 and all("used elsewhere" in s.reason for s in e.sites)
    with torch.no_grad():
        out = torch.compile(model, backend="minference", options=COVER)(ids, output_attentions=True)
        ref = model(ids, output_attentions=True)
    torch.testing.assert_close(out.attentions[0], ref.attentions[0], atol=1e-5, rtol=1e-5)


def test_all_dense_patterns_leave_the_attention_alone():
    e = mcompile.explain(tiny_llama("sdpa"), _ids(1, 80), options={"dense_below": 0, "default_pattern": {"kind": "dense"}})
    assert e.rewritten == 0 and all("every head is dense" in s.reason for s in e.sites)


def test_inductor_cache_key_covers_mcompile_and_options(monkeypatch, tmp_path):
    """A cached compiled graph is reused only for the same mcompile sources and the same options."""
    from torch._inductor import config as inductor_config

    from mcompile import cache

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))  # a cache no other test has filled
    # inductor_config.patch, not monkeypatch: undoing a monkeypatch deletes the config entry
    with inductor_config.patch(fx_graph_cache=True, force_disable_caches=False):
        model, ids = tiny_llama("sdpa", layers=1), _ids(1, 64)

        def compile_once(options):
            torch._dynamo.reset()
            counters.clear()
            _logits(torch.compile(model, backend="minference", options=options), ids)
            return counters["inductor"]["fxgraph_cache_hit"]

        torch._inductor.utils.clear_inductor_caches()
        sparse, cover = {**SPARSE, **INDUCTOR}, {**COVER, **INDUCTOR}
        compile_once(sparse)
        assert compile_once(sparse) == 1  # same sources, same options: a cache hit
        assert compile_once(cover) == 0  # other budgets: other graph, no hit
        cache.source_hash.cache_clear()
        monkeypatch.setattr(cache, "source_hash", lambda: b"another mcompile version")
        assert compile_once(sparse) == 0  # other mcompile sources: no hit


def test_explain_reports_memory_passes_and_their_reasons():
    """Chunked MLPs and the last-position logits pass show up in explain, applied or kept with
    the reason (with logits_to_keep=1 the lm_head already sees one position)."""
    model = tiny_llama("sdpa", layers=2)
    e = mcompile.explain(model, _ids(1, 80), options={"dense_below": 0, "logits": "last"}, logits_to_keep=1)
    lines = e.memory_lines()
    assert sum("chunked_mlp" in x and "applied" in x for x in lines) == 2
    assert any("last_logits" in x and "already sees one position" in x for x in lines)
    assert sum("rope_once" in x and "applied" in x for x in lines) == 2  # cos and sin
    assert sum("store_residual" in x and "applied" in x for x in lines) == 3  # not the last add
    assert "chunked_mlp" in e.table()


def test_static_length_equal_to_the_hidden_size_is_not_quadratic():
    """A 64-token prompt into a model of hidden size 64: (1, 64, 64) activations are N x hidden,
    not N x N, and must not be reported as O(N^2)."""
    e = mcompile.explain(tiny_llama("sdpa", layers=1), _ids(1, 64), options={"dense_below": 0})
    assert not [x for x in e.memory_lines() if "quadratic" in x]
