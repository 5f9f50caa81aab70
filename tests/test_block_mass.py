"""Block-mass: per query block, the fewest key tiles reaching a share of the estimated mass.

The estimator against a direct computation, the selection's contract (target reached, nothing
kept beyond it, forced tiles, diffuse heads dense), and the index it builds driving the sparse
attention against dense attention with the index's mask materialised, over odd shapes, GQA,
batch > 1, padding and a chunk after a cached prefix."""

import pytest
import torch

from mcompile.index import BLOCK, SENTINEL, block_mask_rows, kept_fraction, num_blocks
from mcompile.kernels.block_mass import LOCAL_TILES, sample_offsets, select_tiles, share_neighbours, tile_mass
from mcompile.kernels.estimate import estimate_index_ref
from mcompile.patterns import Pattern, PatternKind, encode

from .helpers import dense_causal, masked_dense, padding_mask, qkv


def _mass(recall, samples=8):
    return Pattern.from_dict({"kind": "block_mass", "recall": recall, "samples": samples})


def _structured(b, h, hk, n, d, seed=0):
    """Q/K with a few strong key columns, so that heads are sparse, as real ones are."""
    q, k, v = qkv(b, h, hk, n, d, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    hot = torch.randint(0, n, (hk, 3), generator=g)
    for j in range(hk):
        k[:, j, hot[j]] += 4 * q.mean((0, 1, 2))  # keys every query aligns with
    return q, k, v


def test_pattern_parses_validates_and_describes():
    p = _mass(0.98)
    assert p.kind == PatternKind.BLOCK_MASS and p.recall == 0.98 and p.samples == 8
    assert Pattern.from_dict(p.to_dict()) == p and p.describe() == "block_mass(recall=0.98, samples=8, score=mass)"
    assert Pattern.from_dict({"kind": "block_mass", "recall": 1}).recall == 1.0
    m = Pattern.from_dict({"kind": "block_mass", "recall": 0.99, "samples": 64, "score": "max"})
    assert (m.recall, m.samples, m.score) == (0.99, 64, "max") and p.score == "mass"
    assert Pattern.from_dict(m.to_dict()) == m and encode([m]) == ([4], [990], [64 | 128])
    for bad, message in [({"recall": 0.0}, r"recall must be a number in \(0, 1\]"),
                         ({"recall": 1.5}, r"recall must be a number in \(0, 1\]"),
                         ({"recall": "high"}, "recall must be a number"),
                         ({"recall": 0.9505}, "kept to 1/1000"),
                         ({"recall": 0.9, "samples": 65}, "samples must be <= 64"),
                         ({"recall": 0.9, "samples": 0}, "samples must be >= 1"),
                         ({"recall": 0.9, "samples": 6}, "samples must be a power of two"),
                         ({"recall": 0.9, "samples": 200}, "samples must be <= 64, got 200"),
                         ({"recall": 0.9, "samples": 8.0}, "samples must be an int"),
                         ({"recall": 0.9, "score": "sum"}, r"score must be one of \['mass', 'max'\]"),
                         ({"recall": 0.9, "neighbours": 2}, "neighbours must be 0 or 1"),
                         ({"recall": 0.9, "neighbours": True}, "neighbours must be 0 or 1"),
                         ({"recall": 0.9, "blocks": 4}, "unknown keys")]:
        with pytest.raises(ValueError, match=message):
            Pattern.from_dict({"kind": "block_mass", **bad})


def test_neighbours_option_round_trips():
    n = Pattern.from_dict({"kind": "block_mass", "recall": 0.99, "samples": 4, "score": "max", "neighbours": 1})
    assert (n.samples, n.score, n.neighbours) == (4, "max", 1) and encode([n]) == ([4], [990], [4 | 128 | 256])
    assert Pattern.from_dict(n.to_dict()) == n
    assert n.describe() == "block_mass(recall=0.99, samples=4, score=max, neighbours=1)"
    assert "neighbours" not in _mass(0.9).to_dict() and _mass(0.9).neighbours == 0


@pytest.mark.parametrize("m0,m_rows", [(0, 5), (3, 4), (7, 1)])
def test_share_neighbours_equals_a_direct_computation(m0, m_rows):
    """Each block's estimate: the mean over blocks m-1, m, m+1 (those that hold queries) of their
    estimates restricted to block m's causal tiles and renormalised there, and never below the
    block's own renormalised estimate."""
    nb = m0 + m_rows
    est = torch.rand(2, 3, m_rows, nb, generator=torch.Generator().manual_seed(m0))
    out = share_neighbours(est, m0)
    for j in range(m_rows):
        parts = []
        for i in (j - 1, j, j + 1):
            if 0 <= i < m_rows:
                e = est[:, :, i].clone()
                e[..., m0 + j + 1:] = 0
                parts.append(e / e.sum(-1, keepdim=True))
        own = parts[0] if j == 0 else parts[1]
        torch.testing.assert_close(out[:, :, j], torch.maximum(sum(parts) / len(parts), own))
        assert out[:, :, j, m0 + j + 1:].eq(0).all()


def test_share_neighbours_keeps_a_blocks_own_peak():
    """The last block looks at a far tile its neighbour does not (a question over a passage, the
    block before it the passage's text): sharing must not lower that tile below the block's own
    estimate, or a lower target drops it (the mean alone halved it and lost a needle)."""
    nb = 6
    est = torch.zeros(1, 1, 2, nb)
    est[0, 0, 0, :5] = torch.tensor([0.3, 0.0, 0.0, 0.5, 0.2])  # block 4: sink, tile 3, local
    est[0, 0, 1] = torch.tensor([0.4, 0.3, 0.0, 0.0, 0.15, 0.15])  # block 5: tile 1 is its own
    out = share_neighbours(est, 4)
    assert out[0, 0, 1, 1] == pytest.approx(0.3)  # the mean alone: 0.15, below the neighbour's tile 3 (0.25)
    tiles, counts, _ = select_tiles(out, torch.tensor([0.75]), 4, nb)
    assert tiles[0, 0, 1, :counts[0, 0, 1]].tolist() == [0, 1, 4, 5]  # sink, its own tile, local, diagonal


def test_neighbours_heads_select_from_the_shared_estimate():
    """In a layer mixing heads with and without neighbours (a chunk after a cached prefix), each
    head's tiles are select_tiles of its own estimate, shared or not, and the sparse attention over
    that index equals dense attention with its mask."""
    q, k, v = _structured(1, 4, 2, 1500, 16, seed=3)
    q = q[:, :, 1500 - 700:]
    spec = {"kind": "block_mass", "recall": 0.9, "samples": 4, "score": "max"}
    pats = [Pattern.from_dict({**spec, "neighbours": x}) for x in (1, 0, 0, 1)]
    index = estimate_index_ref(q, k, None, *encode(pats), 0.25)
    n, m0 = 1500, (1500 - 700) // BLOCK
    est = tile_mass(q, k, None, 0.25, torch.arange(4), 4, score="max")
    for h, x in enumerate((1, 0, 0, 1)):
        e = share_neighbours(est[:, h:h + 1], m0) if x else est[:, h:h + 1]
        tiles, counts, _ = select_tiles(e, torch.tensor([0.9]), m0, num_blocks(n))
        for j in range(counts.shape[-1]):
            c = int(counts[0, 0, j])
            assert index.blocks[0, h, m0 + j, :c].tolist() == tiles[0, 0, j, :c].tolist()
    plain = estimate_index_ref(q, k, None, *encode([Pattern.from_dict(spec)] * 4), 0.25)
    for h, x in enumerate((1, 0, 0, 1)):  # the option changes the heads that have it, and only those
        same = torch.equal(index.blocks[0, h], plain.blocks[0, h]) and torch.equal(index.block_count[0, h],
                                                                                   plain.block_count[0, h])
        assert same != bool(x)
    out = torch.ops.mcompile.sparse_attention(q, k, v, *index, None, 0.25)
    ref = masked_dense(torch.nn.functional.pad(q, (0, 0, n - 700, 0)), k, v, index, 0.25)[:, :, n - 700:]
    torch.testing.assert_close(out, ref.to(out.dtype), atol=1e-5, rtol=1e-5)


def test_sample_offsets_spread_over_the_block():
    assert sample_offsets(1).tolist() == [63]
    assert sample_offsets(4).tolist() == [63, 47, 31, 15]
    assert sample_offsets(64).tolist() == list(range(63, -1, -1))


@pytest.mark.parametrize("b,h,hk,n,nq", [(1, 2, 2, 200, 200), (2, 4, 2, 161, 161), (1, 3, 1, 300, 130)])
def test_tile_mass_equals_a_direct_computation(b, h, hk, n, nq):
    """Each estimate is the mean, over the sampled rows of its block, of the softmax mass per key
    tile, computed here row by row with the causal mask materialised."""
    q, k, _ = qkv(b, h, hk, n, 16, seed=3)
    q = q[:, :, n - nq:]
    kp = padding_mask(b, n, left=(7,) * b)
    heads = torch.tensor([0, h - 1])
    est = tile_mass(q, k, kp, 0.25, heads, samples=4)
    p = n - nq
    m0, nb = p // BLOCK, num_blocks(n)
    assert est.shape == (b, 2, nb - m0, nb)
    group = h // hk
    for bi in range(b):
        for hi, head in enumerate(heads.tolist()):
            for m in range(m0, nb):
                rows = [min(max(m * BLOCK + o, p, m * BLOCK), min(n, (m + 1) * BLOCK) - 1) for o in (63, 47, 31, 15)]
                want = torch.zeros(nb)
                for r in rows:
                    s = (q[bi, head, r - p].float() @ k[bi, head // group].float().T) * 0.25
                    s = s.masked_fill((torch.arange(n) > r) | ~kp[bi], float("-inf"))
                    pr = torch.softmax(s, -1)
                    want += torch.nn.functional.pad(pr, (0, nb * BLOCK - n)).view(nb, BLOCK).sum(-1) / len(rows)
                torch.testing.assert_close(est[bi, hi, m - m0], want, atol=1e-5, rtol=1e-5)


def test_tile_max_score_equals_a_direct_computation():
    """score="max": the mean over the sampled rows of a softmax over the causal tiles of each
    row's largest allowed logit in the tile; padding and a prefix chunk included."""
    b, h, hk, n, nq = 2, 2, 1, 200, 150
    q, k, _ = qkv(b, h, hk, n, 16, seed=4)
    q = q[:, :, n - nq:]
    kp = padding_mask(b, n, left=(0, 70))  # batch 1: tile 0 and part of tile 1 padded out
    est = tile_mass(q, k, kp, 0.25, torch.tensor([1]), samples=2, score="max")
    p = n - nq
    m0, nb = p // BLOCK, num_blocks(n)
    for bi in range(b):
        for m in range(m0, nb):
            want = torch.zeros(nb)
            rows = [min(max(m * BLOCK + o, p), n - 1) for o in (63, 31)]
            for r in rows:
                s = (q[bi, 1, r - p] @ k[bi, 0].T) * 0.25
                s = s.masked_fill((torch.arange(n) > r) | ~kp[bi], float("-inf"))
                top = torch.stack([s[t * BLOCK:(t + 1) * BLOCK].max() for t in range(nb)])
                want += torch.softmax(top, -1).nan_to_num(0.0) / len(rows)
            torch.testing.assert_close(est[bi, 0, m - m0], want, atol=1e-6, rtol=1e-5)
    assert est[1, 0, :, 0].eq(0).all()  # a tile with no allowed key scores 0


def test_selection_reaches_the_target_with_the_fewest_tiles():
    torch.manual_seed(0)
    nb, m0 = 9, 2
    est = torch.rand(1, 3, nb - m0, nb) ** 4  # skewed masses
    recall = torch.tensor([0.5, 0.9, 1.0])
    tiles, counts, dense = select_tiles(est, recall, m0, capacity=nb)
    assert not dense.any()
    for h in range(3):
        for i in range(nb - m0):
            m = m0 + i
            row = est[0, h, i, :m + 1]
            kept = tiles[0, h, i, :counts[0, h, i]].tolist()
            forced = {0, *range(max(0, m - LOCAL_TILES), m + 1)}  # the sink, the local tiles, the diagonal
            assert kept == sorted(kept) and forced <= set(kept)
            assert (tiles[0, h, i, counts[0, h, i]:] == SENTINEL).all()
            share = row[kept].sum() / row.sum()
            assert share >= recall[h] - 1e-6
            optional = sorted((t for t in kept if t not in forced), key=lambda t: row[t].item())
            if optional:  # dropping the smallest optional tile falls short: nothing kept beyond the target
                assert (row[kept].sum() - row[optional[0]]) / row.sum() < recall[h]


def test_a_head_needing_more_tiles_than_the_index_holds_runs_dense():
    est = torch.ones(1, 2, 4, 4)  # uniform: the last block needs all 4 tiles at recall 1
    _, counts, dense = select_tiles(est, torch.tensor([1.0, 0.5]), 0, capacity=3)
    assert dense.tolist() == [[True, False]]
    q, k, v = qkv(1, 2, 2, 256, 16)
    kinds, p0, p1 = encode([_mass(1.0)] * 2)
    index = estimate_index_ref(q, k, None, kinds, p0, p1, 0.25, capacity=(1, 0, 3))
    assert index.run_count.tolist() == [[1, 1]] and (index.block_count == 0).all()  # one run of every diagonal
    out = torch.ops.mcompile.sparse_attention(q, k, v, *index, None, 0.25)
    torch.testing.assert_close(out, dense_causal(q, k, v, 0.25), atol=1e-5, rtol=1e-5)


SHAPES = [(1, 2, 2, 200, 200, 16), (2, 4, 2, 161, 161, 16), (2, 6, 2, 97, 97, 32), (1, 4, 4, 300, 130, 16),
          (2, 3, 1, 257, 257, 8)]


@pytest.mark.parametrize("padded", [False, True], ids=["nopad", "pad"])
@pytest.mark.parametrize("b,h,hk,n,nq,d", SHAPES)
def test_sparse_attention_equals_masked_dense(b, h, hk, n, nq, d, padded):
    q, k, v = _structured(b, h, hk, n, d)
    q = q[:, :, n - nq:].contiguous()
    kp = padding_mask(b, n, left=(5,) * b, right=(3,) * b) if padded else None
    kinds, p0, p1 = encode([_mass(0.6, samples=4)] * h)
    index = estimate_index_ref(q, k, kp, kinds, p0, p1, d ** -0.5)
    out = torch.ops.mcompile.sparse_attention(q, k, v, *index, kp, d ** -0.5)
    ref = masked_dense(torch.nn.functional.pad(q, (0, 0, n - nq, 0)), k, v, index, d ** -0.5, kp)[:, :, n - nq:]
    rows = slice(5, n - nq - 3) if padded else slice(None)  # fully padded query rows aside
    torch.testing.assert_close(out[:, :, rows], ref[:, :, rows].to(out.dtype), atol=1e-5, rtol=1e-5)
    if num_blocks(n) > 2 + LOCAL_TILES:  # (fewer blocks: the forced tiles are all there is)
        assert kept_fraction(index, n, kp, queries=nq).mean() < 1.0  # tiles were dropped


def test_recall_one_keeps_every_tile_and_equals_dense():
    q, k, v = _structured(2, 4, 2, 230, 16)
    kinds, p0, p1 = encode([_mass(1.0)] * 4)
    index = estimate_index_ref(q, k, None, kinds, p0, p1, 0.25)
    mask = block_mask_rows(index, 0, 230, 230)
    causal = torch.arange(230)[None, :] <= torch.arange(230)[:, None]
    assert torch.equal(mask, causal.expand_as(mask))
    out = torch.ops.mcompile.sparse_attention(q, k, v, *index, None, 0.25)
    torch.testing.assert_close(out, dense_causal(q, k, v, 0.25).to(out.dtype), atol=1e-5, rtol=1e-5)


def test_mixed_with_other_patterns_in_one_layer():
    """Per head: vertical-slash, block-mass, A-shape and dense in one index, each head as alone."""
    q, k, v = _structured(1, 4, 2, 260, 16)
    pats = [Pattern.from_dict({"kind": "vertical_slash", "vertical": 30, "slash": 100}), _mass(0.7),
            Pattern.from_dict({"kind": "a_shape", "sink": 4, "local": 64}), Pattern(PatternKind.DENSE)]
    kinds, p0, p1 = encode(pats)
    index = estimate_index_ref(q, k, None, kinds, p0, p1, 0.25)
    alone = estimate_index_ref(q[:, 1:2], k[:, :1], None, *encode([_mass(0.7)]), 0.25)
    assert torch.equal(block_mask_rows(index, 0, 260, 260)[:, 1], block_mask_rows(alone, 0, 260, 260)[:, 0])
    out = torch.ops.mcompile.sparse_attention(q, k, v, *index, None, 0.25)
    torch.testing.assert_close(out, masked_dense(q, k, v, index, 0.25).to(out.dtype), atol=1e-5, rtol=1e-5)


def test_compiled_model_with_block_mass_equals_masked_dense(monkeypatch):
    """Through the backend: a tiny Llama with block-mass as the default pattern equals the same
    model whose attention is dense with the index's mask materialised."""
    from mcompile.kernels import dispatch
    from mcompile.tools.models import tiny_llama

    options = {"dense_below": 0, "compiler": "aot_eager", "default_pattern": {"kind": "block_mass", "recall": 0.8}}
    model = tiny_llama("sdpa")
    ids = torch.randint(0, 128, (2, 300), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = torch.compile(model, backend="minference", options=options)(ids).logits
        torch._dynamo.reset()
        monkeypatch.setattr(dispatch, "attention_impl", lambda q: lambda q, k, v, index, scale, kp, window=0:
                            masked_dense(q, k, v, index, scale, kp).to(q.dtype))
        ref = torch.compile(model, backend="minference", options=options)(ids).logits
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("nq,padded,kb", [(300, False, None), (170, True, None), (300, False, 3)])
def test_block_mass_layer_index_equals_the_general_assembly(nq, padded, kb):
    """A layer of block-mass heads only takes block_mass_index (selection written into the index,
    no other tables); it keeps exactly what the general assembly keeps for the same heads in a
    mixed layer: a chunk after a cached prefix, padding, heads run dense for lack of capacity."""
    b, n, d = 2, 300, 16
    q, k, v = _structured(b, 4, 2, n, d)
    q = q[:, :, n - nq:].contiguous()
    kp = padding_mask(b, n, left=(0, 7), right=(4, 0)) if padded else None
    mass = [_mass(0.6, samples=4), _mass(0.95, samples=4)]
    vs = Pattern.from_dict({"kind": "vertical_slash", "vertical": 30, "slash": 100})
    caps = None if kb is None else (100, 30, kb)
    mixed = estimate_index_ref(q, k, kp, *encode(mass + [vs, vs]), d ** -0.5, capacity=caps)
    alone = estimate_index_ref(q[:, :2], k[:, :1], kp, *encode(mass), d ** -0.5,
                               capacity=None if kb is None else (1, 0, kb))
    assert alone.column_count.shape[-1] == alone.block_count.shape[-1] and alone.columns.shape[-1] == 0
    if kb is not None:
        assert alone.run_count.any()  # a head ran dense
    rows = (n - nq, n)
    assert torch.equal(block_mask_rows(alone, *rows, n), block_mask_rows(mixed, *rows, n)[:, :2])
    out = torch.ops.mcompile.sparse_attention(q[:, :2], k[:, :1], v[:, :1], *alone, kp, d ** -0.5)
    ref = masked_dense(torch.nn.functional.pad(q[:, :2], (0, 0, n - nq, 0)), k[:, :1], v[:, :1], alone, d ** -0.5,
                       kp)[:, :, n - nq:]
    live = slice(7, None) if padded else slice(None)
    torch.testing.assert_close(out[:, :, live], ref[:, :, live].to(out.dtype), atol=1e-5, rtol=1e-5)


def test_pattern_budgets_by_name():
    """A pattern's budgets read by name for its kind; another kind's name is an error naming the
    budgets it has; the int lists the ops take are only their encoding."""
    from mcompile.patterns import Pattern, encode

    vs = Pattern.from_dict({"kind": "vertical_slash", "vertical": 1000, "slash": 6096})
    assert (vs.vertical, vs.slash) == (1000, 6096) and encode([vs]) == ([2], [1000], [6096])
    a = Pattern.from_dict({"kind": "a_shape", "sink": 64, "local": 1024})
    assert (a.sink, a.local) == (64, 1024)
    bm = Pattern.from_dict({"kind": "block_mass", "recall": 0.95, "samples": 16})
    assert (bm.recall, bm.samples, bm.score) == (0.95, 16, "mass") and encode([bm]) == ([4], [950], [16])
    assert Pattern.from_dict({"kind": "block_sparse", "blocks": 8}).blocks == 8
    with pytest.raises(AttributeError, match=r"has no 'slash' \(its budgets: \['sink', 'local'\]\)"):
        a.slash
