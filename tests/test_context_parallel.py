"""Context parallelism (``mcompile.context_parallel``): the sequence split over 2 gloo processes on
the CPU, each rank running the model on its share with sparse attention over the keys before its
queries; the logits equal one process's sparse prefill of the whole prompt (the backend's), for
both layouts and for the default pattern and A-shape, eager or compiled with the backend."""

import functools
import os

import pytest
import torch
import torch.multiprocessing as mp

from mcompile import context_parallel as cp
from mcompile.tools.models import tiny_llama

from .helpers import free_port, gloo_group

WAYS = 2
N = 512  # zigzag over 2 ranks: 4 chunks of 128 positions (two query blocks each)
CASES = {
    "default": {"dense_below": 0},
    "ashape": {"dense_below": 0, "default_pattern": {"kind": "a_shape", "sink": 64, "local": 128}},
    "below": {"dense_below": 4096},  # the whole prompt is short: dense everywhere, as in one process
}


def _ids():
    return torch.randint(0, 128, (2, N), generator=torch.Generator().manual_seed(0))


def test_shard_ranges_and_round_trip():
    assert cp.shard_ranges(512, 2, 0, "zigzag") == [(0, 128), (384, 512)]
    assert cp.shard_ranges(512, 2, 1, "zigzag") == [(128, 256), (256, 384)]
    assert cp.shard_ranges(512, 4, 3, "contiguous") == [(384, 512)]
    x = torch.arange(2 * 1024).view(2, 1024)
    for layout in cp.LAYOUTS:
        for world in (1, 2, 4):
            parts = [cp.shard(x, 1, world, r, layout) for r in range(world)]
            assert sum(p.shape[1] for p in parts) == 1024
            assert torch.equal(cp.unshard(parts, 1, layout), x)


@pytest.mark.parametrize("args,match", [
    ((500, 2, 0, "zigzag"), "divisible by 256"),
    ((512, 2, 0, "ring"), "layout must be one of"),
    ((512, 2, 2, "zigzag"), "0 <= rank < world"),
])
def test_shard_ranges_errors_say_what_to_do(args, match):
    with pytest.raises(ValueError, match=match):
        cp.shard_ranges(*args)


def test_attention_needs_an_initialised_group():
    q = torch.zeros(1, 2, 128, 16)
    with pytest.raises(RuntimeError, match="init_process_group"):
        cp.attention(q, q, q)


def test_what_context_parallelism_does_not_take_is_refused_with_its_reason():
    """One rank (a world of 1, gloo): a cache, dropout, soft-capping, a non-causal module and
    padded prompts each get a clear error, and the attention itself runs (counted)."""
    model = tiny_llama("sdpa", layers=1, heads=4, kv_heads=2, head_dim=16)
    module = model.model.layers[0].self_attn
    q, k = torch.randn(1, 4, 128, 16), torch.randn(1, 2, 128, 16)
    with gloo_group(0, 1, free_port()):
        with pytest.raises(ValueError, match="use_cache=False"):
            cp.attention(q, torch.randn(1, 2, 256, 16), torch.randn(1, 2, 256, 16))
        call = functools.partial(cp._attention_function, module, q, k, k, None, options=None, group=None,
                                 layout="zigzag")
        with pytest.raises(ValueError, match="dropout"):
            call(dropout=0.1)
        with pytest.raises(ValueError, match="'softcap' is not supported"):
            call(softcap=30.0)
        torch._dynamo.utils.counters.clear()
        assert call()[0].shape == (1, 128, 4, 16)
        assert torch._dynamo.utils.counters["mcompile"]["context_parallel_attention"] == 1
        module.is_causal = False
        with pytest.raises(ValueError, match="not causal"):
            call()
        with pytest.raises(ValueError, match="padded positions"):
            cp.prefill(model, _ids(), attention_mask=torch.ones(2, N).index_fill_(1, torch.tensor([0]), 0))


def _rank(rank: int, port: int, path: str):
    with gloo_group(rank, WAYS, port):
        from transformers import AutoModelForCausalLM

        torch.set_num_threads(1)
        model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="sdpa").eval()
        out = {}
        for layout in cp.LAYOUTS:
            for name, options in CASES.items():
                torch._dynamo.utils.counters.clear()
                out[layout, name] = cp.prefill(model, _ids(), options=options, layout=layout)
                out[layout, name, "sparse"] = torch._dynamo.utils.counters["mcompile"]["packed_sparse"]
        # Compiled with the backend: the model's other work compiles, attention runs between the graphs.
        import mcompile

        backend = functools.partial(mcompile.minference_backend, options={"compiler": "aot_eager"})
        out["compiled"] = cp.prefill(torch.compile(model, backend=backend), _ids(), options=CASES["default"])
        torch.save(out, os.path.join(path, f"out{rank}.pt"))


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not built")
def test_context_parallel_prefill_equals_one_process(tmp_path):
    import mcompile

    model = tiny_llama("sdpa", layers=2, heads=4, kv_heads=2, head_dim=16)
    model.save_pretrained(tmp_path)
    mp.start_processes(_rank, args=(free_port(), str(tmp_path)), nprocs=WAYS, start_method="spawn")
    with torch.no_grad():
        dense = model(_ids()).logits
        one = {}
        for name, options in CASES.items():
            torch._dynamo.reset()
            backend = functools.partial(mcompile.minference_backend, options={**options, "compiler": "aot_eager"})
            one[name] = torch.compile(model, backend=backend)(_ids()).logits
    for rank in range(WAYS):
        out = torch.load(tmp_path / f"out{rank}.pt")
        for layout in cp.LAYOUTS:
            for name in CASES:
                torch.testing.assert_close(out[layout, name], one[name], atol=2e-5, rtol=2e-5,
                                           msg=lambda m: f"{layout} {name}: {m}")
            # each rank answered its 2 ranges (zigzag) or 1 range (contiguous) sparse in both layers
            assert out[layout, "ashape", "sparse"] == 2 * (2 if layout == "zigzag" else 1)
            assert out[layout, "below", "sparse"] == 0
        torch.testing.assert_close(out["compiled"], out["zigzag", "default"], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(one["below"], dense, atol=2e-5, rtol=2e-5)
    assert (one["ashape"] - dense).abs().max() > 1e-3  # A-shape dropped keys: not dense against dense
