"""The float8 KV cache (mcompile.kv_cache): rounding bound, what each update returns, memory, and
generation with it under the minference backend (CPU)."""

import pytest
import torch
from torch._dynamo.utils import counters
from transformers import DynamicCache
from transformers.cache_utils import DynamicSlidingWindowLayer

from mcompile.kv_cache import FP8_MAX, FP8Cache, FP8Layer, cache_bytes, dequantize, fp8_scale, quantize
from mcompile.tools.models import tiny_llama

COVER = {"dense_below": 0, "compiler": "aot_eager",
         "default_pattern": {"kind": "vertical_slash", "vertical": 4096, "slash": 4096}}


def _ids(b, n, seed=0):
    return torch.randint(0, 128, (b, n), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_round_trip_within_e4m3_rounding(dtype):
    x = torch.randn(2, 3, 97, 16, generator=torch.Generator().manual_seed(0)).to(dtype)
    x[:, 1, :, 5] *= 40  # an outlier channel gets its own scale
    scale = fp8_scale(x)
    assert scale.shape == (1, 3, 1, 16)
    back = dequantize(quantize(x, scale), scale, torch.float32)
    # e4m3: 3 mantissa bits (relative rounding <= 2^-4); subnormal spacing 2^-9 of the scale
    bound = x.float().abs() * 2 ** -4 + scale * 2 ** -9
    assert ((back - x.float()).abs() <= bound * 1.0001).all()


def test_out_of_range_values_clamp_not_nan():
    scale = torch.ones(1, 1, 1, 4)
    q = quantize(torch.tensor([[[[1e6, -1e6, 3.0, 0.0]]]]), scale)
    assert not torch.isnan(q.float()).any()
    assert q.float().flatten().tolist() == [FP8_MAX, -FP8_MAX, 3.0, 0.0]


def test_prefill_returns_its_states_decode_returns_the_cache():
    layer = FP8Layer()
    g = torch.Generator().manual_seed(0)
    k, v = torch.randn(1, 2, 50, 8, generator=g), torch.randn(1, 2, 50, 8, generator=g)
    k_out, v_out = layer.update(k, v)
    assert k_out is k and v_out is v  # the prefill attends to exact K/V
    assert layer.keys.dtype == torch.float8_e4m3fn and layer.get_seq_length() == 50
    # within the range the first update's scales cover (past it values clamp: another test)
    k1, v1 = 0.7 * k[:, :, 7:8], -0.3 * v[:, :, 9:10]
    k_all, v_all = layer.update(k1, v1)
    assert k_all.shape == (1, 2, 51, 8) and k_all.dtype == torch.float32
    ref = torch.cat([k, k1], dim=-2)
    assert (k_all - ref).abs().max() <= 0.1 * ref.abs().max()
    assert not torch.equal(k_all[..., :50, :], k)  # rounded: the cache really is float8
    assert layer.get_seq_length() == 51


def test_cache_layers_and_memory():
    model = tiny_llama(layers=3, model_type="mistral", sliding_window=64, layer_types=None)
    cache = FP8Cache(model.config)
    kinds = {type(layer) for layer in cache.layers}
    assert len(cache.layers) == 3 and kinds <= {FP8Layer, DynamicSlidingWindowLayer}
    model = tiny_llama(layers=2)
    ids = _ids(1, 120)
    fp8, bf = FP8Cache(model.config), DynamicCache(config=model.config)
    with torch.no_grad():
        model(ids, past_key_values=fp8, use_cache=True)
        model(ids, past_key_values=bf, use_cache=True)
    kv = sum(l.keys.numel() + l.values.numel() for l in bf.layers)
    assert fp8.get_seq_length() == 120
    assert cache_bytes(bf) == 4 * kv  # fp32 model
    assert cache_bytes(fp8) == kv + 2 * 2 * 2 * 16 * 4  # one byte per element, + scales (2 layers, K and V)


def test_first_logits_exact_decode_close():
    """The prefill with the FP8 cache gives the logits of the bf16 cache exactly; the decode
    logits differ only by the K/V rounding."""
    model = tiny_llama(layers=2)
    ids = _ids(2, 90)
    with torch.no_grad():
        fp8, ref = FP8Cache(model.config), DynamicCache(config=model.config)
        a = model(ids, past_key_values=fp8, use_cache=True).logits
        b = model(ids, past_key_values=ref, use_cache=True).logits
        assert torch.equal(a, b)
        nxt = a[:, -1:].argmax(-1)
        a = model(nxt, past_key_values=fp8, use_cache=True).logits
        b = model(nxt, past_key_values=ref, use_cache=True).logits
    err = ((a - b).abs().max() / b.abs().max()).item()
    assert 0 < err < 0.05


def test_generate_compiled_sparse_prefill_with_fp8_cache():
    """generate() after model.compile(backend="minference"): the prefill is rewritten, the decode
    reads the FP8 cache, the tokens equal eager generation with the same cache, and a new prompt
    length compiles no new graph."""
    model = tiny_llama("sdpa")
    prompts = [_ids(1, n, seed=n) for n in (90, 170)]
    with torch.no_grad():
        refs = [model.generate(p, max_new_tokens=6, do_sample=False, past_key_values=FP8Cache(model.config))
                for p in prompts]
        model.compile(backend="minference", dynamic=True, options=COVER)
        graphs, outs = [], []
        for p in prompts:
            outs.append(model.generate(p, max_new_tokens=6, do_sample=False, past_key_values=FP8Cache(model.config)))
            graphs.append(counters["stats"]["unique_graphs"])
    for r, o in zip(refs, outs):
        assert torch.equal(r, o)
    assert graphs[0] == graphs[1]
    assert counters["mcompile"]["rewritten"] >= 2


def test_cache_contiguous_one_decode_graph():
    """The prefill's K/V are transposed views; stored as they come, the cache would change layout at
    its first concatenation and the compiled decode step would compile twice (once per layout)."""
    x = torch.randn(1, 5, 2, 8).transpose(1, 2)  # (B, H, N, D) as the projections give it
    assert quantize(x, fp8_scale(x)).is_contiguous()
    model = tiny_llama("sdpa")
    torch._dynamo.reset()
    with torch.no_grad():
        model.compile(backend="minference", dynamic=True, options=COVER)
        before = counters["stats"]["unique_graphs"]
        model.generate(_ids(1, 90), max_new_tokens=4, do_sample=False, past_key_values=FP8Cache(model.config))
    assert counters["stats"]["unique_graphs"] - before == 2  # the prefill and the decode step


# torch 2.11's Inductor generates C++ for this graph on the CPU that does not compile (a vectorized
# bounds check names a temporary it never declared, in the kernel that reads the float8 cache and
# the positions; run on the GPU machine's CPU, docs/results/gpu_machine_cpu_chunk_tests_torch211_2026-12-08.log);
# torch 2.13 compiles it. On CUDA Inductor generates Triton instead.
_OLD_CPU_INDUCTOR = tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2]) < (2, 13)


