"""Llama-style decoders (Llama, Mistral, Qwen2) as a Flax module, with their Hugging Face names.

One module covers the three families; they differ only in which projections carry biases and
whether attention is restricted to a sliding window (Mistral: every layer; Qwen2: the layers
`layer_types` marks "sliding_attention").
"""

from __future__ import annotations

from dataclasses import dataclass

import flax.linen as nn
import jax
import jax.numpy as jnp

from mend_jax.models.common import (
    Embed,
    Linear,
    RMSNorm,
    TiedHead,
    activation,
    attention_bias,
    dot_product_attention,
    positions_from_mask,
    rotary,
)
from mend_jax.models.names import ParamName, last_blocks
from mend_jax.models.registry import Architecture, register

DEFAULT_ROPE_THETA = 10000.0


@dataclass(frozen=True)
class LlamaConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    hidden_act: str
    rms_norm_eps: float
    rope_theta: float
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    tie_word_embeddings: bool
    # Attention window per layer (None = full causal attention); HF keeps key k for query q
    # iff q - window < k <= q.
    layer_windows: tuple[int | None, ...]

    @classmethod
    def from_hf(cls, c) -> LlamaConfig:
        mt = c.model_type
        if mt not in ("llama", "mistral", "qwen2"):
            raise ValueError(f"LlamaConfig.from_hf: unsupported model_type {mt!r}")
        heads = c.num_attention_heads
        kv_heads = getattr(c, "num_key_value_heads", None) or heads
        if heads % kv_heads:
            raise ValueError(
                f"{mt} config: num_attention_heads={heads} is not a multiple of "
                f"num_key_value_heads={kv_heads}"
            )
        if mt == "qwen2":  # Qwen2 hard-codes q/k/v biases and a bias-free o_proj and MLP
            qkv_bias, o_bias, mlp_bias = True, False, False
        elif mt == "llama":
            qkv_bias = o_bias = bool(getattr(c, "attention_bias", False))
            mlp_bias = bool(getattr(c, "mlp_bias", False))
        else:  # mistral: no biases anywhere
            qkv_bias = o_bias = mlp_bias = False
        return cls(
            model_type=mt,
            vocab_size=c.vocab_size,
            hidden_size=c.hidden_size,
            intermediate_size=c.intermediate_size,
            num_hidden_layers=c.num_hidden_layers,
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            head_dim=getattr(c, "head_dim", None) or c.hidden_size // heads,
            hidden_act=c.hidden_act,
            rms_norm_eps=c.rms_norm_eps,
            rope_theta=_rope_theta(c),
            qkv_bias=qkv_bias,
            o_bias=o_bias,
            mlp_bias=mlp_bias,
            tie_word_embeddings=bool(getattr(c, "tie_word_embeddings", False)),
            layer_windows=_layer_windows(c),
        )


def _rope_theta(c) -> float:
    """rope_theta of a default (unscaled) RoPE; scaled variants are refused.

    transformers 5.x keeps it in `rope_parameters` (with `rope_scaling` as an alias); 4.x has a
    `rope_theta` attribute and an optional `rope_scaling` dict.
    """
    params = getattr(c, "rope_parameters", None) or getattr(c, "rope_scaling", None) or {}
    if not isinstance(params, dict):
        raise TypeError(f"{c.model_type} config: rope_parameters must be a dict, got {params!r}")
    if params and "full_attention" in params:  # per-layer-type rope dicts (5.x)
        params = params["full_attention"]
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type != "default":
        raise ValueError(
            f"{c.model_type} config: rope_type {rope_type!r} ({params}) is not supported; "
            "only the default, unscaled RoPE is implemented"
        )
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError(f"{c.model_type} config: partial_rotary_factor is not supported")
    theta = params.get("rope_theta", getattr(c, "rope_theta", None))
    return float(theta if theta is not None else DEFAULT_ROPE_THETA)


def _layer_windows(c) -> tuple[int | None, ...]:
    n = c.num_hidden_layers
    window = getattr(c, "sliding_window", None)
    if c.model_type == "mistral":
        return (window,) * n
    if c.model_type == "qwen2":
        if window is None or not getattr(c, "use_sliding_window", False):
            return (None,) * n
        types = getattr(c, "layer_types", None) or ["full_attention"] * n
        return tuple(window if t == "sliding_attention" else None for t in types)
    return (None,) * n


class LlamaAttention(nn.Module):
    config: LlamaConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, bias, positions):
        c = self.config
        B, T, _ = x.shape
        H, KV, hd = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        q = Linear(H * hd, c.qkv_bias, self.dtype, name="q_proj")(x).reshape(B, T, H, hd)
        k = Linear(KV * hd, c.qkv_bias, self.dtype, name="k_proj")(x).reshape(B, T, KV, hd)
        v = Linear(KV * hd, c.qkv_bias, self.dtype, name="v_proj")(x).reshape(B, T, KV, hd)
        q = rotary(q, positions, hd, c.rope_theta, interleaved=False)
        k = rotary(k, positions, hd, c.rope_theta, interleaved=False)
        out = dot_product_attention(q, k, v, bias).reshape(B, T, H * hd)
        return Linear(c.hidden_size, c.o_bias, self.dtype, name="o_proj")(out)


class LlamaMLP(nn.Module):
    config: LlamaConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        c = self.config
        lin = lambda d, name: Linear(d, c.mlp_bias, self.dtype, name=name)
        gate = activation(c.hidden_act)(lin(c.intermediate_size, "gate_proj")(x))
        return lin(c.hidden_size, "down_proj")(gate * lin(c.intermediate_size, "up_proj")(x))


