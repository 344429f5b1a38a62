"""BART (Lewis et al. 2020) encoder-decoder as a Flax module, with its Hugging Face names.

Post-LN layers, learned positions (offset by 2, fairseq's legacy), `layernorm_embedding` after
the embeddings, the LM head tied to `model.shared` plus a `final_logits_bias`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import flax.linen as nn
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from mend_jax.models.common import (
    Embed,
    LayerNorm,
    Linear,
    activation,
    attention_bias,
    dot_product_attention,
)
from mend_jax.models.names import ParamName
from mend_jax.models.registry import Architecture, register

# fairseq reserved the first two rows of the position table (for padding); transformers keeps
# the layout, so position t reads row t + 2 and the table has max_position_embeddings + 2 rows.
POSITION_OFFSET = 2


@dataclass(frozen=True)
class BartConfig:
    vocab_size: int
    d_model: int
    encoder_layers: int
    decoder_layers: int
    encoder_attention_heads: int
    decoder_attention_heads: int
    encoder_ffn_dim: int
    decoder_ffn_dim: int
    max_position_embeddings: int
    activation_function: str
    scale_embedding: bool
    layer_norm_eps: float = 1e-5  # torch.nn.LayerNorm's default; BART's config has no field

    @classmethod
    def from_hf(cls, c) -> BartConfig:
        if not getattr(c, "tie_word_embeddings", True):
            # transformers then keeps separate encoder, decoder and output embeddings.
            raise ValueError("BART with tie_word_embeddings=False is not supported: only the "
                             "standard layout, one `model.shared` embedding for the encoder, "
                             "decoder and LM head, is")
        for heads in (c.encoder_attention_heads, c.decoder_attention_heads):
            if c.d_model % heads:
                raise ValueError(f"BART d_model={c.d_model} is not divisible by {heads} heads")
        activation(c.activation_function)  # fails early, naming the supported ones
        return cls(
            vocab_size=c.vocab_size,
            d_model=c.d_model,
            encoder_layers=c.encoder_layers,
            decoder_layers=c.decoder_layers,
            encoder_attention_heads=c.encoder_attention_heads,
            decoder_attention_heads=c.decoder_attention_heads,
            encoder_ffn_dim=c.encoder_ffn_dim,
            decoder_ffn_dim=c.decoder_ffn_dim,
            max_position_embeddings=c.max_position_embeddings,
            activation_function=c.activation_function,
            scale_embedding=bool(c.scale_embedding),
        )


class BartAttention(nn.Module):
    """Multi-head attention with biased projections; q is scaled by head_dim**-0.5."""

    num_heads: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, kv, mask_bias):
        B, Tq, D = x.shape
        Tk = kv.shape[1]
        Dh = D // self.num_heads
        lin = lambda name: Linear(D, dtype=self.dtype, name=name)
        q = (lin("q_proj")(x) * Dh ** -0.5).reshape(B, Tq, self.num_heads, Dh)
        k = lin("k_proj")(kv).reshape(B, Tk, self.num_heads, Dh)
        v = lin("v_proj")(kv).reshape(B, Tk, self.num_heads, Dh)
        out = dot_product_attention(q, k, v, mask_bias, scale=1.0)
        return lin("out_proj")(out.reshape(B, Tq, D))


class BartLayer(nn.Module):
    """Post-LN: x = LN(x + self_attn(x)); (decoder) x = LN(x + cross_attn(x, enc));
    x = LN(x + fc2(act(fc1(x))))."""

    config: BartConfig
    is_decoder: bool
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, mask_bias, encoder_hidden=None, encoder_mask_bias=None):
        c = self.config
        heads = c.decoder_attention_heads if self.is_decoder else c.encoder_attention_heads
        ffn = c.decoder_ffn_dim if self.is_decoder else c.encoder_ffn_dim
        ln = lambda name: LayerNorm(c.layer_norm_eps, dtype=self.dtype, name=name)
        x = ln("self_attn_layer_norm")(
            x + BartAttention(heads, self.dtype, name="self_attn")(x, x, mask_bias))
        if self.is_decoder:
            x = ln("encoder_attn_layer_norm")(
                x + BartAttention(heads, self.dtype, name="encoder_attn")(
                    x, encoder_hidden, encoder_mask_bias))
        h = activation(c.activation_function)(Linear(ffn, dtype=self.dtype, name="fc1")(x))
        return ln("final_layer_norm")(x + Linear(c.d_model, dtype=self.dtype, name="fc2")(h))


class BartStack(nn.Module):
    """The encoder (bidirectional) or decoder (causal, cross-attending) stack of layers."""

    config: BartConfig
    is_decoder: bool
    dtype: jnp.dtype = jnp.float32
    remat: bool = False

    @nn.compact
    def __call__(self, x, attention_mask, encoder_hidden=None, encoder_attention_mask=None):
        """x: the (scaled) token embeddings [B, T, d_model]."""
        c = self.config
        T = x.shape[1]
        if T > c.max_position_embeddings:
            stack = "decoder" if self.is_decoder else "encoder"
            raise ValueError(f"BART {stack} input of {T} tokens exceeds the model's "
                             f"{c.max_position_embeddings} positions")
        positions = Embed(c.max_position_embeddings + POSITION_OFFSET, c.d_model, self.dtype,
                          name="embed_positions")(jnp.arange(T) + POSITION_OFFSET)  # T d_model
        x = LayerNorm(c.layer_norm_eps, dtype=self.dtype, name="layernorm_embedding")(
            x + positions[None].astype(x.dtype))
        mask_bias = attention_bias(attention_mask, T, T, causal=self.is_decoder,
                                   dtype=jnp.float32)
        enc_bias = None
        if self.is_decoder:
            enc_bias = attention_bias(encoder_attention_mask, T, encoder_hidden.shape[1],
                                      causal=False, dtype=jnp.float32)
        n = c.decoder_layers if self.is_decoder else c.encoder_layers
        layer = nn.remat(BartLayer) if self.remat else BartLayer
        for i in range(n):
            x = layer(c, self.is_decoder, self.dtype, name=f"layers_{i}")(
                x, mask_bias, encoder_hidden, enc_bias)
        return x


class BartModel(nn.Module):
    """`model.*` of the checkpoint: the shared embedding and both stacks."""

    config: BartConfig
    dtype: jnp.dtype = jnp.float32
    remat: bool = False

    def setup(self):
        c = self.config
        self.shared = Embed(c.vocab_size, c.d_model, self.dtype)
        self.encoder = BartStack(c, False, self.dtype, self.remat)
        self.decoder = BartStack(c, True, self.dtype, self.remat)

    def __call__(self, input_ids, attention_mask, decoder_input_ids, decoder_attention_mask):
        """The decoder's last hidden states [B, Td, d_model]."""
        c = self.config
        scale = math.sqrt(c.d_model) if c.scale_embedding else 1.0
        encoder_hidden = self.encoder(self.shared(input_ids) * scale, attention_mask)
        return self.decoder(self.shared(decoder_input_ids) * scale, decoder_attention_mask,
                            encoder_hidden, attention_mask)

    def lm_head(self, x):
        return self.shared.attend(x)


