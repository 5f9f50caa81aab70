"""Small FX node helpers shared by the matchers and the mask proof."""

from __future__ import annotations

from typing import Optional

import torch
import torch.fx as fx


def target_name(node) -> str:
    """``"softmax"`` for ``F.softmax(...)`` or ``x.softmax(...)``; "" for anything not a call."""
    if not isinstance(node, fx.Node) or node.op not in ("call_function", "call_method"):
        return ""
    return node.target if node.op == "call_method" else getattr(node.target, "__name__", str(node.target))


def example(node) -> Optional[torch.Tensor]:
    """The (fake) value Dynamo recorded for a node, if any."""
    if not isinstance(node, fx.Node):
        return None
    return node.meta.get("example_value", node.meta.get("val"))
