"""Building blocks shared by every architecture: the editable dense layer, masks, activations.

Every weight matrix that MEND may edit is a `Linear`. Its kernel is stored as [d_in, d_out] (the
Flax convention), so the fine-tuning gradient of one layer is sum_t u_t δ_tᵀ with u the layer
input and δ the gradient w.r.t. the output; `mend_jax.capture` intercepts `Linear.__call__`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import flax.linen as nn
import jax
import jax.numpy as jnp


def _flat_dot(x: jax.Array, w: jax.Array) -> jax.Array:
    """x [..., i] @ w [i, o] as one 2-D matmul: XLA's CPU backend runs the backward pass of a
    dot whose contraction spans several leading axes about 3x slower than the flattened one."""
    return (x.reshape(-1, x.shape[-1]) @ w).reshape(*x.shape[:-1], w.shape[-1])


class Linear(nn.Module):
    """y = x @ kernel (+ bias); kernel [d_in, d_out]. The unit of gradient capture and editing."""

    features: int
    use_bias: bool = True
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param(
            "kernel", nn.initializers.normal(0.02), (x.shape[-1], self.features), self.dtype
        )
        y = _flat_dot(x.astype(kernel.dtype), kernel)
        if self.use_bias:
            bias = self.param("bias", nn.initializers.zeros, (self.features,), self.dtype)
            y = y + bias
        return y


class Embed(nn.Module):
    """Token embedding [vocab, d]; `attend` gives tied output logits."""

    num_embeddings: int
    features: int
    dtype: jnp.dtype = jnp.float32

    def setup(self):
        self.embedding = self.param(
            "embedding", nn.initializers.normal(0.02), (self.num_embeddings, self.features),
            self.dtype,
        )

    def __call__(self, ids: jax.Array) -> jax.Array:
        return jnp.take(self.embedding, ids, axis=0)

    def attend(self, x: jax.Array) -> jax.Array:
        return _flat_dot(x, self.embedding.astype(x.dtype).T)


class TiedHead(nn.Module):
    """Logits against an embedding table passed in (a tied head reached from outside the
    module that owns the table); no parameters of its own."""

    @nn.compact
    def __call__(self, x: jax.Array, table: jax.Array) -> jax.Array:
        return _flat_dot(x, table.astype(x.dtype).T)


def _is_head(module: nn.Module, method: str) -> bool:
    """A language model's output head: a tied `Embed.attend` or `TiedHead`, or a `Linear` named
    "lm_head"."""
    return ((isinstance(module, Embed) and method == "attend")
            or (isinstance(module, TiedHead) and method == "__call__")
            or (isinstance(module, Linear) and method == "__call__" and module.name == "lm_head"))


@contextmanager
def head_at(positions: jax.Array) -> Iterator[list]:
    """Within this context the output head reads only the hidden states at `positions` [B, P]
    (indices into the sequence axis): the model returns logits [B, P, V] instead of [B, T, V].
    Every layer below the head still runs on every position, so the logits are exactly those
    of the full call at the chosen positions; the head's matmul (the largest of a small model,
    and of the vocabulary-wide softmax after it) shrinks by T/P. Yields the list of heads it
    rerouted, for the caller to check that there was one."""
    hits: list = []

    def intercept(next_fun, args, kwargs, context):
        if not _is_head(context.module, context.method_name):
            return next_fun(*args, **kwargs)
        hits.append(context.module.name)
        x = jnp.take_along_axis(args[0], positions[:, :, None].astype(jnp.int32), axis=1)
        return next_fun(x, *args[1:], **kwargs)

    with nn.intercept_methods(intercept):
        yield hits


class LayerNorm(nn.Module):
    """PyTorch-compatible LayerNorm (params `scale`, `bias`)."""

    eps: float = 1e-5
    use_bias: bool = True
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        d = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (d,), self.dtype)
        xf = x.astype(jnp.float32)
        mean = xf.mean(-1, keepdims=True)
        var = jnp.square(xf - mean).mean(-1, keepdims=True)
        y = (xf - mean) * jax.lax.rsqrt(var + self.eps) * scale.astype(jnp.float32)
        if self.use_bias:
            y = y + self.param("bias", nn.initializers.zeros, (d,), self.dtype).astype(jnp.float32)
        return y.astype(x.dtype)


class RMSNorm(nn.Module):
    """RMS norm as in T5 / Llama (weight only, statistics in float32)."""

    eps: float = 1e-6
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), self.dtype)
        xf = x.astype(jnp.float32)
        y = xf * jax.lax.rsqrt(jnp.mean(jnp.square(xf), -1, keepdims=True) + self.eps)
        return (y.astype(self.dtype) * scale).astype(x.dtype)


def _gelu_tanh(x):
    return jax.nn.gelu(x, approximate=True)


def _gelu_exact(x):
    return jax.nn.gelu(x, approximate=False)


ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu_new": _gelu_tanh,
    "gelu_pytorch_tanh": _gelu_tanh,
    "gelu_fast": _gelu_tanh,
    "gelu": _gelu_exact,
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
}


def activation(name: str) -> Callable[[jax.Array], jax.Array]:
    if name not in ACTIVATIONS:
        raise ValueError(f"unsupported activation {name!r}; supported: {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


def attention_bias(
    attention_mask: jax.Array | None, q_len: int, k_len: int, causal: bool, dtype
) -> jax.Array:
    """Additive bias [B or 1, 1, q, k]: 0 where attending is allowed, dtype-min elsewhere."""
    allowed = jnp.ones((1, 1, q_len, k_len), dtype=bool)
    if causal:
        allowed = allowed & jnp.tril(jnp.ones((q_len, k_len), dtype=bool))[None, None]
    if attention_mask is not None:
        allowed = allowed & (attention_mask[:, None, None, :].astype(bool))
    return jnp.where(allowed, 0.0, jnp.finfo(dtype).min).astype(dtype)


def dot_product_attention(q, k, v, bias, scale: float | None = None):
    """q [B,Tq,H,Dh], k/v [B,Tk,H,Dh] (H may be a divisor for GQA: k/v repeated). Softmax in f32."""
    if k.shape[2] != q.shape[2]:
        rep = q.shape[2] // k.shape[2]
        k = jnp.repeat(k, rep, axis=2)
        v = jnp.repeat(v, rep, axis=2)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = jnp.einsum("bqhd,bkhd->bhqk", q.astype(jnp.float32), k.astype(jnp.float32)) * scale
    scores = scores + bias.astype(jnp.float32)
    probs = jax.nn.softmax(scores, axis=-1)
    return jnp.einsum("bhqk,bkhd->bqhd", probs, v.astype(jnp.float32)).astype(q.dtype)


def rotary(x: jax.Array, positions: jax.Array, rot_dim: int, theta: float, interleaved: bool):
    """Apply rotary position embedding to the first `rot_dim` features of x [B,T,H,Dh].

    interleaved=True is GPT-J's (pairs 2i, 2i+1); False is Llama's rotate_half (i, i + rot/2).
    """
    inv = 1.0 / (theta ** (jnp.arange(0, rot_dim, 2, dtype=jnp.float32) / rot_dim))
    ang = positions[..., None].astype(jnp.float32) * inv  # B T rot/2
    sin, cos = jnp.sin(ang)[:, :, None, :], jnp.cos(ang)[:, :, None, :]
    xr, xp = x[..., :rot_dim].astype(jnp.float32), x[..., rot_dim:]
    if interleaved:
        x1, x2 = xr[..., 0::2], xr[..., 1::2]
        o1, o2 = x1 * cos - x2 * sin, x2 * cos + x1 * sin
        out = jnp.stack([o1, o2], axis=-1).reshape(xr.shape)
    else:
        half = rot_dim // 2
        x1, x2 = xr[..., :half], xr[..., half:]
        out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return jnp.concatenate([out.astype(x.dtype), xp], axis=-1)


def positions_from_mask(attention_mask: jax.Array | None, batch: int, length: int) -> jax.Array:
    """Position ids 0..T-1 (right padding keeps real tokens at 0..n-1)."""
    return jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32)[None], (batch, length))
