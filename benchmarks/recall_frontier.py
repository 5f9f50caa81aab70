"""Recall against computed share on real heads, with the oracles: how far an index is from the best possible.

SmolLM2-135M-Instruct (real weights, RoPE stretched by YaRN x16) reads real text; for each of a
set of layers its Q/K are captured (``mcompile.tools.capture``) and, on 64-row query blocks sampled in
the second half of the prompt, the exact attention is compared with:

- the tile oracle: per query block, the fewest 64x64 tiles whose true mass reaches the target;
- the column oracle: per query block, the fewest key columns (a key for all 64 rows of the block)
  whose true mass, averaged over the block's rows, reaches the target: the finest selection a
  kernel that computes 64 query rows at a time can make;
- the key oracle: per query row, the fewest keys whose true mass reaches the target;
- each policy's index, built by the package's own estimation (``estimate_index_ref`` on the
  device the run uses): recall (true mass on kept keys, mean over rows), and the share of the
  sampled rows' causal pairs it computes (= kept: the kernels compute exactly the index).

    python -m benchmarks.recall_frontier --lengths 8192 --out frontier.json --plot frontier.png
    python -m benchmarks.recall_frontier --device cuda --dtype bfloat16 --lengths 32768 65536 131072 --time

(run as a module from the repository root: as a script, benchmarks/kernels.py would shadow the
``kernels`` package that transformers 5.25 imports)

Policies (``--policies``): ``default`` (the package's default pattern), ``vs-default``
(vertical-slash 1000/6096 at 128K, scaled below it: the default until 2026-12-06),
``vs:V,S`` (fixed vertical-slash budgets), ``ashape:SINK,LOCAL``, ``mass:R`` or ``mass:R,S`` (block-mass at recall R with
S sampled rows per block; ``mass:R,S,1`` with the neighbouring blocks' rows shared), ``max:R[,S]`` (the same with the "max" tile score), ``minference:V,S`` (MInference's own pipeline at budgets V/S, from
the sources benchmarks/peer_minference.py vendors; CUDA only; computed = what its kernel
scores, whole 64-wide tiles included). Prints one line per layer as it goes and a table at the
end.

Selections below the tile, which no index of the package expresses yet (``measure_columns``:
recall and kept share only, no kernel): ``cols:R[,S]``: per query block the sink, diagonal and
previous tiles whole, then the fewest single key columns (a key for the block's 64 rows) whose
mass, averaged over S sampled rows of the block (block-mass's rows, 8 by default), reaches R of
the estimated total; ``prune:R,S,D``: the tiles block-mass (mass score, S rows) keeps at R, then
in the chosen free tiles the keys of smallest estimated mass dropped up to D of the estimated
total (a tile keeping more than half its keys stays whole); ``cv:R,S,D``: the same from the
tiles of block-mass's "max" score (the default's), a tile cut to columns only where columns
chosen from half the sampled rows hold ``CV_SHARE`` of the other half's mass on it (a vertical
line; a slash, each row its own key, stays whole); ``cvt:R,S,D``: the same tiles, each cut by a
rule local to the tile (each sampled row's softmax over the tile's 64 keys alone, averaged; the
fewest keys holding 1 - D of it, the split-half test on those averages), which needs no
block-wide threshold; ``cva:R,S,K``: the same tiles cut to the union of each sampled row's K
largest logits in the tile (no probabilities), a vertical line when 3 of 4 odd rows' largest key
is among the even rows' top keys. A fourth value 1 (``cvt:R,S,D,1``) takes the tiles with the
neighbouring blocks' estimates shared, as the default's are. ``kept`` counts a column as 64 pairs;
``columns`` is the share of kept pairs held in gathered columns (a kernel computes those at a
lower rate than whole tiles).

A tile score without logits (``measure_bound``): ``qb:R,S[,G]``, block-mass's selection (the "max"
score, no neighbours) with each sampled row's largest logit in a tile replaced by Quest's upper
bound from the per-dimension key minima and maxima of sub-tiles of G keys (64 by default);
``xm:R,S``, the same code from the exact largest logits (equal to ``max:R,S``).
"""

from __future__ import annotations

import argparse
import json
from typing import Optional

import torch

from mcompile.tools.capture import attention_recall, capture_qkv
from mcompile.config import MInferenceConfig
from mcompile.tools.data import haystack
from mcompile.index import BLOCK, SparseIndex, block_mask_rows
from mcompile.kernels.block_mass import select_tiles
from mcompile.kernels.estimate import estimate_index_ref
from mcompile.ops import dense_is_faster
from mcompile.tools.models import load_smollm2
from mcompile.patterns import DEFAULT_BUDGET_EXPONENT, DEFAULT_BUDGET_LENGTH, DEFAULT_VERTICAL_SLASH, Pattern, encode, \
    scaled_budgets

