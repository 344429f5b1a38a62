"""Losses and edit metrics, computed as the reference does (labels use -100 for "not counted").

Decoder-only models shift (logits at t predict the label at t+1); seq2seq models do not. A
classifier's logits [B, C] with labels [B] read as sequences of one counted position: its
per-example metrics are the class's −log p and whether the argmax is the label.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

IGNORE = -100
# A decoder-only batch may carry the positions whose logits predict its counted labels
# ([B, P], padded with -1): then only those positions go through the output head.
POSITIONS = "logit_positions"


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
        return logits, shift_labels(labels)
    return logits, labels


def shift_labels(labels: Int[Array, "B T"]) -> jax.Array:
    """The label each position's logits predict: labels[:, t + 1], and IGNORE at the last
    position. Shifting the labels rather than slicing the logits keeps the logits' producer (the
    output head) fused with the loss: XLA's CPU backward through a sliced [B, T-1, V] is about
    twice as slow."""
    return jnp.concatenate([labels[:, 1:], jnp.full_like(labels[:, :1], IGNORE)], 1)


def token_log_probs(logits: Float[Array, "B T V"], labels: Int[Array, "B T"], shift: bool):
    """(log p(label) [B, T'], counted mask [B, T']); [B] and [B] for a classifier's [B, C]
    logits and [B] labels."""
    logits, labels = _align(logits, labels, shift)
    mask = labels != IGNORE
    safe = jnp.where(mask, labels, 0)
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return jnp.take_along_axis(logp, safe[..., None], axis=-1)[..., 0], mask


def labelled(labels: Int[Array, "B T"] | Int[Array, " B"]) -> jax.Array:
    """Per-example bool [B]: the example has at least one counted label."""
    counted = labels != IGNORE
    return counted if labels.ndim == 1 else counted.any(-1)


def masked_nll(logits, labels, shift: bool) -> jax.Array:
    """Mean −log p(label) over the counted positions of the batch."""
    lp, mask = token_log_probs(logits, labels, shift)
    return -(lp * mask).sum() / jnp.maximum(mask.sum(), 1)


def _per_example(logits, labels, shift: bool):
    """(logits [B, T, V], labels [B, T]); a classifier's [B, C] and [B] as sequences of one."""
    if labels.ndim == 1 and logits.ndim == 2 and not shift:
        return logits[:, None], labels[:, None]
    if labels.ndim != 2:
        raise ValueError(f"per-example metrics need labels [batch, seq] with logits [batch, seq, "
                         f"vocab], or unshifted labels [batch] with logits [batch, classes]; got "
                         f"labels {tuple(labels.shape)}, logits {tuple(logits.shape)}, "
                         f"shift={shift}")
    return logits, labels


def sequence_nll(logits, labels, shift: bool) -> jax.Array:
    """Per-example mean NLL over its counted positions [B] (a classifier's: −log p(label))."""
    logits, labels = _per_example(logits, labels, shift)
    lp, mask = token_log_probs(logits, labels, shift)
    return -(lp * mask).sum(-1) / jnp.maximum(mask.sum(-1), 1)


def sequence_correct(logits, labels, shift: bool) -> jax.Array:
    """Per-example bool [B]: argmax equals the label at every counted position (teacher forcing);
    a classifier's: argmax == label, False where the label is not counted."""
    logits, labels = _align(*_per_example(logits, labels, shift), shift)
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
    """The mask the locality KL is averaged over: the decoder mask for seq2seq, the attention
    mask otherwise, ones [B] for a classifier's batch (labels [B]: one distribution each)."""
    labels = batch.get("labels")
    if labels is not None and labels.ndim == 1:
        return jnp.ones(labels.shape, jnp.int32)
    return batch["decoder_attention_mask"] if seq2seq else batch["attention_mask"]


def _bucket(n: int) -> int:
    return 1 << max(int(n) - 1, 0).bit_length()


def logit_positions(labels: np.ndarray, width: int | None = None) -> np.ndarray:
    """Host side: for decoder-only labels [B, T], the positions t whose logits predict a counted
    label (labels[t + 1] counted), in order, [B, width] padded with -1. `width` defaults to the
    largest count rounded up to a power of two, so batches take few distinct shapes (each shape
    is one compilation)."""
    counted = np.asarray(labels)[:, 1:] != IGNORE
    n = int(counted.sum(1).max(initial=0))
    width = _bucket(n) if width is None else width
    if n > width:
        raise ValueError(f"a row has {n} counted labels, more than the width {width}")
    out = np.full((counted.shape[0], width), -1, np.int32)
    for i, row in enumerate(counted):
        idx = np.flatnonzero(row)
        out[i, : len(idx)] = idx
    return out


def positions_width(*label_arrays: np.ndarray) -> int:
    """One `logit_positions` width for several batches (e.g. an edit's inputs and rephrases,
    which are concatenated in one forward)."""
    return _bucket(max(int((np.asarray(a)[:, 1:] != IGNORE).sum(1).max(initial=0))
                       for a in label_arrays))


def logit_view(batch) -> tuple[jax.Array, jax.Array] | None:
    """(gather [B, P+1], labels [B, P+1]) for a batch with `logit_positions`, None without.

    The shifted metrics of this module over `logits[gather]` and these labels equal those over
    the full logits and labels: view position j holds the logits of position p_j and view label
    j + 1 the label p_j predicts (the last gathered position, and every padding entry, pair with
    an ignored label). None too when the view would be no narrower than the sequence."""
    pos = batch.get(POSITIONS) if hasattr(batch, "get") else None
    labels = batch["labels"]
    if pos is None or pos.shape[1] + 1 >= labels.shape[1]:
        return None
    at = jnp.maximum(pos, 0)
    nxt = jnp.where(pos >= 0, jnp.take_along_axis(labels, at + 1, axis=1), IGNORE)
    first = jnp.full((labels.shape[0], 1), IGNORE, labels.dtype)
    return (jnp.concatenate([at, jnp.zeros_like(at[:, :1])], 1),
            jnp.concatenate([first, nxt.astype(labels.dtype)], 1))
