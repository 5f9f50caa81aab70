"""Write evaluation results as Markdown tables and the needle heat map (PNG).

The heat map follows the paper's needle figure: prompt length on x, needle depth on y, one panel
per variant, a cell green when the answer contained the needle and red when not.
"""

from __future__ import annotations

from pathlib import Path

from .variants import DENSE, MINFERENCE

HEATMAP = "needle_heatmap.png"
MARKDOWN = "eval.md"


def _grid(cells: list[dict]):
    lengths = sorted({c["length"] for c in cells})
    depths = sorted({round(c["depth"], 4) for c in cells})
    by = {(c["length"], round(c["depth"], 4)): c for c in cells}
    return lengths, depths, by


def needle_table(results: dict) -> str:
    """Rows = depth, columns = length; each cell 'dense / minference' as pass (+) or miss (-)."""
    needle = results.get("needle", {})
    if MINFERENCE not in needle:
        return ""
    lengths, depths, dense = _grid(needle[DENSE]["cells"])
    _, _, sparse = _grid(needle[MINFERENCE]["cells"])
    mark = lambda c: "-" if c is None else ("pass" if c["passed"] else "MISS")
    lines = ["| depth \\ length | " + " | ".join(str(n) for n in lengths) + " |",
             "| --- |" + " --- |" * len(lengths)]
    for d in depths:
        row = [f"{mark(dense.get((n, d)))} / {mark(sparse.get((n, d)))}" for n in lengths]
        lines.append(f"| {d:.0%} | " + " | ".join(row) + " |")
    cmp = needle["comparison"]
    lines.append("")
    lines.append(f"Cells: dense / minference. Passed: dense {cmp['dense_passed']}/{cmp['cells']}, minference "
                 f"{cmp['minference_passed']}/{cmp['cells']}; cells dense passed and minference missed: "
                 f"{cmp['lost'] or 'none'}.")
    return "\n".join(lines)


def perplexity_table(results: dict) -> str:
    ppl = results.get("perplexity", {})
    if MINFERENCE not in ppl:
        return ""
    d, m = ppl[DENSE], ppl[MINFERENCE]
    return "\n".join([
        "| variant | windows | window / stride | tokens scored | perplexity |",
        "| --- | --- | --- | --- | --- |",
        f"| dense | {len(d['windows'])} | {d['window']} / {d['stride']} | {d['scored']} | {d['perplexity']:.4f} |",
        f"| minference | {len(m['windows'])} | {m['window']} / {m['stride']} | {m['scored']} | {m['perplexity']:.4f} |",
        "",
        f"Relative difference: {100 * ppl['relative_difference']:+.2f}% "
        f"(attentions rewritten in the prefill graph: {m['compile']['prefill_rewritten']}).",
    ])


def attention_table(results: dict) -> str:
    by_length = results.get("attention", {}).get("by_length", {})
    if not by_length:
        return ""
    lines = ["| length | recall mean | recall min (head) | weakest layer (mean) | output error mean / max "
             "| kept fraction mean / max |", "| --- | --- | --- | --- | --- | --- |"]
    for n, r in sorted(by_length.items(), key=lambda kv: int(kv[0])):
        s = r["summary"]
        if not s.get("layers"):
            lines.append(f"| {n} | no layer rewritten | | | | |")
            continue
        lines.append(f"| {n} | {s['recall_mean']:.4f} | {s['recall_min']:.4f} | {s['weakest_layer']} "
                     f"({s['recall_min_layer_mean']:.4f}) | {s['output_error_mean']:.4f} / {s['output_error_max']:.4f} "
                     f"| {100 * s['kept_fraction_mean']:.1f}% / {100 * s['kept_fraction_max']:.1f}% |")
    return "\n".join(lines)


def per_layer_table(results: dict, length: str) -> str:
    """Recall and output error per layer (mean and min over heads) at one length."""
    layers = results["attention"]["by_length"][length]["layers"]
    lines = ["| layer | recall mean | recall min | output error mean | kept fraction mean |",
             "| --- | --- | --- | --- | --- |"]
    for r in layers:
        if not r["rewritten"]:
            lines.append(f"| {r['layer']} | dense | | | |")
            continue
        mean = lambda xs: sum(xs) / len(xs)
        lines.append(f"| {r['layer']} | {mean(r['recall']):.4f} | {min(r['recall']):.4f} | "
                     f"{mean(r['output_error']):.4f} | {100 * mean(r['kept_fraction']):.1f}% |")
    return "\n".join(lines)


def targets_table(results: dict) -> str:
    t = results.get("targets", {})
    lines = ["| target | met | numbers |", "| --- | --- | --- |"]
    for name, v in t.items():
        met = {True: "yes", False: "**no**", None: "not measured"}[v.get("met")]
        nums = ", ".join(f"{k}={v[k]}" for k in v if k != "met")
        lines.append(f"| {name} | {met} | {nums} |")
    return "\n".join(lines)


def markdown(results: dict) -> str:
    spec = results["spec"]
    parts = [f"# Accuracy evaluation: {spec['model']} ({spec['dtype']}, {spec['device']})", ""]
    if spec.get("command"):
        parts += [f"Command: `{spec['command']}`", ""]
    parts += [f"Variants: {results['variants']}", "", "## Targets", "", targets_table(results), ""]
    for title, text in (("Needle in a haystack", needle_table(results)), ("Perplexity", perplexity_table(results)),
                        ("Attention recall, output error and kept fraction", attention_table(results))):
        if text:
            parts += [f"## {title}", "", text, ""]
    by_length = results.get("attention", {}).get("by_length", {})
    if by_length:
        longest = max(by_length, key=int)
        parts += [f"### Per layer at {longest} tokens", "", per_layer_table(results, longest), ""]
    parts += [f"Timings (s): {results.get('timings_s', {})}", ""]
    return "\n".join(parts)


def heatmap(results: dict, path: Path) -> bool:
    """Save the needle heat map; False when there is no needle result or no matplotlib."""
    needle = results.get("needle", {})
    if MINFERENCE not in needle:
        return False
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, name in zip(axes, (DENSE, MINFERENCE)):
        lengths, depths, by = _grid(needle[name]["cells"])
        score = [[float(by[(n, d)]["passed"]) if (n, d) in by else float("nan") for n in lengths] for d in depths]
        ax.imshow(score, cmap="RdYlGn", vmin=0, vmax=1, aspect="auto")
        ax.set_xticks(range(len(lengths)), [f"{n // 1024}K" if n % 1024 == 0 else str(n) for n in lengths])
        ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths])
        ax.set_xlabel("context length (tokens)")
        passed = sum(c["passed"] for c in needle[name]["cells"])
        ax.set_title(f"{name}: {passed}/{len(needle[name]['cells'])} found")
    axes[0].set_ylabel("needle depth")
    fig.suptitle(f"Needle in a haystack, {results['spec']['model']} ({results['spec']['dtype']})")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def write(results: dict, out: Path) -> None:
    (out / MARKDOWN).write_text(markdown(results))
    heatmap(results, out / HEATMAP)
