"""Continuous batching (transformers' ``generate_batch``: chunked prefill over a paged cache,
several requests per step) with sparse prefill per request (mcompile/serving.py), on the CPU."""

import pytest
import torch
from torch._dynamo.utils import counters

from mcompile import ops
from mcompile.config import MInferenceConfig
from mcompile.serving import packed_attention, sparse_batching
from mcompile.tools.models import tiny_llama

from .helpers import qkv

transformers = pytest.importorskip("transformers")
from transformers import ContinuousBatchingConfig, GenerationConfig  # noqa: E402

LENGTHS = (300, 420, 260, 512)
COVER = {"dense_below": 0, "pattern_db": None, "default_pattern": {"kind": "vertical_slash", "vertical": 1000,
                                                                    "slash": 1000}}
SPARSE = {"dense_below": 0, "pattern_db": None, "default_pattern": {"kind": "vertical_slash", "vertical": 30,
                                                                     "slash": 100}}


def _generate(model, chunk=128):
    prompts = [[(7 * i + j) % 120 + 3 for i in range(n)] for j, n in enumerate(LENGTHS)]
    config = GenerationConfig(max_new_tokens=4, do_sample=False, eos_token_id=None, pad_token_id=0)
    # 16 pages of 256 hold the four requests; left unset, transformers sizes the paged cache at 90% of
    # free memory, and allocating that took 14-26 s per call on the CPU
    cb = ContinuousBatchingConfig(max_batch_tokens=chunk, num_blocks=16, use_cuda_graph=False,
                                  auto_switch_to_flash=False)
    with torch.no_grad():
        out = model.generate_batch(prompts, generation_config=config, continuous_batching_config=cb,
                                   progress_bar=False, warmup=False)
    return [out[k].generated_tokens for k in sorted(out)]


@pytest.mark.skipif(not hasattr(transformers, "__version__") or
                    tuple(int(x) for x in transformers.__version__.split(".")[:2]) < (5, 25),
                    reason="sparse_batching needs transformers >= 5.25 (earlier ones update the paged cache inside "
                           "their paged|sdpa attention function)")
