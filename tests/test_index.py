"""The sparse index format: its documented example, run merging, prefix counts, densities."""

import pytest
import torch

from mcompile.index import SENTINEL, SparseIndex, column_counts, index_to_mask, kept_fraction, runs_to_diag_prefix
from mcompile.kernels.estimate import diagonals_to_runs


def _index(runs, columns, n, b=1, h=1):
    r = torch.tensor(runs, dtype=torch.int32).view(1, 1, -1, 2).expand(b, h, -1, -1).contiguous()
    rc = torch.full((b, h), len(runs), dtype=torch.int32)
    c = torch.tensor(columns, dtype=torch.int32).view(1, 1, -1).expand(b, h, -1).contiguous()
    nb = (n + 63) // 64
    return SparseIndex(r, rc, runs_to_diag_prefix(r, rc, n), c, column_counts(c, n),
                       torch.zeros(b, h, nb + 1, 0, dtype=torch.int32), torch.zeros(b, h, nb + 1, dtype=torch.int32))


def test_run_tiles_are_block_wide_bands():
    """Run (0, 1) keeps, for query block m, the keys [m*64 - 1, (m+1)*64): a 65-wide band."""
    n = 200
    mask = index_to_mask(_index([(0, 1)], [], n), n)[0, 0]
    for q in (0, 63, 64, 100, 199):
        m = q // 64
        expected = torch.zeros(n, dtype=torch.bool)
        expected[max(0, m * 64 - 1):q + 1] = True
        assert torch.equal(mask[q], expected), q


def test_columns_and_causality():
    n = 130
    mask = index_to_mask(_index([(0, 0)], [5, 70], n), n)[0, 0]
    assert mask[4, 5] == 0 and mask[5, 5] == 1  # causal
    assert mask[100, 5] == 1 and mask[100, 70] == 1 and mask[100, 6] == 0
    assert mask[69, 70] == 0  # column 70 is in the future for query 69


def test_diagonals_merge_into_runs_at_least_a_block_apart():
    d = torch.tensor([[[0, 1, 2, 70, 100, 200, SENTINEL, SENTINEL]]], dtype=torch.int32)
    runs, count = diagonals_to_runs(d)
    assert count.item() == 3
    assert runs[0, 0, :3].tolist() == [[0, 2], [70, 100], [200, 200]]
    assert (runs[0, 0, 3:] == SENTINEL).all()


def test_diag_prefix_counts_covered_diagonals():
    r = torch.tensor([[[[0, 2], [10, 11]]]], dtype=torch.int32)
    p = runs_to_diag_prefix(r, torch.tensor([[2]], dtype=torch.int32), 16)
    assert p[0, 0].tolist() == [0, 1, 2, 3, 3, 3, 3, 3, 3, 3, 3, 4, 5, 5, 5, 5, 5]


@pytest.mark.parametrize("n", [1, 63, 200, 517])
def test_diag_prefix_matches_a_scan_over_random_runs(n):
    """Random sorted disjoint runs (some past n, some padded away) against a plain scan."""
    g = torch.Generator().manual_seed(n)
    b, h, r = 2, 5, 7
    runs = torch.full((b, h, r, 2), SENTINEL, dtype=torch.int32)
    count = torch.randint(0, r + 1, (b, h), generator=g, dtype=torch.int32)
    expected = torch.zeros(b, h, n + 1, dtype=torch.int32)
    for bi in range(b):
        for hi in range(h):
            edges = (torch.randperm(n + 40, generator=g)[:2 * int(count[bi, hi])].sort().values).view(-1, 2)
            runs[bi, hi, :len(edges)] = edges.int()
            covered = torch.zeros(n, dtype=torch.int32)
            for lo, hi_ in edges.tolist():
                covered[lo:hi_ + 1] = 1
            expected[bi, hi, 1:] = covered.cumsum(0)
    assert torch.equal(runs_to_diag_prefix(runs, count, n), expected)
    assert torch.equal(runs_to_diag_prefix(runs[:, :, :0], count * 0, n), torch.zeros(b, h, n + 1, dtype=torch.int32))


