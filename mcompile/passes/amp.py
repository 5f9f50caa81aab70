"""Autocast at each node of a Dynamo graph: the dtype autocast makes an attention compute in.

Autocast reaches a Dynamo graph in two ways:

- entered outside the compiled code (``with torch.autocast(...): model(x)``): no node shows it;
  it is the state when the backend runs, and Dynamo guards it, so the compiled graph only ever
  runs under that same state;
- entered inside it: Dynamo records ``torch.amp.autocast_mode._enter_autocast(device_type,
  dtype, enabled, cache_enabled)`` before the region and ``_exit_autocast(ctx)`` after it
  (``dtype=None``: the device's autocast dtype).

Matrix products (``matmul``, ``bmm``, ``baddbmm``, ``einsum``) and SDPA are on autocast's
lower-precision list on CPU and CUDA: inside an enabled region they cast their floating inputs
(float32, float16, bfloat16; never float64) to the region's dtype and return that dtype. An
attention rewritten there must do the same (passes/rewrite.py casts q, k and v). Any other node
that names autocast changes the state in a way this module does not follow: attentions after it
stay dense with that reason.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.fx as fx

from .nodes import target_name

_ENTER = torch.amp.autocast_mode._enter_autocast
_EXIT = torch.amp.autocast_mode._exit_autocast
ELIGIBLE = (torch.float32, torch.float16, torch.bfloat16)  # what autocast casts (float64 never)


@dataclass(frozen=True)
class Autocast:
    """Autocast for one device type at one node: ``dtype`` is the dtype lower-precision ops
    compute in (None: autocast off), ``unknown`` why it cannot be told ("" when it can)."""

    dtype: Optional[torch.dtype] = None
    unknown: str = ""


def autocast_regions(graph: fx.Graph) -> dict:
    """Node -> (the ``_enter_autocast`` nodes whose regions hold it, innermost last; why the
    state is unknown there, or "")."""
    active: list = []
    unknown = ""
    regions = {}
    for node in graph.nodes:
        if node.op == "call_function" and node.target is _ENTER:
            active.append(node)
        elif node.op == "call_function" and node.target is _EXIT:
            ctx = node.args[0] if node.args else None
            if active and active[-1] is ctx:
                active.pop()
            elif not unknown:
                unknown = "an autocast region of the graph closes out of order"
        elif not unknown and node.op in ("call_function", "call_method") and "autocast" in target_name(node).lower():
            unknown = f"the graph changes autocast through {target_name(node)}"
        regions[node] = (tuple(active), unknown)
    return regions


def _enter_args(node: fx.Node) -> tuple:
    names = ("device_type", "dtype", "enabled", "cache_enabled")
    values = dict(zip(names, node.args))
    values.update({k: v for k, v in node.kwargs.items() if k in names})
    return values.get("device_type"), values.get("dtype"), values.get("enabled", True)


def autocast_at(regions: dict, node: fx.Node, device_type: str) -> Autocast:
    """Autocast for ``device_type`` where ``node`` runs: the innermost region of the graph for
    that device, else the state the backend runs under."""
    active, unknown = regions.get(node, ((), ""))
    if unknown:
        return Autocast(unknown=unknown)
    for enter in reversed(active):
        device, dtype, enabled = _enter_args(enter)
        if not isinstance(device, str) or not isinstance(enabled, bool):
            return Autocast(unknown=f"an autocast region of the graph has arguments {enter.args}")
        if device != device_type:
            continue
        if not enabled:
            return Autocast()
        return Autocast(dtype if isinstance(dtype, torch.dtype) else torch.get_autocast_dtype(device_type))
    if torch.is_autocast_enabled(device_type):
        return Autocast(torch.get_autocast_dtype(device_type))
    return Autocast()


def cast_dtype(dtype: torch.dtype, amp: Autocast) -> torch.dtype:
    """The dtype a tensor of ``dtype`` enters a lower-precision op in under ``amp``."""
    return amp.dtype if amp.dtype is not None and dtype in ELIGIBLE else dtype
