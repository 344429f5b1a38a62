"""UltraEdit (Gu et al., 2025): training-free lifelong editing with MEND's (u, δ) interface.

No editor network: every edited weight's captured keys u_t and output gradients δ_t are
standardised by running statistics that are carried from one edit call to the next ("lifelong
normalisation", one set per weight shape, as the reference), each token asks for the output
shift v_t = ‖û_t‖² δ̂_t on its raw key, and one ridge solve per weight gives the update
ΔW = lr · (UᵀU + λI)⁻¹ UᵀV (W' = W − ΔW). The state is the statistics alone, so sequential
editing threads it through `edit_and_update`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import jax
import jax.numpy as jnp

from mend_jax.capture import capture
from mend_jax.editing import check_edit_batch
from mend_jax.editors.mend import (
    _standardise,
    init_stats,
    make_layout,
    ridge_solve,
    selected_tokens,
    update_stats,
)
from mend_jax.models.names import get_path, set_path


@dataclass(frozen=True)
class UltraEditConfig:
    lr: float = 1e-4          # step size of the value shifts (the reference's `lr`)
    lam: float = 1.0          # ridge λ (the reference adds the identity)
    tokens: str = "answer"    # the tokens whose keys are edited: "answer" (reference) or "all"
    norm_eps: float = 1e-7

    def __post_init__(self):
        if self.tokens not in ("all", "answer"):
            raise ValueError(f"tokens must be 'all' or 'answer', got {self.tokens!r}")
        if self.lam <= 0:
            raise ValueError(f"lam must be > 0, got {self.lam}")


class UltraEdit:
    """Pure, jit-able: `edit_and_update(state, params, batch) -> (new params, new state)`."""

    stateful = True

    def __init__(self, model, inner_params: Sequence[str] | None = None,
                 config: UltraEditConfig | None = None):
        self.model = model
        self.config = config or UltraEditConfig()
        inner = list(inner_params) if inner_params is not None else model.default_inner_params()
        self.layout = make_layout(model, inner, shared=True)

    def init(self, key=None) -> dict:
        stats = {}
        for group, (d_in, d_out) in zip(self.layout.groups, self.layout.shapes):
            stats.setdefault(group, init_stats(d_in, d_out))
        return {"stats": stats}

    def edit_and_update(self, state: dict, model_params: dict, edit_batch) -> tuple[dict, dict]:
        cfg, lay = self.config, self.layout
        _, captured, _ = capture(self.model, model_params, edit_batch, lay.weights)
        captured = jax.lax.stop_gradient(captured)
        masks = {n: selected_tokens(captured[n], cfg.tokens == "answer")
                 for n in lay.inner_params}
        # Every weight of a shape adds its tokens to the shape's statistics before any is solved.
        stats = dict(state["stats"])
        for name, group in zip(lay.inner_params, lay.groups):
            cap = captured[name]
            stats[group] = update_stats(stats[group], cap.layer_inputs.astype(jnp.float32),
                                        cap.output_grads.astype(jnp.float32), masks[name])
        new = model_params
        for name, group in zip(lay.inner_params, lay.groups):
            cap, s, m = captured[name], stats[group], masks[name]
            keys = cap.layer_inputs.astype(jnp.float32) * m[:, None]
            u_hat = _standardise(keys, s["u_mean"], s["u_m2"], s["count"], cfg.norm_eps)
            d_hat = _standardise(cap.output_grads.astype(jnp.float32), s["d_mean"], s["d_m2"],
                                 s["count"], cfg.norm_eps)
            values = jnp.sum(u_hat * u_hat, -1, keepdims=True) * d_hat * m[:, None]
            update = cfg.lr * ridge_solve(keys, values, jnp.asarray(cfg.lam, jnp.float32))
            path = lay.weight(name).path
            w = get_path(model_params, path)
            new = set_path(new, path, (w.astype(jnp.float32) - update).astype(w.dtype))
        return new, {"stats": stats}

    def edit(self, state: dict, model_params: dict, edit_batch) -> dict:
        """One batch of edits from `state`'s statistics (the updated statistics are dropped)."""
        check_edit_batch(self.model, edit_batch)
        return self.edit_and_update(state, model_params, edit_batch)[0]
