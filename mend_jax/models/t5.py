"""T5 (Raffel et al. 2020) encoder-decoder as a Flax module, with its Hugging Face names.

Covers T5 v1.0 (ReLU feed-forward, LM head tied to `shared` with the d_model**-0.5 rescaling)
and v1.1 / Flan-T5 (gated-GELU feed-forward, separate `lm_head`, no rescaling).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import flax.linen as nn
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from mend_jax.models.common import (
    Embed,
    Linear,
    RMSNorm,
    activation,
    attention_bias,
    dot_product_attention,
)
from mend_jax.models.names import ParamName
from mend_jax.models.registry import Architecture, register


@dataclass(frozen=True)
class T5Config:
    vocab_size: int
    d_model: int
    d_kv: int
    d_ff: int
    num_layers: int
    num_decoder_layers: int
    num_heads: int
    relative_attention_num_buckets: int
    relative_attention_max_distance: int
    layer_norm_epsilon: float
    dense_act_fn: str
    is_gated_act: bool
    # v1.0: lm_head is `shared` and decoder output is scaled by d_model**-0.5; v1.1: neither.
    tie_word_embeddings: bool

    @classmethod
    def from_hf(cls, c) -> T5Config:
        ff = c.feed_forward_proj.split("-")
        act = "gelu_new" if c.feed_forward_proj == "gated-gelu" else ff[-1]
        # transformers >= 5 forces `tie_word_embeddings=True` on every T5Config and keeps the
        # checkpoint's own value as `scale_decoder_outputs` (False for v1.1, whose checkpoints
        # carry their own `lm_head.weight`); older versions only have `tie_word_embeddings`.
        tied = getattr(c, "scale_decoder_outputs", c.tie_word_embeddings)
        return cls(
            vocab_size=c.vocab_size,
            d_model=c.d_model,
            d_kv=c.d_kv,
            d_ff=c.d_ff,
            num_layers=c.num_layers,
            num_decoder_layers=c.num_decoder_layers or c.num_layers,
            num_heads=c.num_heads,
            relative_attention_num_buckets=c.relative_attention_num_buckets,
            relative_attention_max_distance=c.relative_attention_max_distance,
            layer_norm_epsilon=c.layer_norm_epsilon,
            dense_act_fn=act,
            is_gated_act=ff[0] == "gated",
            tie_word_embeddings=bool(tied),
        )


def relative_position_bucket(
    relative_position: Int[Array, "q k"], bidirectional: bool, num_buckets: int, max_distance: int
) -> Int[Array, "q k"]:
    """Mesh-TensorFlow's bucketing of key_pos - query_pos: exact near 0, logarithmic further out."""
    buckets = jnp.zeros_like(relative_position)
    if bidirectional:
        num_buckets //= 2
        buckets = buckets + (relative_position > 0).astype(jnp.int32) * num_buckets
        distance = jnp.abs(relative_position)
    else:  # causal: only the past (relative_position <= 0) has distinct buckets
        distance = -jnp.minimum(relative_position, 0)
    max_exact = num_buckets // 2
    is_small = distance < max_exact
    # float32 log, truncated toward zero, exactly as the reference; max(.,1) only avoids log(0)
    # on entries the `where` discards.
    large = max_exact + (
        jnp.log(jnp.maximum(distance, 1).astype(jnp.float32) / max_exact)
        / math.log(max_distance / max_exact)
        * (num_buckets - max_exact)
    ).astype(jnp.int32)
    large = jnp.minimum(large, num_buckets - 1)
    return buckets + jnp.where(is_small, distance, large)


