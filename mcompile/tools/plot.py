"""Pictures of pattern databases (``mcompile plot``): PNG files drawn with matplotlib.

- ``plot_database``: every head's pattern kind (colour) and expected density at a length
  (``cost.expected_density``, budgets scaled as the backend scales them), layers down, heads across.
- ``plot_head``: one head of one layer on real input: the dense causal attention map beside the
  mask of the pattern the database gives it, both pooled to ``pixels`` x ``pixels`` cells
  (attention: the largest probability in a cell, log scale; mask: the kept fraction of a cell).
  Rows are computed a band at a time: memory is O(band x N), never N x N.

Figures are built with ``matplotlib.figure.Figure`` and its Agg canvas: no global pyplot state.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from ..patterns import PatternKind, encode, scaled_budgets

KIND_COLOURS = {PatternKind.DENSE: "#9e9e9e", PatternKind.A_SHAPE: "#4c72b0",
                PatternKind.VERTICAL_SLASH: "#dd8452", PatternKind.BLOCK_SPARSE: "#55a868",
                PatternKind.BLOCK_MASS: "#8172b3"}
LOG_FLOOR = -4.0  # attention probabilities below 1e-4 are drawn as the floor colour
BAND_ROWS = 256  # query rows per band when pooling the attention map


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=120)
    FigureCanvasAgg(fig)
    return fig


def plot_database(db, n: int, path) -> Path:
    """Kinds (colour) and expected densities (%, text) of every head at length ``n``."""
    import numpy as np
    from matplotlib.colors import ListedColormap

    from ..pattern_db.cost import expected_density

    layers, heads = db.model.num_layers, db.model.num_heads
    kinds = np.zeros((layers, heads))
    fig = _figure(1.0 + 0.55 * heads, 1.2 + 0.28 * layers)
    ax = fig.add_subplot(1, 1, 1)
    order = list(KIND_COLOURS)
    ax_cmap = ListedColormap([KIND_COLOURS[k] for k in order])
    dens = []
    for i in range(layers):
        for j, p in enumerate(db.patterns_for(i)):
            kinds[i, j] = order.index(p.kind)
            d = expected_density(scaled_budgets(p, n, db.budget_length, db.budget_exponent), n)
            if d is not None:  # block-mass: depends on the input
                dens.append(d)
            ax.text(j, i, "?" if d is None else f"{100 * d:.0f}", ha="center", va="center", fontsize=7,
                    color="white")
    ax.imshow(kinds, cmap=ax_cmap, vmin=-0.5, vmax=len(order) - 0.5, aspect="auto", interpolation="nearest")
    ax.set_xlabel("query head")
    ax.set_ylabel("layer")
    ax.set_xticks(range(heads))
    ax.set_yticks(range(0, layers, max(1, layers // 15)))
    from matplotlib.patches import Patch

    ax.legend(handles=[Patch(color=KIND_COLOURS[k], label=k.label) for k in order], loc="upper center",
              bbox_to_anchor=(0.5, -0.06 - 0.6 / max(layers, 1)), ncol=2, fontsize=7, frameon=False)
    mean = sum(dens) / max(len(dens), 1)
    ax.set_title(f"{db.model.name or db.source}: kind per head, expected density (%) at {n} tokens\n"
                 f"mean {100 * mean:.1f}%, budgets at {db.budget_length or 'any'} tokens", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    return Path(path)


def _pooled_rows(n: int, cell: int):
    """Bands of query rows, each a multiple of ``cell`` rows (the last may be shorter)."""
    band = max(cell, (BAND_ROWS // cell) * cell)
    return [(r0, min(n, r0 + band)) for r0 in range(0, n, band)]


def attention_images(q, k, index, head: int, scale: float, pixels: int):
    """(max-pooled attention probability, mean-pooled kept fraction), each (P, P) fp32, for one
    head. q (1, H, N, D), k (1, Hk, N, D)."""
    from ..index import block_mask_rows

    n = q.shape[2]
    group = q.shape[1] // k.shape[1]
    cell = -(-n // pixels)
    pad = -n % cell
    qh, kh = q[0, head].float(), k[0, head // group].float()
    keys = torch.arange(n)
    att, kept = [], []
    for r0, r1 in _pooled_rows(n, cell):
        s = (qh[r0:r1] @ kh.T) * scale  # (R, N)
        causal = keys[None, :] <= torch.arange(r0, r1)[:, None]
        p = torch.softmax(s.masked_fill(~causal, float("-inf")), -1)
        m = block_mask_rows(index, r0, r1, n)[0, head].float()
        rpad = -(r1 - r0) % cell
        att.append(F.max_pool2d(F.pad(p, (0, pad, 0, rpad))[None, None], cell)[0, 0])
        kept.append(F.avg_pool2d(F.pad(m, (0, pad, 0, rpad))[None, None], cell)[0, 0])
    return torch.cat(att), torch.cat(kept)


def plot_head(model, input_ids, db, layer: int, head: int, path, pixels: int = 512, title_data: str = "") -> Path:
    """The dense attention map of (layer, head) on ``input_ids`` beside its pattern's mask."""
    from .capture import attention_recall, capture_qkv
    from ..kernels.estimate import estimate_index_ref
    from ..pattern_db.cost import kernel_density
    from .search import attention_scale

    if not 0 <= layer < db.model.num_layers or not 0 <= head < db.model.num_heads:
        raise ValueError(f"layer {layer} / head {head} outside the database's {db.model.num_layers} layers / "
                         f"{db.model.num_heads} heads")
    q, k, _ = capture_qkv(model, input_ids, layers=[layer])[layer]
    n = q.shape[2]
    scale = attention_scale(model, layer, q.shape[-1])
    patterns = [scaled_budgets(p, n, db.budget_length, db.budget_exponent) for p in db.patterns_for(layer)]
    index = estimate_index_ref(q, k, None, *encode(patterns), scale)
    att, kept = attention_images(q, k, index, head, scale, pixels)
    recall = float(attention_recall(q, k, index, scale)[0, head])
    density = float(kernel_density(index, n)[0, head])
    fig = _figure(10, 5.2)
    left, right = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    im = left.imshow(att.clamp(min=10 ** LOG_FLOOR).log10().numpy(), cmap="magma", vmin=LOG_FLOOR, vmax=0,
                     extent=(0, n, n, 0), interpolation="nearest")
    fig.colorbar(im, ax=left, fraction=0.046, label="log10 attention (max per cell)")
    left.set_title(f"dense attention, layer {layer} head {head}, {n} tokens", fontsize=9)
    im = right.imshow(kept.numpy(), cmap="Greys", vmin=0, vmax=1, extent=(0, n, n, 0), interpolation="nearest")
    fig.colorbar(im, ax=right, fraction=0.046, label="kept fraction of cell")
    right.set_title(f"{patterns[head].describe()}\nkernel density {100 * density:.1f}%, recall {recall:.3f}",
                    fontsize=9)
    for ax in (left, right):
        ax.set_xlabel("key")
        ax.set_ylabel("query")
    if title_data:
        fig.suptitle(title_data, fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    return Path(path)
