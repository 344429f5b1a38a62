"""Architecture registry: what each supported `model_type` is made of."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import flax.linen as nn

from mend_jax.models.names import ParamName


@dataclass(frozen=True)
class Architecture:
    """How to build, name and edit one family of checkpoints.

    config_from_hf: transformers config -> frozen, hashable module config.
    module: (config, dtype, remat) -> flax Module whose __call__(input_ids, attention_mask,
        decoder_input_ids, decoder_attention_mask) returns float32 logits.
    param_names: config -> list of ParamName (every tensor of the checkpoint).
    default_inner_params: config -> HF names MEND edits by default (as the reference configs).
    targets: config -> what the logits predict (a BERT checkpoint's head decides):
        "next_token": logits [B, T, V] at t predict the label at t+1 (decoder-only LMs);
        "token": logits [B, T, V] at t predict the label at t (seq2seq decoders, masked
        LMs); "class": logits [B, num_labels], one label per example (classifiers).
        None: "token" for seq2seq models, "next_token" otherwise.
    """

    name: str
    model_types: tuple[str, ...]
    seq2seq: bool
    config_from_hf: Callable[[Any], Any]
    module: Callable[..., nn.Module]
    param_names: Callable[[Any], list[ParamName]]
    default_inner_params: Callable[[Any], list[str]]
    targets: Callable[[Any], str] | None = None


_REGISTRY: dict[str, Architecture] = {}


def register(arch: Architecture) -> Architecture:
    for t in arch.model_types:
        _REGISTRY[t] = arch
    return arch


def supported_model_types() -> list[str]:
    _import_all()
    return sorted(_REGISTRY)


def get_architecture(model_type: str) -> Architecture:
    _import_all()
    if model_type not in _REGISTRY:
        raise ValueError(
            f"unsupported model_type {model_type!r}; supported: {sorted(_REGISTRY)}"
        )
    return _REGISTRY[model_type]


def _import_all() -> None:
    # Importing an architecture module registers it.
    import importlib

    for mod in ("gpt2", "gpt_neo", "gptj", "t5", "bart", "bert", "llama"):
        try:
            importlib.import_module(f"mend_jax.models.{mod}")
        except ModuleNotFoundError as e:
            if e.name != f"mend_jax.models.{mod}":
                raise
