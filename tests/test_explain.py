"""explain says what happened: on compiled models, attentions it cannot rewrite (with what was
seen and why), the prompt length of inputs_embeds, continuous batching, autocast."""

import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.utils import counters

import mcompile
from mcompile.tools.models import tiny_llama

COVER = {"dense_below": 0, "default_pattern": {"kind": "vertical_slash", "vertical": 4096, "slash": 4096}}


def _ids(b=1, n=120, seed=0):
    return torch.randint(0, 128, (b, n), generator=torch.Generator().manual_seed(seed))


def _logits(model, ids, **kw):
    with torch.no_grad():
        return model(ids, **kw).logits


class _Recorder:
    """A user's minference backend that counts its compiles and the runs of what it compiled."""

    def __init__(self, compiler: str = "aot_eager"):
        self.compiles = self.runs = 0
        self.reports = []
        self.compiler = compiler

    def __call__(self, gm, example_inputs):
        self.compiles += 1
        compiled = mcompile.minference_backend(gm, example_inputs, options={**COVER, "compiler": self.compiler},
                                               report_sink=self.reports.append)

        def run(*args):
            self.runs += 1
            return compiled(*args)

        return run


# ------------------------------------------------------------------------------------------------
# explain on a model that is compiled already
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("how", ["model.compile", "torch.compile"])
def test_explain_sees_a_compiled_model_and_leaves_its_code_alone(how):
    model = tiny_llama("sdpa")
    ids = _ids()
    ref = _logits(model, ids)
    user = _Recorder()
    if how == "model.compile":
        model.compile(backend=user)
        target = model
    else:
        target = torch.compile(model, backend=user)
    first = _logits(target, ids)
    compiles, runs = user.compiles, user.runs
    assert compiles >= 1 and runs >= 1 and user.reports[0].rewritten == 2

    e = mcompile.explain(target, ids, options=COVER)
    assert e.rewritten == 2 and len(e.sites) == 2, e.summary()
    assert "2 of 2 attentions rewritten" in e.summary()
    assert user.compiles == compiles  # explain compiled with its own backend, never the user's

    after = _logits(target, ids)
    assert user.compiles == compiles and user.runs == runs + 1  # the user's compiled code ran, not recompiled
    torch.testing.assert_close(after, first)
    torch.testing.assert_close(after, ref, atol=1e-4, rtol=1e-4)
    again = mcompile.explain(target, ids, options=COVER)  # not served from its own earlier compile
    assert again.rewritten == 2 and len(again.reports) == 1


def test_explain_before_compiling_leaves_nothing_behind():
    model = tiny_llama("sdpa")
    ids = _ids()
    e = mcompile.explain(model, ids, options={"dense_below": 0, "default_pattern": {"kind": "dense"}})
    assert e.rewritten == 0 and len(e.sites) == 2
    user = _Recorder()
    model.compile(backend=user)
    out = _logits(model, ids)
    assert user.compiles == 1 and user.runs == 1 and user.reports[0].rewritten == 2
    torch.testing.assert_close(out, _logits(tiny_llama("sdpa"), ids), atol=1e-4, rtol=1e-4)


def test_default_pattern_is_block_mass_and_reported():
    """With no options the heads get block-mass (recall 0.985 of the max score, 8 rows, shared
    with the neighbouring blocks), which explain names; its
    density depends on the input, so none is promised. Short prompts stay dense by default."""
    model = tiny_llama("sdpa")
    ids = _ids()
    e = mcompile.explain(model, ids, options={"dense_below": 0})
    assert e.rewritten == 2 and "block_mass(recall=0.985, samples=8, score=max, neighbours=1)" in str(e)
    assert "chunked_mlp model.layers.0.mlp" in str(e) and "L['" not in str(e)  # module paths as users name them
    assert all(e.density(site, 4096) is None for site in e.sites)
    shared = {"kind": "block_mass", "recall": 0.99, "samples": 4, "score": "max", "neighbours": 1}
    e = mcompile.explain(model, ids, options={"dense_below": 0, "default_pattern": shared})
    assert e.rewritten == 2 and "block_mass(recall=0.99, samples=4, score=max, neighbours=1)" in str(e)
    assert ids.shape[1] < mcompile.MInferenceConfig().dense_below


# ------------------------------------------------------------------------------------------------
# Attentions that are found but not rewritten say what was seen and why
# ------------------------------------------------------------------------------------------------

