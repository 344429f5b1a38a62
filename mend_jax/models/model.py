"""A loaded model: the pure forward pass (`Model.logits`) and what editing and export read of
it (its name map, its (prompt, target) format), and the batch-to-call convention
(`model_inputs`) every forward pass of a tokenised batch goes through."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mend_jax.models.common import head_at
from mend_jax.models.names import NameMap
from mend_jax.models.registry import Architecture


@dataclass(eq=False)
class Model:
    """A loaded model: pure `logits(params, ...)` plus everything needed to edit and export it."""

    arch: Architecture
    config: Any                     # the module's frozen config
    hf_config: Any                  # the transformers config (for export)
    module: nn.Module
    params: dict
    tokenizer: Any = None
    dtype: Any = jnp.float32
    names: NameMap = field(init=False)

    def __post_init__(self):
        self.names = NameMap(self.arch.param_names(self.config))

    @property
    def seq2seq(self) -> bool:
        return self.arch.seq2seq

    @property
    def targets(self) -> str:
        """What the logits predict: "next_token", "token" or "class" (see `Architecture`)."""
        if self.arch.targets is not None:
            return self.arch.targets(self.config)
        return "token" if self.seq2seq else "next_token"

    @property
    def shift_labels(self) -> bool:
        """Whether logits at t predict the label at t+1 (decoder-only language models)."""
        return self.targets == "next_token"

    @property
    def pair_format(self) -> dict[str, Any]:
        """How (prompt, target) text becomes this model's batches: the keyword arguments of
        `tokenize_pairs` / `make_edit_batch` (`seq2seq`; the decoder's first input id, the
        config's `decoder_start_token_id` or its pad id; a classifier's `label2id`, which
        turns target strings into class ids)."""
        hf = self.hf_config
        start = None
        if self.seq2seq:
            start = getattr(hf, "decoder_start_token_id", None)
            start = getattr(hf, "pad_token_id", None) if start is None else start
        label2id = None
        if self.targets == "class":
            label2id = {str(k): int(v) for k, v in hf.label2id.items()}
        return {"seq2seq": self.seq2seq, "decoder_start_token_id": start, "label2id": label2id}

    def logits(self, params, input_ids, attention_mask=None, decoder_input_ids=None,
               decoder_attention_mask=None, *, positions=None) -> jax.Array:
        """Float32 logits [B, T, V] (T = decoder length for seq2seq models), or [B, num_labels]
        for a sequence classifier (`targets == "class"`). With `positions` [B, P] (a decoder-only
        language model's sequence indices): the logits at those positions alone, [B, P, V],
        with the output head computed only there (`common.head_at`)."""
        args = ({"params": params}, input_ids, attention_mask, decoder_input_ids,
                decoder_attention_mask)
        if positions is None:
            return self.module.apply(*args)
        with head_at(positions) as heads:
            out = self.module.apply(*args)
        if len(heads) != 1:
            raise ValueError(f"{self.arch.name}: logits at chosen positions need one output head "
                             f"(a tied embedding or a Linear named lm_head); found {heads}")
        return out

    def default_inner_params(self) -> list[str]:
        return self.arch.default_inner_params(self.config)

    def with_remat(self, remat: bool = True) -> Model:
        """The same model with transformer blocks rematerialised in the backward pass."""
        module = self.arch.module(self.config, self.dtype, remat)
        return Model(self.arch, self.config, self.hf_config, module, self.params,
                     self.tokenizer, self.dtype)


def model_inputs(batch: Mapping[str, jax.Array]) -> tuple:
    """Positional model inputs of a tokenised batch (decoder inputs are None for decoder-only)."""
    return (batch["input_ids"], batch.get("attention_mask"), batch.get("decoder_input_ids"),
            batch.get("decoder_attention_mask"))
