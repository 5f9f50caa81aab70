"""MInferenceConfig: the validated form of ``torch.compile(..., options={...})``."""

from __future__ import annotations

import enum
import os
from dataclasses import dataclass, field, fields
from typing import Any, Mapping, Optional

from .patterns import DEFAULT_BLOCK_MASS, DEFAULT_BUDGET_EXPONENT, DEFAULT_BUDGET_LENGTH, DEFAULT_VERTICAL_SLASH, Pattern

# Prompts shorter than this stay dense: the shortest measured length at which the default
# pattern's layer (estimation + sparse attention) beats cuDNN on real heads (docs/BENCHMARKS.md,
# "Crossover").
DEFAULT_DENSE_BELOW = 24576
# Tokens per chunk of the chunked MLP. MInference ran the MLP in 96K-token chunks on an A100 at
# 1M tokens; 64K keeps Llama-3-8B's chunk intermediates (gate, up: 64K x 14336 bf16) at 1.75 GiB
# each, while each chunk's matmuls (about 23 TFLOP) stay long enough that per-chunk launch and
# allocation costs are negligible.
DEFAULT_MLP_CHUNK = 65536


class Compiler(str, enum.Enum):
    """What runs the rewritten graph."""

    INDUCTOR = "inductor"  # torch._inductor.compile_fx (the default, as with backend="inductor")
    AOT_EAGER = "aot_eager"  # AOTAutograd, then eager kernels (debugging lowering problems)
    EAGER = "eager"  # the rewritten FX graph as is (debugging the rewrite)


class Logits(str, enum.Enum):
    """Which positions the language-model head computes logits for."""

    ALL = "all"  # every position, as the model does (the default: no change of output shape)
    LAST = "last"  # the last position only: logits of shape (B, 1, vocab), what generation needs


def _choices(enum_cls) -> list[str]:
    return [e.value for e in enum_cls]


# Integer options reach the graph ops as int64 arguments.
INT64_MAX = 2 ** 63 - 1


def _check_int(name: str, value, low: int, what: str = "") -> None:
    """An int (not a bool) in [low, INT64_MAX], else a ValueError that says so."""
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= INT64_MAX:
        raise ValueError(f"{name} must be an int in [{low}, 2**63 - 1]{what}, got {value!r}")