def _transformers_model(model_type: str, impl: str):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM

    small = {"vocab_size": 128}
    if model_type == "bloom":
        small.update(hidden_size=64, n_layer=2, n_head=4)
    elif model_type == "gpt_neo":
        small.update(hidden_size=64, num_layers=2, num_heads=4, attention_types=[[["global", "local"], 1]],
                     max_position_embeddings=256)
    elif model_type == "t5":
        small.update(d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4)
    else:
        small.update(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                     intermediate_size=128)
        if model_type == "gpt_oss":
            small.update(num_local_experts=4, num_experts_per_tok=2)
    torch.manual_seed(0)
    config = AutoConfig.for_model(model_type, **small)
    cls = AutoModelForSeq2SeqLM if model_type == "t5" else AutoModelForCausalLM
    return cls.from_config(config, attn_implementation=impl).eval()


@pytest.mark.parametrize("model_type,impl,seen", [
    ("gemma2", "eager", "tanh (logit soft-capping)"),
    ("bloom", "eager", "baddbmm (a bias added to q·kᵀ inside the product"),
    ("gpt_neo", "eager", "torch.where masking them with a tensor read from the module's state"),
    ("gpt_oss", "eager", "attention sinks"),
])
def test_attention_of_another_form_is_reported_with_what_was_seen(model_type, impl, seen):
    model = _transformers_model(model_type, impl)
    e = mcompile.explain(model, _ids(2, 80), options={"dense_below": 0})
    assert len(e.sites) == 2 and e.rewritten == 0, e.table()  # one per layer; GPT-OSS's router softmax is not one
    for site in e.sites:
        assert seen in site.reason and "not matched" in site.reason, site.reason
        assert "seen: " in site.reason and "softmax" in site.reason
    assert "0 of 2 attentions rewritten" in e.summary()
    assert [s.layer for s in e.sites] == [0, 1]


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_padded_t5_reports_its_six_attentions(impl):
    """Encoder and decoder self-attention carry T5's learned position bias; the decoder's
    cross-attention reads the encoder's output."""
    model = _transformers_model("t5", impl)
    ids = _ids(2, 80)
    mask = torch.ones_like(ids)
    mask[0, :10] = 0
    e = mcompile.explain(model, ids, attention_mask=mask, decoder_input_ids=_ids(2, 70, seed=1),
                         options={"dense_below": 0})
    assert len(e.sites) == 6 and e.rewritten == 0, e.table()
    reasons = [s.reason for s in e.sites]
    assert sum("position bias" in r for r in reasons) == 4, reasons
    assert sum(r.startswith("cross-attention") for r in reasons) == 2, reasons
    assert "0 of 6 attentions rewritten" in e.summary()


class _Router(torch.nn.Module):
    """A softmax over a linear layer's output (an MoE gate): not an attention."""

    def __init__(self):
        super().__init__()
        self.gate = torch.nn.Linear(16, 4)
        self.weight = torch.nn.Parameter(torch.randn(16, 4))

    def forward(self, x):
        a = F.softmax(self.gate(x), dim=-1)
        b = F.softmax(x @ self.weight, dim=-1)  # a product with a weight, not of two activations
        return a @ b.transpose(-2, -1) @ x


class _Bmm(torch.nn.Module):
    """Attention over (batch x heads, length, head dim) tensors with bmm."""

    def forward(self, q, k, v):
        return torch.bmm(F.softmax(torch.bmm(q, k.transpose(1, 2)) * 0.25, dim=-1), v)


def test_softmax_that_is_not_attention_is_not_reported_and_other_forms_are():
    e = mcompile.explain(_Router(), torch.randn(2, 30, 16), options={"dense_below": 0})
    assert not e.sites and "no attention found" in e.summary(), e.summary()
    q = torch.randn(4, 80, 16)
    e = mcompile.explain(_Bmm(), q, q, q, options={"dense_below": 0})
    (site,) = e.sites
    assert not site.rewritten and "bmm over (batch x heads" in site.reason and "not matched" in site.reason


def test_flex_attention_is_reported():
    e = mcompile.explain(tiny_llama("flex_attention"), _ids(1, 100), options={"dense_below": 0})
    assert len(e.sites) == 2 and e.rewritten == 0, e.table()
    assert all(s.kind == "flex_attention" and "attn_implementation='sdpa'" in s.reason for s in e.sites)


class _Wrapped(torch.nn.Module):
    def forward(self, q, k, v):
        from torch._higher_order_ops.wrap import wrap

        return wrap(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True), q, k, v)


def test_attention_inside_a_higher_order_op_is_reported():
    q = torch.randn(1, 2, 80, 16)
    e = mcompile.explain(_Wrapped(), q, q, q, options={"dense_below": 0})
    (site,) = e.sites
    assert not site.rewritten and "inside a subgraph of wrap" in site.reason, site.reason


# ------------------------------------------------------------------------------------------------
# Prompt length
# ------------------------------------------------------------------------------------------------