TARGETS = (0.9, 0.95, 0.97, 0.98, 0.99)  # recall targets of the oracles
TEXT_OFFSET = 20000  # tokens into the standard library's documentation (not the search's calibration text)
CV_SHARE = 0.8  # cv: a tile goes to columns when half the rows' columns hold this share of the other half's mass


def policy(spec: str, n: int) -> Pattern:
    if spec == "default":
        return MInferenceConfig().default_pattern
    if spec == "vs-default":
        return scaled_budgets(DEFAULT_VERTICAL_SLASH, n, DEFAULT_BUDGET_LENGTH, DEFAULT_BUDGET_EXPONENT)
    kind, _, args = spec.partition(":")
    values = [float(x) for x in args.split(",")]
    if kind == "vs":
        return Pattern.from_dict({"kind": "vertical_slash", "vertical": int(values[0]), "slash": int(values[1])})
    if kind == "ashape":
        return Pattern.from_dict({"kind": "a_shape", "sink": int(values[0]), "local": int(values[1])})
    if kind in ("mass", "max"):
        extra = {"samples": int(values[1])} if len(values) > 1 else {}
        if len(values) > 2:
            extra["neighbours"] = int(values[2])
        return Pattern.from_dict({"kind": "block_mass", "recall": values[0], "score": kind, **extra})
    raise ValueError(f"unknown policy {spec!r}: default, vs-default, vs:V,S, ashape:SINK,LOCAL, mass:R[,S[,NB]] or "
                     "max:R[,S[,NB]]")


def sampled_blocks(n: int, count: int) -> list[int]:
    """``count`` query blocks spread over the second half of the prompt, the last one included."""
    nb = n // BLOCK
    first, last = nb // 2, nb - 1
    return sorted({first + round(i * (last - first) / max(count - 1, 1)) for i in range(count)})


def exact_rows(q, k, m, scale):
    """(H, BLOCK, N) fp32 softmax of query block m over all keys (future keys 0)."""
    n, group = k.shape[2], q.shape[1] // k.shape[1]
    r0, r1 = m * BLOCK, (m + 1) * BLOCK
    s = torch.matmul(q[0, :, r0:r1].float(), k[0, :, :r1].float().repeat_interleave(group, 0).transpose(-1, -2)) * scale
    causal = torch.arange(r1, device=q.device)[None, :] <= torch.arange(r0, r1, device=q.device)[:, None]
    p = torch.softmax(s.masked_fill(~causal, float("-inf")), -1)
    return torch.nn.functional.pad(p, (0, n - r1))


def fewest(mass: torch.Tensor, target: float) -> torch.Tensor:
    """How many of the largest entries of each row reach ``target`` of the row's sum."""
    srt = mass.sort(-1, descending=True).values
    return ((srt.cumsum(-1) - srt) < target * srt.sum(-1, keepdim=True)).sum(-1)


def oracles(q, k, blocks, scale):
    """{'tile@t': (H,), 'col@t': (H,), 'key@t': (H,)}: computed share of the sampled rows' causal pairs."""
    n, h = k.shape[2], q.shape[1]
    nb = (n + BLOCK - 1) // BLOCK
    tiles = {t: torch.zeros(h, device=q.device) for t in TARGETS}
    keys = {t: torch.zeros(h, device=q.device) for t in TARGETS}
    cols = {t: torch.zeros(h, device=q.device) for t in TARGETS}
    causal = 0.0
    for m in blocks:
        p = exact_rows(q, k, m, scale)  # (H, 64, N)
        tm = torch.nn.functional.pad(p, (0, nb * BLOCK - n)).view(h, BLOCK, nb, BLOCK).sum(-1).mean(1)
        cm = p.mean(1)  # (H, N) each key's mass averaged over the block's rows
        for t in TARGETS:
            count = fewest(tm, t).float()
            tiles[t] += (count - 1) * BLOCK * BLOCK + BLOCK * (BLOCK + 1) / 2  # the diagonal tile is half causal
            keys[t] += fewest(p, t).float().sum(-1)
            cols[t] += fewest(cm, t).float() * BLOCK  # a column costs its 64 rows (the diagonal's upper half too)
        causal += BLOCK * m * BLOCK + BLOCK * (BLOCK + 1) / 2
    return {**{f"tile@{t}": (tiles[t] / causal).tolist() for t in TARGETS},
            **{f"col@{t}": (cols[t] / causal).tolist() for t in TARGETS},
            **{f"key@{t}": (keys[t] / causal).tolist() for t in TARGETS}}


def layer_ms(q, k, v, pattern: Optional[Pattern], scale) -> float:
    """Median ms of the attention layer on CUDA: the ops (estimation + sparse kernel), or cuDNN's
    causal SDPA for ``pattern`` None."""
    from triton.testing import do_bench

    h = q.shape[1]
    if pattern is None:
        fn = lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale,
                                                                      enable_gqa=True)
    else:
        kinds, p0, p1 = encode([pattern] * h)
        fn = lambda: torch.ops.mcompile.sparse_attention(
            q, k, v, *torch.ops.mcompile.estimate_index(q, k, None, kinds, p0, p1, scale), None, scale)
    return do_bench(fn, warmup=50, rep=200, return_mode="median")


