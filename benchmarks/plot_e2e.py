"""Plot time to first token against prompt length from ``benchmarks/e2e.py`` JSON results.

    python benchmarks/plot_e2e.py docs/results/e2e_llama8b_*.json --out docs/images/e2e_llama8b.png

Left: dense and minference time to first token (log-log); right: the speedup. Rows below the
first length where minference ran sparse are dense in both. Fitted rows (``--fit`` runs) are
drawn hollow. Repeated (case, length) rows keep the first file's.
"""

from __future__ import annotations

import argparse
import json

DENSE_CASES = ("dense", "dense-mem")


def load(paths):
    """{case: {length: (ms, fitted)}} over the files, first file wins."""
    rows = {}
    for path in paths:
        with open(path) as f:
            result = json.load(f)
        for r in result["rows"]:
            if "ms" not in r:
                continue
            case = "dense" if r["case"] in DENSE_CASES else "minference"
            rows.setdefault(case, {}).setdefault(r["length"], (r["ms"], bool(r.get("fit"))))
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("results", nargs="+")
    p.add_argument("--out", required=True)
    p.add_argument("--title", default="Llama-3-8B shape, H100, bf16, prefill (no KV cache)")
    args = p.parse_args()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = load(args.results)
    fig = Figure(figsize=(10, 4), dpi=120)
    FigureCanvasAgg(fig)
    ax, bx = fig.subplots(1, 2)
    for case, colour in (("dense", "#4c72b0"), ("minference", "#dd8452")):
        pts = sorted(rows.get(case, {}).items())
        ax.plot([n for n, _ in pts], [ms / 1e3 for _, (ms, _) in pts], color=colour, label=case)
        for n, (ms, fitted) in pts:
            ax.scatter([n], [ms / 1e3], color=colour, facecolors="none" if fitted else colour, zorder=3)
    common = sorted(set(rows.get("dense", {})) & set(rows.get("minference", {})))
    speed = [rows["dense"][n][0] / rows["minference"][n][0] for n in common]
    bx.plot(common, speed, color="#55a868", marker="o")
    for n, s in zip(common, speed):
        bx.annotate(f"{s:.2f}x", (n, s), textcoords="offset points", xytext=(0, 6), ha="center", fontsize=8)
    bx.axhline(1.0, color="#9e9e9e", lw=0.8)
    for a in (ax, bx):
        a.set_xscale("log", base=2)
        a.set_xlabel("prompt tokens")
        a.grid(alpha=0.3)
    ax.set_yscale("log")
    ax.set_ylabel("time to first token (s)")
    ax.legend(title="hollow: fitted from 1-2 layers", fontsize=8, title_fontsize=8)
    bx.set_ylabel("speedup over dense")
    fig.suptitle(args.title, fontsize=10)
    fig.tight_layout()
    fig.savefig(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
