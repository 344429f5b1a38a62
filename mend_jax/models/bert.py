"""BERT (Devlin et al. 2019) as a Flax module, with its Hugging Face names.

A bidirectional post-LayerNorm encoder with one of two heads, read from the checkpoint's
`architectures`: `BertForMaskedLM` (logits [B, T, V], decoder tied to the word embeddings) or
`BertForSequenceClassification` (pooler on [CLS], then `classifier`: logits [B, num_labels]; the
paper's FEVER model). Token type ids are not an input: every token is segment 0, as transformers
assumes when none are passed.
"""

from __future__ import annotations

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
from mend_jax.models.names import ParamName, last_blocks
from mend_jax.models.registry import Architecture, register

# transformers class -> our head. BertForPreTraining checkpoints (bert-base-uncased's original
# format) carry the masked-LM head plus an NSP head that no edit uses.
HEADS = {
    "BertForMaskedLM": "masked_lm",
    "BertForPreTraining": "masked_lm",
    "BertForSequenceClassification": "classifier",
}


@dataclass(frozen=True)
class BertConfig:
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    hidden_act: str
    max_position_embeddings: int
    type_vocab_size: int
    layer_norm_eps: float
    head: str                  # "masked_lm" | "classifier"
    num_labels: int

    @classmethod
    def from_hf(cls, c) -> BertConfig:
        archs = list(getattr(c, "architectures", None) or [])
        # A config without `architectures` (built in code) gets the pretraining head.
        known = [HEADS[a] for a in archs if a in HEADS] or ([] if archs else ["masked_lm"])
        if not known:
            raise ValueError(f"BERT architectures {archs} are not supported; supported: "
                             f"{sorted(HEADS)}")
        if getattr(c, "is_decoder", False):
            raise ValueError("BERT with is_decoder=True (causal attention) is not supported; "
                             "the supported heads are bidirectional encoders")
        if not getattr(c, "tie_word_embeddings", True) and known[0] == "masked_lm":
            # Untied, transformers 5 also unties the decoder's bias from cls.predictions.bias;
            # no released BERT checkpoint does this.
            raise ValueError("BERT masked LM with tie_word_embeddings=False is not supported")
        if getattr(c, "position_embedding_type", "absolute") != "absolute":
            raise ValueError(f"BERT position_embedding_type={c.position_embedding_type!r} is not "
                             "supported; only learned absolute positions are")
        if not isinstance(c.hidden_act, str):
            raise ValueError(f"BERT hidden_act must be an activation name, got {c.hidden_act!r}")
        return cls(
            vocab_size=c.vocab_size,
            hidden_size=c.hidden_size,
            num_hidden_layers=c.num_hidden_layers,
            num_attention_heads=c.num_attention_heads,
            intermediate_size=c.intermediate_size,
            hidden_act=c.hidden_act,
            max_position_embeddings=c.max_position_embeddings,
            type_vocab_size=c.type_vocab_size,
            layer_norm_eps=c.layer_norm_eps,
            head=known[0],
            num_labels=c.num_labels,
        )


class BertSelfAttention(nn.Module):
    config: BertConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, bias):
        c = self.config
        B, T, D = x.shape
        hd = D // c.num_attention_heads
        q, k, v = (Linear(D, dtype=self.dtype, name=n)(x).reshape(B, T, c.num_attention_heads, hd)
                   for n in ("query", "key", "value"))
        return dot_product_attention(q, k, v, bias).reshape(B, T, D)


class BertResidualOutput(nn.Module):
    """LayerNorm(dense(h) + residual): transformers' BertSelfOutput and BertOutput (post-LN)."""

    features: int
    eps: float
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, h, residual):
        h = Linear(self.features, dtype=self.dtype, name="dense")(h)
        return LayerNorm(self.eps, dtype=self.dtype, name="LayerNorm")(h + residual)


class BertAttention(nn.Module):
    config: BertConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, bias):
        c = self.config
        h = BertSelfAttention(c, self.dtype, name="self")(x, bias)
        return BertResidualOutput(c.hidden_size, c.layer_norm_eps, self.dtype, name="output")(h, x)


class BertIntermediate(nn.Module):
    config: BertConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        c = self.config
        return activation(c.hidden_act)(
            Linear(c.intermediate_size, dtype=self.dtype, name="dense")(x))