def measure_minference(q, k, v, spec: str, blocks, scale, timed: bool):
    """MInference's pipeline: recall and computed share of its index on the sampled blocks, its
    layer time (estimate + CUDA index builder + Triton kernel, all heads in one call of each)."""
    from triton.testing import do_bench

    from .peer_minference import minference_kept, minference_layer, recall_on_blocks

    n = k.shape[2]
    vertical, slash = (int(x) for x in spec.partition(":")[2].split(","))
    rows = [m * BLOCK for m in blocks]
    covered = minference_kept(q, k, vertical, slash, scale, rows)  # (1, H, R, 64, N)
    recall = recall_on_blocks(q, k, covered, rows, scale)[0]
    keys = torch.arange(n, device=q.device)
    kept = sum((covered[0, :, i] & (keys[None, :] <= (m * BLOCK + torch.arange(BLOCK, device=q.device))[:, None]))
               .sum((-1, -2)).double() for i, m in enumerate(blocks))
    causal = sum(BLOCK * m * BLOCK + BLOCK * (BLOCK + 1) / 2 for m in blocks)
    row = {"recall": recall.tolist(), "kept": (kept / causal).tolist()}
    del covered
    if timed:
        row["layer_ms"] = do_bench(lambda: minference_layer(q, k, v, vertical, slash, scale), warmup=50, rep=200,
                                   return_mode="median")
    return row


