"""Sweep of default vertical-slash policies on SmolLM2-135M-Instruct real Q/K/V (CPU, fp32).

What the default policy (no pattern database) keeps, and what cheaper variants of it would keep,
measured on the dense model's captured Q/K/V of a needle prompt (50% depth, the eval's prompt)
at several lengths. Per variant and length: kept fraction of causal pairs (mean over heads,
exact), mean attention recall, mean / max output error (32 sampled 64-query blocks, as the eval),
layer 0's recall. Also a breakdown of what the current default keeps (sink columns, local band,
vertical columns, slash runs).

Nothing in the package is changed: variants of the estimator are built here from the package's
own pieces (``vertical_slash_scores``, ``diagonals_to_runs``, ``SparseIndex``...).

    python benchmarks/policy_sweep.py capture --lengths 2048,4096,6144,8192   # Q/K/V to --cache
    python benchmarks/policy_sweep.py breakdown --lengths 2048,4096,8192
    python benchmarks/policy_sweep.py sweep --lengths 2048,4096,6144,8192 --out /tmp/sweep   # --only r3 etc.
    python benchmarks/policy_sweep.py model --candidate abs:144,875 --parts perplexity      # first 8K window
    python benchmarks/policy_sweep.py model --candidate tile:768,1536 --parts needle --dense
    python benchmarks/policy_sweep.py model --candidate mass:0.99,0.85 --parts perplexity   # per-head mass shares

Results and their reading: benchmarks/results/policy_sweep_cpu.md. One thread by default (--threads).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from mcompile.capture import capture_qkv
from mcompile.eval.attention import sample_rows
from mcompile.eval.needle_grid import cell_value
from mcompile.index import (
    BLOCK,
    SENTINEL,
    SparseIndex,
    column_counts,
    index_rows,
    num_blocks,
    runs_to_diag_prefix,
)
from mcompile.kernels.estimate import (
    _topk_sorted,
    diagonals_to_runs,
    vertical_slash_scores,
)
from mcompile.needle import needle_prompt
from mcompile.patterns import (
    LOCAL_DIAGONALS,
    SINK_COLUMNS,
    Pattern,
    PatternKind,
)

CACHE = Path("/tmp/mcompile_policy_sweep")


# --------------------------------------------------------------------------------------------
# capture


def capture(lengths, cache: Path, depth: float = 0.5):
    from mcompile.models import load_smollm2

    cache.mkdir(parents=True, exist_ok=True)
    if all((cache / f"qkv_{n}.pt").exists() for n in lengths):
        return
    model, tok = load_smollm2(dtype=torch.float32)
    scales = {m.layer_idx: float(m.scaling) for m in model.modules()
              if hasattr(m, "layer_idx") and hasattr(m, "scaling")}
    for n in lengths:
        path = cache / f"qkv_{n}.pt"
        if path.exists():
            continue
        t = time.perf_counter()
        ids = needle_prompt(tok, n, depth, value=cell_value(n, depth)).input_ids
        store = capture_qkv(model, ids)
        torch.save({"tokens": ids.shape[1], "scales": scales, "qkv": store}, path)
        print(f"captured {n} ({ids.shape[1]} tokens) in {time.perf_counter() - t:.0f} s", flush=True)


def load(n, cache: Path):
    return torch.load(cache / f"qkv_{n}.pt")


# --------------------------------------------------------------------------------------------
# budgets


def scaled(value: int, n: int, length: int, exponent: float, floor: int, minimum: int) -> int:
    """patterns.scaled_budgets for one budget, with the floor as a parameter."""
    if length <= 0 or n >= length:
        return value
    return min(value, max(round(value * (n / length) ** exponent), floor, minimum))


# --------------------------------------------------------------------------------------------
# index from selected columns and runs (the package's SparseIndex format)


def make_index(cols: torch.Tensor, runs: torch.Tensor, run_count: torch.Tensor, n: int) -> SparseIndex:
    b, h = run_count.shape
    blocks = torch.full((b, h, index_rows(n), 0), SENTINEL, dtype=torch.int32)
    block_count = torch.zeros(b, h, index_rows(n), dtype=torch.int32)
    return SparseIndex(runs, run_count, runs_to_diag_prefix(runs, run_count, n), cols,
                       column_counts(cols, n), blocks, block_count)


def block_keep(index: SparseIndex, n: int) -> torch.Tensor:
    """(B, H, NB, n) bool: keys kept by each query block before the causal mask, the same set as
    ``index.block_mask_rows`` builds (run tiles and columns; no key blocks here), built from
    interval end points (run r's tile in block m is keys [m*BLOCK - d_hi, (m+1)*BLOCK - d_lo))."""
    b, h = index.run_count.shape
    nb = num_blocks(n)
    r = index.runs.shape[-2]
    valid = torch.arange(r) < index.run_count[..., None].long()  # (B, H, R)
    lo = index.runs[..., 0].long()
    hi = index.runs[..., 1].long()
    blk = torch.arange(nb).view(1, 1, nb, 1)
    start = (blk * BLOCK - hi[:, :, None, :]).clamp(0, n)  # (B, H, NB, R)
    end = ((blk + 1) * BLOCK - lo[:, :, None, :]).clamp(0, n)
    ok = valid[:, :, None, :] & (end > start)
    start = torch.where(ok, start, n)
    end = torch.where(ok, end, n)
    delta = torch.zeros(b, h, nb, n + 1, dtype=torch.int32)
    delta.scatter_add_(3, start, torch.ones_like(start, dtype=torch.int32))
    delta.scatter_add_(3, end, -torch.ones_like(end, dtype=torch.int32))
    keep = delta[..., :n].cumsum(-1) > 0
    col = torch.zeros(b, h, n + 1, dtype=torch.bool)
    col.scatter_(2, index.columns.long().clamp(max=n), True)
    return keep | col[..., None, :n]


def block_keep_slow(index: SparseIndex, n: int) -> torch.Tensor:
    """The same from ``block_mask_rows``'s formula (diag_prefix spans); for checking block_keep."""
    b, h = index.run_count.shape
    nb = num_blocks(n)
    blk = torch.arange(nb)
    keys = torch.arange(n)
    lo = (blk[:, None] * BLOCK - keys[None, :]).clamp(min=0)
    hi = ((blk[:, None] + 1) * BLOCK - 1 - keys[None, :]).clamp(max=n - 1)
    prefix = index.diag_prefix.long()
    span = prefix[..., (hi + 1).clamp(min=0).flatten()] - prefix[..., lo.flatten()]
    keep = (span > 0).view(b, h, nb, n) & (hi >= lo)
    col = torch.zeros(b, h, n + 1, dtype=torch.bool)
    col.scatter_(2, index.columns.long().clamp(max=n), True)
    return keep | col[..., None, :n]


def causal_rows(n: int) -> torch.Tensor:
    """(NB, n) float: causal query rows of block m that can see key j."""
    nb = num_blocks(n)
    blk = torch.arange(nb)
    keys = torch.arange(n)
    end = torch.clamp((blk + 1) * BLOCK, max=n)[:, None]
    start = torch.maximum(keys[None, :], (blk * BLOCK)[:, None])
    return (end - start).clamp(min=0).double()


def kept_pairs(keep: torch.Tensor, rows: torch.Tensor, n: int) -> torch.Tensor:
    """(B, H) kept fraction of the n(n+1)/2 causal pairs from a block-level keep mask."""
    return (keep.double() * rows).sum((-1, -2)) / (n * (n + 1) / 2)


# --------------------------------------------------------------------------------------------
# selection (from the vertical / slash scores, which do not depend on the budgets)


def select_columns(vertical: torch.Tensor, nv: int, sink: int = SINK_COLUMNS) -> torch.Tensor:
    v = vertical.clone()
    v[..., :sink] = float("inf")
    h = v.shape[1]
    return _topk_sorted(v, torch.full((h,), nv), nv)


def select_runs_topk(slash: torch.Tensor, ns: int, local: int = LOCAL_DIAGONALS):
    """The package's slash selection: top-ns diagonals (the first ``local`` forced), merged."""
    s = slash.clone()
    s[..., :local] = float("inf")
    h = s.shape[1]
    return diagonals_to_runs(_topk_sorted(s, torch.full((h,), ns), ns))


def select_runs_tile_aware(slash: torch.Tensor, candidates: int, width_budget: int, local: int = LOCAL_DIAGONALS):
    """Tile-aware variant: take the top ``candidates`` diagonals (local forced), merge them into runs
    as the package does, then keep runs in order of score per computed key (run mass / (width + 63),
    a run of d_lo..d_hi costs d_hi - d_lo + 64 keys per query row) while the total cost per row
    stays within ``width_budget`` keys; the local run is always kept. All tensor ops (sort,
    cumsum, gather): the same shape of work as the package's estimator."""
    s = slash.clone()
    s[..., :local] = float("inf")
    h = s.shape[1]
    n = s.shape[-1]
    runs, rc = diagonals_to_runs(_topk_sorted(s, torch.full((h,), candidates), candidates))
    r = runs.shape[-2]
    valid = torch.arange(r) < rc[..., None]
    lo = torch.where(valid, runs[..., 0], 0).long()
    hi = torch.where(valid, runs[..., 1], 0).long()
    finite = slash.clone()
    finite[..., :local] = 0
    cs = torch.nn.functional.pad(finite.double().cumsum(-1), (1, 0))
    mass = cs.gather(-1, (hi + 1).clamp(max=n)) - cs.gather(-1, lo)
    width = (hi - lo + BLOCK).double()
    density = torch.where(valid, mass / width, -1.0)
    density = torch.where(valid & (lo == 0), float("inf"), density)
    order = density.argsort(-1, descending=True)
    w_sorted = torch.where(valid, width, 0).gather(-1, order)
    ok_sorted = (w_sorted.cumsum(-1) <= width_budget) | (density.gather(-1, order) == float("inf"))
    ok_sorted &= valid.gather(-1, order)
    keep = torch.zeros_like(valid).scatter(-1, order, ok_sorted)
    new_lo = torch.where(keep, runs[..., 0], SENTINEL).sort(-1)
    new_hi = torch.where(keep, runs[..., 1], SENTINEL).sort(-1).values
    return torch.stack([new_lo.values, new_hi], -1), keep.sum(-1, dtype=torch.int32)


def mass_select(scores: torch.Tensor, share: float, forced: int) -> tuple[torch.Tensor, float]:
    """Per (batch, head) row, the fewest top-scoring entries whose scores reach ``share`` of the
    row's total, the first ``forced`` entries always kept and their scores counted first (a
    per-head budget set by the estimate's own mass, as FlexPrefill's cumulative threshold):
    (ascending indices, SENTINEL-padded; mean entries kept per row)."""
    ranked = scores.clone()
    ranked[..., :forced] = float("inf")
    order = ranked.argsort(-1, descending=True)
    raw = scores.gather(-1, order)
    before = raw.cumsum(-1) - raw  # mass of the entries ranked above
    keep = (before < share * scores.sum(-1, keepdim=True)) | (order < forced)
    picked = torch.where(keep, order.to(torch.int32), SENTINEL).sort(-1).values
    return picked, float(keep.sum(-1).double().mean())


# --------------------------------------------------------------------------------------------
# policies: name -> fn(vertical, slash, n) -> (columns, runs, run_count)


def vs_policy(v_ref=1000, s_ref=6096, length=131072, exponent=0.7, floor_v=64, floor_s=128,
              sink=SINK_COLUMNS, local=LOCAL_DIAGONALS, v_exponent=None):
    def fn(vertical, slash, n):
        nv = min(n, scaled(v_ref, n, length, exponent if v_exponent is None else v_exponent, floor_v, sink))
        ns = min(n, scaled(s_ref, n, length, exponent, floor_s, local))
        runs, rc = select_runs_topk(slash, ns, local)
        return select_columns(vertical, nv, sink), runs, rc, (nv, ns)
    return fn


def tile_policy(v_ref, w_ref, length, exponent, cand_factor=4, floor_v=64, floor_w=256,
                sink=SINK_COLUMNS, local=LOCAL_DIAGONALS, v_exponent=None):
    """Vertical budget as vs_policy; slash runs chosen tile-aware under a per-row key budget
    ``w`` (scaled like the budgets), from ``cand_factor * w / BLOCK`` + local candidates."""
    def fn(vertical, slash, n):
        nv = min(n, scaled(v_ref, n, length, exponent if v_exponent is None else v_exponent, floor_v, sink))
        w = min(n, scaled(w_ref, n, length, exponent, floor_w, local + BLOCK))
        cand = min(n, local + max(1, cand_factor * w // BLOCK))
        runs, rc = select_runs_tile_aware(slash, cand, w, local)
        return select_columns(vertical, nv, sink), runs, rc, (nv, w)
    return fn


def mass_policy(share_v: float, share_s: float, sink=SINK_COLUMNS, local=LOCAL_DIAGONALS):
    """No budgets: each head keeps the verticals and slashes that hold ``share_v`` / ``share_s`` of
    its estimated column / diagonal mass (``mass_select``); reported budgets are the mean counts."""
    def fn(vertical, slash, n):
        cols, nv = mass_select(vertical, share_v, sink)
        diags, ns = mass_select(slash, share_s, local)
        runs, rc = diagonals_to_runs(diags)
        return cols, runs, rc, (round(nv), round(ns))
    return fn


def multi_block_scores(q, k, scale, blocks: int = 4):
    """Vertical / slash scores summed over ``blocks`` 64-query windows ending at evenly spaced
    positions (the last one is the package's), each window's scores computed by the package's
    ``vertical_slash_scores`` on the prefix it sees. Not in the package: a probe of whether
    estimating from queries spread over the prompt beats the last 64 alone."""
    n = k.shape[2]
    h = q.shape[1]
    vertical = torch.zeros(q.shape[0], h, n)
    slash = torch.zeros(q.shape[0], h, n)
    for i in range(1, blocks + 1):
        e = max(BLOCK, (n * i // blocks) // BLOCK * BLOCK) if i < blocks else n
        v, sl = vertical_slash_scores(q[:, :, :e], k[:, :, :e], None, scale, torch.arange(h))
        vertical[..., :e] += v
        slash[..., :e] += sl
    return vertical, slash


# --------------------------------------------------------------------------------------------
# measurement: every policy on the same layer, sharing the scores and the dense softmax


def measure_layer(q, k, v, scale, n, policies: dict, rows, crows):
    """{policy: {"kept": (H,), "recall": (H,), "err": (H,), "budgets": ...}} for one layer.
    A policy whose name contains "multi" selects from ``multi_block_scores``."""
    h = q.shape[1]
    group = h // k.shape[1]
    vertical, slash = vertical_slash_scores(q, k, None, scale, torch.arange(h))
    multi = multi_block_scores(q, k, scale) if any("multi" in name for name in policies) else None
    keeps, out = {}, {}
    for name, fn in policies.items():
        cols, runs, rc, budgets = fn(*(multi if "multi" in name else (vertical, slash)), n)
        idx = make_index(cols, runs, rc, n)
        keeps[name] = block_keep(idx, n)
        out[name] = {"kept": kept_pairs(keeps[name], crows, n)[0], "budgets": budgets,
                     "runs": float(rc.float().mean()), "mass": torch.zeros(h, dtype=torch.float64),
                     "err2": torch.zeros(h, dtype=torch.float64)}
    ref2 = torch.zeros(h, dtype=torch.float64)
    count = 0
    kk = k.float().repeat_interleave(group, 1)[0]
    vv = v.float().repeat_interleave(group, 1)[0]
    qq = q.float()[0]
    for r0 in rows:
        r1 = min(n, r0 + BLOCK)
        s = torch.matmul(qq[:, r0:r1], kk[:, :r1].transpose(-1, -2)) * scale  # (H, R, r1)
        causal = torch.arange(r1)[None, :] <= torch.arange(r0, r1)[:, None]
        p = torch.softmax(s.masked_fill(~causal, float("-inf")), -1)
        dense = p @ vv[:, :r1]
        ref2 += (dense.double() ** 2).sum((-1, -2))
        count += r1 - r0
        for name in policies:
            pk = p * keeps[name][0, :, r0 // BLOCK, :r1][:, None, :]
            m = pk.sum(-1, keepdim=True)
            o = (pk @ vv[:, :r1]) / m
            out[name]["mass"] += m.squeeze(-1).double().sum(-1)
            out[name]["err2"] += ((o - dense).double() ** 2).sum((-1, -2))
    for name in policies:
        r = out[name]
        r["recall"] = (r.pop("mass") / count).float()
        r["err"] = (r.pop("err2") / ref2).sqrt().float()
    return out


def summarize(per_layer: dict) -> dict:
    """per_layer {layer: {"kept", "recall", "err"}} -> means / maxima over heads."""
    cat = lambda key: torch.cat([per_layer[l][key] for l in sorted(per_layer)]).double()
    kept, recall, err = cat("kept"), cat("recall"), cat("err")
    layer_recall = {l: float(per_layer[l]["recall"].mean()) for l in per_layer}
    return {"kept_mean": float(kept.mean()), "kept_max": float(kept.max()),
            "recall_mean": float(recall.mean()), "recall_min": float(recall.min()),
            "err_mean": float(err.mean()), "err_max": float(err.max()),
            "layer0_recall": layer_recall.get(0), "weakest_layer_recall": min(layer_recall.values()),
            "runs_mean": sum(per_layer[l]["runs"] for l in per_layer) / len(per_layer),
            "budgets": per_layer[min(per_layer)]["budgets"]}


def run_policies(lengths, policies: dict, cache: Path, row_blocks: int = 32, log=print) -> dict:
    results = {name: {} for name in policies}
    for n in lengths:
        t = time.perf_counter()
        data = load(n, cache)
        tokens = data["tokens"]
        rows = sample_rows(tokens, row_blocks)
        crows = causal_rows(tokens)
        per = {name: {} for name in policies}
        for layer in sorted(data["qkv"]):
            q, k, v = data["qkv"][layer]
            res = measure_layer(q, k, v, data["scales"][layer], tokens, policies, rows, crows)
            for name in policies:
                per[name][layer] = res[name]
        for name in policies:
            results[name][n] = {"tokens": tokens, **summarize(per[name]),
                                "per_layer": {l: {"kept": float(r["kept"].mean()), "recall": float(r["recall"].mean()),
                                                  "err": float(r["err"].mean())} for l, r in per[name].items()}}
        del data
        log(f"length {n}: {len(policies)} policies in {time.perf_counter() - t:.0f} s")
    return results


# --------------------------------------------------------------------------------------------
# breakdown of one policy's kept fraction into sink columns, local band, verticals, slash runs


def _filter(cols, runs, rc, *, sink_cols=True, verticals=True, local_run=True, slash_runs=True, band_only=False,
            sink=SINK_COLUMNS, local=LOCAL_DIAGONALS):
    """Keep only some parts of an index; ``band_only``: the local run cut back to the forced
    diagonals 0..local-1 (what is left of it when no selected slash merges into it)."""
    if band_only:
        runs = runs.clone()
        runs[..., 1] = torch.where(runs[..., 0] == 0, local - 1, runs[..., 1])
    keep_c = torch.where(cols < sink, sink_cols, verticals) & (cols != SENTINEL)
    c = torch.where(keep_c, cols, SENTINEL).sort(-1).values
    valid = torch.arange(runs.shape[-2]) < rc[..., None]
    keep_r = valid & torch.where(runs[..., 0] == 0, local_run, slash_runs)
    lo = torch.where(keep_r, runs[..., 0], SENTINEL).sort(-1).values
    hi = torch.where(keep_r, runs[..., 1], SENTINEL).sort(-1).values
    return c, torch.stack([lo, hi], -1), keep_r.sum(-1, dtype=torch.int32)


COMPONENTS = {  # name: which parts are kept
    "band": {"sink_cols": False, "verticals": False, "local_run": True, "slash_runs": False, "band_only": True},
    "local": {"sink_cols": False, "verticals": False, "local_run": True, "slash_runs": False},
    "sink": {"sink_cols": True, "verticals": False, "local_run": False, "slash_runs": False},
    "verticals": {"sink_cols": False, "verticals": True, "local_run": False, "slash_runs": False},
    "slash_runs": {"sink_cols": False, "verticals": False, "local_run": False, "slash_runs": True},
    "local+sink": {"sink_cols": True, "verticals": False, "local_run": True, "slash_runs": False},
    "local+sink+verticals": {"sink_cols": True, "verticals": True, "local_run": True, "slash_runs": False},
    "local+sink+slash": {"sink_cols": True, "verticals": False, "local_run": True, "slash_runs": True},
    "all": {},
}


def component_policies(base):
    def make(parts):
        def fn(vertical, slash, n):
            cols, runs, rc, budgets = base(vertical, slash, n)
            return (*_filter(cols, runs, rc, **parts), budgets)
        return fn
    return {name: make(parts) for name, parts in COMPONENTS.items()}


def slash_stats(base, lengths, cache: Path) -> dict:
    """Per length: how the chosen slash diagonals fall into runs (means over heads), and what the
    non-local slash diagonals would keep at one key per diagonal per row vs what their tiles keep."""
    out = {}
    for n in lengths:
        data = load(n, cache)
        tokens = data["tokens"]
        stats = {"diagonals": [], "runs": [], "single": [], "width": [], "line_pairs": [], "local_hi": []}
        for layer in sorted(data["qkv"]):
            q, k, _ = data["qkv"][layer]
            h = q.shape[1]
            vertical, slash = vertical_slash_scores(q, k, None, data["scales"][layer], torch.arange(h))
            _, runs, rc, (nv, ns) = base(vertical, slash, tokens)
            s = slash.clone()
            s[..., :LOCAL_DIAGONALS] = float("inf")
            diags = _topk_sorted(s, torch.full((h,), ns), ns)[0]  # (H, ns)
            for hh in range(h):
                d = diags[hh][diags[hh] != SENTINEL].long()
                far = d[d >= LOCAL_DIAGONALS]
                r = runs[0, hh, :rc[0, hh]].long()
                nonlocal_runs = r[r[:, 0] > 0]
                stats["diagonals"].append(len(far))
                stats["runs"].append(len(nonlocal_runs))
                stats["single"].append(int((nonlocal_runs[:, 0] == nonlocal_runs[:, 1]).sum()))
                stats["width"].append(float((nonlocal_runs[:, 1] - nonlocal_runs[:, 0] + 1).float().mean())
                                      if len(nonlocal_runs) else 0.0)
                stats["line_pairs"].append(float((tokens - far).clamp(min=0).sum()) / (tokens * (tokens + 1) / 2))
                stats["local_hi"].append(int(r[r[:, 0] == 0][0, 1]) if (r[:, 0] == 0).any() else -1)
        out[n] = {"tokens": tokens, "budgets": (nv, ns), **{k: sum(v) / len(v) for k, v in stats.items()}}
        del data
    return out


def breakdown(lengths, cache: Path, base=None, row_blocks: int = 32, log=print) -> dict:
    base = base or vs_policy()
    res = run_policies(lengths, component_policies(base), cache, row_blocks, log)
    stats = slash_stats(base, lengths, cache)
    table = {}
    for n in lengths:
        g = lambda name, key="kept_mean", n=n: res[name][n][key]
        table[n] = {"budgets": stats[n]["budgets"], "tokens": stats[n]["tokens"],
                    "alone": {c: g(c) for c in ("band", "local", "sink", "verticals", "slash_runs")},
                    "incremental": {"band": g("band"), "+merged_into_local": g("local") - g("band"),
                                    "+sink": g("local+sink") - g("local"),
                                    "+verticals": g("local+sink+verticals") - g("local+sink"),
                                    "+slash_runs": g("all") - g("local+sink+verticals")},
                    "total": g("all"),
                    "slash_added_over_local_sink": g("local+sink+slash") - g("local+sink"),
                    "recall": {c: g(c, "recall_mean") for c in ("local+sink", "local+sink+verticals",
                                                                  "local+sink+slash", "all")},
                    "err_mean": {c: g(c, "err_mean") for c in ("local+sink", "local+sink+verticals",
                                                                "local+sink+slash", "all")},
                    "slash": stats[n]}
    return table


# --------------------------------------------------------------------------------------------
# the sweep


def budgets_at(n_ref: int, v: int, s: int, length: int = 131072, exponent: float = 0.7) -> tuple:
    """Reference budgets (at ``length``) that scale to (v, s) at ``n_ref`` tokens."""
    r = (n_ref / length) ** exponent
    return round(v / r), round(s / r)


def sweep_policies() -> dict:
    """The candidates. Budgets are named by their value at 4096 tokens and scaled as the package
    scales them (reference 131072 tokens, exponent 0.7, floors 64 / 128) unless said otherwise."""
    p = {"default (1000,6096)@128K e0.7": vs_policy()}
    for v4, s4 in ((88, 300), (88, 200), (256, 200), (512, 200), (512, 150), (1024, 150)):
        v_ref, s_ref = budgets_at(4096, v4, s4)
        p[f"vs v{v4} s{s4}@4K e0.7"] = vs_policy(v_ref, s_ref)
    # slower growth with length (exponent 0.5) from the same 4K point
    v_ref, s_ref = budgets_at(4096, 512, 200, exponent=0.5)
    p["vs v512 s200@4K e0.5"] = vs_policy(v_ref, s_ref, exponent=0.5)
    # tile-aware slash selection: a per-row key budget w for the slash tiles (local run included)
    for v4, w4 in ((256, 768), (512, 512), (512, 768), (1024, 512)):
        v_ref, w_ref = budgets_at(4096, v4, w4)
        p[f"tile v{v4} w{w4}@4K e0.7"] = tile_policy(v_ref, w_ref, 131072, 0.7, floor_w=256)
    # round 2: between the default and the s200 points; wider forced local bands; more sinks;
    # exponent 0.5 for a falling kept fraction 4K -> 6K -> 8K
    for v4, s4, e in ((512, 250, 0.7), (768, 250, 0.7), (512, 300, 0.7), (512, 250, 0.5), (768, 300, 0.5)):
        v_ref, s_ref = budgets_at(4096, v4, s4, exponent=e)
        p[f"r2 vs v{v4} s{s4}@4K e{e}"] = vs_policy(v_ref, s_ref, exponent=e)
    for v4, s4, local in ((512, 320, 256), (512, 384, 384), (512, 256, 256)):
        v_ref, s_ref = budgets_at(4096, v4, s4)
        p[f"r2 vs v{v4} s{s4}@4K local{local} e0.7"] = vs_policy(v_ref, s_ref, local=local, floor_s=local)
    v_ref, s_ref = budgets_at(4096, 512, 250)
    p["r2 vs v512 s250@4K sink64 e0.7"] = vs_policy(v_ref, s_ref, sink=64)
    # round 3: around 30% at 4K, verticals over slashes, exponents that keep the kept fraction falling
    for v4, s4, e in ((768, 200, 0.7), (768, 200, 0.6), (1024, 200, 0.6), (768, 225, 0.6), (1024, 225, 0.5),
                      (640, 220, 0.6)):
        v_ref, s_ref = budgets_at(4096, v4, s4, exponent=e)
        p[f"r3 vs v{v4} s{s4}@4K e{e}"] = vs_policy(v_ref, s_ref, exponent=e)
    # round 4: slashes grow linearly with length (exponent 1.0), verticals slower; budgets at 131072
    # tokens (MInference's slash default 6096 at e1.0 is 190 at 4K, 381 at 8K)
    for v_ref, ve, s_ref in ((8689, 0.7, 6096), (8689, 0.7, 6400), (6144, 0.6, 6400), (8192, 0.6, 6096)):
        p[f"r4 v{v_ref}@128K e{ve} s{s_ref}@128K e1.0"] = vs_policy(v_ref, s_ref, exponent=1.0, v_exponent=ve)
    for v8, s8 in ((1248, 406), (1152, 400)):
        p[f"r4 vs v{v8} s{s8}@8K e1.0"] = vs_policy(v8, s8, length=8192, exponent=1.0)
    # round 6: candidate r3 (768 / 200 at 4K, e0.7) with higher slash floors (they bind only at 2K)
    v_ref, s_ref = budgets_at(4096, 768, 200)
    for floor_s in (200, 256, 300):
        p[f"r6 vs v768 s200@4K e0.7 floor_s{floor_s}"] = vs_policy(v_ref, s_ref, floor_s=floor_s)
    v_ref, s_ref = budgets_at(4096, 768, 200, exponent=0.6)
    p["r6 vs v768 s200@4K e0.6 floor_s200"] = vs_policy(v_ref, s_ref, exponent=0.6, floor_s=200)
    # round 7: the budgets at 8K of the perplexity runs (one 8K window: only these matter)
    for v8, s8 in ((144, 875), (144, 487), (144, 406), (1248, 406), (1248, 325)):
        p[f"r7 at8K v{v8} s{s8}"] = vs_policy(v8, s8, length=8192, exponent=1.0)
    # round 8: scores from 4 query windows spread over the prompt instead of the last 64 queries
    for v4, s4 in ((768, 200), (88, 300)):
        v_ref, s_ref = budgets_at(4096, v4, s4)
        p[f"r8 multi vs v{v4} s{s4}@4K e0.7"] = vs_policy(v_ref, s_ref)
        p[f"r8 last64 vs v{v4} s{s4}@4K e0.7"] = vs_policy(v_ref, s_ref)
    # round 5: tile-aware selection at about the kept fraction of the round-3 candidates
    for v4, w4 in ((768, 1024), (768, 1280), (768, 1536)):
        v_ref, w_ref = budgets_at(4096, v4, w4)
        p[f"r5 tile v{v4} w{w4}@4K e0.7"] = tile_policy(v_ref, w_ref, 131072, 0.7, floor_w=256)
    # round 9: no budgets, per-head counts from the estimate's mass (share of vertical / slash mass)
    for sv, ss in ((0.9, 0.9), (0.99, 0.75), (0.99, 0.8), (0.99, 0.85), (0.99, 0.9), (0.995, 0.9), (0.999, 0.95)):
        p[f"r9 mass v{sv} s{ss}"] = mass_policy(sv, ss)
    return p


def fmt_table(results: dict, lengths) -> str:
    lines = [("| policy | length | budgets (v / s or w) | kept mean | kept max | recall mean | recall min | "
             "out err mean | out err max | layer 0 recall | weakest layer recall | slash runs / head |"),
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, by_n in results.items():
        for n in lengths:
            r = by_n.get(n) or by_n.get(str(n))
            if r is None:
                continue
            lines.append(f"| {name} | {n} | {r['budgets'][0]} / {r['budgets'][1]} | {100 * r['kept_mean']:.1f}% | "
                         f"{100 * r['kept_max']:.1f}% | {r['recall_mean']:.4f} | {r['recall_min']:.4f} | "
                         f"{r['err_mean']:.4f} | {r['err_max']:.4f} | {r['layer0_recall']:.4f} | "
                         f"{r['weakest_layer_recall']:.4f} | {r['runs_mean']:.1f} |")
    return "\n".join(lines)


def fmt_breakdown(table: dict) -> str:
    pc = lambda x: f"{100 * x:.1f}%"
    lines = [("| length | budgets v / s | forced band (diag 0-99) | + slashes merged into the local run | + sink columns | "
             "+ vertical columns | + other slash runs (tiles) | total kept | other runs / head (single diagonals) | "
             "selected diagonals beyond the forced ones / head | those diagonals as lines (1 key per query) |"),
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for n, r in table.items():
        inc, sl = r["incremental"], r["slash"]
        lines.append(f"| {n} | {r['budgets'][0]} / {r['budgets'][1]} | {pc(inc['band'])} | {pc(inc['+merged_into_local'])} | "
                     f"{pc(inc['+sink'])} | {pc(inc['+verticals'])} | {pc(inc['+slash_runs'])} | {pc(r['total'])} | "
                     f"{sl['runs']:.1f} ({sl['single']:.1f}) | {sl['diagonals']:.0f} | {pc(sl['line_pairs'])} |")
    lines += ["", ("| length | local run ends at diagonal (mean) | recall: local+sink | + verticals | + slashes (no verticals) | "
              "all | out err: local+sink | + verticals | + slashes | all |"), "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for n, r in table.items():
        rc, er = r["recall"], r["err_mean"]
        keys = ("local+sink", "local+sink+verticals", "local+sink+slash", "all")
        lines.append(f"| {n} | {r['slash']['local_hi']:.0f} | " + " | ".join(f"{rc[k]:.4f}" for k in keys) + " | "
                     + " | ".join(f"{er[k]:.4f}" for k in keys) + " |")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# end to end on the model: perplexity of one window and the needle grid, for one candidate


class PatchedEstimator:
    """Context manager: the package's pure-PyTorch estimator with this class's selection
    (``select``) for all-vertical-slash layers without padding; other layers keep the package's.
    Patches ``mcompile.kernels.estimate.assemble_index`` for the duration (nothing on disk
    changes); ``calls`` counts the layers it estimated, to prove it ran."""

    def __init__(self, local: int = LOCAL_DIAGONALS, sink: int = SINK_COLUMNS):
        self.local, self.sink, self.calls = local, sink, 0

    def select(self, vertical, slash, nv: int, w: int, n: int):
        """(columns, runs, run_count) from the scores and the op's (scaled) budgets."""
        raise NotImplementedError

    def assemble(self, q, k, key_padding, kinds, p0, p1, scale, vs_scores=vertical_slash_scores, capacity=None):
        if key_padding is not None or any(int(x) != PatternKind.VERTICAL_SLASH for x in kinds) \
                or len(set(p0)) > 1 or len(set(p1)) > 1 or q.shape[2] != k.shape[2]:
            return self._orig(q, k, key_padding, kinds, p0, p1, scale, vs_scores, capacity)
        h, n = q.shape[1], k.shape[2]
        vertical, slash = vs_scores(q, k, None, scale, torch.arange(h, device=q.device))
        cols, runs, rc = self.select(vertical, slash, min(p0[0], n), min(p1[0], n), n)
        self.calls += 1
        # Built at the selection's own size, not the op's capacity: the graph runs eagerly here.
        return make_index(cols, runs, rc, n)

    def __enter__(self):
        from mcompile.kernels import estimate as est

        self._orig = est.assemble_index
        est.assemble_index = self.assemble
        return self

    def __exit__(self, *exc):
        from mcompile.kernels import estimate as est

        est.assemble_index = self._orig


class TileAwareEstimator(PatchedEstimator):
    """Tile-aware slash selection (``select_runs_tile_aware``); the op's budgets are read as
    (verticals, per-row key budget of the slash tiles)."""

    def __init__(self, cand_factor: int = 4, **kw):
        super().__init__(**kw)
        self.cand_factor = cand_factor

    def select(self, vertical, slash, nv, w, n):
        cand = min(n, self.local + max(1, self.cand_factor * w // BLOCK))
        runs, rc = select_runs_tile_aware(slash, cand, w, self.local)
        return select_columns(vertical, nv, self.sink), runs, rc


class MassEstimator(PatchedEstimator):
    """Per-head counts from the estimate's mass (``mass_select``); the op's budgets are ignored."""

    def __init__(self, share_v: float, share_s: float, **kw):
        super().__init__(**kw)
        self.share_v, self.share_s = share_v, share_s

    def select(self, vertical, slash, nv, w, n):
        cols, runs, rc, _ = mass_policy(self.share_v, self.share_s, self.sink, self.local)(vertical, slash, n)
        return cols, runs, rc


def candidate_options(name: str) -> tuple[dict, Callable[[], PatchedEstimator] | None]:
    """(backend options, estimator patch or None) of a candidate: 'default', 'vs:V,S' (budgets at
    4096 tokens, scaled as the package does), 'tile:V,W', 'abs:V,S' (absolute budgets, no scaling:
    for one perplexity window, only its length's budgets matter) or 'mass:SV,SS' (shares of the
    vertical / slash mass, no budgets: ``MassEstimator``)."""
    if name == "default":
        return {}, None
    kind, spec = name.split(":")
    if kind == "mass":
        sv, ss = (float(x) for x in spec.split(","))
        return {}, lambda: MassEstimator(sv, ss)
    v4, x4 = (int(x) for x in spec.split(","))
    if kind == "abs":
        return {"default_pattern": Pattern(PatternKind.VERTICAL_SLASH, v4, x4), "budget_length": 0}, None
    v_ref, x_ref = budgets_at(4096, v4, x4)
    pattern = Pattern(PatternKind.VERTICAL_SLASH, v_ref, x_ref)
    options = {"default_pattern": pattern, "budget_length": 131072, "budget_exponent": 0.7}
    return options, (TileAwareEstimator if kind == "tile" else None)


def run_model(name: str, parts, lengths, depths, ppl_window: int, dense: bool, log=print) -> dict:
    from mcompile.eval import needle_grid, perplexity
    from mcompile.eval.runner import load_model
    from mcompile.eval.variants import DENSE, MINFERENCE, Variant, compiled

    model, tok, _ = load_model("smollm2", torch.float32, "cpu")
    options, estimator = candidate_options(name)
    variants = ([Variant(DENSE, "eager")] if dense else []) + \
        [Variant(MINFERENCE, "eager", {"dense_below": 0, "pattern_db": None, **options})]
    out = {"candidate": name, "options": {k: str(v) for k, v in options.items()}, "estimator": None}
    for variant in variants:
        est = estimator() if (estimator is not None and variant.name == MINFERENCE) else None
        if est is not None:
            out["estimator"] = type(est).__name__
        ctx = est if est is not None else _null()
        res = out.setdefault(variant.name, {})
        with ctx:
            if "perplexity" in parts:
                t = time.perf_counter()
                tokens = perplexity.text_tokens(tok, ppl_window)
                decoder = model.get_decoder()
                with compiled(decoder, variant) as comp:
                    ppl = perplexity.perplexity(model, tokens, ppl_window, ppl_window // 2, "cpu", decoder=decoder)
                res["perplexity"] = {"value": ppl["perplexity"], "scored": ppl["scored"], "compile": comp.summary(),
                                     "seconds": round(time.perf_counter() - t)}
                log(f"{variant.name}: perplexity {ppl['perplexity']:.4f} in {time.perf_counter() - t:.0f} s")
            if "needle" in parts:
                t = time.perf_counter()
                with compiled(model, variant) as comp:
                    cells = needle_grid.run_grid(model, tok, lengths, depths, "cpu",
                                                 on_cell=lambda c, name=variant.name: log(
                                                     f"{name} {c.length} {c.depth}: "
                                                     f"{'pass' if c.passed else 'MISS'} {c.answer!r}"))
                res["needle"] = {"cells": needle_grid.cells_to_json(cells), "compile": comp.summary(),
                                 "seconds": round(time.perf_counter() - t)}
        if est is not None:
            res["patched_layer_calls"] = est.calls
    return out


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("what", choices=["capture", "breakdown", "sweep", "model"])
    ap.add_argument("--candidate", default="default", help="model: 'default', 'vs:V,S', 'tile:V,W' (budgets at 4096), 'abs:V,S' or 'mass:SV,SS'")
    ap.add_argument("--parts", default="perplexity", help="model: perplexity,needle")
    ap.add_argument("--depths", default="0.3,0.5,0.7,0.9", help="model: needle depths")
    ap.add_argument("--ppl-window", type=int, default=8192)
    ap.add_argument("--dense", action="store_true", help="model: run dense too")
    ap.add_argument("--lengths", default="2048,4096,6144,8192")
    ap.add_argument("--cache", default=str(CACHE), help="folder for the captured Q/K/V (about 2.5 GB for 2K-8K)")
    ap.add_argument("--row-blocks", type=int, default=32)
    ap.add_argument("--only", default=None, help="comma-separated substrings: sweep only policies whose name has one")
    ap.add_argument("--out", default=None, help="write OUT.json and OUT.md")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    lengths = [int(x) for x in args.lengths.split(",") if x]
    log = lambda msg: print(msg, file=sys.stderr, flush=True)
    if args.what == "model":
        result = run_model(args.candidate, args.parts.split(","), lengths,
                           [float(x) for x in args.depths.split(",")], args.ppl_window, args.dense, log)
        text = json.dumps(result, indent=1, default=str)
        print(text)
        if args.out:
            Path(args.out + ".json").write_text(text + "\n")
        return 0
    cache = Path(args.cache)
    capture(lengths, cache)
    if args.what == "capture":
        return 0
    if args.what == "breakdown":
        result = breakdown(lengths, cache, row_blocks=args.row_blocks, log=log)
        text = json.dumps(result, indent=1, default=str)
        print(fmt_breakdown(result))
    else:
        policies = sweep_policies()
        if args.only:
            keys = args.only.split(",")
            policies = {k: v for k, v in policies.items() if any(x in k for x in keys)}
        result = run_policies(lengths, policies, cache, args.row_blocks, log)
        text = json.dumps(result, indent=1, default=str)
        print(fmt_table(result, lengths))
    if args.out:
        Path(args.out + ".json").write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