class BertLayer(nn.Module):
    config: BertConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, bias):
        c = self.config
        x = BertAttention(c, self.dtype, name="attention")(x, bias)
        h = BertIntermediate(c, self.dtype, name="intermediate")(x)
        return BertResidualOutput(c.hidden_size, c.layer_norm_eps, self.dtype, name="output")(h, x)


class BertEmbeddings(nn.Module):
    config: BertConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, input_ids):
        c = self.config
        embed = lambda n, name: Embed(n, c.hidden_size, self.dtype, name=name)  # noqa: E731
        # Positions count from 0 whatever the padding (right padding keeps real tokens first).
        x = (embed(c.vocab_size, "word_embeddings")(input_ids)
             + embed(c.type_vocab_size, "token_type_embeddings")(jnp.zeros_like(input_ids))
             + embed(c.max_position_embeddings, "position_embeddings")(
                 jnp.arange(input_ids.shape[1])[None]))
        return LayerNorm(c.layer_norm_eps, dtype=self.dtype, name="LayerNorm")(x)


class BertEncoder(nn.Module):
    config: BertConfig
    dtype: jnp.dtype = jnp.float32
    remat: bool = False

    @nn.compact
    def __call__(self, x, bias):
        block = nn.remat(BertLayer) if self.remat else BertLayer
        for i in range(self.config.num_hidden_layers):
            x = block(self.config, self.dtype, name=f"layer_{i}")(x, bias)
        return x


class BertPooler(nn.Module):
    """tanh(dense(h_[CLS])): the classifier reads one token per example."""

    config: BertConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, hidden: Float[Array, "B T D"]) -> Float[Array, "B D"]:
        dense = Linear(self.config.hidden_size, dtype=self.dtype, name="dense")
        return jnp.tanh(dense(hidden[:, 0]))


class BertModel(nn.Module):
    """Embeddings, encoder and (for the classifier) pooler, under transformers' `bert.` prefix.

    Returns the last hidden states [B, T, D] and, when pooling, the pooled [CLS] state [B, D].
    """

    config: BertConfig
    dtype: jnp.dtype = jnp.float32
    remat: bool = False

    @nn.compact
    def __call__(self, input_ids, attention_mask):
        c = self.config
        T = input_ids.shape[1]
        bias = attention_bias(attention_mask, T, T, causal=False, dtype=jnp.float32)
        x = BertEmbeddings(c, self.dtype, name="embeddings")(input_ids)
        hidden = BertEncoder(c, self.dtype, self.remat, name="encoder")(x, bias)
        if c.head != "classifier":
            return hidden, None
        return hidden, BertPooler(c, self.dtype, name="pooler")(hidden)


class BertPredictionHeadTransform(nn.Module):
    config: BertConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, hidden):
        c = self.config
        h = activation(c.hidden_act)(Linear(c.hidden_size, dtype=self.dtype, name="dense")(hidden))
        return LayerNorm(c.layer_norm_eps, dtype=self.dtype, name="LayerNorm")(h)


class BertLMPredictionHead(nn.Module):
    """transformers' `cls.predictions`: transform, then the decoder tied to the word embeddings,
    plus an output-only bias."""

    config: BertConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, hidden, word_embeddings: Float[Array, "V D"]):
        c = self.config
        h = BertPredictionHeadTransform(c, self.dtype, name="transform")(hidden)
        logits = jnp.einsum("btd,vd->btv", h, word_embeddings.astype(h.dtype))
        bias = self.param("bias", nn.initializers.zeros, (c.vocab_size,), self.dtype)
        return logits + bias.astype(logits.dtype)


class _OnlyMLMHead(nn.Module):
    # transformers' BertOnlyMLMHead: only a scope, so that paths read cls/predictions/...
    config: BertConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, hidden, word_embeddings):
        return BertLMPredictionHead(self.config, self.dtype, name="predictions")(
            hidden, word_embeddings)


class BertForEditing(nn.Module):
    """The whole checkpoint: `bert` plus the head its config names; float32 logits."""

    config: BertConfig
    dtype: jnp.dtype = jnp.float32
    remat: bool = False

    @nn.compact
    def __call__(
        self,
        input_ids: Int[Array, "B T"],
        attention_mask: Int[Array, "B T"] | None = None,
        decoder_input_ids=None,            # an encoder-only model has no decoder inputs
        decoder_attention_mask=None,
    ) -> Float[Array, "B T V"] | Float[Array, "B num_labels"]:
        c = self.config
        bert = BertModel(c, self.dtype, self.remat, name="bert")
        hidden, pooled = bert(input_ids, attention_mask)
        if c.head == "classifier":
            logits = Linear(c.num_labels, dtype=self.dtype, name="classifier")(pooled)
        else:
            table = bert.variables["params"]["embeddings"]["word_embeddings"]["embedding"]
            logits = _OnlyMLMHead(c, self.dtype, name="cls")(hidden, table)
        return logits.astype(jnp.float32)