@pytest.mark.parametrize("model_type", ["llama", "mistral"])
def test_generate_batch_with_covering_budgets_equals_dense(model_type):
    """Four prompts of 260-512 tokens prefilled in chunks of 128 tokens: every chunk of every
    request runs the sparse path over its cached keys, and with budgets that cover every key
    the tokens equal plain continuous batching's; Mistral's sliding window (64 keys: its layers
    read a window's worth of cache per request) is applied exactly."""
    model = tiny_llama("sdpa", layers=2, model_type=model_type, **({"sliding_window": 64} if model_type == "mistral"
                                                                   else {}))
    dense = _generate(model)
    counters.clear()
    with sparse_batching(COVER):
        sparse = _generate(model)
    assert sparse == dense
    assert counters["mcompile"]["packed_sparse"] >= 2 * sum(-(-n // 128) for n in LENGTHS) // 2
    assert counters["mcompile"]["packed_fallback"] == 0
    assert counters["mcompile"]["packed_lengths_reused"] > 0  # the second layer of a step reads nothing
    if model_type != "llama":
        return
    with sparse_batching(SPARSE):
        assert all(len(t) == 4 for t in _generate(model))  # budgets that drop keys still serve
    # Outside the block, SDPA is transformers' own again.
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    assert ALL_ATTENTION_FUNCTIONS["sdpa"] is sdpa_attention_forward


def _packed(lengths_q, lengths_k, h=4, hk=2, d=16):
    """Packed requests as continuous batching hands them to attention, and their cu_seq_lens."""
    qs, ks, vs = [], [], []
    for i, (nq, n) in enumerate(zip(lengths_q, lengths_k)):
        q, k, v = qkv(1, h, hk, n, d, seed=i)
        qs.append(q[:, :, n - nq:])
        ks.append(k)
        vs.append(v)
    cu = lambda xs: torch.tensor([0, *torch.tensor(xs).cumsum(0).tolist()], dtype=torch.int32)  # noqa: E731
    return torch.cat(qs, 2), torch.cat(ks, 2), torch.cat(vs, 2), cu(lengths_q), cu(lengths_k), (qs, ks, vs)


def _fallback(*args, **kwargs):
    raise AssertionError("fell back")


@pytest.mark.parametrize("window", [0, 50])
def test_packed_requests_equal_each_request_alone(window):
    """A decode step, a chunk after a prefix and a whole prompt in one packed call: each equals
    the ops run on that request alone (dense for the decode step), in the packed order."""
    config = MInferenceConfig.from_options(SPARSE)
    q, k, v, cq, ck, (qs, ks, vs) = _packed([1, 100, 150], [300, 260, 150])
    module = torch.nn.Module()
    module.sliding_window = window or None
    with torch.no_grad():
        out, _ = packed_attention(module, q, k, v, None, scaling=0.25, fallback=_fallback, config=config,
                                  cu_seq_lens_q=cq, cu_seq_lens_k=ck)
    assert out.shape == (1, q.shape[2], 4, 16)
    kinds, p0, p1 = ([1] * 4, [0] * 4, [window] * 4) if window else ([2] * 4, [30] * 4, [100] * 4)
    rows = 0
    for qi, ki, vi in zip(qs, ks, vs):
        if ops.runs_dense(qi.shape[2], ki.shape[2], 0):
            want = ops.dense_attention(qi, ki, vi, None, 0.25, window)
        else:
            index = ops.estimate_index(qi, ki, None, kinds, p0, p1, 0.25, *(
                (0, 0.0) if window else (config.budget_length, config.budget_exponent)))
            want = ops.sparse_attention(qi, ki, vi, *index, None, 0.25, window)
        torch.testing.assert_close(out[:, rows:rows + qi.shape[2]], want.transpose(1, 2))
        rows += qi.shape[2]


def test_old_transformers_is_a_clear_error(monkeypatch):
    import mcompile.serving

    monkeypatch.setattr(mcompile.serving, "MIN_TRANSFORMERS", "99.0")  # as if the installed one were older
    with pytest.raises(RuntimeError, match="needs transformers >= 99.0"):
        with sparse_batching(SPARSE):
            pass


def test_calls_it_does_not_understand_go_to_the_original():
    """No per-request lengths, a non-causal module, soft-capping or attention sinks: the original
    function answers, with the arguments it was given, and the fallback is counted."""
    config = MInferenceConfig.from_options(SPARSE)
    q, k, v, cq, ck, _ = _packed([100, 150], [260, 150])
    causal, encoder = torch.nn.Module(), torch.nn.Module()
    encoder.is_causal = False
    lengths = {"cu_seq_lens_q": cq, "cu_seq_lens_k": ck}
    cases = [(causal, {"is_causal": True}), (encoder, lengths), (causal, {**lengths, "softcap": 50.0}),
             (causal, {**lengths, "s_aux": torch.zeros(4)})]
    counters.clear()
    for module, kwargs in cases:
        seen = []
        with torch.no_grad():
            out = packed_attention(module, q, k, v, None, fallback=lambda *a, **kw: seen.append(kw) or "orig",
                                   config=config, **kwargs)
        assert out == "orig" and seen[0].keys() >= kwargs.keys()
    assert counters["mcompile"]["packed_fallback"] == len(cases)
    with torch.no_grad():  # the same call with nothing unknown runs the packed path
        out, _ = packed_attention(causal, q, k, v, None, fallback=_fallback, config=config, softcap=None, **lengths)
    assert out.shape == (1, 250, 4, 16)


@pytest.mark.skipif(tuple(int(x) for x in transformers.__version__.split(".")[:2]) < (5, 25),
                    reason="sparse_batching needs transformers >= 5.25")
def test_compiled_model_serves_sparse_batches():
    """Under ``model.compile(backend="minference")`` the packed attention runs between the compiled
    graphs (it is compiler-disabled: per-request sizes are data), and the tokens still equal
    plain continuous batching's with covering budgets."""
    model = tiny_llama("sdpa", layers=1)
    dense = _generate(model)
    counters.clear()
    model.compile(backend="minference", dynamic=True, options=COVER)
    with sparse_batching(COVER):
        assert _generate(model) == dense
    assert counters["mcompile"]["packed_sparse"] > 0


def test_length_reader_reads_once_per_step_and_again_after_any_change():
    """The lengths of a step are read once and reused while the same tensors arrive unchanged; an
    in-place write, new tensors, or tensors without a version counter are read again."""
    from mcompile.serving import LengthReader

    reader = LengthReader()
    cu_q, cu_k = torch.tensor([0, 3, 5], dtype=torch.int32), torch.tensor([0, 9, 20], dtype=torch.int32)
    counters.clear()
    assert reader.read(cu_q, cu_k) == [0, 3, 5, 0, 9, 20]
    assert reader.read(cu_q, cu_k) == [0, 3, 5, 0, 9, 20]
    assert counters["mcompile"]["packed_lengths_reused"] == 1
    cu_q[1:].copy_(torch.tensor([4, 6]))  # the next step writes the same buffer
    assert reader.read(cu_q, cu_k) == [0, 4, 6, 0, 9, 20]
    cu_k[2] = 21
    assert reader.read(cu_q, cu_k) == [0, 4, 6, 0, 9, 21]
    assert reader.read(cu_q.clone(), cu_k) == [0, 4, 6, 0, 9, 21]
    assert counters["mcompile"]["packed_lengths_reused"] == 1
    with torch.inference_mode():
        iq, ik = torch.tensor([0, 2]), torch.tensor([0, 7])
        assert reader.read(iq, ik) == [0, 2, 0, 7]
        iq[1] = 3
        assert reader.read(iq, ik) == [0, 3, 0, 7]  # no version counter: read every time
    assert counters["mcompile"]["packed_lengths_reused"] == 1


def test_density_checks_of_a_layer_in_one_host_read(monkeypatch):
    """A layer's requests (serving.packed_attention) are planned first and their density checks read
    from the device together (ops.dense_by_fraction_many, the opaque op's check for many indices):
    a request whose index covers so much that dense attention is faster goes dense (counted), one
    that keeps little stays sparse, a request already dense (no plan) is left alone, and all of it
    costs one host read. Off CUDA or with a sliding window nothing is checked."""
    from mcompile.index import SparseIndex
    from mcompile.patterns import Pattern, PatternKind, encode

    n = ops.FRACTION_CHECK_MIN
    q, k = torch.randn(1, 2, 128, 8), torch.randn(1, 1, n, 8)

    def plan(pattern):
        return SparseIndex(*ops.estimate_index(q, k, None, *encode([pattern] * 2), 8 ** -0.5))

    plans = [(plan(Pattern(PatternKind.DENSE, 0, 0)), n), (plan(Pattern(PatternKind.A_SHAPE, 64, 256)), n),
             (None, n), (plan(Pattern(PatternKind.DENSE, 0, 0)), n - 1)]  # the last below the check's length
    reads = []
    tolist = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda t: reads.append(t.shape) or tolist(t))
    before = counters["mcompile"]["dense_by_fraction"]
    assert ops.dense_by_fraction_many(plans, True) == [True, False, False, False]
    assert reads == [torch.Size([2])] and counters["mcompile"]["dense_by_fraction"] == before + 1
    assert ops.dense_by_fraction_many(plans, False) == [False] * 4 and len(reads) == 1