class T5Attention(nn.Module):
    """Multi-head attention without 1/sqrt(d) scaling (folded into T5's initialisation)."""

    config: T5Config
    has_relative_attention_bias: bool = False
    bidirectional: bool = True
    dtype: jnp.dtype = jnp.float32

    def position_bias(self, q_len: int, k_len: int) -> Float[Array, "1 H q k"]:
        c = self.config
        rel = jnp.arange(k_len)[None, :] - jnp.arange(q_len)[:, None]  # q k
        buckets = relative_position_bucket(rel, self.bidirectional,
                                           c.relative_attention_num_buckets,
                                           c.relative_attention_max_distance)
        table = Embed(c.relative_attention_num_buckets, c.num_heads, self.dtype,
                      name="relative_attention_bias")
        return jnp.transpose(table(buckets), (2, 0, 1))[None].astype(jnp.float32)

    @nn.compact
    def __call__(self, x, kv, mask_bias, position_bias):
        """Returns (output, position_bias); the first layer of a stack computes the bias."""
        c = self.config
        B, Tq, _ = x.shape
        Tk = kv.shape[1]
        inner = c.num_heads * c.d_kv
        lin = lambda name: Linear(inner, use_bias=False, dtype=self.dtype, name=name)
        q = lin("q")(x).reshape(B, Tq, c.num_heads, c.d_kv)
        k = lin("k")(kv).reshape(B, Tk, c.num_heads, c.d_kv)
        v = lin("v")(kv).reshape(B, Tk, c.num_heads, c.d_kv)
        if position_bias is None:
            position_bias = (self.position_bias(Tq, Tk) if self.has_relative_attention_bias
                             else jnp.zeros((1, c.num_heads, Tq, Tk), jnp.float32))
        out = dot_product_attention(q, k, v, position_bias + mask_bias, scale=1.0)
        out = Linear(c.d_model, use_bias=False, dtype=self.dtype, name="o")(
            out.reshape(B, Tq, inner))
        return out, position_bias


class T5LayerSelfAttention(nn.Module):
    config: T5Config
    has_relative_attention_bias: bool
    bidirectional: bool
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, mask_bias, position_bias):
        c = self.config
        h = RMSNorm(c.layer_norm_epsilon, self.dtype, name="layer_norm")(x)
        out, position_bias = T5Attention(c, self.has_relative_attention_bias, self.bidirectional,
                                         self.dtype, name="SelfAttention")(
            h, h, mask_bias, position_bias)
        return x + out, position_bias


class T5LayerCrossAttention(nn.Module):
    config: T5Config
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, encoder_hidden, mask_bias, position_bias):
        c = self.config
        h = RMSNorm(c.layer_norm_epsilon, self.dtype, name="layer_norm")(x)
        out, position_bias = T5Attention(c, False, True, self.dtype, name="EncDecAttention")(
            h, encoder_hidden, mask_bias, position_bias)
        return x + out, position_bias


class T5DenseReluDense(nn.Module):
    """v1.0: wo(act(wi x)); v1.1 (gated): wo(act(wi_0 x) * wi_1 x)."""

    config: T5Config
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        c = self.config
        act = activation(c.dense_act_fn)
        lin = lambda d, name: Linear(d, use_bias=False, dtype=self.dtype, name=name)
        if c.is_gated_act:
            h = act(lin(c.d_ff, "wi_0")(x)) * lin(c.d_ff, "wi_1")(x)
        else:
            h = act(lin(c.d_ff, "wi")(x))
        return lin(c.d_model, "wo")(h)


class T5LayerFF(nn.Module):
    config: T5Config
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        c = self.config
        h = RMSNorm(c.layer_norm_epsilon, self.dtype, name="layer_norm")(x)
        return x + T5DenseReluDense(c, self.dtype, name="DenseReluDense")(h)


class T5Block(nn.Module):
    """layer_0 self-attention, (decoder) layer_1 cross-attention, then the feed-forward layer."""

    config: T5Config
    is_decoder: bool
    has_relative_attention_bias: bool
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, mask_bias, position_bias, encoder_hidden=None, encoder_mask_bias=None,
                 cross_position_bias=None):
        c = self.config
        x, position_bias = T5LayerSelfAttention(
            c, self.has_relative_attention_bias, not self.is_decoder, self.dtype,
            name="layer_0")(x, mask_bias, position_bias)
        if self.is_decoder:
            x, cross_position_bias = T5LayerCrossAttention(c, self.dtype, name="layer_1")(
                x, encoder_hidden, encoder_mask_bias, cross_position_bias)
        x = T5LayerFF(c, self.dtype, name=f"layer_{2 if self.is_decoder else 1}")(x)
        return x, position_bias, cross_position_bias