def _module(config: BertConfig, dtype=jnp.float32, remat: bool = False) -> nn.Module:
    return BertForEditing(config, dtype, remat)


def _layer_norm(hf: str, path: tuple[str, ...]) -> list[ParamName]:
    # Checkpoints converted from the original TensorFlow release (bert-base-uncased among them)
    # name LayerNorm parameters gamma/beta; transformers renames them on load, and so do we.
    return [ParamName(f"{hf}.LayerNorm.weight", path + ("LayerNorm", "scale"),
                      fallback=f"{hf}.LayerNorm.gamma"),
            ParamName(f"{hf}.LayerNorm.bias", path + ("LayerNorm", "bias"),
                      fallback=f"{hf}.LayerNorm.beta")]


def _dense(hf: str, path: tuple[str, ...], tokens: str = "input") -> list[ParamName]:
    return [ParamName(f"{hf}.weight", path + ("kernel",), "linear", tokens=tokens),
            ParamName(f"{hf}.bias", path + ("bias",), tokens=tokens)]


def param_names(c: BertConfig) -> list[ParamName]:
    emb = ("bert", "embeddings")
    words = "bert.embeddings.word_embeddings.weight"
    names = [ParamName(f"bert.embeddings.{e}.weight", emb + (e, "embedding"))
             for e in ("word_embeddings", "position_embeddings", "token_type_embeddings")]
    names += _layer_norm("bert.embeddings", emb)
    for i in range(c.num_hidden_layers):
        hf, p = f"bert.encoder.layer.{i}", ("bert", "encoder", f"layer_{i}")
        for lin in ("query", "key", "value"):
            names += _dense(f"{hf}.attention.self.{lin}", p + ("attention", "self", lin))
        names += _dense(f"{hf}.attention.output.dense", p + ("attention", "output", "dense"))
        names += _layer_norm(f"{hf}.attention.output", p + ("attention", "output"))
        names += _dense(f"{hf}.intermediate.dense", p + ("intermediate", "dense"))
        names += _dense(f"{hf}.output.dense", p + ("output", "dense"))
        names += _layer_norm(f"{hf}.output", p + ("output",))
    if c.head == "classifier":
        # The pooler and the classifier act on one token per example, [CLS].
        names += _dense("bert.pooler.dense", ("bert", "pooler", "dense"), tokens="first")
        names += _dense("classifier", ("classifier",), tokens="first")
        return names
    head = ("cls", "predictions")
    names += _dense("cls.predictions.transform.dense", head + ("transform", "dense"))
    names += _layer_norm("cls.predictions.transform", head + ("transform",))
    names.append(ParamName("cls.predictions.bias", head + ("bias",)))
    # transformers ties the decoder to the word embeddings and its bias to cls.predictions.bias;
    # checkpoints hold the copies or not.
    names.append(ParamName("cls.predictions.decoder.weight", emb + ("word_embeddings",
                           "embedding"), optional=True, tied_to=words))
    names.append(ParamName("cls.predictions.decoder.bias", head + ("bias",), optional=True,
                           tied_to="cls.predictions.bias"))
    return names


def default_inner_params(c: BertConfig) -> list[str]:
    """The reference's FEVER choice (bert-base.yaml): intermediate and output dense matrices of
    the last 2 encoder layers."""
    return last_blocks("bert.encoder.layer.{i}.{lin}", c.num_hidden_layers,
                       ("intermediate.dense", "output.dense"), k=2)


def targets(c: BertConfig) -> str:
    return "class" if c.head == "classifier" else "token"


ARCH = register(
    Architecture(
        name="bert",
        model_types=("bert",),
        seq2seq=False,
        config_from_hf=BertConfig.from_hf,
        module=_module,
        param_names=param_names,
        default_inner_params=default_inner_params,
        targets=targets,
    )
)

__all__ = ["ARCH", "BertConfig", "BertForEditing"]