class LlamaDecoderLayer(nn.Module):
    config: LlamaConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, bias, positions):
        c = self.config
        norm = lambda name: RMSNorm(c.rms_norm_eps, self.dtype, name=name)
        attn = LlamaAttention(c, self.dtype, name="self_attn")
        x = x + attn(norm("input_layernorm")(x), bias, positions)
        return x + LlamaMLP(c, self.dtype, name="mlp")(norm("post_attention_layernorm")(x))


def _window_bias(bias: jax.Array, window: int | None) -> jax.Array:
    """Restrict an additive [B,1,T,T] bias to keys within `window` positions of the query."""
    if window is None:
        return bias
    T = bias.shape[-1]
    q, k = jnp.arange(T)[:, None], jnp.arange(T)[None, :]
    # jnp.where (not +) so a masked entry stays finite: finfo.min + finfo.min would be -inf.
    return jnp.where(q - k < window, bias, jnp.finfo(bias.dtype).min)


class LlamaModel(nn.Module):
    """The decoder stack (HF `model.*`): embeddings, layers, final norm; returns hidden states."""

    config: LlamaConfig
    dtype: jnp.dtype = jnp.float32
    remat: bool = False

    @nn.compact
    def __call__(self, input_ids, attention_mask=None):
        c = self.config
        B, T = input_ids.shape
        x = Embed(c.vocab_size, c.hidden_size, self.dtype, name="embed_tokens")(input_ids)
        positions = positions_from_mask(attention_mask, B, T)
        full = attention_bias(attention_mask, T, T, causal=True, dtype=jnp.float32)
        biases = {w: _window_bias(full, w) for w in set(c.layer_windows)}
        layer = nn.remat(LlamaDecoderLayer) if self.remat else LlamaDecoderLayer
        for i in range(c.num_hidden_layers):
            x = layer(c, self.dtype, name=f"layers_{i}")(x, biases[c.layer_windows[i]], positions)
        return RMSNorm(c.rms_norm_eps, self.dtype, name="norm")(x)


class LlamaForCausalLM(nn.Module):
    config: LlamaConfig
    dtype: jnp.dtype = jnp.float32
    remat: bool = False

    @nn.compact
    def __call__(
        self, input_ids, attention_mask=None, decoder_input_ids=None, decoder_attention_mask=None
    ):
        c = self.config
        model = LlamaModel(c, self.dtype, self.remat, name="model")
        x = model(input_ids, attention_mask)
        if c.tie_word_embeddings:
            # Reuse the bound embedding table of the decoder stack.
            table = model.variables["params"]["embed_tokens"]["embedding"]
            logits = TiedHead(name="tied_head")(x, table)
        else:
            logits = Linear(c.vocab_size, False, self.dtype, name="lm_head")(x)
        return logits.astype(jnp.float32)


def _module(config: LlamaConfig, dtype=jnp.float32, remat: bool = False) -> nn.Module:
    return LlamaForCausalLM(config, dtype, remat)


def param_names(c: LlamaConfig) -> list[ParamName]:
    embed = ("model", "embed_tokens", "embedding")
    names = [
        ParamName("model.embed_tokens.weight", embed),
        ParamName("model.norm.weight", ("model", "norm", "scale")),
    ]
    if c.tie_word_embeddings:
        names.append(
            ParamName("lm_head.weight", embed, optional=True, tied_to="model.embed_tokens.weight")
        )
    else:
        names.append(ParamName("lm_head.weight", ("lm_head", "kernel"), "linear"))
    linears = [
        ("self_attn", "q_proj", c.qkv_bias),
        ("self_attn", "k_proj", c.qkv_bias),
        ("self_attn", "v_proj", c.qkv_bias),
        ("self_attn", "o_proj", c.o_bias),
        ("mlp", "gate_proj", c.mlp_bias),
        ("mlp", "up_proj", c.mlp_bias),
        ("mlp", "down_proj", c.mlp_bias),
    ]
    for i in range(c.num_hidden_layers):
        hf, p = f"model.layers.{i}", ("model", f"layers_{i}")
        for norm in ("input_layernorm", "post_attention_layernorm"):
            names.append(ParamName(f"{hf}.{norm}.weight", p + (norm, "scale")))
        for sub, lin, has_bias in linears:
            local = i == c.num_hidden_layers - 1 and (sub == "mlp" or lin in ("q_proj", "o_proj"))
            names.append(ParamName(f"{hf}.{sub}.{lin}.weight", p + (sub, lin, "kernel"), "linear",
                                   local=local))
            if has_bias:
                names.append(ParamName(f"{hf}.{sub}.{lin}.bias", p + (sub, lin, "bias")))
    return names


def default_inner_params(c: LlamaConfig) -> list[str]:
    """The reference's decoder choice, MLP in/out matrices of the last 3 layers (SwiGLU: up,
    down)."""
    return last_blocks("model.layers.{i}.mlp.{lin}", c.num_hidden_layers, ("up_proj", "down_proj"))


ARCH = register(
    Architecture(
        name="llama",
        model_types=("llama", "mistral", "qwen2"),
        seq2seq=False,
        config_from_hf=LlamaConfig.from_hf,
        module=_module,
        param_names=param_names,
        default_inner_params=default_inner_params,
    )
)

__all__ = ["ARCH", "LlamaConfig", "LlamaForCausalLM"]
