"""Helpers for parity tests against PyTorch transformers models built from small configs."""

from __future__ import annotations

import numpy as np


def torch_logits(tmodel, input_ids, attention_mask, decoder_input_ids=None,
                 decoder_attention_mask=None) -> np.ndarray:
    import torch

    kw = {"input_ids": torch.tensor(np.asarray(input_ids), dtype=torch.long),
          "attention_mask": torch.tensor(np.asarray(attention_mask), dtype=torch.long)}
    if decoder_input_ids is not None:
        kw["decoder_input_ids"] = torch.tensor(np.asarray(decoder_input_ids), dtype=torch.long)
        kw["decoder_attention_mask"] = torch.tensor(
            np.asarray(decoder_attention_mask), dtype=torch.long)
    with torch.no_grad():
        return tmodel(**kw).logits.float().numpy()


def right_padded_batch(vocab: int, lengths: list[int], seed: int = 0):
    rng = np.random.default_rng(seed)
    T = max(lengths)
    ids = rng.integers(1, vocab, size=(len(lengths), T)).astype(np.int32)
    mask = np.zeros((len(lengths), T), np.int32)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
        ids[i, n:] = 0
    return ids, mask


def masked_max_diff(a: np.ndarray, b: np.ndarray, mask: np.ndarray) -> float:
    """Max |a-b| over positions where mask is 1 (padding positions are not compared)."""
    m = mask.astype(bool)
    return float(np.abs(a[m] - b[m]).max())


def save_torch_model(tmodel, path) -> None:
    tmodel.save_pretrained(str(path), safe_serialization=True)
