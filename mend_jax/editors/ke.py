"""KE (KnowledgeEditor, De Cao et al. 2021): a hyper-network that reads the edit and shapes its
gradient into the update, behind the same `edit(state, model_params, batch)` interface as MEND.

As the reference (`algs/efk.py` of eric-mitchell/mend, adapted from De Cao's `OneShotLearner`):
the edit's tokens go through an embedding (initialised from the model's input embeddings), a
one-layer bidirectional LSTM and a tanh layer to a condition vector c; for each edited weight
W [d_in, d_out] a small network (weight-normalised Linear, tanh, weight-normalised Linear) maps c
to two rank-1 matrices and a gate,

    A = softmax(a_row)ᵀ a_col,  B = softmax(b_row)ᵀ b_col,  s = max_scale · sigmoid(n),
    ΔW = s · (∇_W L ⊙ A + B),

and W' = W − ΔW. With k edits in one call every edit gets its own c, A, B and s, and its own
share G_i of the gradient (the batch loss summed over its tokens): ΔW = Σ_i s_i (G_i ⊙ A_i + B_i).
An editor state is `{"params": {"nets": {"conditioner": ..., "weights": ...}}, "stats": {}}`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from mend_jax.capture import Captured, capture
from mend_jax.editing import check_edit_batch
from mend_jax.editors.mend import EditorLayout, make_layout
from mend_jax.metrics import IGNORE
from mend_jax.models.names import get_path, set_path


@dataclass(frozen=True)
class KEConfig:
    """Hyper-network sizes; defaults are the reference's (OneShotLearner as EFK builds it)."""

    hidden_dim: int = 512       # LSTM hidden size per direction, and each weight network's hidden
    condition_dim: int = 768    # size of the edit's encoding c
    max_scale: float = 1.0      # EFK passes 1 (OneShotLearner's own default is 1e-3)

    def __post_init__(self):
        if self.hidden_dim < 1 or self.condition_dim < 1:
            raise ValueError(f"hidden_dim and condition_dim must be >= 1, got "
                             f"{self.hidden_dim}, {self.condition_dim}")
        if self.max_scale <= 0:
            raise ValueError(f"max_scale must be > 0, got {self.max_scale}")


# ----------------------------------------------------------------------------- layers
def _uniform(key, shape, bound):
    return jax.random.uniform(key, shape, jnp.float32, -bound, bound)


def init_linear(key, d_in: int, d_out: int, weight_norm: bool = False) -> dict:
    """torch.nn.Linear's init (U(±1/√d_in) for weight and bias); with `weight_norm`, torch's
    weight_norm reparametrisation w = g · v / ‖v‖ per output unit, g starting at ‖v‖."""
    kw, kb = jax.random.split(key)
    bound = d_in**-0.5
    w = _uniform(kw, (d_in, d_out), bound)
    layer = {"b": _uniform(kb, (d_out,), bound)}
    if weight_norm:
        layer.update(v=w, g=jnp.linalg.norm(w, axis=0))
    else:
        layer["w"] = w
    return layer


def apply_linear(layer: dict, x: jax.Array) -> jax.Array:
    if "v" in layer:
        w = layer["v"] * (layer["g"] / jnp.linalg.norm(layer["v"], axis=0))
    else:
        w = layer["w"]
    return x @ w + layer["b"]


def init_lstm(key, d_in: int, hidden: int) -> dict:
    """One direction of torch.nn.LSTM (gates i, f, g, o; U(±1/√hidden) init, one bias)."""
    ki, kh, kb = jax.random.split(key, 3)
    bound = hidden**-0.5
    return {"w_in": _uniform(ki, (d_in, 4 * hidden), bound),
            "w_hidden": _uniform(kh, (hidden, 4 * hidden), bound),
            "b": _uniform(kb, (4 * hidden,), bound)}


