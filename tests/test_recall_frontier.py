"""The benchmark's selections below the tile (benchmarks/recall_frontier.py ``measure_columns``) on
attention whose shape is known: a vertical line is kept as one column, a slash as whole tiles."""

import pytest
import torch

from benchmarks.recall_frontier import measure_bound, measure_columns, measure_policy, oracles

N = 512  # 8 blocks of 64; one-hot q/k make each row attend (almost) only to its target key
BLOCK_M = 7  # the query block measured: rows 448..511
CAUSAL = 64 * BLOCK_M * 64 + 64 * 65 / 2


def _heads():
    """Head 0: every row looks at key 100 (a vertical line in tile 1); head 1: row i looks at key
    i - 200 (a slash: block 7's rows look at keys 248..311, tiles 3 and 4)."""
    targets = [torch.full((N,), 100), (torch.arange(N) - 200).clamp(min=0)]
    q = torch.stack([4.0 * torch.nn.functional.one_hot(t, N).float() for t in targets])[None]
    k = 4.0 * torch.eye(N)[None, None].repeat(1, 2, 1, 1)
    return q, k


@pytest.mark.parametrize("spec", ["cv:0.99,8,0.005", "cvt:0.99,8,0.05"])
def test_vertical_kept_as_a_column_and_slash_as_tiles(spec):
    """The split-half test tells a vertical line from a slash, with the block-wide drop (``cv``) and
    with the rule a kernel could apply tile by tile (``cvt``: each row's softmax within the tile)."""
    q, k = _heads()
    row = measure_columns(q, k, spec, [BLOCK_M], 1.0)
    assert min(row["recall"]) > 0.99
    # head 0: the forced tiles (sink, diagonal, the one before) and one column; head 1: those and tiles 3, 4
    assert row["kept"][0] == pytest.approx((3 * 4096 + 64) / CAUSAL)
    assert row["kept"][1] == pytest.approx(5 * 4096 / CAUSAL)
    assert row["columns"][0] == pytest.approx(64 / (3 * 4096 + 64)) and row["columns"][1] == 0.0


def test_columns_alone_miss_a_slash():
    """Columns chosen from 8 sampled rows hold those rows' keys only: the slash's other rows lose theirs."""
    q, k = _heads()
    row = measure_columns(q, k, "cols:0.99,8", [BLOCK_M], 1.0)
    assert row["recall"][0] > 0.99 and row["recall"][1] < 0.5


def test_top_keys_cut_a_slash_tile_that_most_sampled_rows_see_as_flat():
    """``cva``: rows that see a tile as flat (no key of theirs in it) all name the same largest key, so
    the split-half test passes and the slash's edge tile (keys 248..255, which only rows 448..455 look
    at, one of them sampled) is cut to a few columns: the other rows lose their key."""
    q, k = _heads()
    row = measure_columns(q, k, "cva:0.99,8,1", [BLOCK_M], 1.0)
    assert row["recall"][0] > 0.99 and row["recall"][1] < 0.95
    assert row["columns"][1] > 0.0


def test_column_oracle_between_the_tile_and_key_oracles():
    q, k = _heads()
    o = oracles(q, k, [BLOCK_M], 1.0)
    for t in (0.9, 0.99):
        assert o[f"key@{t}"][0] <= o[f"col@{t}"][0] <= o[f"tile@{t}"][0]
        assert o[f"col@{t}"][0] == pytest.approx(64 / CAUSAL)  # the vertical: one column
        assert o[f"col@{t}"][1] > 32 * 64 / CAUSAL  # the slash: a column per row



def test_bound_score_and_its_control():
    """``xm`` (block-mass's selection from the exact largest logits, no neighbours) keeps what the
    package's own index of ``max:R,S`` keeps; ``qb`` (Quest's per-dimension bound in place of the
    largest logit) keeps the same here, where each tile's bound is its one key's logit: the sink,
    diagonal and previous tiles and the target's tiles (the vertical's tile 1; the slash's 3 and 4)."""
    q, k = _heads()
    exact = measure_bound(q, k, "xm:0.99,8", [BLOCK_M], 1.0)
    package = measure_policy(q, k, None, "max:0.99,8", [BLOCK_M], 1.0, False)
    assert exact["kept"] == pytest.approx(package["kept"]) and exact["recall"] == pytest.approx(package["recall"])
    for spec in ("qb:0.99,8", "qb:0.99,8,16"):
        bound = measure_bound(q, k, spec, [BLOCK_M], 1.0)
        assert bound["kept"] == pytest.approx(exact["kept"]) and min(bound["recall"]) > 0.99
    assert exact["kept"][0] == pytest.approx((3 * 4096 + 2080) / CAUSAL)
    assert exact["kept"][1] == pytest.approx((4 * 4096 + 2080) / CAUSAL)


def test_cut_from_tiles_shared_with_the_neighbours():
    """``cvt:R,S,D,1`` takes block-mass's tiles with the neighbouring blocks' estimates shared (as the
    default's are): never fewer tiles than without, every target kept; the vertical still a column."""
    q, k = _heads()
    alone = measure_columns(q, k, "cvt:0.99,8,0.05", [BLOCK_M], 1.0)
    shared = measure_columns(q, k, "cvt:0.99,8,0.05,1", [BLOCK_M], 1.0)
    assert min(shared["recall"]) > 0.99
    assert shared["kept"][0] == pytest.approx(alone["kept"][0]) and shared["columns"][0] > 0.0
    assert shared["kept"][1] >= alone["kept"][1]


def test_kernel_rate_leaves_out_layers_sent_to_dense(tmp_path):
    """A layer whose index covers more than the op's density threshold runs dense attention (its
    timed 'kernel' is dense attention's), so the kernel's rate is taken over the other layers, and
    the time plot draws that layer as dense."""
    from benchmarks.recall_frontier import plot_time, summary
    from mcompile.ops import DENSE_ABOVE_FRACTION, FRACTION_CHECK_MIN, dense_is_faster

    n = max(FRACTION_CHECK_MIN, 131072)
    oracle = {f"{kind}@{t}": [0.1] for kind in ("tile", "key") for t in (0.9, 0.95, 0.97, 0.98, 0.99)}

    def layer(i, computed, kernel_ms, layer_ms):
        return {"length": n, "layer": i, "cudnn_ms": 40.0, "oracles": oracle,
                "policies": {"default": {"recall": [0.97], "kept": [computed], "layer_computed": computed,
                                         "kernel_ms": kernel_ms, "layer_ms": layer_ms}}}

    dense, sparse = DENSE_ABOVE_FRACTION + 0.2, 0.2
    assert dense_is_faster(dense, n) and not dense_is_faster(sparse, n)
    assert not dense_is_faster(dense, FRACTION_CHECK_MIN - 1)
    results = [layer(0, dense, 48.0, 46.0), layer(3, sparse, 10.0, 14.0)]
    (row,) = summary(results)
    assert row["dense_layers"] == 1
    assert row["kernel_rate_vs_cudnn"] == pytest.approx(40.0 * sparse / 10.0)  # the sparse layer's alone
    assert row["speedup_vs_cudnn"] == pytest.approx(40.0 / 30.0)
    plot_time(results, str(tmp_path / "time.png"))
    assert (tmp_path / "time.png").stat().st_size > 0
