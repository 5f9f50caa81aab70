"""How many remote key tiles a rank would fetch under index-driven context parallelism
(docs/CONTEXT_PARALLEL.md), on real heads: SmolLM2 + YaRN, real text, the default pattern.

    PYTHONPATH=. python -m benchmarks.cp_union --length 16384 --ranks 2 4 8 [--device cuda] [--out r.json]

The prompt's 64-position blocks are split into P equal chunks, one per rank. Rank r needs, per KV
head, the key tiles of earlier ranks that any of its query blocks keeps for any query head of
that KV head (the union ``u``); ring attention moves every earlier tile (causal: ``r N / P``).
Printed per P: the fetched share ``sum_r u_r / sum_r (r N / P)`` over all layers and KV heads,
and its worst layer.
"""

from __future__ import annotations

import argparse
import json

import torch

from mcompile import ops
from mcompile.config import MInferenceConfig
from mcompile.index import num_blocks
from mcompile.patterns import encode
from mcompile.tools.capture import capture_qkv
from mcompile.tools.data import haystack
from mcompile.tools.models import load_smollm2


def remote_tiles(index, nb: int, ranks: int, group: int) -> tuple[int, int]:
    """(tiles fetched, tiles ring attention moves) summed over ranks and KV heads, for one layer."""
    blocks, counts = index[5][0], index[6][0]  # (H, rows, KB), (H, rows)
    h = blocks.shape[0]
    per = nb // ranks
    fetched = ring = 0
    for r in range(1, ranks):
        lo, hi = r * per, (r + 1) * per if r < ranks - 1 else nb
        for kv in range(h // group):
            kept = set()
            for head in range(kv * group, (kv + 1) * group):
                for m in range(lo, hi):
                    tiles = blocks[head, m, :int(counts[head, m])].tolist()
                    kept.update(t for t in tiles if t < lo)
            fetched += len(kept)
            ring += lo
    return fetched, ring


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--length", type=int, default=16384)
    p.add_argument("--ranks", type=int, nargs="+", default=[2, 4, 8])
    p.add_argument("--layers", type=int, nargs="*", default=None, help="default: every layer")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    model, tok = load_smollm2(yarn_factor=max(16.0, args.length / 8192), device=args.device)
    ids = torch.tensor([haystack(tok, args.length)], device=args.device)
    config = MInferenceConfig()
    h, hk = model.config.num_attention_heads, model.config.num_key_value_heads
    kinds, p0, p1 = encode([config.default_pattern] * h)
    nb = num_blocks(args.length)
    totals = {r: [0, 0] for r in args.ranks}
    per_layer = {r: {} for r in args.ranks}

    def on_layer(layer, q, k, v):
        index = ops.estimate_index(q, k, None, kinds, p0, p1, q.shape[-1] ** -0.5, config.budget_length,
                                   config.budget_exponent)
        for ranks in args.ranks:
            fetched, ring = remote_tiles(index, nb, ranks, h // hk)
            totals[ranks][0] += fetched
            totals[ranks][1] += ring
            per_layer[ranks][layer] = fetched / max(ring, 1)
        print(f"layer {layer}: " + ", ".join(f"P={r} {per_layer[r][layer]:.3f}" for r in args.ranks), flush=True)

    capture_qkv(model, ids, args.layers, on_layer=on_layer)
    print(f"\nN={args.length}, SmolLM2 + YaRN, default pattern ({config.default_pattern}): remote tiles fetched / "
          "ring attention's")
    print("| ranks | fetched / ring (all layers) | worst layer |")
    print("| --- | --- | --- |")
    rows = []
    for r in args.ranks:
        share = totals[r][0] / max(totals[r][1], 1)
        worst = max(per_layer[r].items(), key=lambda kv: kv[1])
        print(f"| {r} | {share:.3f} | layer {worst[0]}: {worst[1]:.3f} |")
        rows.append({"ranks": r, "share": share, "per_layer": per_layer[r]})
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"length": args.length, "pattern": str(config.default_pattern), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
