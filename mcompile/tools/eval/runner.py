"""Run the accuracy evaluation: needle grid, perplexity and attention metrics, dense vs minference.

``run_eval(spec)`` loads the model, runs the parts ``spec.parts`` names for both variants, checks
the targets, and writes ``eval.json`` (and, via ``report.write``, ``eval.md`` and the heat map)
into ``spec.out_dir`` after every part, so an interrupted run keeps what it finished.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from . import attention, needle_grid, perplexity, report
from .variants import DENSE, MINFERENCE, Variant, compiled

log = logging.getLogger(__name__)

PARTS = ("needle", "perplexity", "attention")
# Targets of issue 5 (SmolLM2-135M-Instruct, real weights).
TARGET_KEPT_AT_4K = 0.30  # the pattern keeps at most 30% of causal keys at 4K ...
TARGET_KEPT_LENGTH = 4096  # ... and less as length grows
TARGET_PPL_REL = 0.01  # minference perplexity within 1% of dense
TARGET_RECALL = 0.95  # mean attention recall


@dataclass
class EvalSpec:
    model: str = "smollm2"  # "smollm2", a local model folder, or a .gguf file
    device: str = "cpu"
    dtype: str = "float32"
    yarn: float | None = None
    compiler: str = "eager"  # dense backend / minference compiler
    options: dict = field(default_factory=lambda: {"dense_below": 0, "pattern_db": None})
    lengths: tuple = (2048, 4096, 6144, 8192)
    depths: tuple = (0.1, 0.3, 0.5, 0.7, 0.9)
    ppl_window: int | None = None  # None: the model's context
    ppl_stride: int | None = None  # None: half the window
    ppl_tokens: int = 16384  # tokens of text scored (from the start of the documentation); 0: all
    attention_lengths: tuple | None = None  # None: the needle lengths
    row_blocks: int = attention.DEFAULT_ROW_BLOCKS
    parts: tuple = PARTS
    out_dir: str | None = None
    progress: bool = True
    command: str = ""  # the command line that made the results, for the report


def load_model(name: str, dtype: torch.dtype, device: str, yarn: float | None = None):
    """(model, tokenizer, context length) from "smollm2", a model folder or a .gguf file."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if name == "smollm2":
        from ..models import SMOLLM2_CONTEXT, load_smollm2

        model, tok = load_smollm2(dtype=dtype, device=device, yarn_factor=yarn)
        return model, tok, int(SMOLLM2_CONTEXT * (yarn or 1))
    if yarn:
        raise ValueError("--yarn is only supported with --model smollm2")
    path = Path(name)
    if not path.exists():
        raise FileNotFoundError(f"no model at {name!r}: give 'smollm2', a local model folder or a .gguf file "
                                "(nothing is downloaded)")
    kwargs = {"gguf_file": path.name} if path.suffix == ".gguf" else {}
    folder = path.parent if kwargs else path
    tok = AutoTokenizer.from_pretrained(folder, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, **kwargs).to(device).eval()
    return model, tok, int(model.config.max_position_embeddings)


def _bar(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=not enabled, leave=True)


def _variants(spec: EvalSpec) -> list[Variant]:
    return [Variant(DENSE, spec.compiler), Variant(MINFERENCE, spec.compiler, dict(spec.options))]


def _needle(spec, model, tok, results) -> None:
    for variant in _variants(spec):
        bar = _bar(len(spec.lengths) * len(spec.depths), f"needle {variant.name}", spec.progress)
        with compiled(model, variant) as comp:
            cells = needle_grid.run_grid(model, tok, spec.lengths, spec.depths, spec.device,
                                         on_cell=lambda c, bar=bar: bar.update())
        bar.close()
        results["needle"][variant.name] = {"cells": needle_grid.cells_to_json(cells), "compile": comp.summary()}
    results["needle"]["comparison"] = needle_grid.compare(results["needle"][DENSE]["cells"],
                                                          results["needle"][MINFERENCE]["cells"])


def _perplexity(spec, model, tok, results, context) -> None:
    window = spec.ppl_window or context
    stride = spec.ppl_stride or window // 2
    tokens = perplexity.text_tokens(tok, max(spec.ppl_tokens, window) if spec.ppl_tokens else 0)
    decoder = model.get_decoder()
    for variant in _variants(spec):
        n_windows = len(perplexity.windows(len(tokens), window, stride))
        bar = _bar(n_windows, f"perplexity {variant.name}", spec.progress)
        with compiled(decoder, variant) as comp:
            ppl = perplexity.perplexity(model, tokens, window, stride, spec.device, decoder=decoder,
                                        on_window=lambda w, bar=bar: bar.update())
        bar.close()
        results["perplexity"][variant.name] = {**ppl, "compile": comp.summary()}
    d, m = results["perplexity"][DENSE]["perplexity"], results["perplexity"][MINFERENCE]["perplexity"]
    results["perplexity"]["relative_difference"] = m / d - 1


