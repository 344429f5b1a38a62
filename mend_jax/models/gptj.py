"""GPT-J (Wang & Komatsuzaki 2021) as a Flax module, with its Hugging Face names.

Differences from GPT-2 that matter here: rotary position embedding on the first `rotary_dim`
features of each head (GPT-J's interleaved pairs 2i, 2i+1) instead of learned positions, a
parallel block (attention and MLP both read the same ln_1 output), q/k/v/out_proj without
bias, an untied `lm_head` with bias, and every dense layer a torch nn.Linear (layout "linear").
"""

from __future__ import annotations

from dataclasses import dataclass

import flax.linen as nn
import jax.numpy as jnp

from mend_jax.models.common import (
    Embed,
    LayerNorm,
    Linear,
    activation,
    attention_bias,
    dot_product_attention,
    positions_from_mask,
    rotary,
)
from mend_jax.models.names import ParamName, last_blocks
from mend_jax.models.registry import Architecture, register

ROTARY_THETA = 10000.0


@dataclass(frozen=True)
class GPTJConfig:
    vocab_size: int
    n_embd: int
    n_layer: int
    n_head: int
    n_inner: int
    rotary_dim: int
    activation_function: str
    layer_norm_epsilon: float

    def __post_init__(self):
        head_dim = self.n_embd // self.n_head
        if self.rotary_dim % 2 or not 0 < self.rotary_dim <= head_dim:
            raise ValueError(
                f"gptj config: rotary_dim={self.rotary_dim} must be even and in "
                f"(0, head_dim={head_dim}]"
            )

    @classmethod
    def from_hf(cls, c) -> GPTJConfig:
        if getattr(c, "tie_word_embeddings", False):
            raise ValueError(
                "gptj config: tie_word_embeddings=True is not supported "
                "(GPT-J checkpoints have their own lm_head.weight and lm_head.bias)"
            )
        return cls(
            vocab_size=c.vocab_size,
            n_embd=c.n_embd,
            n_layer=c.n_layer,
            n_head=c.n_head,
            n_inner=c.n_inner or 4 * c.n_embd,
            rotary_dim=c.rotary_dim or c.n_embd // c.n_head,
            activation_function=c.activation_function,
            layer_norm_epsilon=c.layer_norm_epsilon,
        )


class GPTJAttention(nn.Module):
    config: GPTJConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, bias, positions):
        c = self.config
        B, T, D = x.shape
        hd = D // c.n_head
        q, k, v = (
            Linear(D, use_bias=False, dtype=self.dtype, name=n)(x).reshape(B, T, c.n_head, hd)
            for n in ("q_proj", "k_proj", "v_proj")
        )
        q = rotary(q, positions, c.rotary_dim, ROTARY_THETA, interleaved=True)
        k = rotary(k, positions, c.rotary_dim, ROTARY_THETA, interleaved=True)
        out = dot_product_attention(q, k, v, bias).reshape(B, T, D)
        return Linear(D, use_bias=False, dtype=self.dtype, name="out_proj")(out)


class GPTJMLP(nn.Module):
    config: GPTJConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        c = self.config
        h = activation(c.activation_function)(Linear(c.n_inner, dtype=self.dtype, name="fc_in")(x))
        return Linear(c.n_embd, dtype=self.dtype, name="fc_out")(h)


class GPTJBlock(nn.Module):
    config: GPTJConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, bias, positions):
        c = self.config
        h = LayerNorm(c.layer_norm_epsilon, dtype=self.dtype, name="ln_1")(x)
        # Parallel block: attention and MLP both read ln_1(x); there is no ln_2.
        attn = GPTJAttention(c, self.dtype, name="attn")(h, bias, positions)
        return x + attn + GPTJMLP(c, self.dtype, name="mlp")(h)


class GPTJModel(nn.Module):
    config: GPTJConfig
    dtype: jnp.dtype = jnp.float32
    remat: bool = False

    @nn.compact
    def __call__(self, input_ids, attention_mask=None):
        c = self.config
        B, T = input_ids.shape
        x = Embed(c.vocab_size, c.n_embd, self.dtype, name="wte")(input_ids)
        bias = attention_bias(attention_mask, T, T, causal=True, dtype=jnp.float32)
        positions = positions_from_mask(attention_mask, B, T)
        block = nn.remat(GPTJBlock) if self.remat else GPTJBlock
        for i in range(c.n_layer):
            x = block(c, self.dtype, name=f"h_{i}")(x, bias, positions)
        return LayerNorm(c.layer_norm_epsilon, dtype=self.dtype, name="ln_f")(x)


class GPTJLM(nn.Module):
    """HF's GPTJForCausalLM: `transformer` plus an untied `lm_head` (with bias) at the top."""

    config: GPTJConfig
    dtype: jnp.dtype = jnp.float32
    remat: bool = False

    @nn.compact
    def __call__(
        self, input_ids, attention_mask=None, decoder_input_ids=None, decoder_attention_mask=None
    ):
        c = self.config
        x = GPTJModel(c, self.dtype, self.remat, name="transformer")(input_ids, attention_mask)
        return Linear(c.vocab_size, dtype=self.dtype, name="lm_head")(x).astype(jnp.float32)


def _wrap(config: GPTJConfig, dtype=jnp.float32, remat: bool = False) -> nn.Module:
    return GPTJLM(config, dtype, remat)


def param_names(c: GPTJConfig) -> list[ParamName]:
    names = [
        ParamName("transformer.wte.weight", ("transformer", "wte", "embedding")),
        ParamName("transformer.ln_f.weight", ("transformer", "ln_f", "scale")),
        ParamName("transformer.ln_f.bias", ("transformer", "ln_f", "bias")),
        ParamName("lm_head.weight", ("lm_head", "kernel"), "linear"),
        ParamName("lm_head.bias", ("lm_head", "bias")),
    ]
    for i in range(c.n_layer):
        hf, p = f"transformer.h.{i}", ("transformer", f"h_{i}")
        names.append(ParamName(f"{hf}.ln_1.weight", p + ("ln_1", "scale")))
        names.append(ParamName(f"{hf}.ln_1.bias", p + ("ln_1", "bias")))
        last = i == c.n_layer - 1   # position-local weights: `ParamName.local`
        for lin in ("q_proj", "k_proj", "v_proj", "out_proj"):
            names.append(
                ParamName(f"{hf}.attn.{lin}.weight", p + ("attn", lin, "kernel"), "linear",
                          local=last and lin in ("q_proj", "out_proj"))
            )
        for lin in ("fc_in", "fc_out"):
            names.append(ParamName(f"{hf}.mlp.{lin}.weight", p + ("mlp", lin, "kernel"), "linear",
                                   local=last))
            names.append(ParamName(f"{hf}.mlp.{lin}.bias", p + ("mlp", lin, "bias")))
    return names


def default_inner_params(c: GPTJConfig) -> list[str]:
    """The reference's GPT-style choice: MLP in/out matrices of the last 3 blocks."""
    return last_blocks("transformer.h.{i}.mlp.{lin}", c.n_layer, ("fc_in", "fc_out"))


ARCH = register(
    Architecture(
        name="gptj",
        model_types=("gptj",),
        seq2seq=False,
        config_from_hf=GPTJConfig.from_hf,
        module=_wrap,
        param_names=param_names,
        default_inner_params=default_inner_params,
    )
)

__all__ = ["ARCH", "GPTJLM", "GPTJConfig"]
