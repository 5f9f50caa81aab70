"""Accuracy evaluation of the minference backend against dense attention on a real model.

Three measurements, each for dense (plain compile) and minference (the backend with the options
under test), on the same model and inputs:

- ``needle_grid``: a number hidden at several depths of real text at several lengths, answered by
  greedy generation; a heat map (length x depth) like the paper's figure;
- ``perplexity``: sliding windows at the model's full context over real text;
- ``attention``: recall, output error and kept fraction of causal keys per layer and head.

``run_eval(EvalSpec(...))`` runs them and writes JSON, Markdown and the heat map; ``mcompile eval``
is the command line (``add_commands`` registers it). Results and commands: docs/ACCURACY.md.
"""

from .cli import add_commands
from .runner import EvalSpec, check_targets, load_model, run_eval
from .variants import DENSE, MINFERENCE, Variant, compiled

__all__ = [
           "DENSE",
           "MINFERENCE",
           "EvalSpec",
           "Variant",
           "add_commands",
           "check_targets",
           "compiled",
           "load_model",
           "run_eval",
]