def _attention(spec, model, tok, results) -> None:
    patterns = attention.layer_patterns(model, spec.options)
    results["attention"]["patterns_rewritten_layers"] = len(patterns)
    lengths = spec.attention_lengths or spec.lengths
    layers = model.config.num_hidden_layers
    for n in lengths:
        from ..needle import needle_prompt

        bar = _bar(layers, f"attention {n}", spec.progress)
        ids = needle_prompt(tok, n, 0.5, value=needle_grid.cell_value(n, 0.5)).input_ids.to(spec.device)
        per_layer = attention.measure(model, ids, patterns, spec.row_blocks, on_layer=lambda _, bar=bar: bar.update())
        bar.close()
        results["attention"]["by_length"][str(n)] = {"tokens": ids.shape[1], "summary": attention.summarize(per_layer),
                                                     "layers": per_layer}


def check_targets(spec: EvalSpec, results: dict) -> dict:
    """Each target: met (True/False) or None when not measured, with the numbers it used."""
    t: dict = {}
    dense_below = spec.options.get("dense_below", 0)
    sparse_lengths = [n for n in spec.lengths if n >= dense_below]
    t["sparse_ran"] = {"dense_below": dense_below, "sparse_lengths": sparse_lengths,
                       "met": bool(sparse_lengths)}
    for part in ("needle", "perplexity"):
        comp = results.get(part, {}).get(MINFERENCE, {}).get("compile")
        if comp is not None:
            t[f"{part}_rewritten"] = {"attentions": comp["prefill_rewritten"], "met": comp["prefill_rewritten"] > 0}
    if MINFERENCE in results.get("needle", {}):
        t["needle"] = results["needle"]["comparison"]
        t["needle"] = {**t["needle"], "met": t["needle"]["target_met"]}
    if "relative_difference" in results.get("perplexity", {}):
        window = results["perplexity"][DENSE]["window"]
        if not window >= dense_below:
            t["sparse_ran"]["met"] = False
        rel = results["perplexity"]["relative_difference"]
        t["perplexity"] = {"relative_difference": rel, "met": abs(rel) <= TARGET_PPL_REL}
    by_length = results.get("attention", {}).get("by_length", {})
    if by_length:
        means = {n: r["summary"].get("recall_mean") for n, r in by_length.items()}
        t["recall"] = {"mean_by_length": means, "met": all(m is not None and m >= TARGET_RECALL for m in means.values())}
        kept = {int(n): r["summary"].get("kept_fraction_mean") for n, r in by_length.items()}
        at = [n for n in kept if n >= TARGET_KEPT_LENGTH]
        ok = all(kept[n] is not None and kept[n] <= TARGET_KEPT_AT_4K for n in at)
        ordered = [kept[n] for n in sorted(at)]
        t["density"] = {"kept_mean_by_length": kept, "met": (ok and all(a >= b for a, b in zip(ordered, ordered[1:])))
                        if at else None}
    return t


def run_eval(spec: EvalSpec) -> dict:
    """Evaluate; returns the results dict (also written to ``spec.out_dir`` when set)."""
    unknown = set(spec.parts) - set(PARTS)
    if unknown:
        raise ValueError(f"unknown part(s) {sorted(unknown)}; valid parts: {list(PARTS)}")
    _variants(spec)  # validate the options before minutes of loading
    dtype = getattr(torch, spec.dtype)
    t0 = time.perf_counter()
    model, tok, context = load_model(spec.model, dtype, spec.device, spec.yarn)
    results = {"spec": {**asdict(spec), "context": context}, "variants": [v.describe() for v in _variants(spec)],
               "needle": {}, "perplexity": {}, "attention": {"by_length": {}}, "timings_s": {}}
    steps = {"needle": lambda: _needle(spec, model, tok, results),
             "perplexity": lambda: _perplexity(spec, model, tok, results, context),
             "attention": lambda: _attention(spec, model, tok, results)}
    for part in PARTS:
        if part not in spec.parts:
            continue
        t = time.perf_counter()
        steps[part]()
        results["timings_s"][part] = round(time.perf_counter() - t, 1)
        results["targets"] = check_targets(spec, results)
        log.info("eval: %s done in %.0f s", part, results["timings_s"][part])
        if spec.out_dir:
            write(results, spec.out_dir)
    results["timings_s"]["total"] = round(time.perf_counter() - t0, 1)
    results["targets"] = check_targets(spec, results)
    if spec.out_dir:
        write(results, spec.out_dir)
    return results


def write(results: dict, out_dir: str) -> None:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "eval.json").write_text(json.dumps(results, indent=1) + "\n")
    report.write(results, out)