class BartForConditionalGeneration(nn.Module):
    config: BartConfig
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
            raise ValueError("BART is an encoder-decoder model: pass decoder_input_ids")
        model = BartModel(c, self.dtype, self.remat, name="model")
        x = model(input_ids, attention_mask, decoder_input_ids, decoder_attention_mask)
        # A buffer in transformers (never trained), a parameter here so that it is loaded and
        # exported with the rest.
        bias = self.param("final_logits_bias", nn.initializers.zeros, (1, c.vocab_size),
                          self.dtype)
        return model.lm_head(x).astype(jnp.float32) + bias.astype(jnp.float32)


def _module(config: BartConfig, dtype=jnp.float32, remat: bool = False) -> nn.Module:
    return BartForConditionalGeneration(config, dtype, remat)


def _tokens(stack: str, attn: str = "", lin: str = "") -> str:
    """The token stream a weight acts on: cross-attention keys and values read the encoder's
    output, so they act on encoder tokens although they live in the decoder."""
    if stack == "encoder" or (attn == "encoder_attn" and lin in ("k_proj", "v_proj")):
        return "input"
    return "decoder"


def _linear(hf: str, path: tuple[str, ...], tokens: str) -> list[ParamName]:
    """An nn.Linear with bias: weight [d_out, d_in] (transposed to our kernel) and bias."""
    return [ParamName(f"{hf}.weight", path + ("kernel",), "linear", tokens=tokens),
            ParamName(f"{hf}.bias", path + ("bias",), tokens=tokens)]