@pytest.mark.xfail(_OLD_CPU_INDUCTOR, reason="torch < 2.13: Inductor's C++ code for this graph does not compile",
                   strict=False)
def test_generate_chunked_prefill_compiled():
    """generate(prefill_chunk_size=...) over the FP8 cache: each chunk after the first attends to the
    cached keys through a rewritten (sparse) attention, the tokens equal eager generation chunked the
    same way, and the graphs stop growing: a chunk the size of its offset may get one graph of its own
    (Dynamo's duck sizing), after that a new prompt length compiles nothing. Through Inductor, with
    ``dense_below`` between the chunks' key lengths so that the graph holds the conditional: a
    chunk's key length is ``past + chunk`` (each layer's cache its own past symbol, some known
    equal), whose symbols cross the shared region on their own (conditional._free_symbols);
    Inductor could not generate the region's code before."""
    model = tiny_llama("sdpa")
    prompts = [_ids(1, 300), _ids(1, 420, seed=1), _ids(1, 530, seed=2)]
    kw = {"max_new_tokens": 5, "do_sample": False, "prefill_chunk_size": 128}
    torch._dynamo.reset()
    with torch.no_grad():
        refs = [model.generate(p, past_key_values=FP8Cache(model.config), **kw) for p in prompts]
        model.compile(backend="minference", dynamic=True, options={**COVER, "dense_below": 200, "compiler": "inductor"})
        rewritten = counters["mcompile"]["rewritten"]
        outs = [model.generate(prompts[0], past_key_values=FP8Cache(model.config), **kw)]
        assert counters["mcompile"]["rewritten"] - rewritten > 2  # the chunk graphs too, not the prefill's alone
        outs.append(model.generate(prompts[1], past_key_values=FP8Cache(model.config), **kw))
        graphs = counters["stats"]["unique_graphs"]
        outs.append(model.generate(prompts[2], past_key_values=FP8Cache(model.config), **kw))
    for out, ref in zip(outs, refs):
        assert torch.equal(out, ref)
    assert counters["stats"]["unique_graphs"] == graphs



