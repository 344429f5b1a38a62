"""The pure meta-training step of MEND (and KE, ENN): (state, model_params, batch) -> (state,
metrics).

L = c_edit · NLL(edited model, equivalent input, new target) + c_loc · KL(base ‖ edited on loc),
(with `edit_on="both"` the NLL is taken over the equivalent input and the edit input together),
differentiated through the edit w.r.t. the editor networks and the per-layer step sizes. An
editor that meta-learns the model's own weights (ENN: it has `pre_edit_params`) is measured for
locality against its pre-edit model, and L adds c_base · KL(base ‖ pre-edit model on loc).
Jit it at the boundary: `jax.jit(trainer.step, donate_argnums=0)`.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import optax

from mend_jax.capture import labelled_logits
from mend_jax.editors.enn import ENN
from mend_jax.editors.ke import KE
from mend_jax.editors.mend import MEND
from mend_jax.metrics import labelled, loc_mask, locality_kl, masked_nll, sequence_correct
from mend_jax.models import model_inputs


@dataclass(frozen=True)
class TrainConfig:
    """Meta-training hyperparameters; defaults are the reference's MEND config."""

    lr: float = 1e-6            # Adam on the editor networks
    # "adam" (the reference) or "adafactor": factored second moments and no first moment, so the
    # editor's optimizer state is O(rows + cols) per matrix instead of two copies of it (memory:
    # bench/RESULTS.md). The update is RMS-normalised and clipped like Adam's, at the same lr.
    optimizer: str = "adam"
    # Polyak averaging: with a decay d in (0, 1), the trainer keeps an exponential moving average
    # of the editor's parameters (ema <- d·ema + (1 − d)·params after every step); validation,
    # the best checkpoint and the saved editor use it. None: the raw parameters (reference).
    ema: float | None = None
    # The per-layer step sizes' learning rate. None (the reference's behaviour): the step sizes
    # are trained by the editor's optimizer at `lr` (the reference builds a separate lr_lr
    # optimizer, but the main optimizer's zero_grad() clears their gradient before it steps, so
    # it never moves them). A number gives them their own optimizer (of the kind `optimizer`
    # names) at that learning rate (a deviation).
    lr_lr: float | None = None
    c_edit: float = 0.1
    c_loc: float = 1.0
    grad_clip: float = 100.0
    accumulate: int = 10        # gradient accumulation steps (optax.MultiSteps)
    # Where the edit loss is measured after the edit: "outer" (the equivalent input, as the
    # reference) or "both" (the equivalent input and the edit input itself, averaged).
    edit_on: str = "outer"
    # "constant" (the reference) or "cosine": both learning rates decay to 0 over
    # `decay_steps` optimizer updates (the pipeline sets it from the loop's max_steps).
    lr_schedule: str = "constant"
    decay_steps: int | None = None
    # ENN only (editors with meta-learned base weights): weight of KL(original ‖ meta-learned
    # model) on the locality inputs. The reference back-propagates this term with weight 1 and
    # uses its `cbase` only in the logged total; here c_base weights the gradient.
    c_base: float = 0.0

    def __post_init__(self):
        if self.edit_on not in ("outer", "both"):
            raise ValueError(f"edit_on must be 'outer' or 'both', got {self.edit_on!r}")
        if self.ema is not None and not 0.0 < self.ema < 1.0:
            raise ValueError(f"ema must be a decay in (0, 1) or None, got {self.ema}")
        if self.optimizer not in ("adam", "adafactor"):
            raise ValueError(f"optimizer must be 'adam' or 'adafactor', got {self.optimizer!r}")
        if self.lr_schedule not in ("constant", "cosine"):
            raise ValueError(f"lr_schedule must be 'constant' or 'cosine', got "
                             f"{self.lr_schedule!r}")
        if self.lr_schedule == "cosine" and not self.decay_steps:
            raise ValueError("lr_schedule='cosine' needs decay_steps > 0")
        if self.c_base < 0:
            raise ValueError(f"c_base must be >= 0, got {self.c_base}")

    def schedule(self, lr: float) -> optax.Schedule | float:
        if self.lr_schedule == "cosine":
            return optax.cosine_decay_schedule(lr, self.decay_steps)
        return lr

    def base_optimizer(self, lr: float) -> optax.GradientTransformation:
        """The optimizer of one parameter group at learning rate `lr` (scheduled)."""
        if self.optimizer == "adafactor":
            # no relative step (multiply_by_parameter_scale) and no momentum: lr means what it
            # means for Adam; matrices with both sides >= 128 keep factored second moments only
            return optax.adafactor(self.schedule(lr), multiply_by_parameter_scale=False)
        return optax.adam(self.schedule(lr))


