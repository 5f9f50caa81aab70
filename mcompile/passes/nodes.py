"""Small FX node helpers shared by the matchers and the mask proof."""

from __future__ import annotations

import re
from typing import Optional

import torch
import torch.fx as fx
from torch.fx.experimental.symbolic_shapes import statically_known_true


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


_SOURCE_ROOT = re.compile(r"^[LG]\[[^\]]*\](\[\d+\])*\.?")  # L['self'], L['args'][0], G['...']


def module_path(source: str) -> str:
    """A module's path as the user names it (``model.layers.0.self_attn``) from the Dynamo source
    name in ``nn_module_stack`` (``L['self'].model.layers[0].self_attn``, ``L['args'][0]._modules
    ['model']...``: the root's name depends on how the model was called and on the torch release)."""
    path = _SOURCE_ROOT.sub("", str(source))
    path = re.sub(r"\.?_modules\['([^']*)'\]", r".\1", path)
    path = re.sub(r"\['([^']*)'\]", r".\1", path)
    path = re.sub(r"\[(\d+)\]", r".\1", path)
    return path.strip(".")


def same_size(a, b) -> bool:
    """a == b for ints and SymInts, without adding a guard."""
    return bool(statically_known_true(a == b))


LAYER_RE = re.compile(r"(?:layers?|(?<![A-Za-z0-9_])(?:blocks?|h))[._](\d+)[._]")


def module_info(node: fx.Node) -> tuple[Optional[int], str, str]:
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return None, "", ""
    qualname, cls = list(stack.values())[-1]
    cls_name = getattr(cls, "__name__", str(cls).rsplit(".", 1)[-1].strip("'>"))
    layer = None
    for path, _ in stack.values():
        m = LAYER_RE.search(str(path).replace("[", ".").replace("]", ".") + ".")
        if m:
            layer = int(m.group(1))
            break
    return layer, module_path(qualname), cls_name


def node_module(node: fx.Node) -> str:
    """The path of the module a node was traced in (``model.layers.0.mlp``), "" if unknown."""
    return str(module_info(node)[1])
