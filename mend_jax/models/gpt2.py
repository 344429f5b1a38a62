"""GPT-2 (Radford et al. 2019) as a Flax module, with its Hugging Face names."""

from __future__ import annotations

import math
from dataclasses import dataclass

import flax.linen as nn
import jax
import jax.numpy as jnp

from mend_jax.models.common import (
    Embed,
    LayerNorm,
    Linear,
    activation,
    attention_bias,
    dot_product_attention,
)
from mend_jax.models.names import ParamName, last_blocks
from mend_jax.models.registry import Architecture, register


@dataclass(frozen=True)
class GPT2Config:
    vocab_size: int
    n_positions: int
    n_embd: int
    n_layer: int
    n_head: int
    n_inner: int
    activation_function: str
    layer_norm_epsilon: float
    scale_attn_weights: bool = True
    scale_attn_by_inverse_layer_idx: bool = False

    @classmethod
    def from_hf(cls, c) -> GPT2Config:
        return cls(
            vocab_size=c.vocab_size,
            n_positions=c.n_positions,
            n_embd=c.n_embd,
            n_layer=c.n_layer,
            n_head=c.n_head,
            n_inner=c.n_inner or 4 * c.n_embd,
            activation_function=c.activation_function,
            layer_norm_epsilon=c.layer_norm_epsilon,
            scale_attn_weights=getattr(c, "scale_attn_weights", True),
            scale_attn_by_inverse_layer_idx=getattr(c, "scale_attn_by_inverse_layer_idx", False),
        )


class GPT2Attention(nn.Module):
    config: GPT2Config
    layer_idx: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, bias):
        c = self.config
        B, T, D = x.shape
        hd = D // c.n_head
        qkv = Linear(3 * D, dtype=self.dtype, name="c_attn")(x)
        q, k, v = jnp.split(qkv, 3, axis=-1)
        q, k, v = (t.reshape(B, T, c.n_head, hd) for t in (q, k, v))
        scale = 1.0 / math.sqrt(hd) if c.scale_attn_weights else 1.0
        if c.scale_attn_by_inverse_layer_idx:
            scale /= self.layer_idx + 1
        out = dot_product_attention(q, k, v, bias, scale=scale).reshape(B, T, D)
        return Linear(D, dtype=self.dtype, name="c_proj")(out)


class GPT2MLP(nn.Module):
    config: GPT2Config
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        c = self.config
        h = activation(c.activation_function)(Linear(c.n_inner, dtype=self.dtype, name="c_fc")(x))
        return Linear(c.n_embd, dtype=self.dtype, name="c_proj")(h)


class GPT2Block(nn.Module):
    config: GPT2Config
    layer_idx: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, bias):
        c = self.config
        ln = lambda name: LayerNorm(c.layer_norm_epsilon, dtype=self.dtype, name=name)
        x = x + GPT2Attention(c, self.layer_idx, self.dtype, name="attn")(ln("ln_1")(x), bias)
        return x + GPT2MLP(c, self.dtype, name="mlp")(ln("ln_2")(x))


class GPT2LM(nn.Module):
    config: GPT2Config
    dtype: jnp.dtype = jnp.float32
    remat: bool = False

    @nn.compact
    def __call__(self, input_ids, attention_mask=None, decoder_input_ids=None,
                 decoder_attention_mask=None):
        c = self.config
        B, T = input_ids.shape
        wte = Embed(c.vocab_size, c.n_embd, self.dtype, name="wte")
        wpe = Embed(c.n_positions, c.n_embd, self.dtype, name="wpe")
        x = wte(input_ids) + wpe(jnp.arange(T)[None])
        bias = attention_bias(attention_mask, T, T, causal=True, dtype=jnp.float32)
        block = nn.remat(GPT2Block) if self.remat else GPT2Block
        for i in range(c.n_layer):
            x = block(c, i, self.dtype, name=f"h_{i}")(x, bias)
        x = LayerNorm(c.layer_norm_epsilon, dtype=self.dtype, name="ln_f")(x)
        return wte.attend(x).astype(jnp.float32)


def _wrap(config: GPT2Config, dtype=jnp.float32, remat: bool = False) -> nn.Module:
    # HF nests everything under "transformer"; so do we, so paths mirror names.
    return _Root(config, dtype, remat)


class _Root(nn.Module):
    config: GPT2Config
    dtype: jnp.dtype = jnp.float32
    remat: bool = False

    @nn.compact
    def __call__(self, *args, **kwargs):
        return GPT2LM(self.config, self.dtype, self.remat, name="transformer")(*args, **kwargs)


def param_names(c: GPT2Config) -> list[ParamName]:
    names = [
        ParamName("transformer.wte.weight", ("transformer", "wte", "embedding")),
        ParamName("transformer.wpe.weight", ("transformer", "wpe", "embedding")),
        ParamName("transformer.ln_f.weight", ("transformer", "ln_f", "scale")),
        ParamName("transformer.ln_f.bias", ("transformer", "ln_f", "bias")),
        ParamName("lm_head.weight", ("transformer", "wte", "embedding"), optional=True,
                  tied_to="transformer.wte.weight"),
    ]
    for i in range(c.n_layer):
        hf, p = f"transformer.h.{i}", ("transformer", f"h_{i}")
        for ln in ("ln_1", "ln_2"):
            names.append(ParamName(f"{hf}.{ln}.weight", p + (ln, "scale")))
            names.append(ParamName(f"{hf}.{ln}.bias", p + (ln, "bias")))
        for sub, lin in (("attn", "c_attn"), ("attn", "c_proj"), ("mlp", "c_fc"),
                         ("mlp", "c_proj")):
            local = i == c.n_layer - 1 and (sub, lin) != ("attn", "c_attn")
            names.append(ParamName(f"{hf}.{sub}.{lin}.weight", p + (sub, lin, "kernel"), "conv1d",
                                   local=local))
            names.append(ParamName(f"{hf}.{sub}.{lin}.bias", p + (sub, lin, "bias")))
    return names


def default_inner_params(c: GPT2Config) -> list[str]:
    """The reference's GPT-style choice: MLP in/out matrices of the last 3 blocks."""
    return last_blocks("transformer.h.{i}.mlp.{lin}", c.n_layer, ("c_fc", "c_proj"))


ARCH = register(
    Architecture(
        name="gpt2",
        model_types=("gpt2",),
        seq2seq=False,
        config_from_hf=GPT2Config.from_hf,
        module=_wrap,
        param_names=param_names,
        default_inner_params=default_inner_params,
    )
)

__all__ = ["ARCH", "GPT2LM", "GPT2Config", "jax"]