def _row_mean(values, labels):
    """Mean over rows that have a label (batched training pads its edit rows with none)."""
    rows = labelled(labels).astype(jnp.float32)
    return (values * rows).sum() / jnp.maximum(rows.sum(), 1.0)


_STEP_SIZES = ("edit_lrs", "log_lambdas")


def _labels(tree):
    # The step sizes (and lstsq's λ) form the "edit_lrs" group, trained at lr_lr when it is set;
    # everything else (editor networks, ENN's learned weights) is "nets", trained at lr.
    return {key: jax.tree.map(lambda _, key=key: "edit_lrs" if key in _STEP_SIZES else "nets",
                              sub)
            for key, sub in tree.items()}


class MetaTrainer:
    """Meta-trains an editor (MEND, KE, ENN) on a fixed base model."""

    def __init__(self, editor: MEND | KE | ENN, config: TrainConfig | None = None):
        self.editor = editor
        self.model = editor.model
        self.config = config or TrainConfig()
        c = self.config
        opt = (c.base_optimizer(c.lr) if c.lr_lr is None
               else optax.multi_transform({"nets": c.base_optimizer(c.lr),
                                           "edit_lrs": c.base_optimizer(c.lr_lr)}, _labels))
        inner = optax.chain(optax.clip_by_global_norm(c.grad_clip), opt)
        # MultiSteps keeps a gradient-sized accumulator: only pay for it when accumulating.
        self.optimizer = (inner if c.accumulate == 1
                          else optax.MultiSteps(inner, every_k_schedule=c.accumulate))

    def init(self, key: jax.Array) -> dict:
        editor_state = self.editor.init(key)
        state = {
            "editor": editor_state,
            "opt_state": self.optimizer.init(editor_state["params"]),
            "step": jnp.zeros((), jnp.int32),
            "n_skipped": jnp.zeros((), jnp.int32),
        }
        if self.config.ema is not None:
            state["ema"] = jax.tree.map(jnp.copy, editor_state["params"])
        return state

    def selected(self, state: dict) -> dict:
        """The editor state that validation, checkpoints and edits use: the trained one, or with
        `ema` set its moving average (with the trained normalisation statistics)."""
        if self.config.ema is None:
            return state["editor"]
        return {**state["editor"], "params": state["ema"]}

    def loss(self, editor_params, stats, model_params, batch, train: bool = True):
        """(L, (metrics, new_stats)) of one edit example/equivalent/locality triple."""
        c, model = self.config, self.model
        shift = model.shift_labels
        new_params, new_stats, pre_loss = self.editor.edit_with_stats(
            {"params": editor_params, "stats": stats}, model_params, batch["edit_inner"],
            train=train)
        outer = batch["edit_outer"]
        n_outer = outer["labels"].shape[0]
        if c.edit_on == "both":
            # One forward over [outer; inner] rows (same width): the mean NLL of both.
            both = {k: jnp.concatenate([outer[k], batch["edit_inner"][k]])
                    for k in outer if k in batch["edit_inner"]}
            post_both, both_labels = labelled_logits(model, new_params, both)
            edit_loss = masked_nll(post_both, both_labels, shift)
            post_outer, outer_labels = post_both[:n_outer], both_labels[:n_outer]
        else:
            post_outer, outer_labels = labelled_logits(model, new_params, outer)
            edit_loss = masked_nll(post_outer, outer_labels, shift)
        loc = batch["loc"]
        mask = loc_mask(loc, model.seq2seq)
        base_loc = jax.lax.stop_gradient(model.logits(model_params, *model_inputs(loc)))
        base_metrics = {}
        pre_edit = getattr(self.editor, "pre_edit_params", None)
        if pre_edit is not None:
            # ENN, as the reference: locality is measured against the meta-learned (pre-edit)
            # model, which a KL term keeps close to the original base model.
            learned_loc = model.logits(pre_edit(editor_params, model_params), *model_inputs(loc))
            base_kl = locality_kl(base_loc, learned_loc, mask)
            base_metrics = {"base_kl": base_kl, "loc_acc_original": sequence_correct(
                base_loc, loc["labels"], shift).mean()}
            base_loc = jax.lax.stop_gradient(learned_loc)
        post_loc = model.logits(new_params, *model_inputs(loc))
        loc_kl = locality_kl(base_loc, post_loc, mask)
        total = c.c_edit * edit_loss + c.c_loc * loc_kl
        if pre_edit is not None:
            total = total + c.c_base * base_metrics["base_kl"]
        metrics = {
            "loss": total,
            "edit_loss": edit_loss,
            "pre_edit_loss": pre_loss,
            "locality_kl": loc_kl,
            "edit_acc": _row_mean(sequence_correct(post_outer, outer_labels, shift),
                                  outer_labels),
            "n_edits": jnp.sum(labelled(outer["labels"])).astype(jnp.float32),
            "loc_acc_pre": sequence_correct(base_loc, loc["labels"], shift).mean(),
            "loc_acc_post": sequence_correct(post_loc, loc["labels"], shift).mean(),
            **base_metrics,
        }
        if "edit_lrs" in editor_params:  # KE has no step sizes
            metrics["edit_lr_mean"] = jnp.mean(jnp.stack(list(editor_params["edit_lrs"].values())))
        return total, (metrics, new_stats)

    def step(self, state: dict, model_params: dict, batch: dict) -> tuple[dict, dict]:
        """One meta-training step. A non-finite loss or gradient skips the update (counted)."""
        c, editor = self.config, state["editor"]
        grad_fn = jax.value_and_grad(self.loss, has_aux=True)
        (loss, (metrics, new_stats)), grads = grad_fn(
            editor["params"], editor["stats"], model_params, batch)
        finite = jnp.isfinite(loss) & jnp.all(jnp.stack(
            [jnp.all(jnp.isfinite(g)) for g in jax.tree.leaves(grads)]))
        updates, opt_state = self.optimizer.update(grads, state["opt_state"], editor["params"])
        params = optax.apply_updates(editor["params"], updates)
        proposed = {"editor": {"params": params, "stats": new_stats}, "opt_state": opt_state}
        kept = {"editor": editor, "opt_state": state["opt_state"]}
        new = jax.tree.map(lambda a, b: jnp.where(finite, a, b), proposed, kept)
        if c.ema is not None:
            new["ema"] = jax.tree.map(lambda e, p: c.ema * e + (1.0 - c.ema) * p, state["ema"],
                                      new["editor"]["params"])
        new["step"] = state["step"] + 1
        new["n_skipped"] = state["n_skipped"] + (~finite).astype(jnp.int32)
        metrics = dict(metrics, skipped=(~finite).astype(jnp.float32),
                       grad_norm=optax.tree.norm(grads))
        return new, metrics

    def eval_step(self, editor_state: dict, model_params: dict, batch: dict) -> dict:
        """Validation metrics with frozen statistics."""
        _, (metrics, _) = self.loss(editor_state["params"], editor_state["stats"], model_params,
                                    batch, train=False)
        return metrics