def run_lstm(p: dict, x: Float[Array, "B T E"], mask: Float[Array, "B T"],
             reverse: bool) -> Float[Array, "B H"]:
    """The final hidden state over the real tokens: masked steps carry the state unchanged, so
    it equals a packed sequence's (forward: at the last real token; reverse: at the first)."""
    hidden = p["w_hidden"].shape[0]
    zeros = jnp.zeros((x.shape[0], hidden), jnp.float32)

    def cell(carry, inputs):
        h, c = carry
        x_t, m_t = inputs
        i, f, g, o = jnp.split(x_t @ p["w_in"] + h @ p["w_hidden"] + p["b"], 4, -1)
        c_new = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
        h_new = jax.nn.sigmoid(o) * jnp.tanh(c_new)
        m = m_t[:, None]
        return (m * h_new + (1 - m) * h, m * c_new + (1 - m) * c), None

    (h, _), _ = jax.lax.scan(cell, (zeros, zeros), (jnp.swapaxes(x, 0, 1), mask.T),
                             reverse=reverse)
    return h


# ----------------------------------------------------------------------------- the editor
def input_embedding_path(model) -> tuple[str, ...]:
    """Pytree path of the model's token embedding table [vocab, d_model] (the conditioner's
    initial embeddings, as the reference's `wte` / `shared`)."""
    vocab = model.config.vocab_size
    for name in model.names.names:
        if name.tied_to is None and name.path[-1] == "embedding":
            leaf = get_path(model.params, name.path)
            if leaf.ndim == 2 and leaf.shape[0] == vocab:
                return name.path
    raise ValueError(f"{model.hf_config.model_type}: no token embedding [vocab={vocab}, d] found "
                     "to initialise KE's conditioner")


