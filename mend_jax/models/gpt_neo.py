"""GPT-Neo (Black et al. 2021) as a Flax module, with its Hugging Face names.

Differences from GPT-2 that matter here: layers alternate global and local (sliding-window)
causal attention, attention scores are NOT scaled by 1/sqrt(head_dim), q/k/v have no bias, and
every dense layer is a torch nn.Linear (layout "linear", [out, in] in the checkpoint).
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
)
from mend_jax.models.names import ParamName, last_blocks
from mend_jax.models.registry import Architecture, register

ATTENTION_TYPES = ("global", "local")


@dataclass(frozen=True)
class GPTNeoConfig:
    vocab_size: int
    max_position_embeddings: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    window_size: int
    attention_layers: tuple[str, ...]  # "global" | "local", one per layer
    activation_function: str
    layer_norm_epsilon: float

    def __post_init__(self):
        if len(self.attention_layers) != self.num_layers:
            raise ValueError(
                f"gpt_neo config: attention_layers has {len(self.attention_layers)} entries, "
                f"expected num_layers={self.num_layers}"
            )
        bad = sorted(set(self.attention_layers) - set(ATTENTION_TYPES))
        if bad:
            raise ValueError(
                f"gpt_neo config: unsupported attention types {bad}; expected {ATTENTION_TYPES}"
            )

    @classmethod
    def from_hf(cls, c) -> GPTNeoConfig:
        if not getattr(c, "tie_word_embeddings", True):
            raise ValueError(
                "gpt_neo config: tie_word_embeddings=False is not supported "
                "(lm_head must share transformer.wte.weight)"
            )
        return cls(
            vocab_size=c.vocab_size,
            max_position_embeddings=c.max_position_embeddings,
            hidden_size=c.hidden_size,
            num_layers=c.num_layers,
            num_heads=c.num_heads,
            intermediate_size=c.intermediate_size or 4 * c.hidden_size,
            window_size=c.window_size,
            attention_layers=tuple(c.attention_layers),
            activation_function=c.activation_function,
            layer_norm_epsilon=c.layer_norm_epsilon,
        )


def local_attention_bias(causal_bias, window_size: int):
    """Restrict a causal bias [B|1, 1, T, T] to the last `window_size` keys (i - j < window)."""
    q_len, k_len = causal_bias.shape[-2:]
    i = jnp.arange(q_len)[:, None]
    j = jnp.arange(k_len)[None, :]
    in_window = (i - j) < window_size
    return jnp.where(in_window, causal_bias, jnp.finfo(causal_bias.dtype).min)


class GPTNeoSelfAttention(nn.Module):
    config: GPTNeoConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, bias):
        c = self.config
        B, T, D = x.shape
        hd = D // c.num_heads
        q, k, v = (
            Linear(D, use_bias=False, dtype=self.dtype, name=n)(x).reshape(B, T, c.num_heads, hd)
            for n in ("q_proj", "k_proj", "v_proj")
        )
        # GPT-Neo was trained without the 1/sqrt(head_dim) scaling.
        out = dot_product_attention(q, k, v, bias, scale=1.0).reshape(B, T, D)
        return Linear(D, dtype=self.dtype, name="out_proj")(out)


class GPTNeoAttention(nn.Module):
    # Only exists so that paths mirror HF's `attn.attention.q_proj`.
    config: GPTNeoConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, bias):
        return GPTNeoSelfAttention(self.config, self.dtype, name="attention")(x, bias)


class GPTNeoMLP(nn.Module):
    config: GPTNeoConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        c = self.config
        h = Linear(c.intermediate_size, dtype=self.dtype, name="c_fc")(x)
        h = activation(c.activation_function)(h)
        return Linear(c.hidden_size, dtype=self.dtype, name="c_proj")(h)


class GPTNeoBlock(nn.Module):
    config: GPTNeoConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, bias):
        c = self.config
        ln = lambda name: LayerNorm(c.layer_norm_epsilon, dtype=self.dtype, name=name)
        x = x + GPTNeoAttention(c, self.dtype, name="attn")(ln("ln_1")(x), bias)
        return x + GPTNeoMLP(c, self.dtype, name="mlp")(ln("ln_2")(x))


class GPTNeoLM(nn.Module):
    config: GPTNeoConfig
    dtype: jnp.dtype = jnp.float32
    remat: bool = False

    @nn.compact
    def __call__(
        self, input_ids, attention_mask=None, decoder_input_ids=None, decoder_attention_mask=None
    ):
        c = self.config
        T = input_ids.shape[1]
        wte = Embed(c.vocab_size, c.hidden_size, self.dtype, name="wte")
        wpe = Embed(c.max_position_embeddings, c.hidden_size, self.dtype, name="wpe")
        x = wte(input_ids) + wpe(jnp.arange(T)[None])
        global_bias = attention_bias(attention_mask, T, T, causal=True, dtype=jnp.float32)
        biases = {"global": global_bias, "local": local_attention_bias(global_bias, c.window_size)}
        block = nn.remat(GPTNeoBlock) if self.remat else GPTNeoBlock
        for i, kind in enumerate(c.attention_layers):
            x = block(c, self.dtype, name=f"h_{i}")(x, biases[kind])
        x = LayerNorm(c.layer_norm_epsilon, dtype=self.dtype, name="ln_f")(x)
        return wte.attend(x).astype(jnp.float32)


class _Root(nn.Module):
    # HF nests everything under "transformer"; so do we, so paths mirror names.
    config: GPTNeoConfig
    dtype: jnp.dtype = jnp.float32
    remat: bool = False

    @nn.compact
    def __call__(self, *args, **kwargs):
        return GPTNeoLM(self.config, self.dtype, self.remat, name="transformer")(*args, **kwargs)


def _wrap(config: GPTNeoConfig, dtype=jnp.float32, remat: bool = False) -> nn.Module:
    return _Root(config, dtype, remat)


def param_names(c: GPTNeoConfig) -> list[ParamName]:
    names = [
        ParamName("transformer.wte.weight", ("transformer", "wte", "embedding")),
        ParamName("transformer.wpe.weight", ("transformer", "wpe", "embedding")),
        ParamName("transformer.ln_f.weight", ("transformer", "ln_f", "scale")),
        ParamName("transformer.ln_f.bias", ("transformer", "ln_f", "bias")),
        ParamName(
            "lm_head.weight",
            ("transformer", "wte", "embedding"),
            optional=True,
            tied_to="transformer.wte.weight",
        ),
    ]
    for i in range(c.num_layers):
        hf, p = f"transformer.h.{i}", ("transformer", f"h_{i}")
        for ln in ("ln_1", "ln_2"):
            names.append(ParamName(f"{hf}.{ln}.weight", p + (ln, "scale")))
            names.append(ParamName(f"{hf}.{ln}.bias", p + (ln, "bias")))
        att, ap = f"{hf}.attn.attention", p + ("attn", "attention")
        last = i == c.num_layers - 1   # position-local weights: `ParamName.local`
        for lin in ("q_proj", "k_proj", "v_proj", "out_proj"):
            names.append(ParamName(f"{att}.{lin}.weight", ap + (lin, "kernel"), "linear",
                                   local=last and lin in ("q_proj", "out_proj")))
        names.append(ParamName(f"{att}.out_proj.bias", ap + ("out_proj", "bias")))
        for lin in ("c_fc", "c_proj"):
            names.append(ParamName(f"{hf}.mlp.{lin}.weight", p + ("mlp", lin, "kernel"), "linear",
                                   local=last))
            names.append(ParamName(f"{hf}.mlp.{lin}.bias", p + ("mlp", lin, "bias")))
    return names


def default_inner_params(c: GPTNeoConfig) -> list[str]:
    """The reference's GPT-style choice: MLP in/out matrices of the last 3 blocks."""
    return last_blocks("transformer.h.{i}.mlp.{lin}", c.num_layers, ("c_fc", "c_proj"))


ARCH = register(
    Architecture(
        name="gpt_neo",
        model_types=("gpt_neo",),
        seq2seq=False,
        config_from_hf=GPTNeoConfig.from_hf,
        module=_wrap,
        param_names=param_names,
        default_inner_params=default_inner_params,
    )
)

__all__ = ["ARCH", "GPTNeoConfig", "GPTNeoLM", "local_attention_bias"]
