"""ENN (Editable Neural Networks, Sinitsin et al. 2020) behind the same `edit` interface as MEND.

ENN meta-learns the model itself: the edited weights (a copy, `inner_params`) and one step size
per weight (`edit_lrs`) are trained so that `n_edit_steps` plain gradient steps on the edit's
NLL make the edit, while the edited model stays close to the unedited one on unrelated inputs
and the meta-learned model stays close to the original base model (the trainer's `c_base` term).
As the reference (`algs/enn.py` of eric-mitchell/mend): SGD with per-weight learning rates,
differentiated through (second order) unless `first_order`.

An editor state is `{"params": {"inner_params": {name: W}, "edit_lrs": {name: α}}, "stats": {}}`;
`edit(state, model_params, batch)` substitutes the learned weights into `model_params`, then
takes the steps. So an edited model differs from the base model by the meta-learned weights as
well as by the edit (evaluation measures drawdown against the base model).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import jax
import jax.numpy as jnp

from mend_jax.editing import check_edit_batch
from mend_jax.editors.mend import EditorLayout, make_layout
from mend_jax.metrics import masked_nll
from mend_jax.models import model_inputs
from mend_jax.models.names import get_path, set_path


@dataclass(frozen=True)
class ENNConfig:
    """Defaults are the reference's (`alg/enn.yaml`, `edit_lr` from its `config.yaml`)."""

    n_edit_steps: int = 1
    first_order: bool = False   # stop the gradient through the inner gradients (FOMAML)
    edit_lr: float = 1e-2       # initial step size of every edited weight

    def __post_init__(self):
        if self.n_edit_steps < 1:
            raise ValueError(f"n_edit_steps must be >= 1, got {self.n_edit_steps}")


class ENN:
    """ENN for one model and one list of edited weights (static configuration)."""

    def __init__(self, model, inner_params: Sequence[str] | None = None,
                 config: ENNConfig | None = None):
        self.model = model
        self.config = config or ENNConfig()
        inner = list(inner_params) if inner_params is not None else model.default_inner_params()
        self.layout: EditorLayout = make_layout(model, inner, shared=False)

    def init(self, key: jax.Array | None = None) -> dict:
        """The base model's own edited weights (float32) and the initial step sizes."""
        del key  # deterministic: the weights start as the model's
        names = self.layout.inner_params
        # Copies (jnp.array copies): the state must not alias the model's buffers, which a
        # training step donating the state would otherwise invalidate.
        weights = {n: jnp.array(get_path(self.model.params, self.layout.weight(n).path),
                                jnp.float32) for n in names}
        edit_lrs = {n: jnp.asarray(self.config.edit_lr, jnp.float32) for n in names}
        return {"params": {"inner_params": weights, "edit_lrs": edit_lrs}, "stats": {}}

    def with_weights(self, model_params: dict, weights: Mapping[str, jax.Array]) -> dict:
        """`model_params` with the edited weights replaced (cast to the model's dtype)."""
        new = model_params
        for name, w in weights.items():
            path = self.layout.weight(name).path
            new = set_path(new, path, w.astype(get_path(model_params, path).dtype))
        return new

    def pre_edit_params(self, editor_params: dict, model_params: dict) -> dict:
        """The model an edit starts from: the base model with the meta-learned weights."""
        return self.with_weights(model_params, editor_params["inner_params"])

    def edit_with_stats(self, editor_state: dict, model_params: dict, edit_batch,
                        train: bool = False) -> tuple[dict, dict, jax.Array]:
        """(edited params, stats (none: returned unchanged), NLL before the first step)."""
        del train
        model, cfg = self.model, self.config
        params = editor_state["params"]
        lrs = params["edit_lrs"]

        def nll(weights):
            logits = model.logits(self.with_weights(model_params, weights),
                                  *model_inputs(edit_batch))
            return masked_nll(logits, edit_batch["labels"], shift=model.shift_labels)

        weights = params["inner_params"]
        pre_loss = None
        for _ in range(cfg.n_edit_steps):
            loss, grads = jax.value_and_grad(nll)(weights)
            pre_loss = loss if pre_loss is None else pre_loss
            if cfg.first_order:
                grads = jax.lax.stop_gradient(grads)
            weights = {n: w - lrs[n] * grads[n] for n, w in weights.items()}
        return self.with_weights(model_params, weights), editor_state["stats"], pre_loss

    def edit(self, editor_state: dict, model_params: dict, edit_batch) -> dict:
        """Pure, jit-able edit of one request or k requests (their NLLs averaged)."""
        check_edit_batch(self.model, edit_batch)
        return self.edit_with_stats(editor_state, model_params, edit_batch)[0]