def condition_tokens(model, batch: Mapping[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
    """(token ids [B, L], mask [B, L]) the edit is conditioned on: the edit's own tokens, prompt
    and target (for a seq2seq model the encoder tokens, then the target tokens)."""
    if not model.seq2seq:
        return batch["input_ids"], batch["attention_mask"].astype(jnp.float32)
    labels = batch["labels"]
    ids = jnp.concatenate([batch["input_ids"], jnp.where(labels != IGNORE, labels, 0)], 1)
    mask = jnp.concatenate([batch["attention_mask"].astype(jnp.float32),
                            (labels != IGNORE).astype(jnp.float32)], 1)
    return ids, mask


class KE:
    """KnowledgeEditor for one model and one list of edited weights (static configuration)."""

    def __init__(self, model, inner_params: Sequence[str] | None = None,
                 config: KEConfig | None = None):
        self.model = model
        self.config = config or KEConfig()
        inner = list(inner_params) if inner_params is not None else model.default_inner_params()
        # One network per weight (the reference's ConditionedParameter), never shared.
        self.layout: EditorLayout = make_layout(model, inner, shared=False)
        self.embedding_path = input_embedding_path(model)

    def init(self, key: jax.Array) -> dict:
        cfg, lay = self.config, self.layout
        # A copy (jnp.array copies): the state must not alias the model's buffers, which a
        # training step donating the state would otherwise invalidate.
        emb = jnp.array(get_path(self.model.params, self.embedding_path), jnp.float32)
        k_fwd, k_bwd, k_out, k_nets = jax.random.split(key, 4)
        conditioner = {
            "embedding": emb,
            "lstm_fwd": init_lstm(k_fwd, emb.shape[1], cfg.hidden_dim),
            "lstm_bwd": init_lstm(k_bwd, emb.shape[1], cfg.hidden_dim),
            "out": init_linear(k_out, 2 * cfg.hidden_dim, cfg.condition_dim),
        }
        weights = {}
        for group, (d_in, d_out), k in zip(lay.groups, lay.shapes,
                                           jax.random.split(k_nets, len(lay.groups))):
            k1, k2 = jax.random.split(k)
            weights[group] = {
                "hidden": init_linear(k1, cfg.condition_dim, cfg.hidden_dim, weight_norm=True),
                "out": init_linear(k2, cfg.hidden_dim, 2 * (d_in + d_out) + 1, weight_norm=True),
            }
        return {"params": {"nets": {"conditioner": conditioner, "weights": weights}},
                "stats": {}}

    # -- the hyper-network
    def condition(self, params: dict, ids: Int[Array, "B L"],
                  mask: Float[Array, "B L"]) -> Float[Array, "B C"]:
        """The edit's encoding c: embeddings, bidirectional LSTM, tanh layer."""
        p = params["nets"]["conditioner"]
        x = p["embedding"][ids]
        h = jnp.concatenate([run_lstm(p["lstm_fwd"], x, mask, reverse=False),
                             run_lstm(p["lstm_bwd"], x, mask, reverse=True)], -1)
        return jnp.tanh(apply_linear(p["out"], h))

    def factors(self, params: dict, cond: Float[Array, "B C"], name: str) -> dict:
        """Per edit: gate s [B], mask factors a_row [B, d_in] (softmaxed), a_col [B, d_out] and
        offset factors b_row, b_col, so that A_i = a_row_i a_col_iᵀ and B_i = b_row_i b_col_iᵀ.

        The softmax runs over the input side, as the reference's does for GPT-2's Conv1D weights
        (stored [d_in, d_out]); for a torch Linear weight ([d_out, d_in]) the reference's runs
        over the output side."""
        weight = self.layout.weight(name)
        d_in, d_out = weight.shape
        net = params["nets"]["weights"][weight.group]
        out = apply_linear(net["out"], jnp.tanh(apply_linear(net["hidden"], cond)))
        a_col, a_row, b_col, b_row, gate = jnp.split(
            out, [d_out, d_out + d_in, 2 * d_out + d_in, 2 * (d_out + d_in)], -1)
        return {"scale": self.config.max_scale * jax.nn.sigmoid(gate[:, 0]),
                "a_row": jax.nn.softmax(a_row, -1), "a_col": a_col,
                "b_row": jax.nn.softmax(b_row, -1), "b_col": b_col}

    def weight_update(self, f: dict, cap: Captured, n_rows: int,
                      rows: Float[Array, "B"]) -> Float[Array, "d_in d_out"]:  # noqa: F821
        """Σ_i s_i (G_i ⊙ A_i + B_i) over the edits i, with G_i = Σ_{t in i} u_t δ_tᵀ.

        G_i ⊙ (a bᵀ) = Σ_t (a ⊙ u_t)(b ⊙ δ_t)ᵀ, so no per-edit gradient is materialised. Rows
        without a label (padding rows of a batch) get s_i = 0."""
        scale = f["scale"] * rows
        u = cap.layer_inputs.astype(jnp.float32) * cap.token_mask[:, None]
        u = u.reshape(n_rows, -1, u.shape[-1])                              # B T d_in
        d = cap.output_grads.astype(jnp.float32).reshape(n_rows, -1, cap.output_grads.shape[-1])
        masked_grad = jnp.einsum("bti,bto->io", u * (scale[:, None] * f["a_row"])[:, None],
                                 d * f["a_col"][:, None])
        offset = jnp.einsum("b,bi,bo->io", scale, f["b_row"], f["b_col"])
        return masked_grad + offset

    def apply_updates(self, model_params: dict, updates: Mapping[str, jax.Array]) -> dict:
        """W' = W − ΔW for every edited weight (the reference adds; see the README)."""
        new = model_params
        for name, update in updates.items():
            path = self.layout.weight(name).path
            w = get_path(model_params, path)
            new = set_path(new, path, (w.astype(jnp.float32) - update).astype(w.dtype))
        return new

    def edit_with_stats(self, editor_state: dict, model_params: dict, edit_batch,
                        train: bool = False) -> tuple[dict, dict, jax.Array]:
        """(new model params, stats (none: returned unchanged), pre-edit loss)."""
        del train  # no running statistics
        params = editor_state["params"]
        loss, captured, _ = capture(self.model, jax.lax.stop_gradient(model_params), edit_batch,
                                    self.layout.weights)
        captured = jax.lax.stop_gradient(captured)
        cond = self.condition(params, *condition_tokens(self.model, edit_batch))
        n_rows = edit_batch["input_ids"].shape[0]
        labelled = (edit_batch["labels"] != IGNORE).reshape(n_rows, -1)
        rows = jnp.any(labelled, -1).astype(jnp.float32)
        updates = {name: self.weight_update(self.factors(params, cond, name), captured[name],
                                            n_rows, rows)
                   for name in self.layout.inner_params}
        return self.apply_updates(model_params, updates), editor_state["stats"], loss

    def edit(self, editor_state: dict, model_params: dict, edit_batch) -> dict:
        """Pure, jit-able edit of one request or k requests (each conditioned on its own)."""
        check_edit_batch(self.model, edit_batch)
        return self.edit_with_stats(editor_state, model_params, edit_batch)[0]