def test_preallocated_cache_writes_in_place():
    """FP8Cache(max_length=...): each float8 layer's store is allocated once and every update is
    written into it (keys / values view its filled part); what each update returns equals the
    growing cache's; an update past max_length is a clear error; beam reordering and batch
    selection keep the layer on a store; bad arguments are refused."""
    model = tiny_llama(layers=2)
    grow, pre = FP8Cache(model.config), FP8Cache(model.config, max_length=100, batch_size=2)
    layer = pre.layers[0]
    store = layer.key_store
    assert store.shape == (2, 100, 2, 16) and store.dtype == torch.float8_e4m3fn  # (B, tokens, KV heads, D)
    g = torch.Generator().manual_seed(0)
    for n in (40, 1, 29):
        k, v = torch.randn(2, 2, n, 16, generator=g), torch.randn(2, 2, n, 16, generator=g)
        for a, b in zip(grow.layers[0].update(k, v), layer.update(k, v)):
            assert torch.equal(a, b)
    assert layer.key_store is store and layer.keys._base is store and layer.get_seq_length() == 70
    assert torch.equal(layer.keys.view(torch.uint8), grow.layers[0].keys.view(torch.uint8))
    # both layers' stores (K and V, held from the start) + layer 0's scales
    assert cache_bytes(pre) == 2 * 2 * (2 * 2 * 100 * 16) + 2 * 2 * 16 * 4
    with pytest.raises(ValueError, match="max_length=100 tokens per layer; this update needs 101"):
        layer.update(torch.randn(2, 2, 31, 16), torch.randn(2, 2, 31, 16))
    layer.reorder_cache(torch.tensor([1, 0]))
    grow.layers[0].reorder_cache(torch.tensor([1, 0]))
    assert layer.keys._base is layer.key_store and torch.equal(layer.keys.view(torch.uint8),
                                                                grow.layers[0].keys.view(torch.uint8))
    layer.crop(-5)  # a view of the store, 5 tokens shorter; the next update writes after it
    layer.update(torch.randn(2, 2, 5, 16), torch.randn(2, 2, 5, 16))
    assert layer.get_seq_length() == 70 and layer.keys._base is layer.key_store
    layer.batch_select_indices(torch.tensor([1]))
    assert layer.key_store.shape == (1, 100, 2, 16) and layer.get_seq_length() == 70
    k, v = torch.randn(1, 2, 3, 16), torch.randn(1, 2, 3, 16)
    assert layer.update(k, v)[0].shape == (1, 2, 73, 16)
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="max_length must be a positive int"):
            FP8Cache(model.config, max_length=bad)
        with pytest.raises(ValueError, match="batch_size must be a positive int"):
            FP8Cache(model.config, max_length=10, batch_size=bad)
    with pytest.raises(ValueError, match="do not fit the layer's store"):  # K/V of another head count
        FP8Cache(model.config, max_length=10).layers[0].update(torch.randn(1, 3, 2, 16), torch.randn(1, 3, 2, 16))
    with pytest.raises(ValueError, match="needs the model's config"):
        FP8Cache(max_length=10)



def test_preallocated_cache_chunked_prefill_compiled():
    """A prefill in chunks compiled over FP8Cache(max_length=...): the tokens equal eager generation
    with the growing cache, every chunk lands in the stores allocated before the call (the graphs
    write into them; through Inductor in place, so that a chunk's graph holds the cache once: the
    memory is measured on the GPU, docs/BENCHMARKS.md), and caches of other lengths and capacities
    compile nothing new."""
    model = tiny_llama("sdpa", layers=1)
    prompts = [_ids(1, 330, seed=2), _ids(1, 250)]
    kw = {"max_new_tokens": 3, "do_sample": False, "prefill_chunk_size": 96}
    torch._dynamo.reset()
    with torch.no_grad():
        refs = [model.generate(p, past_key_values=FP8Cache(model.config), **kw) for p in prompts]
        model.compile(backend="minference", dynamic=True, options={**COVER, "dense_below": 200})
        graphs = None
        for p, ref, extra in ((prompts[0], refs[0], 0), (prompts[1], refs[1], 40)):
            cache = FP8Cache(model.config, max_length=p.shape[1] + 2 + extra)
            stores = [(l.key_store.data_ptr(), l.value_store.data_ptr()) for l in cache.layers]
            assert torch.equal(model.generate(p, past_key_values=cache, **kw), ref)
            assert [(l.key_store.data_ptr(), l.value_store.data_ptr()) for l in cache.layers] == stores
            assert all(l.keys._base is l.key_store and l.get_seq_length() == p.shape[1] + 2 for l in cache.layers)
            graphs = graphs or counters["stats"]["unique_graphs"]
    assert counters["mcompile"]["rewritten"] > 2
    assert counters["stats"]["unique_graphs"] == graphs
