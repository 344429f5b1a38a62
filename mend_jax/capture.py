"""(u, δ) capture as a function transform.

For every edited dense layer h = W u, the fine-tuning gradient is ∇_W L = Σ_t u_t δ_tᵀ (our kernels
are [d_in, d_out]), with u_t the layer input and δ_t = ∂L/∂h_t. We get both from ONE forward and
backward pass without hooks: a Flax method interceptor makes the chosen `Linear` modules `sow` their
inputs and `perturb` their outputs with a zero variable; the gradient w.r.t. that zero
variable is δ.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass

import flax.linen as nn
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from mend_jax.metrics import IGNORE, POSITIONS, logit_view, masked_nll, shift_labels
from mend_jax.models.common import Linear, head_at
from mend_jax.models.model import model_inputs
from mend_jax.models.names import EditedWeight, ParamName

INPUTS = "layer_inputs"
OUTPUT_GRADS = "output_grads"


@dataclass(frozen=True)
class Captured:
    """Per edited weight: token-flattened inputs, output gradients, the real-token mask and the
    answer-token mask (positions whose output predicts a target token; MALMEN's `token: ans`)."""

    layer_inputs: Float[Array, "tokens d_in"]
    output_grads: Float[Array, "tokens d_out"]
    token_mask: Float[Array, "tokens"]  # noqa: F821 (a jaxtyping dimension, not a name)
    answer_mask: Float[Array, "tokens"] | None = None  # noqa: F821


jax.tree_util.register_dataclass(
    Captured, data_fields=["layer_inputs", "output_grads", "token_mask", "answer_mask"],
    meta_fields=[]
)


def _interceptor(module_paths: frozenset[tuple[str, ...]]):
    def intercept(next_fun, args, kwargs, context):
        module = context.module
        if (context.method_name != "__call__" or not isinstance(module, Linear)
                or tuple(module.path) not in module_paths):
            return next_fun(*args, **kwargs)
        module.sow("intermediates", INPUTS, args[0])
        return module.perturb(OUTPUT_GRADS, next_fun(*args, **kwargs))

    return intercept


def labelled_logits(model, params, batch: Mapping[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
    """(logits, labels) for the losses and metrics of `mend_jax.metrics`: the full logits and
    labels, or, for a decoder-only batch that carries `logit_positions`, the logits at the
    labelled positions alone and the labels aligned to them (`metrics.logit_view`; every shifted
    metric gives the same values, the output head runs on P + 1 positions instead of T)."""
    view = logit_view(batch) if model.shift_labels else None
    if view is None:
        return model.logits(params, *model_inputs(batch)), batch["labels"]
    return model.logits(params, *model_inputs(batch), positions=view[0]), view[1]


def token_mask_for(param: ParamName | EditedWeight, batch: Mapping[str, jax.Array]) -> jax.Array:
    """Which captured tokens of a weight are real: the mask of the token stream it acts on (the
    name map says which: a T5 decoder's cross-attention k/v act on encoder tokens, BERT's pooler
    and classifier on the [CLS] token alone)."""
    if param.tokens == "first":
        return batch["attention_mask"][:, :1]
    return batch[param.mask_key]


def answer_mask_for(model, param: ParamName | EditedWeight,
                    batch: Mapping[str, jax.Array]) -> jax.Array:
    """The tokens whose output predicts a target token: for a decoder-only model the position
    before each labelled one, for a seq2seq decoder or a masked LM the labelled positions; a
    seq2seq encoder has no answer positions of its own, so all its real tokens count (as
    MALMEN), and so do a classifier's (its one label per example is read from every token)."""
    labels = batch["labels"]
    if model.shift_labels:
        nxt = shift_labels(labels)
        return (nxt != IGNORE) & (batch["attention_mask"] > 0)
    labelled = "decoder" if model.seq2seq else "input"
    if model.targets != "class" and param.tokens == labelled:
        return labels != IGNORE
    return token_mask_for(param, batch) > 0


def capture(
    model,
    params: dict,
    batch: Mapping[str, jax.Array],
    inner_params: Sequence[str | EditedWeight],
    loss_fn: Callable | None = None,
) -> tuple[jax.Array, dict[str, Captured], jax.Array]:
    """One forward/backward pass: (loss, {hf_name: Captured}, logits) (the logits of
    `labelled_logits`: at the labelled positions only when the batch has `logit_positions`).

    `loss_fn(logits, batch)` defaults to the mean NLL of the batch's labels (aligned as
    `model.shift_labels` says; a classifier's labels are [B]). Padding tokens are
    masked; label-masked prompt tokens of decoder-only models keep their (genuinely non-zero) δ,
    so Σ_t u_t δ_tᵀ is exactly the weight gradient.

    `inner_params` are Hugging Face names, or the `EditedWeight`s an editor resolved them to
    when it was built (then nothing is looked up here).
    """
    loss_fn = loss_fn or (
        lambda logits, b: masked_nll(logits, b["labels"], shift=model.shift_labels))
    resolved = [(w.name, w) if isinstance(w, EditedWeight) else (w, model.names.lookup(w))
                for w in inner_params]
    # keyed by the path of the Linear module owning each weight (its kernel's path less the leaf)
    by_module = {weight.path[:-1]: (name, weight) for name, weight in resolved}
    intercept = _interceptor(frozenset(by_module))
    inputs = model_inputs(batch)
    # With `logit_positions` the head runs on the labelled positions only, and the loss reads
    # the labels aligned to them (the same loss; see `labelled_logits`).
    view = logit_view(batch) if model.shift_labels else None
    loss_batch = batch if view is None else {**batch, "labels": view[1]}

    def run(perturbations, mutable):
        variables = {"params": params}
        if perturbations is not None:
            variables["perturbations"] = perturbations
        with nn.intercept_methods(intercept), (
                nullcontext() if view is None else head_at(view[0])):
            return model.module.apply(variables, *inputs, mutable=mutable)

    _, shapes = jax.eval_shape(lambda: run(None, ["perturbations", "intermediates"]))
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes["perturbations"])

    def loss_of_perturbations(perturbations):
        logits, state = run(perturbations, ["intermediates"])
        return loss_fn(logits, loss_batch), (state["intermediates"], logits)

    (loss, (intermediates, logits)), grads = jax.value_and_grad(
        loss_of_perturbations, has_aux=True)(zeros)

    captured = {}
    for path, (name, weight) in by_module.items():
        u = _get(intermediates, path)[INPUTS][0]
        d = _get(grads, path)[OUTPUT_GRADS]
        mask = token_mask_for(weight, batch)
        answer = answer_mask_for(model, weight, batch) if "labels" in batch else None
        if view is not None and weight.local and weight.tokens == "input":
            # δ is zero off the positions whose logits the loss reads: keep those rows alone
            u, d, mask, answer = _at_positions(batch[POSITIONS], u, d, mask, answer)
        captured[name] = Captured(
            layer_inputs=u.reshape(-1, u.shape[-1]),       # B*T d_in (B*P: at the positions)
            output_grads=d.reshape(-1, d.shape[-1]),       # B*T d_out
            token_mask=mask.reshape(-1).astype(jnp.float32),
            answer_mask=None if answer is None else answer.reshape(-1).astype(jnp.float32),
        )
    return loss, captured, logits


def _at_positions(positions: jax.Array, *arrays):
    """Each [B, T, ...] array (or None) gathered at `positions` [B, P] (padded with -1: those
    entries are zeroed), [B, P, ...]."""
    at, valid = jnp.maximum(positions, 0), positions >= 0
    out = []
    for a in arrays:
        if a is None:
            out.append(None)
            continue
        extra = (1,) * (a.ndim - 2)
        g = jnp.take_along_axis(a, at.reshape(at.shape + extra), axis=1)
        out.append(g * valid.reshape(valid.shape + extra).astype(g.dtype))
    return out


def _get(tree, path):
    for key in path:
        tree = tree[key]
    return tree


def pseudo_gradient(u: jax.Array, delta: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """Σ_t m_t u_t δ_tᵀ in kernel layout [d_in, d_out]."""
    if mask is not None:
        u = u * mask[:, None].astype(u.dtype)
    return jnp.einsum("ti,to->io", u, delta)
