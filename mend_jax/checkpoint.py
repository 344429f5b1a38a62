"""Orbax checkpoints of editor training: atomic, resumable, never holding a NaN.

Layout under a run folder:
    checkpoints/latest/<step>/   the most recent states (resume from here)
    checkpoints/best/<step>/     the editor state with the best validation edit loss
A latest folder holds the train state (editor params, normalisation stats, optimiser state), a
best folder only {"editor": ...}; both hold a JSON item with the loop's bookkeeping (best
validation loss, patience counter, config).
Orbax writes into a temporary folder and renames it when complete, so a process killed mid-save
leaves the previous checkpoint intact; the half-written folder is cleaned up on the next start.
A finished checkpoint damaged later (a truncated or deleted file) is skipped on restore, with a
warning, for the previous one.
"""

from __future__ import annotations

import logging
from pathlib import Path

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from mend_jax.errors import CheckpointError

log = logging.getLogger(__name__)


def all_finite(tree) -> bool:
    leaves = [x for x in jax.tree.leaves(tree) if hasattr(x, "dtype")]
    return all(bool(jnp.all(jnp.isfinite(x))) for x in leaves
               if jnp.issubdtype(x.dtype, jnp.inexact))


class Checkpoints:
    """The latest and best checkpoints of one training run."""

    def __init__(self, run_dir: str | Path, keep_latest: int = 2):
        root = Path(run_dir).absolute() / "checkpoints"
        opts = dict(enable_async_checkpointing=False, cleanup_tmp_directories=True, create=True)
        self.latest = ocp.CheckpointManager(
            root / "latest", options=ocp.CheckpointManagerOptions(max_to_keep=keep_latest, **opts))
        self.best = ocp.CheckpointManager(
            root / "best", options=ocp.CheckpointManagerOptions(max_to_keep=1, **opts))

    def _save(self, manager, step: int, state: dict, meta: dict) -> bool:
        if not all_finite(state):
            log.error("step %d: state holds NaN/inf; checkpoint NOT written", step)
            return False
        if step in manager.all_steps():
            # a resumed run re-reaching a step it had saved before being killed
            manager.delete(step)
        manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True)
        manager.wait_until_finished()
        return True

    def save_latest(self, step: int, state: dict, meta: dict) -> bool:
        return self._save(self.latest, step, state, meta)

    def save_best(self, step: int, state: dict, meta: dict) -> bool:
        return self._save(self.best, step, state, meta)

    def latest_step(self) -> int | None:
        return self.latest.latest_step()

    def best_step(self) -> int | None:
        return self.best.latest_step()

    @staticmethod
    def _restore(manager, step: int, like: dict) -> tuple[dict, dict]:
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
        out = manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
        return out["state"], out["meta"]

    def restore_latest(self, like: dict) -> tuple[dict, dict] | None:
        """The newest latest checkpoint that restores; a damaged one is skipped with a warning."""
        return self._restore_newest(self.latest, like)

    def restore_best(self, like: dict) -> tuple[dict, dict] | None:
        return self._restore_newest(self.best, like)

    def _restore_newest(self, manager, like: dict) -> tuple[dict, dict] | None:
        steps = sorted(manager.all_steps(), reverse=True)
        failures = []
        for step in steps:
            try:
                return self._restore(manager, step, like)
            except Exception as e:  # orbax/tensorstore raise many types for a damaged folder
                reason = " ".join(str(e).split())[:300] or type(e).__name__
                failures.append(f"step {step}: {reason}")
                log.warning("%s/%d cannot be restored (%s); trying the previous checkpoint",
                            manager.directory, step, reason)
        if failures:
            raise CheckpointError(f"{manager.directory}: no checkpoint restores; "
                                  + "; ".join(failures))
        return None

    def close(self) -> None:
        self.latest.close()
        self.best.close()


def load_best_editor(run_dir: str | Path, like: dict) -> tuple[dict, dict]:
    """(editor_state, meta) of a run's best checkpoint; `like` is a fresh editor state."""
    ck = Checkpoints(run_dir)
    try:
        got = ck.restore_best({"editor": like})
    finally:
        ck.close()
    if got is None:
        raise CheckpointError(f"{Path(run_dir) / 'checkpoints' / 'best'}: no checkpoint found")
    state, meta = got
    return state["editor"], meta
