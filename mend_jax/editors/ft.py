"""Fine-tuning baselines behind the same `edit(state, model_params, batch)` interface.

FT: k optimiser steps on the edited weights only. FT+L (Zhu et al. 2020): the same, each weight
projected back into an L∞ ball of radius `linf` around its original value after every step.
FT+KL: the loss adds c_loc·KL(base ‖ edited) on the batch's locality examples.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import optax

from mend_jax.capture import labelled_logits
from mend_jax.editing import check_edit_batch
from mend_jax.metrics import loc_mask, locality_kl, masked_nll
from mend_jax.models import model_inputs
from mend_jax.models.names import get_path, set_path


@dataclass(frozen=True)
class FTConfig:
    steps: int = 10
    lr: float = 1e-3
    optimizer: str = "adam"          # "adam" or "sgd"
    linf: float | None = None        # FT+L radius; None = unconstrained
    c_loc: float = 0.0               # > 0 gives FT+KL


class FineTune:
    """FT / FT+L / FT+KL on the named weights (the same ones MEND edits)."""

    def __init__(self, model, inner_params: Sequence[str] | None = None,
                 config: FTConfig | None = None):
        self.model = model
        self.config = config or FTConfig()
        self.inner_params = tuple(inner_params or model.default_inner_params())
        for n in self.inner_params:
            model.names.lookup(n)

    def init(self, key: jax.Array | None = None) -> dict:
        return {}

    def _opt(self):
        c = self.config
        return optax.adam(c.lr) if c.optimizer == "adam" else optax.sgd(c.lr)

    def edit(self, editor_state: dict, model_params: dict, edit_batch) -> dict:
        """k steps on the edit batch (`edit_batch` may be {"edit_inner": ..., "loc": ...})."""
        c, model = self.config, self.model
        check_edit_batch(model, edit_batch)
        inner_batch = edit_batch.get("edit_inner", edit_batch)
        loc = edit_batch.get("loc") if isinstance(edit_batch, dict) else None
        paths = [model.names.path(n) for n in self.inner_params]
        original = {n: get_path(model_params, p) for n, p in zip(self.inner_params, paths)}
        base_loc = None
        if c.c_loc > 0 and loc is not None:
            base_loc = jax.lax.stop_gradient(model.logits(model_params, *model_inputs(loc)))

        def full(weights):
            params = model_params
            for n, p in zip(self.inner_params, paths):
                params = set_path(params, p, weights[n])
            return params

        def loss(weights):
            params = full(weights)
            total = masked_nll(*labelled_logits(model, params, inner_batch),
                               shift=model.shift_labels)
            if base_loc is not None:
                post = model.logits(params, *model_inputs(loc))
                total = total + c.c_loc * locality_kl(base_loc, post, loc_mask(loc, model.seq2seq))
            return total

        opt = self._opt()

        def step(_, carry):
            weights, opt_state = carry
            grads = jax.grad(loss)(weights)
            updates, opt_state = opt.update(grads, opt_state, weights)
            weights = optax.apply_updates(weights, updates)
            if c.linf is not None:
                weights = {n: jnp.clip(w, original[n] - c.linf, original[n] + c.linf)
                           for n, w in weights.items()}
            return weights, opt_state

        weights, _ = jax.lax.fori_loop(0, c.steps, step, (original, opt.init(original)))
        return full(weights)