def test_prompt_length_of_inputs_embeds_and_explicit_length():
    model = tiny_llama("sdpa")  # hidden size 64
    embeds = model.get_input_embeddings()(_ids(1, 100)).detach()
    e = mcompile.explain(model, inputs_embeds=embeds, options={"dense_below": 0})
    assert e.length == 100 and e.rewritten == 2
    assert "density@100" in e.table()
    assert mcompile.explain(model, inputs_embeds=embeds, length=4096, options={"dense_below": 0}).length == 4096
    assert mcompile.explain(model, input_ids=_ids(1, 90), options={"dense_below": 0}).length == 90


# ------------------------------------------------------------------------------------------------
# Continuous batching
# ------------------------------------------------------------------------------------------------

_GENERATE_BATCH_RAN: list = []


@pytest.mark.parametrize("impl", ["paged|sdpa", "paged|eager"])
def test_continuous_batching_says_why(impl):
    """generate_batch runs a paged cache Dynamo does not trace: the attention's graph starts
    after the cache update, and the mask over the packed requests is one of its inputs."""
    from transformers import ContinuousBatchingConfig, GenerationConfig

    if _GENERATE_BATCH_RAN and torch.__version__ < "2.13":
        pytest.skip("torch 2.11 crashes (segfault in Dynamo's fake-tensor conversion) on a second generate_batch "
                    "in one process, with any backend")
    _GENERATE_BATCH_RAN.append(impl)
    model = tiny_llama(impl, layers=1)
    user = _Recorder(compiler="eager")
    model.compile(backend=user, dynamic=True)  # dynamic: q, k and v arrive with symbolic head counts too
    config = GenerationConfig(max_new_tokens=1, do_sample=False, eos_token_id=None, pad_token_id=0)
    prompts = [[i % 120 + 3 for i in range(n)] for n in (70, 100)]
    # a small cache: the default one is sized from free memory, and its packed mask (8192 query
    # rows over every cached slot, fp32) took 14 GB, two of which do not fit a CI worker pair
    cb = ContinuousBatchingConfig(max_batch_tokens=256, num_blocks=16, use_cuda_graph=False)
    with torch.no_grad():
        out = model.generate_batch(prompts, generation_config=config, continuous_batching_config=cb,
                                   progress_bar=False, warmup=False)
    assert all(len(o.generated_tokens) == 1 for o in out.values())
    sites = [s for r in user.reports for s in r.sites]
    assert sites and not any(s.rewritten for s in sites)
    for s in sites:
        assert "continuous batching" in s.reason and "input of this graph" in s.reason.replace("inputs", "input"), \
            s.reason  # transformers 5.25: mask, K and V are inputs; 5.17: the mask is
        assert "symbolic" not in s.reason


# ------------------------------------------------------------------------------------------------
# Autocast
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_autocast_bf16_is_rewritten_and_equals_eager_autocast(impl):
    """Under CPU autocast RoPE leaves q and k in float32 and v in bfloat16; eager autocast runs
    SDPA and matmul in bfloat16. The rewrite casts q, k and v as autocast does."""
    model = tiny_llama(impl)
    ids = _ids(2, 150)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        ref = model(ids).logits
        e = mcompile.explain(model, ids, options=COVER)
        assert e.rewritten == 2, e.summary()
        counters.clear()
        out = torch.compile(model, backend="minference", options={**COVER, "compiler": "aot_eager"})(ids).logits
    assert counters["mcompile"]["rewritten"] == 2 and counters["mcompile"]["kept_dense"] == 0
    assert out.dtype == ref.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref.float(), atol=2e-2, rtol=2e-2)


class _AutocastInside(torch.nn.Module):
    """Autocast entered inside the compiled code, and switched off again around one attention."""

    def forward(self, q, k, v):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            with torch.autocast("cpu", enabled=False):
                high = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return low, high


def test_autocast_regions_inside_the_graph():
    q, k, v = (torch.randn(1, 2, 80, 16, generator=torch.Generator().manual_seed(i)) for i in range(3))
    e = mcompile.explain(_AutocastInside(), q, k, v, options=COVER)
    assert e.rewritten == 2, e.summary()
    with torch.no_grad():
        low, high = torch.compile(_AutocastInside(), backend="minference",
                                  options={**COVER, "compiler": "aot_eager"})(q, k, v)
        ref_low, ref_high = _AutocastInside()(q, k, v)
    assert low.dtype == torch.bfloat16 and high.dtype == torch.float32
    torch.testing.assert_close(low.float(), ref_low.float(), atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(high, ref_high, atol=1e-5, rtol=1e-5)