def measure_columns(q, k, spec: str, blocks, scale) -> dict:
    """Recall and kept share of a selection below the tile (module docstring: ``cols:``, ``prune:``,
    ``cv:``): tiles from block-mass's own estimate and selection, keys from the exact softmax of the
    same sampled rows of each block."""
    from mcompile.kernels.block_mass import LOCAL_TILES, sample_offsets, tile_mass

    kind, _, args = spec.partition(":")
    values = [float(x) for x in args.split(",")]
    target, samples = values[0], int(values[1]) if len(values) > 1 else 8
    drop = values[2] if kind in ("prune", "cv", "cvt", "cva") else 0.0
    neighbours = kind in ("cv", "cvt", "cva") and len(values) > 3 and bool(values[3])
    n, h = k.shape[2], q.shape[1]
    nb = (n + BLOCK - 1) // BLOCK
    offs = sample_offsets(samples, q.device)
    recall, pairs, gathered = torch.zeros(h), torch.zeros(h, dtype=torch.float64), torch.zeros(h, dtype=torch.float64)
    causal = 0.0
    tiles = torch.arange(nb, device=q.device)
    for m in blocks:
        p = torch.nn.functional.pad(exact_rows(q, k, m, scale), (0, nb * BLOCK - n))  # (H, 64, NB*64)
        est = p[:, offs].mean(1)  # (H, L): the sampled rows' mean mass per key (future keys 0)
        forced_t = (tiles == 0) | ((tiles >= m - LOCAL_TILES) & (tiles <= m))  # select_tiles' forced tiles
        forced = forced_t.repeat_interleave(BLOCK)
        total = est.sum(-1, keepdim=True)
        if kind == "cols":
            keep = forced[None] | _largest_reaching(est.masked_fill(forced[None], 0.0),
                                                    target * total - (est * forced).sum(-1, keepdim=True))
            whole = forced_t[None].expand(h, nb)
        else:
            # block-mass's own tiles for this block: its estimate of block m alone (a 64-row chunk
            # after m blocks of keys), then its selection
            # (``neighbours``: blocks m - 1 and m + 1 estimated too, and block m's estimate shared
            # with theirs as the default's is)
            first = m - 1 if neighbours else m
            end = min((m + 2 if neighbours else m + 1) * BLOCK, n)
            te = tile_mass(q[:, :, first * BLOCK:end], k[:, :, :end], None, scale, torch.arange(h, device=q.device),
                           samples, "max" if kind in ("cv", "cvt", "cva") else "mass")
            chosen = _selected_tiles(te, target, first, m, nb, neighbours) & ~forced_t[None]
            cand = chosen.repeat_interleave(BLOCK, -1)
            if kind in ("cvt", "cva"):  # cut tile by tile, from the sampled rows' logits within each tile
                keep = torch.zeros_like(cand)
                cut = (_tile_local_columns if kind == "cvt" else _tile_top_columns)(
                    _tile_logits(q, k, m, scale, offs), chosen, drop, keep)
                whole = (forced_t[None] | chosen) & ~cut
            else:
                dropped = _largest_reaching(-est.masked_fill(~cand, float("inf")), None, budget=drop * total,
                                            values=est)
                keep = cand & ~dropped
                whole = (keep.view(h, nb, BLOCK).sum(-1) > BLOCK // 2) | forced_t[None]
            if kind == "cv":
                # a tile goes to columns only if columns chosen from half the sampled rows hold most of
                # the other half's mass on it (a vertical line); a slash (each row its own key) stays whole
                rows = p[:, offs]  # (H, S, L)
                half_a, half_b = rows[:, 0::2].mean(1), rows[:, 1::2].mean(1)
                drop_a = _largest_reaching(-half_a.masked_fill(~cand, float("inf")), None,
                                           budget=drop * half_a.sum(-1, keepdim=True), values=half_a)
                keep_a = cand & ~drop_a
                on_b = (half_b * keep_a).view(h, nb, BLOCK).sum(-1)
                tile_b = (half_b * cand).view(h, nb, BLOCK).sum(-1)
                whole = whole | (chosen & (on_b < CV_SHARE * tile_b))
            keep = keep | whole.repeat_interleave(BLOCK, -1)
        recall += (p * keep[:, None]).sum(-1).mean(-1).cpu()
        n_whole = whole.sum(-1).double().cpu()
        n_cols = (keep & ~whole.repeat_interleave(BLOCK, -1)).sum(-1).double().cpu()
        pairs += n_whole * BLOCK * BLOCK + n_cols * BLOCK
        gathered += n_cols * BLOCK
        causal += BLOCK * m * BLOCK + BLOCK * (BLOCK + 1) / 2
    return {"recall": (recall / len(blocks)).tolist(), "kept": (pairs / causal).tolist(),
            "columns": (gathered / pairs).tolist()}


def measure_bound(q, k, spec: str, blocks, scale) -> dict:
    """``qb:R,S,G``: block-mass's selection (recall R of the "max" score, S sampled rows per block)
    with each row's largest logit in a tile replaced by an upper bound that needs no logit (Quest's
    bound for decode): the key tile split into sub-tiles of G keys, each kept as its keys'
    per-dimension minimum and maximum, ``bound(q) = sum_d max(q_d * min_d, q_d * max_d)`` >= every
    ``q . k`` of the sub-tile, the tile's bound the largest of its sub-tiles'. Costs ``2 * 64 / G``
    multiply-adds per row and tile instead of 64 per dimension. ``xm:R,S``: the same selection from
    the exact largest logits (the control: the default's score without the neighbours)."""
    from mcompile.kernels.block_mass import sample_offsets, tile_mass

    kind, _, args = spec.partition(":")
    values = [float(x) for x in args.split(",")]
    target, samples = values[0], int(values[1]) if len(values) > 1 else 8
    sub = int(values[2]) if kind == "qb" and len(values) > 2 else BLOCK
    n, h, group = k.shape[2], q.shape[1], q.shape[1] // k.shape[1]
    nb = (n + BLOCK - 1) // BLOCK
    offs = sample_offsets(samples, q.device)
    if kind == "qb":
        kt = torch.nn.functional.pad(k[0].float(), (0, 0, 0, nb * BLOCK - n))  # (Hk, NB*64, D)
        valid = (torch.arange(nb * BLOCK, device=q.device) < n).view(-1, sub)  # (NS, G)
        kt = kt.view(kt.shape[0], -1, sub, kt.shape[-1])
        kmax = kt.masked_fill(~valid[None, :, :, None], float("-inf")).amax(2).repeat_interleave(group, 0)
        kmin = kt.masked_fill(~valid[None, :, :, None], float("inf")).amin(2).repeat_interleave(group, 0)
        empty = ~valid.any(-1)  # sub-tiles wholly past N
        kmax, kmin = kmax.masked_fill(empty[None, :, None], 0.0), kmin.masked_fill(empty[None, :, None], 0.0)
    recall, pairs, causal = torch.zeros(h), torch.zeros(h, dtype=torch.float64), 0.0
    for m in blocks:
        end = min((m + 1) * BLOCK, n)
        if kind == "qb":
            qr = q[0, :, (m * BLOCK + offs).clamp(max=n - 1)].float()  # (H, S, D)
            bound = (qr.clamp(min=0) @ kmax.transpose(-1, -2) + qr.clamp(max=0) @ kmin.transpose(-1, -2)) * scale
            bound = bound.masked_fill(empty[None, None], float("-inf"))
            top = bound.view(h, samples, nb, BLOCK // sub).amax(-1)[..., :m + 1]  # (H, S, m + 1): causal tiles
            est = torch.softmax(top, -1).mean(1)[None, :, None]  # (1, H, 1, m + 1), as tile_mass's
        else:  # the package's own "max" score of block m
            est = tile_mass(q[:, :, m * BLOCK:end], k[:, :, :end], None, scale, torch.arange(h, device=q.device),
                            samples, "max")
        chosen = _selected_tiles(est, target, m, m, nb, False)
        p = torch.nn.functional.pad(exact_rows(q, k, m, scale), (0, nb * BLOCK - n))  # (H, 64, NB*64)
        recall += (p * chosen.repeat_interleave(BLOCK, -1)[:, None]).sum(-1).mean(-1).cpu()
        pairs += (chosen.sum(-1).double().cpu() - 1) * BLOCK * BLOCK + BLOCK * (BLOCK + 1) / 2
        causal += BLOCK * m * BLOCK + BLOCK * (BLOCK + 1) / 2
    return {"recall": (recall / len(blocks)).tolist(), "kept": (pairs / causal).tolist()}


def _selected_tiles(est: torch.Tensor, target: float, first: int, m: int, nb: int, shared: bool) -> torch.Tensor:
    """(H, NB) bool: the tiles block-mass's selection keeps for query block m at recall ``target``
    from ``est`` (1, H, M, T), tile estimates of blocks ``first``.. (``block_mass.tile_mass``'s
    layout), each block's first shared with its neighbours' when ``shared``."""
    h, dev = est.shape[1], est.device
    kept, count, _ = select_tiles(est, torch.full((h,), target, device=dev), first, est.shape[-1],
                                  shared=torch.full((h,), shared, device=dev))
    ids = kept[0, :, m - first, :m + 1].long()  # (H, m + 1) ascending, SENTINEL-padded past the count
    ids = torch.where(torch.arange(m + 1, device=dev) < count[0, :, m - first, None], ids, nb)
    return torch.zeros(h, nb + 1, dtype=torch.bool, device=dev).scatter_(1, ids, True)[:, :nb]


def _tile_logits(q, k, m, scale, offs) -> torch.Tensor:
    """(H, S, NB, 64) logits of query block m's sampled rows against every key tile (-inf past N)."""
    n, h, group = k.shape[2], q.shape[1], q.shape[1] // k.shape[1]
    nb = (n + BLOCK - 1) // BLOCK
    rows = (m * BLOCK + offs).clamp(max=n - 1)
    s = torch.matmul(q[0, :, rows].float(), k[0].float().repeat_interleave(group, 0).transpose(-1, -2)) * scale
    return torch.nn.functional.pad(s, (0, nb * BLOCK - n), value=float("-inf")).view(h, offs.numel(), nb, BLOCK)


def _tile_local_columns(s, chosen, drop, keep) -> torch.Tensor:
    """``cvt``: (H, NB) the chosen tiles cut to columns by a rule local to each tile, which a kernel
    can apply in one pass over the tile with no block-wide threshold: each sampled row's softmax
    over the tile's 64 keys alone (``s``: ``_tile_logits``), averaged over the rows; the fewest keys
    holding ``1 - drop`` of that average are the tile's columns (at most half the tile); the
    split-half test on the same within-tile averages of rows 0, 2, .. and 1, 3, ... Writes the
    columns into ``keep`` (H, L)."""
    h, _, nb, _ = s.shape
    within = torch.softmax(s, -1).nan_to_num_(0.0)  # (H, S, NB, 64)

    def columns(w):  # (H, NB, 64) -> kept keys of each tile: the fewest holding 1 - drop of it
        return _largest_reaching(w, (1 - drop) * w.sum(-1, keepdim=True))

    full, a, b = within.mean(1), within[:, 0::2].mean(1), within[:, 1::2].mean(1)
    kf, ka = columns(full), columns(a)
    line = (b * ka).sum(-1) >= CV_SHARE * b.sum(-1)
    cut = chosen & (kf.sum(-1) <= BLOCK // 2) & line
    keep.view(h, nb, BLOCK)[cut] = kf[cut]
    return cut


def _tile_top_columns(s, chosen, top, keep) -> torch.Tensor:
    """``cva:R,S,K``: (H, NB) the chosen tiles cut to columns from each sampled row's ``top``
    largest logits in the tile alone (``s``: ``_tile_logits``; what the estimate's max pass could
    keep beside each row's largest logit, with no probabilities): the columns are the union of the
    rows' top keys, the tile is a vertical line when at least 3 of 4 rows of the odd half have
    their largest key among the even half's top keys, and is cut when the union is at most half
    the tile. Writes the columns into ``keep`` (H, L)."""
    h, _, nb, _ = s.shape
    idx = s.topk(int(top), -1).indices  # (H, S, NB, top)
    onehot = torch.zeros(s.shape, dtype=torch.bool, device=s.device).scatter_(-1, idx, True)
    union = onehot.any(1)  # (H, NB, 64)
    set_a = onehot[:, 0::2].any(1)  # (H, NB, 64)
    first_b = idx[:, 1::2, :, 0]  # (H, S/2, NB) each odd row's largest key
    hit = set_a.gather(-1, first_b.permute(0, 2, 1)).float().mean(-1)  # (H, NB)
    cut = chosen & (union.sum(-1) <= BLOCK // 2) & (hit >= 0.75)
    keep.view(h, nb, BLOCK)[cut] = union[cut]
    return cut


def _largest_reaching(x: torch.Tensor, need: Optional[torch.Tensor], budget: Optional[torch.Tensor] = None,
                      values: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Per row of ``x`` (..., L): the largest entries whose sum first reaches ``need`` (H, 1); or, with
    ``budget``, the largest entries of ``x`` whose ``values`` sum stays within ``budget`` (H, 1)."""
    srt, order = x.sort(-1, descending=True)
    if budget is None:
        count = ((srt.cumsum(-1) - srt) < need).sum(-1, keepdim=True)
    else:
        vals = values.gather(-1, order).masked_fill(srt.isinf(), 0.0)
        count = ((vals.cumsum(-1) <= budget) & ~srt.isinf()).sum(-1, keepdim=True)
    ranks = torch.empty_like(order)
    ranks.scatter_(-1, order, torch.arange(x.shape[-1], device=x.device).expand_as(order))
    return ranks < count


def measure_policy(q, k, v, spec: str, blocks, scale, timed: bool):
    if spec.startswith("minference:"):
        return measure_minference(q, k, v, spec, blocks, scale, timed)
    if spec.startswith(("cols:", "prune:", "cv:", "cvt:", "cva:")):
        return measure_columns(q, k, spec, blocks, scale)
    if spec.startswith(("qb:", "xm:")):
        return measure_bound(q, k, spec, blocks, scale)
    n, h = k.shape[2], q.shape[1]
    pattern = policy(spec, n)
    kinds, p0, p1 = encode([pattern] * h)
    if q.is_cuda:  # the index the op builds (the Triton estimation), which is what is timed
        index = SparseIndex(*torch.ops.mcompile.estimate_index(q, k, None, kinds, p0, p1, scale))
    else:
        index = estimate_index_ref(q, k, None, kinds, p0, p1, scale)
    recall = attention_recall(q, k, index, scale, rows=[m * BLOCK for m in blocks])[0]
    kept = sum(block_mask_rows(index, m * BLOCK, (m + 1) * BLOCK, n).sum((-1, -2))[0].double() for m in blocks)
    causal = sum(BLOCK * m * BLOCK + BLOCK * (BLOCK + 1) / 2 for m in blocks)
    row = {"recall": recall.tolist(), "kept": (kept / causal).tolist()}
    if timed:
        row["layer_ms"] = layer_ms(q, k, v, pattern, scale)
        row.update(kernel_only(q, k, v, index, scale))
    return row


def kernel_only(q, k, v, index: SparseIndex, scale) -> dict:
    """The sparse kernel alone on the layer's index, and the share of the layer's causal pairs it
    computes (every row, not only the sampled ones): the kernel's rate against cuDNN's."""
    from triton.testing import do_bench

    from mcompile.index import computed_fraction

    ms = do_bench(lambda: torch.ops.mcompile.sparse_attention(q, k, v, *index, None, scale), warmup=50, rep=200,
                  return_mode="median")
    return {"kernel_ms": ms, "layer_computed": computed_fraction(index, k.shape[2]).float().mean().item()}


def run(args) -> list[dict]:
    torch.set_num_threads(args.threads) if args.threads else None
    dtype = getattr(torch, args.dtype)
    results = []
    for n in args.lengths:
        model, tok = load_smollm2(dtype=dtype, yarn_factor=16, device=args.device)
        ids = torch.tensor([haystack(tok, n, offset=args.offset, source=args.source)], device=args.device)
        blocks = sampled_blocks(n, args.blocks)
        scale = model.model.layers[0].self_attn.scaling
        layers = args.layers

        def one_layer(layer, q, k, v):
            if layer not in layers:
                return
            row = {"length": n, "layer": layer, "oracles": oracles(q, k, blocks, scale), "policies": {}}
            timed = args.time and q.is_cuda
            if timed:
                row["cudnn_ms"] = layer_ms(q, k, v, None, scale)
            for spec in args.policies:
                row["policies"][spec] = measure_policy(q, k, v, spec, blocks, scale, timed)
            results.append(row)
            mean = lambda xs: sum(xs) / len(xs)
            print(f"N={n} L{layer:2d} tile@0.95 {mean(row['oracles']['tile@0.95']):.3f} col@0.95 "
                  f"{mean(row['oracles']['col@0.95']):.3f} key@0.95 {mean(row['oracles']['key@0.95']):.3f} | "
                  + " | ".join(
                      f"{s}: r {mean(r['recall']):.3f}/{min(r['recall']):.2f} k {mean(r['kept']):.3f}"
                      for s, r in row["policies"].items()), flush=True)

        with torch.no_grad():
            capture_qkv(model, ids, layers=layers, on_layer=one_layer)
        del model
    return results


def merge(paths: list[str]) -> list[dict]:
    """The layers of several runs' JSON, policies of the same (length, layer) merged (the oracles
    and cuDNN times of the first run that has the layer)."""
    merged: dict = {}
    for path in paths:
        with open(path) as f:
            for row in json.load(f)["layers"]:
                key = (row["length"], row["layer"])
                if key in merged:
                    merged[key]["policies"].update(row["policies"])
                else:
                    merged[key] = row
    return [merged[key] for key in sorted(merged)]


def tile_oracle_at(oracle: dict, recall: float) -> Optional[float]:
    """The tile oracle's share at ``recall``, linear between the targets it was computed at (None
    outside them or when the run lacks them)."""
    pts = sorted((t, oracle[f"tile@{t}"]) for t in TARGETS if f"tile@{t}" in oracle)
    for (t0, s0), (t1, s1) in zip(pts, pts[1:]):
        if t0 <= recall <= t1:
            return s0 + (s1 - s0) * (recall - t0) / (t1 - t0)
    return None


def summary(results: list[dict]) -> list[dict]:
    """Per length and policy: mean recall, worst head, mean kept; the oracles' mean kept."""
    rows = []
    for n in sorted({r["length"] for r in results}):
        at = [r for r in results if r["length"] == n]
        flat = lambda get: [x for r in at for x in get(r)]
        mean = lambda xs: sum(xs) / len(xs)
        common = [key for key in at[0]["oracles"] if all(key in r["oracles"] for r in at)]  # older runs lack col@
        oracle = {key: mean(flat(lambda r: r["oracles"][key])) for key in common}
        specs = [spec for spec in at[0]["policies"] if all(spec in r["policies"] for r in at)]
        for spec in specs:
            recall = flat(lambda r: r["policies"][spec]["recall"])
            kept = mean(flat(lambda r: r["policies"][spec]["kept"]))
            timing = {}
            if "cudnn_ms" in at[0] and all("layer_ms" in r["policies"][spec] for r in at):
                ms = mean([r["policies"][spec]["layer_ms"] for r in at])
                timing = {"layer_ms": ms, "speedup_vs_cudnn": mean([r["cudnn_ms"] for r in at]) / ms}
            if "cudnn_ms" in at[0] and all("kernel_ms" in r["policies"][spec] for r in at):
                # the kernel's rate on its computed pairs against cuDNN's on all of them, over the
                # layers where it ran: the op's density check sends the others to dense attention
                timing["kernel_ms"] = mean([r["policies"][spec]["kernel_ms"] for r in at])
                ran = [r for r in at if not dense_is_faster(r["policies"][spec]["layer_computed"], n)]
                timing["dense_layers"] = len(at) - len(ran)
                if ran:
                    timing["kernel_rate_vs_cudnn"] = mean([r["cudnn_ms"] * r["policies"][spec]["layer_computed"]
                                                           / r["policies"][spec]["kernel_ms"] for r in ran])
            if all("columns" in r["policies"][spec] for r in at):
                timing["columns"] = mean(flat(lambda r: r["policies"][spec]["columns"]))
            same = tile_oracle_at(oracle, mean(recall))
            rows.append({"length": n, "policy": spec, "recall": mean(recall), "worst": min(recall), "kept": kept,
                         "kept_over_tile_oracle@0.95": kept / oracle["tile@0.95"],
                         **({"kept_over_tile_oracle@same_recall": kept / same} if same else {}), **oracle, **timing})
    return rows


def plot(results: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = summary(results)
    lengths = sorted({r["length"] for r in rows})
    names = list(dict.fromkeys(r["policy"] for r in rows))  # one colour per policy in every panel
    colour = {name: f"C{i % 10}" for i, name in enumerate(names)}
    fig, axes = plt.subplots(1, len(lengths), figsize=(5 * len(lengths), 4), squeeze=False)
    for ax, n in zip(axes[0], lengths):
        at = [r for r in rows if r["length"] == n]
        for r in at:
            ax.scatter(100 * r["kept"], r["recall"], label=r["policy"], color=colour[r["policy"]])
            ax.annotate(f"worst {r['worst']:.2f}", (100 * r["kept"], r["recall"]), fontsize=7)
        for t in TARGETS:
            ax.scatter(100 * at[0][f"tile@{t}"], t, marker="s", color="black")
            ax.scatter(100 * at[0][f"key@{t}"], t, marker="^", color="grey")
            if f"col@{t}" in at[0]:
                ax.scatter(100 * at[0][f"col@{t}"], t, marker="D", color="tab:brown")
        ax.set_title(f"N={n}; oracles: square tile, diamond column, triangle key", fontsize=8)
        ax.set_xlabel("computed share of causal pairs (%)")
        ax.set_ylabel("recall (mean over heads)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def plot_time(results: list[dict], path: str, policy: str = "default") -> None:
    """Where each timed layer's time goes, one panel per length: ``policy``'s kernel and the rest
    of its layer (the estimate and selection; a layer the density check sends to dense after its
    estimate shows its layer time above its kernel's), against cuDNN's causal layer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    timed = [r for r in results if "cudnn_ms" in r and "layer_ms" in r["policies"].get(policy, {})]
    lengths = sorted({r["length"] for r in timed})
    if not lengths:
        raise ValueError(f"no timed layers of policy {policy!r} (run with --time on CUDA)")
    fig, axes = plt.subplots(1, len(lengths), figsize=(6 * len(lengths), 4), squeeze=False)
    for ax, n in zip(axes[0], lengths):
        at = sorted((r for r in timed if r["length"] == n), key=lambda r: r["layer"])
        x = range(len(at))
        pol = [r["policies"][policy] for r in at]
        layer = [p["layer_ms"] for p in pol]
        dense = [dense_is_faster(p["layer_computed"], n) for p in pol]  # the op's density check, after the estimate
        attn = [r["cudnn_ms"] if d else p["kernel_ms"] for r, p, d in zip(at, pol, dense)]
        ax.bar(x, attn, color=["tab:grey" if d else "tab:blue" for d in dense])
        ax.bar(x, [max(a - b, 0.0) for a, b in zip(layer, attn)], bottom=attn, color="tab:orange")
        from matplotlib.patches import Patch

        handles = [Patch(color="tab:blue", label="sparse kernel"), Patch(color="tab:grey", label="dense (cuDNN)"),
                   Patch(color="tab:orange", label="estimate + selection")]
        handles += ax.plot(x, [r["cudnn_ms"] for r in at], "k_", markersize=14, label="cuDNN causal layer")
        for i, p in zip(x, pol):
            ax.annotate(f"{100 * p['layer_computed']:.0f}%", (i, p["layer_ms"]), ha="center", va="bottom", fontsize=7)
        ax.set_xticks(list(x), [str(r["layer"]) for r in at])
        ax.set_xlabel("layer (label: computed share of causal pairs)")
        ax.set_ylabel("ms")
        ax.set_title(f"N={n}, {policy}: layer {sum(layer) / len(layer):.2f} ms mean, "
                     f"cuDNN {sum(r['cudnn_ms'] for r in at) / len(at):.2f} ms", fontsize=9)
        ax.legend(handles=handles, fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[8192])
    p.add_argument("--layers", type=int, nargs="+", default=list(range(0, 30, 3)))
    p.add_argument("--blocks", type=int, default=12, help="64-row query blocks sampled per layer")
    p.add_argument("--policies", nargs="+", default=["vs-default", "mass:0.95", "default", "mass:0.98,4"])
    p.add_argument("--source", default="stdlib", help="text (mcompile.tools.data.SOURCES): stdlib docs or python source")
    p.add_argument("--offset", type=int, default=TEXT_OFFSET, help="tokens into the text")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--time", action="store_true", help="on CUDA: time each policy's layer against cuDNN")
    p.add_argument("--out", default="")
    p.add_argument("--plot", default="")
    p.add_argument("--plot-time", default="", help="with timed layers: each layer's kernel and estimate against cuDNN")
    p.add_argument("--from-json", nargs="+", default=[], help="merge the layers of earlier runs' JSON instead of running")
    args = p.parse_args()
    results = merge(args.from_json) if args.from_json else run(args)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"args": vars(args), "layers": results, "summary": summary(results)}, f, indent=1)
    if args.plot:
        plot(results, args.plot)
    if args.plot_time:
        plot_time(results, args.plot_time)
    print(f"{'N':>7} {'policy':<14} {'recall':>7} {'worst':>6} {'kept':>7} {'kept/tile@.95':>13} {'tile@.95':>8} "
          f"{'col@.95':>8} {'key@.95':>8} {'kept/tile@same':>14}")
    for r in summary(results):
        speed = f" {r['layer_ms']:8.2f} ms {r['speedup_vs_cudnn']:5.2f}x" if "layer_ms" in r else ""
        if "kernel_rate_vs_cudnn" in r:
            speed += (f" kernel {r['kernel_ms']:7.2f} ms, at {r['kernel_rate_vs_cudnn']:.2f} of cuDNN's rate where it "
                      f"ran ({r['dense_layers']} layers dense)")
        if "columns" in r:
            speed += f" ({100 * r['columns']:.0f}% of it in gathered columns)"
        same = r.get("kept_over_tile_oracle@same_recall")
        print(f"{r['length']:>7} {r['policy']:<14} {r['recall']:7.3f} {r['worst']:6.2f} {100 * r['kept']:6.1f}% "
              f"{r['kept_over_tile_oracle@0.95']:13.2f} {100 * r['tile@0.95']:7.1f}% "
              f"{'-' if 'col@0.95' not in r else format(100 * r['col@0.95'], '7.1f') + '%':>8} {100 * r['key@0.95']:7.1f}% "
              f"{'-' if same is None else format(same, '.2f'):>14}{speed}")


if __name__ == "__main__":
    main()