@dataclass(frozen=True)
class MInferenceConfig:
    """Options of the ``minference`` backend.

    pattern_db: a path to a pattern database (JSON), the name of one shipped in the package,
        "auto" (the shipped database whose model fingerprint matches the graph, else the
        default pattern), or None (the default pattern for every head).
    default_pattern: the pattern of heads the database does not cover: by default
        ``{"kind": "block_mass", "recall": 0.985, "samples": 8, "score": "max", "neighbours": 1}``
        (budgets from the input, per head and query block); others, e.g.
        ``{"kind": "vertical_slash", "vertical": 1000, "slash": 6096}``, ``{"kind": "a_shape",
        "sink": 128, "local": 4096}``, ``{"kind": "block_sparse", "blocks": 100}``, ``{"kind": "dense"}``.
    dense_below: prompts shorter than this many tokens run dense attention; 0 forces sparse.
    budget_length: the prompt length at which ``default_pattern``'s budgets hold; shorter prompts
        get them scaled by ``(N / budget_length) ** budget_exponent`` (patterns.scaled_budgets).
        None: 131072 for MInference's vertical-slash default (1000 verticals / 6096 slashes, set
        for 128K prompts), 0 (budgets as given, at every length) for any other pattern
        (block-mass has no budget to scale: its recall target holds at every length).
    budget_exponent: the exponent of that scaling (0.7; see patterns.py for where it comes from).
    logits: "all" (every position, the model as written) or "last": the lm_head sees only the
        last position, so logits are (B, 1, vocab) instead of (B, N, vocab) (at 1M tokens and a
        128K vocabulary the full logits would be 256 GiB in bf16). Nothing changes when the
        lm_head already sees one position (``logits_to_keep=1``, as ``generate()`` passes).
    chunk_mlp: replace gated MLPs (gate/up/down + activation) by ``mcompile::chunked_mlp``,
        which runs them over ``mlp_chunk`` tokens at a time, so no N x intermediate_size tensor
        exists. False: the MLP stays as Inductor compiles it.
    mlp_chunk: tokens per MLP chunk (see DEFAULT_MLP_CHUNK).
    rope_once: store RoPE's cos / sin tables once per forward, as the model computes them, rather
        than let Inductor recompute them inside every layer's RoPE kernel (passes/realize.py).
        False: Inductor decides.
    store_residual: store the residual stream once per residual add, rather than let Inductor
        recompute it from earlier sums in every norm kernel that reads it (passes/realize.py).
    inline_kernels: None (auto: where the Triton kernel runs on the graph's device, i.e. CUDA),
        True (wherever the rewrite allows, any device: tests) or False:
        whether sparse attention enters the graph as a ``torch.cond`` over a ``triton_op`` that
        Inductor lowers into its own code (passes/lowering.py), rather than as the opaque op.
        Either way the result is the same; inlining needs a whole prompt without key padding.
    compiler: "inductor", "aot_eager" or "eager".
    mode: an Inductor mode ("default", "reduce-overhead", "max-autotune", ...), as for
        backend="inductor".
    inductor_config: Inductor config patches passed to compile_fx.
    """

    pattern_db: Optional[str] = "auto"
    default_pattern: Pattern = DEFAULT_BLOCK_MASS
    dense_below: int = DEFAULT_DENSE_BELOW
    budget_length: Optional[int] = None
    budget_exponent: float = DEFAULT_BUDGET_EXPONENT
    logits: Logits = Logits.ALL
    chunk_mlp: bool = True
    mlp_chunk: int = DEFAULT_MLP_CHUNK
    rope_once: bool = True
    store_residual: bool = True
    inline_kernels: Optional[bool] = None
    compiler: Compiler = Compiler.INDUCTOR
    mode: Optional[str] = None
    inductor_config: tuple = field(default_factory=tuple)  # sorted (key, value) pairs

    def __post_init__(self):
        if isinstance(self.pattern_db, os.PathLike):
            object.__setattr__(self, "pattern_db", os.fspath(self.pattern_db))
        if self.pattern_db is not None and not isinstance(self.pattern_db, str):
            raise ValueError(f"pattern_db must be a path, a database name, 'auto' or None, got {self.pattern_db!r}")
        if self.pattern_db is not None and not self.pattern_db.strip():
            raise ValueError("pattern_db is empty: give a database's JSON file, a shipped name, 'auto' or None")
        if self.pattern_db is not None and os.path.isdir(self.pattern_db):
            raise ValueError(f"pattern_db {self.pattern_db!r} is a directory: give the database's JSON file")
        if isinstance(self.default_pattern, Mapping):
            object.__setattr__(self, "default_pattern", Pattern.from_dict(self.default_pattern))
        if not isinstance(self.default_pattern, Pattern):
            raise ValueError(f"default_pattern must be a dict such as {DEFAULT_BLOCK_MASS.to_dict()}")
        _check_int("dense_below", self.dense_below, 0, " (0 forces sparse)")
        if self.budget_length is None:
            length = DEFAULT_BUDGET_LENGTH if self.default_pattern == DEFAULT_VERTICAL_SLASH else 0
            object.__setattr__(self, "budget_length", length)
        _check_int("budget_length", self.budget_length, 0, " or None")
        if isinstance(self.budget_exponent, int) and not isinstance(self.budget_exponent, bool):
            object.__setattr__(self, "budget_exponent", float(self.budget_exponent))
        if not isinstance(self.budget_exponent, float) or not 0.0 <= self.budget_exponent <= 2.0:
            raise ValueError(f"budget_exponent must be a number in [0, 2], got {self.budget_exponent!r}")
        try:
            object.__setattr__(self, "logits", Logits(self.logits))
        except ValueError:
            raise ValueError(f"logits must be one of {_choices(Logits)}, got {self.logits!r}") from None
        if not isinstance(self.chunk_mlp, bool):
            raise ValueError(f"chunk_mlp must be True or False, got {self.chunk_mlp!r}")
        _check_int("mlp_chunk", self.mlp_chunk, 1, " (tokens per chunk)")
        for name in ("rope_once", "store_residual"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if self.inline_kernels not in (None, True, False):
            raise ValueError(f"inline_kernels must be None, True or False, got {self.inline_kernels!r}")
        try:
            object.__setattr__(self, "compiler", Compiler(self.compiler))
        except ValueError:
            raise ValueError(f"compiler must be one of {_choices(Compiler)}, got {self.compiler!r}") from None
        if self.mode is not None:
            import torch._inductor

            modes = sorted(torch._inductor.list_mode_options())
            if self.mode not in modes:
                raise ValueError(f"mode must be one of {modes}, got {self.mode!r}")
        patches = self.inductor_config
        if isinstance(patches, Mapping):
            patches = tuple(sorted(patches.items()))
        if not isinstance(patches, tuple):
            raise ValueError(f"inductor_config must be a dict of Inductor config patches, got {patches!r}")
        object.__setattr__(self, "inductor_config", patches)

    @classmethod
    def from_options(cls, options: Optional[Mapping[str, Any]] = None, mode: Optional[str] = None) -> "MInferenceConfig":
        """Build from torch.compile's ``options`` (and ``mode``); unknown keys are an error."""
        if options is not None and not isinstance(options, Mapping):
            raise ValueError(f"options must be a dict such as {{'dense_below': 0}}, got {options!r}")
        options = dict(options or {})
        valid = [f.name for f in fields(cls)]
        unknown = sorted(set(options) - set(valid))
        if unknown:
            raise ValueError(f"unknown minference option(s) {unknown}; valid options: {valid}")
        if mode is not None:
            if options.get("mode") not in (None, mode):
                raise ValueError(f"mode given twice: {mode!r} and options['mode']={options['mode']!r}")
            options["mode"] = mode
        return cls(**options)

    def inductor_patches(self) -> dict:
        """Config patches for compile_fx: the mode's options, then the explicit patches."""
        patches = {}
        if self.mode is not None:
            import torch._inductor

            patches.update(torch._inductor.list_mode_options(self.mode))
        patches.update(dict(self.inductor_config))
        return patches