class T5Stack(nn.Module):
    """The encoder (bidirectional) or decoder (causal, cross-attending) stack of blocks."""

    config: T5Config
    is_decoder: bool
    dtype: jnp.dtype = jnp.float32
    remat: bool = False

    @nn.compact
    def __call__(self, x, attention_mask, encoder_hidden=None, encoder_attention_mask=None):
        c = self.config
        T = x.shape[1]
        mask_bias = attention_bias(attention_mask, T, T, causal=self.is_decoder,
                                   dtype=jnp.float32)
        enc_bias = None
        if self.is_decoder:
            enc_bias = attention_bias(encoder_attention_mask, T, encoder_hidden.shape[1],
                                      causal=False, dtype=jnp.float32)
        n = c.num_decoder_layers if self.is_decoder else c.num_layers
        block = nn.remat(T5Block) if self.remat else T5Block
        # The relative position bias table lives in block 0; later blocks reuse its output.
        position_bias = cross_position_bias = None
        for i in range(n):
            x, position_bias, cross_position_bias = block(
                c, self.is_decoder, i == 0, self.dtype, name=f"block_{i}")(
                x, mask_bias, position_bias, encoder_hidden, enc_bias, cross_position_bias)
        return RMSNorm(c.layer_norm_epsilon, self.dtype, name="final_layer_norm")(x)


class T5ForConditionalGeneration(nn.Module):
    config: T5Config
    dtype: jnp.dtype = jnp.float32
    remat: bool = False

    @nn.compact
    def __call__(
        self,
        input_ids: Int[Array, "B Te"],
        attention_mask: Int[Array, "B Te"] | None = None,
        decoder_input_ids: Int[Array, "B Td"] | None = None,
        decoder_attention_mask: Int[Array, "B Td"] | None = None,
    ) -> Float[Array, "B Td V"]:
        c = self.config
        if decoder_input_ids is None:
            raise ValueError("T5 is an encoder-decoder model: pass decoder_input_ids")
        shared = Embed(c.vocab_size, c.d_model, self.dtype, name="shared")
        encoder_hidden = T5Stack(c, False, self.dtype, self.remat, name="encoder")(
            shared(input_ids), attention_mask)
        x = T5Stack(c, True, self.dtype, self.remat, name="decoder")(
            shared(decoder_input_ids), decoder_attention_mask, encoder_hidden, attention_mask)
        if c.tie_word_embeddings:
            return shared.attend(x * (c.d_model ** -0.5)).astype(jnp.float32)
        return Linear(c.vocab_size, use_bias=False, dtype=self.dtype, name="lm_head")(x).astype(
            jnp.float32)


def _module(config: T5Config, dtype=jnp.float32, remat: bool = False) -> nn.Module:
    return T5ForConditionalGeneration(config, dtype, remat)


def _tokens(stack: str, attn: str = "", lin: str = "") -> str:
    """The token stream a weight acts on: cross-attention keys and values read the encoder's
    output, so they act on encoder tokens although they live in the decoder."""
    if stack == "encoder" or (attn == "EncDecAttention" and lin in ("k", "v")):
        return "input"
    return "decoder"


