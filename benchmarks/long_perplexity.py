"""Perplexity of long prompts forced sparse against dense: SmolLM2-135M (real weights, RoPE
stretched by YaRN x16) on the standard library's Python source, positions N/2..N.

    python -m benchmarks.long_perplexity --device cuda --dtype bfloat16 --lengths 32768 65536 131072
    python -m benchmarks.long_perplexity --lengths 8192 --policies dense default mass:0.98   # CPU

One prompt of N tokens per length, taken ``--offset`` tokens into the text (code no pattern or
threshold was chosen on); the negative log-likelihood of its second half is scored, so every
scored token has at least N/2 tokens of context. Each policy compiles the decoder with
``backend="minference"``, ``dense_below=0`` (sparse at every length), no pattern database and
the policy's pattern for every head (``recall_frontier.policy``: ``default``, ``vs-default``,
``vs:V,S``, ``ashape:SINK,LOCAL``, ``mass:R[,S]``); ``dense`` is the uncompiled model. Prints a
line per policy as it goes; ``--plot`` draws the perplexities against dense's.
"""

from __future__ import annotations

import argparse
import json
import math
import time

import torch

from mcompile.tools.data import haystack
from mcompile.tools.eval.perplexity import window_nll
from mcompile.tools.models import load_smollm2

from .recall_frontier import policy

OFFSET = 300_000  # tokens into the standard library's source


def score(model, ids: torch.Tensor, spec: str, compiler: str) -> float:
    """Perplexity of ids[N/2:] under ``spec``."""
    torch._dynamo.reset()
    decoder = model.get_decoder()
    if spec != "dense":
        options = {"pattern_db": None, "default_pattern": policy(spec, ids.shape[1]).to_dict(), "dense_below": 0,
                   "compiler": compiler}
        decoder = torch.compile(decoder, backend="minference", options=options, dynamic=False)
    nll, count = window_nll(decoder, model.get_output_embeddings(), ids, ids.shape[1] // 2)
    return math.exp(nll / count)


def plot(rows: list[dict], path: str) -> None:
    """Perplexity relative to dense, per policy, one group of bars per length."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths = sorted({r["length"] for r in rows})
    specs = list(dict.fromkeys(r["policy"] for r in rows if r["policy"] != "dense"))
    fig, ax = plt.subplots(figsize=(2.2 * len(specs) + 2, 4))
    width = 0.8 / len(specs)
    for i, spec in enumerate(specs):
        xs, ys = [], []
        for j, n in enumerate(lengths):
            hit = [r for r in rows if r["length"] == n and r["policy"] == spec and r["vs_dense"] is not None]
            if hit:
                xs.append(j + i * width)
                ys.append(100 * hit[-1]["vs_dense"])
        ax.bar(xs, ys, width, label=spec)
    ax.axhline(0, color="black", linewidth=0.8)
    ax.axhspan(-1, 1, color="grey", alpha=0.2, label="within 1% of dense")
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(lengths))], [f"N={n}" for n in lengths])
    ax.set_ylabel("perplexity vs dense (%)")
    ax.set_title("SmolLM2 + YaRN x16, positions N/2..N of Python source, forced sparse", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[32768, 65536, 131072])
    p.add_argument("--policies", nargs="+", default=["dense", "vs-default", "default", "mass:0.95", "ashape:64,1024"])
    p.add_argument("--offset", type=int, default=OFFSET)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--compiler", default="eager", help="the backend's compiler option (eager: the ops, no Inductor)")
    p.add_argument("--out", default="")
    p.add_argument("--plot", default="")
    p.add_argument("--from-json", nargs="+", default=[], help="plot the rows of earlier runs instead of running")
    args = p.parse_args()
    if args.from_json:
        rows = [r for path in args.from_json for r in json.load(open(path))["rows"]]
        plot(rows, args.plot)
        return
    model, tok = load_smollm2(dtype=getattr(torch, args.dtype), yarn_factor=16, device=args.device)
    rows = []
    for n in args.lengths:
        ids = torch.tensor([haystack(tok, n, offset=args.offset, source="python")], device=args.device)
        dense = None
        for spec in args.policies:
            t0 = time.perf_counter()
            ppl = score(model, ids, spec, args.compiler)
            dense = ppl if spec == "dense" else dense
            rel = f"{100 * (ppl / dense - 1):+.2f}%" if dense else ""
            rows.append({"length": n, "policy": spec, "perplexity": ppl,
                         "vs_dense": ppl / dense - 1 if dense else None})
            print(f"N={n:>6} {spec:<12} perplexity {ppl:8.4f} {rel:>8}  ({time.perf_counter() - t0:.0f} s)", flush=True)
            if args.out:
                with open(args.out, "w") as f:
                    json.dump({"args": vars(args), "rows": rows}, f, indent=1)
    if args.plot:
        plot(rows, args.plot)


if __name__ == "__main__":
    main()
