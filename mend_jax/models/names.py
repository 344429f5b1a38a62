"""The one mapping between Hugging Face parameter names and mend-jax pytree paths.

Every architecture describes its checkpoint as a list of `ParamName`s; loading, exporting,
choosing edited weights (`inner_params`) and sharding rules all ask this module.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

from mend_jax.errors import UnknownNameError

# How a Hugging Face tensor is laid out relative to our pytree leaf.
#   "linear": torch nn.Linear weight [d_out, d_in] -> our kernel [d_in, d_out] (transposed)
#   "conv1d": GPT-2 Conv1D weight, already [d_in, d_out]
#   "same":   embeddings, norms, biases: identical layout
LAYOUTS = ("linear", "conv1d", "same")

# Which token stream a weight acts on, and the batch mask that says which of its tokens are real.
#   "input":   the tokens of `input_ids` (every weight of a decoder-only model; a T5 encoder's
#              weights and the decoder's cross-attention k/v, which read the encoder's output)
#   "decoder": the tokens of `decoder_input_ids` (the rest of a T5 decoder)
#   "first":   only the first token of `input_ids` (BERT's pooler and classifier read [CLS])
TOKEN_MASKS = {"input": "attention_mask", "decoder": "decoder_attention_mask",
               "first": "attention_mask"}


@dataclass(frozen=True)
class ParamName:
    hf: str                      # "transformer.h.9.mlp.c_fc.weight"
    path: tuple[str, ...]        # ("transformer", "h_9", "mlp", "c_fc", "kernel")
    layout: str = "same"
    optional: bool = False       # may be absent from a checkpoint (tied lm_head)
    tied_to: str | None = None   # HF name whose value this one repeats when exported
    fallback: str | None = None  # HF name read instead when this one is absent (tied on save)
    tokens: str = "input"        # the token stream it acts on, a key of TOKEN_MASKS
    # Position-local: the weight's output at a token reaches the logits at that token alone (the
    # last block's MLP, its attention's query and output projections), so when logits are
    # computed at some positions only its δ is exactly zero at every other position (`capture`
    # gathers its rows there; the editor then skips rows it would only mask out).
    local: bool = False

    def __post_init__(self):
        if self.tokens not in TOKEN_MASKS:
            raise ValueError(f"{self.hf}: tokens must be one of {sorted(TOKEN_MASKS)}, "
                             f"got {self.tokens!r}")

    @property
    def mask_key(self) -> str:
        """The batch key of the mask over the tokens this weight acts on."""
        return TOKEN_MASKS[self.tokens]

    def to_leaf(self, array: np.ndarray) -> np.ndarray:
        return array.T if self.layout == "linear" else array

    def to_hf(self, leaf: np.ndarray) -> np.ndarray:
        return leaf.T if self.layout == "linear" else leaf


@dataclass(frozen=True)
class EditedWeight:
    """One edited weight, resolved from the name map once, when its editor is built: what the
    capture and the editors need of it, passed around instead of its name looked up again."""

    name: str                    # Hugging Face name, "transformer.h.9.mlp.c_fc.weight"
    path: tuple[str, ...]        # pytree path of its kernel
    shape: tuple[int, int]       # (d_in, d_out)
    group: str                   # key of the editor network that serves it
    mode: int                    # its mode index inside that network (0 when not shared)
    tokens: str = "input"        # the token stream it acts on, a key of TOKEN_MASKS
    local: bool = False          # position-local (`ParamName.local`)

    @property
    def mask_key(self) -> str:
        """The batch key of the mask over the tokens this weight acts on."""
        return TOKEN_MASKS[self.tokens]


class NameMap:
    """Bidirectional HF name <-> pytree path lookup with helpful errors."""

    def __init__(self, names: Iterable[ParamName]):
        self.names = list(names)
        self.by_hf = {n.hf: n for n in self.names}
        self.by_path = {n.path: n for n in self.names if n.tied_to is None}

    def __contains__(self, hf_name: str) -> bool:
        return hf_name in self.by_hf

    def lookup(self, hf_name: str) -> ParamName:
        """The ParamName of a Hugging Face name; unknown names fail with the closest valid ones."""
        if hf_name in self.by_hf:
            return self.by_hf[hf_name]
        close = difflib.get_close_matches(hf_name, list(self.by_hf), n=5, cutoff=0.5)
        raise UnknownNameError(
            f"unknown parameter name {hf_name!r}; closest valid names: {close or 'none'}"
        )

    def path(self, hf_name: str) -> tuple[str, ...]:
        return self.lookup(hf_name).path

    def module_path(self, hf_name: str) -> tuple[str, ...]:
        """Path of the Linear module owning a weight (the path without the leaf name)."""
        return self.lookup(hf_name).path[:-1]

    def hf_name(self, path: tuple[str, ...]) -> str:
        return self.by_path[tuple(path)].hf


def last_blocks(template: str, n_layers: int, linears: Iterable[str], k: int = 3) -> list[str]:
    """HF names of `linears` in the last k blocks; template like "transformer.h.{i}.mlp.{lin}"."""
    return [f"{template.format(i=i, lin=lin)}.weight"
            for i in range(max(0, n_layers - k), n_layers) for lin in linears]


def get_path(tree: dict, path: tuple[str, ...]) -> Any:
    for key in path:
        tree = tree[key]
    return tree


def set_path(tree: dict, path: tuple[str, ...], value: Any) -> dict:
    """Functional set: returns a new dict sharing every untouched subtree."""
    if not path:
        return value
    head, rest = path[0], path[1:]
    new = dict(tree)
    new[head] = set_path(tree.get(head, {}), rest, value)
    return new


def flatten(tree: dict, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict) or hasattr(v, "items") and not hasattr(v, "shape"):
            out.update(flatten(v, prefix + (k,)))
        else:
            out[prefix + (k,)] = v
    return out