def param_names(c: T5Config) -> list[ParamName]:
    shared = "shared.weight"
    names = [
        ParamName(shared, ("shared", "embedding")),
        # transformers stores the stacks' embeddings as tied copies of `shared` (and re-ties them
        # on load), so they may or may not be in a checkpoint.
        ParamName("encoder.embed_tokens.weight", ("shared", "embedding"), optional=True,
                  tied_to=shared),
        ParamName("decoder.embed_tokens.weight", ("shared", "embedding"), optional=True,
                  tied_to=shared),
        ParamName("encoder.final_layer_norm.weight", ("encoder", "final_layer_norm", "scale")),
        ParamName("decoder.final_layer_norm.weight", ("decoder", "final_layer_norm", "scale"),
                  tokens="decoder"),
        # Original T5 checkpoints carry an unused cross-attention bias table (transformers
        # ignores it on load); naming it as an optional tie lets loading skip it, never export it.
        ParamName("decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight",
                  ("decoder", "block_0", "layer_0", "SelfAttention", "relative_attention_bias",
                   "embedding"), optional=True,
                  tied_to="decoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"),
    ]
    if c.tie_word_embeddings:
        names.append(ParamName("lm_head.weight", ("shared", "embedding"), optional=True,
                               tied_to=shared))
    else:
        # transformers 5 saves a v1.1 model whose head it kept tied without lm_head.weight
        names.append(ParamName("lm_head.weight", ("lm_head", "kernel"), "linear",
                               fallback="shared.weight", tokens="decoder"))
    ff_lins = ("wi_0", "wi_1", "wo") if c.is_gated_act else ("wi", "wo")
    for stack, n in (("encoder", c.num_layers), ("decoder", c.num_decoder_layers)):
        layers = [(0, "SelfAttention")] + ([(1, "EncDecAttention")] if stack == "decoder" else [])
        ff = 2 if stack == "decoder" else 1
        for i in range(n):
            hf, p = f"{stack}.block.{i}", (stack, f"block_{i}")
            for j, attn in layers:
                for lin in ("q", "k", "v", "o"):
                    names.append(ParamName(f"{hf}.layer.{j}.{attn}.{lin}.weight",
                                           p + (f"layer_{j}", attn, lin, "kernel"), "linear",
                                           tokens=_tokens(stack, attn, lin)))
                names.append(ParamName(f"{hf}.layer.{j}.layer_norm.weight",
                                       p + (f"layer_{j}", "layer_norm", "scale"),
                                       tokens=_tokens(stack)))
            if i == 0:
                names.append(ParamName(
                    f"{hf}.layer.0.SelfAttention.relative_attention_bias.weight",
                    p + ("layer_0", "SelfAttention", "relative_attention_bias", "embedding")))
            for lin in ff_lins:
                names.append(ParamName(f"{hf}.layer.{ff}.DenseReluDense.{lin}.weight",
                                       p + (f"layer_{ff}", "DenseReluDense", lin, "kernel"),
                                       "linear", tokens=_tokens(stack)))
            names.append(ParamName(f"{hf}.layer.{ff}.layer_norm.weight",
                                   p + (f"layer_{ff}", "layer_norm", "scale"),
                                   tokens=_tokens(stack)))
    return names


def default_inner_params(c: T5Config) -> list[str]:
    """The reference's T5 choice: feed-forward in/out matrices of the last 2 encoder and decoder
    blocks. The reference edits `wi` and `wo` (v1.0); for gated (v1.1) models we edit `wi_0` (the
    activated branch, the analogue of `wi`) and `wo`, leaving the linear gate `wi_1` frozen."""
    wi = "wi_0" if c.is_gated_act else "wi"
    out = []
    for stack, n, ff in (("encoder", c.num_layers, 1), ("decoder", c.num_decoder_layers, 2)):
        for i in range(max(0, n - 2), n):
            out += [f"{stack}.block.{i}.layer.{ff}.DenseReluDense.{lin}.weight"
                    for lin in (wi, "wo")]
    return out


ARCH = register(
    Architecture(
        name="t5",
        model_types=("t5",),
        seq2seq=True,
        config_from_hf=T5Config.from_hf,
        module=_module,
        param_names=param_names,
        default_inner_params=default_inner_params,
    )
)

__all__ = ["ARCH", "T5Config", "T5ForConditionalGeneration"]
