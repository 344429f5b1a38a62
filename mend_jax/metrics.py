"""Losses and edit metrics, computed as the reference does (labels use -100 for "not counted").

Decoder-only models shift (logits at t predict the label at t+1); seq2seq models do not.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

IGNORE = -100


def _align(logits, labels, shift: bool):
    # Shapes are static, so these checks cost nothing under jit and fail at trace time.
    if logits.ndim != labels.ndim + 1:
        raise ValueError(f"logits {tuple(logits.shape)} do not fit labels {tuple(labels.shape)}: "
                         "expected logits [*labels.shape, vocab or classes]")
    if shift and labels.ndim != 2:
        raise ValueError(f"shifted labels need logits [batch, seq, vocab]; got logits "
                         f"{tuple(logits.shape)} (a classifier's [batch, num_labels] logits "
                         "have no next token: use shift=False)")
    if shift:
        return logits[:, :-1], labels[:, 1:]
    return logits, labels


def token_log_probs(logits: Float[Array, "B T V"], labels: Int[Array, "B T"], shift: bool):
    """(log p(label) [B, T'], counted mask [B, T'])."""
    logits, labels = _align(logits, labels, shift)
    mask = labels != IGNORE
    safe = jnp.where(mask, labels, 0)
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return jnp.take_along_axis(logp, safe[..., None], axis=-1)[..., 0], mask


def masked_nll(logits, labels, shift: bool) -> jax.Array:
    """Mean −log p(label) over the counted positions of the batch."""
    lp, mask = token_log_probs(logits, labels, shift)
    return -(lp * mask).sum() / jnp.maximum(mask.sum(), 1)


def _per_sequence(logits, labels) -> None:
    if labels.ndim != 2:
        raise ValueError(f"per-sequence metrics need labels [batch, seq] and logits [batch, seq, "
                         f"vocab]; got labels {tuple(labels.shape)}, logits {tuple(logits.shape)} "
                         "(a classifier's: compare argmax(logits, -1) with the labels)")


def sequence_nll(logits, labels, shift: bool) -> jax.Array:
    """Per-example mean NLL over its counted positions [B]."""
    _per_sequence(logits, labels)
    lp, mask = token_log_probs(logits, labels, shift)
    return -(lp * mask).sum(-1) / jnp.maximum(mask.sum(-1), 1)


def sequence_correct(logits, labels, shift: bool) -> jax.Array:
    """Per-example bool [B]: argmax equals the label at every counted position (teacher forcing)."""
    _per_sequence(logits, labels)
    logits, labels = _align(logits, labels, shift)
    mask = labels != IGNORE
    hit = (jnp.argmax(logits, -1) == labels) | ~mask
    return hit.all(-1) & mask.any(-1)


def locality_kl(base_logits, edited_logits, mask) -> jax.Array:
    """KL(p_base ‖ p_edited) per counted position, averaged over counted positions."""
    lp_base = jax.nn.log_softmax(base_logits.astype(jnp.float32), -1)
    lp_edit = jax.nn.log_softmax(edited_logits.astype(jnp.float32), -1)
    kl = (jnp.exp(lp_base) * (lp_base - lp_edit)).sum(-1)
    if kl.shape != mask.shape:
        raise ValueError(f"locality mask {tuple(mask.shape)} does not fit logits "
                         f"{tuple(base_logits.shape)}: expected {tuple(kl.shape)}")
    mask = mask.astype(jnp.float32)
    return (kl * mask).sum() / jnp.maximum(mask.sum(), 1.0)


def loc_mask(batch, seq2seq: bool) -> jax.Array:
    """The mask the locality KL is averaged over (decoder mask for seq2seq, else attention)."""
    return batch["decoder_attention_mask"] if seq2seq else batch["attention_mask"]