def test_column_counts_per_block():
    c = torch.tensor([[[3, 64, 65, 190, SENTINEL]]], dtype=torch.int32)
    assert column_counts(c, 200)[0, 0].tolist() == [1, 3, 4, 4, 4]  # ends 64, 128, 192, 256 (+ spare row)


def test_kept_fraction_of_dense_index_is_one():
    n = 300
    idx = _index([(0, n - 1)], [], n)
    assert torch.allclose(kept_fraction(idx, n), torch.ones(1, 1, dtype=torch.float64))
    local = _index([(0, 9)], [], n)
    assert kept_fraction(local, n).item() < 0.5


def test_computed_fraction_tracks_the_exact_count():
    """The run-time estimate of the kernel's work (ops' dense-fallback check) stays within 25%
    of the exact count, for every pattern kind, and is 1 for a dense head."""
    from mcompile.index import computed_fraction
    from mcompile.kernels.estimate import estimate_index_ref
    from mcompile.pattern_db.cost import kernel_density

    torch.manual_seed(0)
    n = 3000
    q, k = torch.randn(2, 4, n, 32), torch.randn(2, 2, n, 32)
    for kinds, p0, p1 in (([2] * 4, [64] * 4, [256] * 4), ([1] * 4, [64] * 4, [512] * 4),
                          ([3] * 4, [4] * 4, [0] * 4), ([2, 1, 3, 2], [30, 16, 8, 500], [100, 300, 0, 900])):
        index = estimate_index_ref(q, k, None, kinds, p0, p1, 32 ** -0.5)
        exact = kernel_density(index, n).mean().item()
        approx = float(computed_fraction(index, n))
        assert abs(approx - exact) <= 0.25 * exact, (kinds, approx, exact)
    dense = estimate_index_ref(q, k, None, [0] * 4, [0] * 4, [0] * 4, 32 ** -0.5)
    assert abs(float(computed_fraction(dense, n)) - 1.0) < 0.05


def test_budgets_scale_below_their_reference_length_only():
    """patterns.scaled_budgets: (N / L)^exponent below L, never below the floors or above the
    given budgets, unchanged at and past L, and absolute when L is 0; explain's default policy."""
    from mcompile.patterns import DEFAULT_VERTICAL_SLASH as VS, Pattern, PatternKind, scaled_budgets

    assert scaled_budgets(VS, 131072, 131072) == VS == scaled_budgets(VS, 1 << 20, 131072) == scaled_budgets(VS, 512, 0)
    half = scaled_budgets(VS, 65536, 131072, 0.7)
    assert (half.vertical, half.slash) == (round(1000 * 0.5 ** 0.7), round(6096 * 0.5 ** 0.7))
    tiny = scaled_budgets(VS, 64, 131072)
    assert (tiny.vertical, tiny.slash) == (64, 128)  # the floors
    a = scaled_budgets(Pattern(PatternKind.A_SHAPE, 4, 4096), 1024, 131072)
    assert a.sink == 4 and 128 <= a.local < 4096  # the sink is never scaled


@pytest.mark.parametrize("n", [1, 5, 7, 8, 9, 40])
def test_chunked_scan_is_a_running_sum(monkeypatch, n):
    """The chunked scan behind ``runs_to_diag_prefix`` equals cumsum across chunk edges."""
    import mcompile.index as index

    monkeypatch.setattr(index, "SCAN_CHUNK", 8)
    x = torch.randint(-3, 4, (2, 3, n), generator=torch.Generator().manual_seed(n), dtype=torch.int32)
    assert torch.equal(index._scan(x), x.cumsum(-1, dtype=torch.int32))
    assert torch.equal(index._scan(x > 0), (x > 0).cumsum(-1, dtype=torch.int32))


def test_diag_prefix_counts_overlapping_runs_once():
    r = torch.tensor([[[[0, 4], [2, 6], [20, 30]]]], dtype=torch.int32)  # overlapping, one past n
    p = runs_to_diag_prefix(r, torch.tensor([[3]], dtype=torch.int32), 24)
    covered = torch.zeros(24, dtype=torch.int32)
    covered[0:7] = 1
    covered[20:24] = 1
    assert p[0, 0, 1:].tolist() == covered.cumsum(0).tolist()
