"""The model Dynamo is compiling, for checks that need its config.

A backend receives a graph, not the model: the layer count of the model, which a pattern
database's fingerprint names, is not in a graph that holds some of its layers. While the backend
runs, Dynamo's instruction translator for the compiled frame is still current, and the frame's
locals hold the module being called (``self``, or the first of ``args`` when transformers wraps
``forward``). This is a torch internal; where it is missing or changes, ``model_config`` returns
None and the callers check what the graph shows instead.
"""

from __future__ import annotations

import logging
from typing import Any, Optional

import torch

log = logging.getLogger(__name__)


def _frame_locals() -> dict:
    try:
        from torch._dynamo.symbolic_convert import InstructionTranslator

        tx = InstructionTranslator.current_tx()
        root = getattr(getattr(tx, "output", None), "root_tx", None) or tx
        return dict(getattr(root, "f_locals", None) or {})
    except Exception as exc:  # no frame being traced (a graph compiled by hand), or the internals moved
        log.debug("mcompile: no Dynamo frame to read the model from: %s", exc)
        return {}


def _candidates(values) -> list:
    out = []
    for v in values:
        if isinstance(v, (tuple, list)):
            out.extend(v)
        elif isinstance(v, dict):
            out.extend(v.values())
        else:
            out.append(v)
    return out


def model_config() -> Optional[Any]:
    """The config (with ``num_hidden_layers``) of the transformers model whose frame is being
    compiled; None when the frame calls something else (a single decoder layer) or is unknown."""
    for value in _candidates(_frame_locals().values()):
        config = getattr(value, "config", None) if isinstance(value, torch.nn.Module) else None
        if config is not None and isinstance(getattr(config, "num_hidden_layers", None), int):
            return config
    return None
