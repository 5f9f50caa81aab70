"""Bad input is a clear error or a correct dense fallback, never a crash inside the model and
never silently accepted: options, pattern databases of another model, odd attention masks."""

import pathlib

import pytest
import torch
from torch._dynamo.utils import counters

import mcompile
from mcompile.tools.models import tiny_llama
from mcompile.pattern_db import ModelFingerprint, save, uniform
from mcompile.patterns import DEFAULT_VERTICAL_SLASH

COVER = {"dense_below": 0, "default_pattern": {"kind": "vertical_slash", "vertical": 4096, "slash": 4096}}


def _ids(b=1, n=100, seed=0):
    return torch.randint(0, 128, (b, n), generator=torch.Generator().manual_seed(seed))


def _logits(model, ids, **kw):
    with torch.no_grad():
        return model(ids, **kw).logits


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
def test_attention_mask_wider_than_the_keys(dynamic):
    """transformers accepts a 2-D attention_mask with more columns than tokens and reads the
    first N; the sparse ops get it cut to (B, N) instead of crashing in the estimation."""
    model = tiny_llama("sdpa")
    ids = _ids(2, 100)
    mask = torch.ones(2, 110, dtype=torch.long)
    mask[0, :5] = 0
    ref = _logits(model, ids, attention_mask=mask)
    out = _logits(torch.compile(model, backend="minference", dynamic=dynamic, options={**COVER, "compiler": "aot_eager"}),
                  ids, attention_mask=mask)
    assert counters["mcompile"]["rewritten"] >= 2
    torch.testing.assert_close(out[:, 5:], ref[:, 5:], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out[1], ref[1], atol=1e-4, rtol=1e-4)


def test_ops_refuse_a_padding_of_the_wrong_shape():
    q = torch.randn(1, 2, 70, 16)
    with pytest.raises(ValueError, match=r"key_padding must be \(B, N\) = \(1, 70\)"):
        torch.ops.mcompile.estimate_index(q, q, torch.ones(1, 80, dtype=torch.bool), [2, 2], [30, 30], [100, 100],
                                          0.25)


@pytest.mark.parametrize("options,message", [
    ({"dense_below": 2 ** 70}, r"dense_below must be an int in \[0, 2\*\*63 - 1\]"),
    ({"budget_length": 2 ** 64}, r"budget_length must be an int in \[0, 2\*\*63 - 1\]"),
    ({"mlp_chunk": 2 ** 64}, r"mlp_chunk must be an int in \[1, 2\*\*63 - 1\]"),
    ({"default_pattern": {"kind": "vertical_slash", "vertical": 2 ** 70, "slash": 100}},
     r"vertical must be <= 2\*\*31 - 1"),
    ({"default_pattern": {"kind": "block_sparse", "blocks": 2 ** 40}}, r"blocks must be <= 2\*\*31 - 1"),
    ({"pattern_db": ""}, "pattern_db is empty"),
    ({"pattern_db": "  "}, "pattern_db is empty"),
    ({"pattern_db": "."}, "is a directory"),
    ({"pattern_db": 3}, "pattern_db must be a path"),
    ("dense_below=0", "options must be a dict"),
    (["dense_below", 0], "options must be a dict"),
])
def test_bad_options_are_clear_errors(options, message):
    with pytest.raises(Exception, match=message):
        _logits(torch.compile(tiny_llama("sdpa", layers=1), backend="minference", options=options), _ids(1, 10))


def test_pattern_db_as_a_path(tmp_path):
    """A pathlib.Path names a database as a string does."""
    path = tmp_path / "db.json"
    save(uniform(ModelFingerprint("llama", 2, 4, 2, 16), DEFAULT_VERTICAL_SLASH), path)
    assert mcompile.MInferenceConfig(pattern_db=path).pattern_db == str(path)
    e = mcompile.explain(tiny_llama("sdpa"), _ids(1, 80), options={**COVER, "pattern_db": pathlib.Path(path)})
    assert e.rewritten == 2 and all("database" in s.pattern_source for s in e.sites)


@pytest.mark.parametrize("fingerprint,field", [
    (("llama", 3, 4, 2, 16), "model.num_layers is 3"),  # same heads and head dim, one more layer
    (("qwen2", 2, 4, 2, 16), "model.model_type is 'qwen2'"),  # same geometry, another model type
    (("llama", 2, 4, 1, 16), "model.num_kv_heads is 1"),
    (("llama", 2, 4, 2, 32), "model.head_dim is 32"),
])
def test_pattern_db_of_another_model_is_refused(tmp_path, fingerprint, field):
    """The whole fingerprint is checked against the model being compiled, not only what each
    attention's shapes show."""
    path = tmp_path / "db.json"
    save(uniform(ModelFingerprint(*fingerprint), DEFAULT_VERTICAL_SLASH), path)
    with pytest.raises(Exception, match=field):
        mcompile.explain(tiny_llama("sdpa"), _ids(1, 80), options={**COVER, "pattern_db": str(path)})


def test_block_budget_beyond_the_prompt_allocates_what_the_prompt_has():
    """A block budget of 10^6 at 300 tokens (5 blocks) sizes the index by the prompt's blocks,
    not by the budget (it would be 10^6 int32 per head and block row)."""
    q = torch.randn(1, 2, 300, 16)
    index = torch.ops.mcompile.estimate_index(q, q, None, [3, 3], [10 ** 6, 10 ** 6], [0, 0], 0.25)
    blocks = index[5]
    assert blocks.shape[-1] <= 6, blocks.shape
    out = torch.ops.mcompile.sparse_attention(q, q, q, *index, None, 0.25)
    ref = torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True, scale=0.25)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)  # every block kept: dense
