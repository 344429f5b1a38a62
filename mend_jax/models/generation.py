"""Greedy generation for every registered architecture, jit-compiled as one function.

The architectures expose only a full forward pass (`Model.logits`), so generation runs on a
fixed-size token buffer that is recomputed in full at every step: no KV cache. One step costs a
forward over the whole buffer, O(steps * buffer_len^2) attention in all. That is the current
trade-off: simple, one compiled program per (batch, prompt length, max_new_tokens), and exact
with respect to the model the editor changes; it is meant for the short continuations MEND
evaluates, not for long-form sampling.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Int

from mend_jax.models.model import Model


def generate(
    model: Model,
    params: dict,
    input_ids: Int[Array, "B P"],
    max_new_tokens: int,
    attention_mask: Int[Array, "B P"] | None = None,
    eos_token_id: int | Sequence[int] | None = None,
) -> Int[Array, "B N"]:
    """Greedy (argmax) continuation of each prompt: int32 [B, max_new_tokens].

    Decoder-only models take right-padded prompts; each row continues from its own last real
    token (the position before its first 0 in `attention_mask`). Seq2seq models encode
    `input_ids` and decode from `hf_config.decoder_start_token_id` (or the pad id).

    eos_token_id: token id(s) that end a row; once a row has emitted one, it emits the pad id
        (the eos id when the config has no pad) for its remaining steps, and the loop stops
        early when every row is done. None (default) never stops: exactly max_new_tokens
        tokens are generated for every row.

    No KV cache: every step recomputes the full forward pass over a [B, P + max_new_tokens]
    buffer (see the module docstring for why).
    """
    if model.targets == "class" or (model.targets == "token" and not model.seq2seq):
        raise ValueError(f"a {model.arch.name} model with {model.targets!r} targets does not "
                         "generate text; only decoder-only and seq2seq language models do")
    input_ids = jnp.asarray(input_ids, jnp.int32)
    if input_ids.ndim != 2:
        raise ValueError(f"input_ids must be [batch, length]; got shape {input_ids.shape}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1; got {max_new_tokens}")
    B, P = input_ids.shape
    if attention_mask is None:
        attention_mask = jnp.ones((B, P), jnp.int32)
    attention_mask = jnp.asarray(attention_mask, jnp.int32)
    if attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"attention_mask shape {attention_mask.shape} differs from input_ids "
            f"shape {input_ids.shape}"
        )
    lengths = np.asarray(attention_mask).sum(1)
    if (lengths < 1).any():
        raise ValueError(
            f"rows {np.nonzero(lengths < 1)[0].tolist()} of attention_mask are "
            "empty; every prompt needs at least one real token"
        )

    hf = model.hf_config
    eos = _as_ids(eos_token_id)
    pad = getattr(hf, "pad_token_id", None)
    if pad is None:
        pad = eos[0] if eos else 0

    if model.seq2seq:
        start = getattr(hf, "decoder_start_token_id", None)
        start = pad if start is None else start
        return _generate_seq2seq(
            model.module, params, input_ids, attention_mask, max_new_tokens, start, pad, eos
        )

    limit = _max_positions(hf)
    if limit is not None and P + max_new_tokens > limit:
        raise ValueError(
            f"prompt length {P} + max_new_tokens {max_new_tokens} exceeds the "
            f"model's {limit} positions"
        )
    return _generate_decoder(
        model.module, params, input_ids, attention_mask, max_new_tokens, pad, eos
    )


def _as_ids(eos_token_id) -> tuple[int, ...]:
    if eos_token_id is None:
        return ()
    if isinstance(eos_token_id, (int, np.integer)):
        return (int(eos_token_id),)
    return tuple(int(i) for i in eos_token_id)


def _max_positions(hf_config) -> int | None:
    for attr in ("n_positions", "max_position_embeddings"):
        n = getattr(hf_config, attr, None)
        if isinstance(n, int):
            return n
    return None


def _pick(logits, eos, pad, done):
    """Argmax token per row; rows already done emit pad. Returns (token [B], done [B])."""
    token = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    token = jnp.where(done, pad, token)
    if eos:
        done = done | jnp.isin(token, jnp.asarray(eos, jnp.int32))
    return token, done


def _loop(step_fn, state, n_steps: int, early_stop: bool):
    """Run step_fn(i, state) for i < n_steps; stop early once every row is done."""

    def cond(carry):
        i, st = carry
        go = i < n_steps
        return go & ~jnp.all(st["done"]) if early_stop else go

    def body(carry):
        i, st = carry
        return i + 1, step_fn(i, st)

    return jax.lax.while_loop(cond, body, (jnp.int32(0), state))[1]


@partial(jax.jit, static_argnames=("module", "max_new_tokens", "pad", "eos"))
def _generate_decoder(
    module: nn.Module,
    params,
    input_ids,
    attention_mask,
    max_new_tokens: int,
    pad: int,
    eos: tuple[int, ...],
):
    B, P = input_ids.shape
    L = P + max_new_tokens
    positions = jnp.arange(L, dtype=jnp.int32)[None]  # 1 L
    buf = jnp.zeros((B, L), jnp.int32).at[:, :P].set(input_ids * attention_mask)
    state = {
        "buf": buf,
        "length": attention_mask.sum(1).astype(jnp.int32),  # B: real tokens so far
        "out": jnp.full((B, max_new_tokens), pad, jnp.int32),
        "done": jnp.zeros((B,), bool),
    }
    rows = jnp.arange(B)

    def step(i, st):
        mask = (positions < st["length"][:, None]).astype(jnp.int32)  # B L
        logits = module.apply({"params": params}, st["buf"], mask, None, None)
        token, done = _pick(logits[rows, st["length"] - 1], eos, pad, st["done"])
        return {
            "buf": st["buf"].at[rows, st["length"]].set(token),
            "length": st["length"] + 1,
            "out": st["out"].at[:, i].set(token),
            "done": done,
        }

    return _loop(step, state, max_new_tokens, bool(eos))["out"]


@partial(jax.jit, static_argnames=("module", "max_new_tokens", "start", "pad", "eos"))
def _generate_seq2seq(
    module: nn.Module,
    params,
    input_ids,
    attention_mask,
    max_new_tokens: int,
    start: int,
    pad: int,
    eos: tuple[int, ...],
):
    B = input_ids.shape[0]
    L = 1 + max_new_tokens
    positions = jnp.arange(L, dtype=jnp.int32)[None]  # 1 L
    state = {
        "dec": jnp.full((B, L), pad, jnp.int32).at[:, 0].set(start),
        "out": jnp.full((B, max_new_tokens), pad, jnp.int32),
        "done": jnp.zeros((B,), bool),
    }

    def step(i, st):
        dec_mask = (positions <= i).astype(jnp.int32)  # 1 L
        dec_mask = jnp.broadcast_to(dec_mask, (B, L))
        logits = module.apply({"params": params}, input_ids, attention_mask, st["dec"], dec_mask)
        token, done = _pick(logits[:, i], eos, pad, st["done"])
        return {
            "dec": st["dec"].at[:, i + 1].set(token),
            "out": st["out"].at[:, i].set(token),
            "done": done,
        }

    return _loop(step, state, max_new_tokens, bool(eos))["out"]