def _layer_norm(hf: str, path: tuple[str, ...], tokens: str) -> list[ParamName]:
    return [ParamName(f"{hf}.weight", path + ("scale",), tokens=tokens),
            ParamName(f"{hf}.bias", path + ("bias",), tokens=tokens)]


def param_names(c: BartConfig) -> list[ParamName]:
    shared = "model.shared.weight"
    path = ("model", "shared", "embedding")
    names = [
        ParamName(shared, path),
        # Tied copies of `shared`: older checkpoints carry them, transformers re-ties on load.
        ParamName("model.encoder.embed_tokens.weight", path, optional=True, tied_to=shared),
        ParamName("model.decoder.embed_tokens.weight", path, optional=True, tied_to=shared),
        ParamName("lm_head.weight", path, optional=True, tied_to=shared),
        ParamName("final_logits_bias", ("final_logits_bias",), tokens="decoder"),
    ]
    for stack, n in (("encoder", c.encoder_layers), ("decoder", c.decoder_layers)):
        hf, p, tok = f"model.{stack}", ("model", stack), _tokens(stack)
        names.append(ParamName(f"{hf}.embed_positions.weight",
                               p + ("embed_positions", "embedding"), tokens=tok))
        names += _layer_norm(f"{hf}.layernorm_embedding", p + ("layernorm_embedding",), tok)
        attns = ("self_attn", "encoder_attn") if stack == "decoder" else ("self_attn",)
        for i in range(n):
            hl, pl = f"{hf}.layers.{i}", p + (f"layers_{i}",)
            for attn in attns:
                for lin in ("q_proj", "k_proj", "v_proj", "out_proj"):
                    names += _linear(f"{hl}.{attn}.{lin}", pl + (attn, lin),
                                     _tokens(stack, attn, lin))
                names += _layer_norm(f"{hl}.{attn}_layer_norm", pl + (f"{attn}_layer_norm",),
                                     tok)
            for lin in ("fc1", "fc2"):
                names += _linear(f"{hl}.{lin}", pl + (lin,), tok)
            names += _layer_norm(f"{hl}.final_layer_norm", pl + ("final_layer_norm",), tok)
    return names


def default_inner_params(c: BartConfig) -> list[str]:
    """The reference's BART-base choice (zsRE): fc1 and fc2 of the last 2 encoder and decoder
    layers."""
    out = []
    for stack, n in (("encoder", c.encoder_layers), ("decoder", c.decoder_layers)):
        for i in range(max(0, n - 2), n):
            out += [f"model.{stack}.layers.{i}.{lin}.weight" for lin in ("fc1", "fc2")]
    return out


ARCH = register(
    Architecture(
        name="bart",
        model_types=("bart",),
        seq2seq=True,
        config_from_hf=BartConfig.from_hf,
        module=_module,
        param_names=param_names,
        default_inner_params=default_inner_params,
    )
)

__all__ = ["ARCH", "BartConfig", "BartForConditionalGeneration"]
