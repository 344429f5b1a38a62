"""The loop around the pure meta-training step: batches, validation, early stopping, checkpoints.

Batches are a pure function of (seed, step), so a run resumed from its latest checkpoint sees
exactly the batches an uninterrupted run would have seen and ends with the same editor.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from mend_jax.checkpoint import Checkpoints
from mend_jax.data import EditRequest, check_requests, make_edit_batch
from mend_jax.data.batching import target_lengths
from mend_jax.metrics import IGNORE, POSITIONS, logit_positions
from mend_jax.metrics import positions_width as widest
from mend_jax.sharding import make_sharded_eval, make_sharded_step
from mend_jax.training import MetaTrainer

log = logging.getLogger(__name__)

VAL_SEED_OFFSET = 1_000_003


@dataclass(frozen=True)
class LoopConfig:
    max_steps: int = 500_000
    batch_size: int = 10        # locality rows per step (each from another request)
    n_edits: int = 1            # edits per step, or the largest k when `n_edits_dist` samples k
    # "fixed": every step edits `n_edits` facts at once (the reference). "log_uniform": each step
    # draws k from 1..n_edits, log-uniformly, so one editor serves every k; the edit rows are
    # padded to the next power of four (rows without labels do not count), so there are only
    # a few compiled shapes (1, 4, 16, 64, ... up to n_edits).
    n_edits_dist: str = "fixed"
    val_every: int = 5000
    val_batches: int = 100
    early_stop_patience: int = 20_000
    save_every: int = 1000
    log_every: int = 100
    # The validation metric that picks the best checkpoint and drives early stopping (lower is
    # better): "edit_loss" (NLL of the new targets after the edit) or "loss" (the whole
    # meta-objective c_edit·edit + c_loc·KL, as the reference's early-stop key).
    select_on: str = "edit_loss"
    # Replace the edited requests' locality rows by their neighbourhood pairs (other subjects
    # with the same true object): all (true), none (false) or this fraction; `make_edit_batch`.
    loc_neighbors: bool | float = False

    def __post_init__(self):
        if self.n_edits_dist not in ("fixed", "log_uniform"):
            raise ValueError(f"n_edits_dist must be 'fixed' or 'log_uniform', got "
                             f"{self.n_edits_dist!r}")
        if self.select_on not in ("edit_loss", "loss"):
            raise ValueError(f"select_on must be 'edit_loss' or 'loss', got {self.select_on!r}")
        if not 0.0 <= float(self.loc_neighbors) <= 1.0:
            raise ValueError(f"loc_neighbors must be true, false or a fraction in [0, 1], got "
                             f"{self.loc_neighbors!r}")


def sample_n_edits(rng: np.random.Generator, n_edits: int, dist: str) -> tuple[int, int]:
    """(k edits of this step, rows they are padded to)."""
    if dist == "fixed" or n_edits == 1:
        return n_edits, n_edits
    k = int(np.clip(np.round(np.exp(rng.uniform(0.0, np.log(n_edits + 0.5)))), 1, n_edits))
    rows = 1
    while rows < k:
        rows *= 4
    return k, min(rows, n_edits)


def batch_at(requests: Sequence[EditRequest], tokenizer, *, seed: int, step: int,
             batch_size: int, n_edits: int, seq2seq: bool, max_length: int,
             loc_neighbors: bool | float = False, n_edits_dist: str = "fixed",
             decoder_start_token_id: int | None = None, label2id: dict | None = None,
             positions_width: int | None = None) -> dict:
    """The training batch of a given step: a pure function of (seed, step).

    `seq2seq`, `decoder_start_token_id` and `label2id` are the model's `pair_format`.

    The first k sampled requests are edited together; the locality rows are the loc pairs of
    `batch_size` requests (those of the edited ones first, unrelated facts either way). With a
    sampled k, the edit rows are padded to a power of four by requests whose labels are all
    ignored: they add no loss, and their δ is exactly zero, so the editor skips their tokens.
    A decoder-only batch's edit parts carry `logit_positions` of `positions_width` (default:
    the batch's own; a run passes `label_width`'s, one shape for every step). The requests are
    not checked here: `train_editor` checks them all once (`check_requests`).
    """
    rng = np.random.default_rng([seed, step])
    k, rows = sample_n_edits(rng, n_edits, n_edits_dist)
    n = min(max(batch_size, rows), len(requests))
    if rows > n:
        raise ValueError(f"n_edits={n_edits} but only {len(requests)} training requests")
    idx = rng.choice(len(requests), size=n, replace=False)
    chosen = [requests[i] for i in idx]
    batch = make_edit_batch(tokenizer, chosen, seq2seq=seq2seq, max_length=max_length, rng=rng,
                            n_edits=rows, loc_neighbors=loc_neighbors,
                            decoder_start_token_id=decoder_start_token_id, label2id=label2id,
                            check=False)
    batch["loc"] = {key: v[:batch_size] for key, v in batch["loc"].items()}
    for part in ("edit_inner", "edit_outer"):
        batch[part]["labels"][k:] = IGNORE
    if not seq2seq and label2id is None:
        # The edit losses need logits at the answer positions alone (`metrics.logit_view`);
        # one width for both parts, which `edit_on: both` concatenates.
        width = positions_width or widest(batch["edit_inner"]["labels"],
                                          batch["edit_outer"]["labels"])
        for part in ("edit_inner", "edit_outer"):
            batch[part][POSITIONS] = logit_positions(batch[part]["labels"], width)
    return _to_device(batch)


def label_width(requests: Sequence[EditRequest], tokenizer, *, max_length: int,
                seq2seq: bool, label2id: dict | None = None, **_) -> int | None:
    """One `logit_positions` width for every batch of a run (each new width would be a new
    compilation of the step): the longest target of `requests` in tokens. None for seq2seq
    models and classifiers, whose labels are already that short."""
    if seq2seq or label2id is not None:
        return None
    return max(target_lengths(tokenizer, [r.target_new for r in requests], max_length))


def _to_device(batch: dict) -> dict:
    out = {}
    for key, part in batch.items():
        if isinstance(part, dict):
            out[key] = {k: jnp.asarray(v) for k, v in part.items() if k != "truncated"}
    return out


def _mean(ms: list[dict]) -> dict:
    return {k: float(np.mean([float(m[k]) for m in ms])) for k in ms[0]}


def validate(trainer: MetaTrainer, eval_step, editor_state, model_params, requests, tokenizer,
             *, cfg: LoopConfig, seed: int, max_length: int,
             positions_width: int | None = None) -> dict:
    metrics = []
    for i in range(cfg.val_batches):
        batch = batch_at(requests, tokenizer, seed=seed + VAL_SEED_OFFSET, step=i,
                         batch_size=cfg.batch_size, n_edits=cfg.n_edits,
                         **trainer.model.pair_format, max_length=max_length,
                         n_edits_dist=cfg.n_edits_dist, positions_width=positions_width)
        metrics.append(eval_step(editor_state, model_params, batch))
    return _mean(metrics)


class ScalarLog:
    """RUN/metrics.jsonl: one JSON object a line ({"step", "split", metric: value, ...}), next
    to TensorBoard's event files, for tools that read text. "train" records carry the index
    of the step just taken, "val" ones the number of steps taken. A run resumed from a
    checkpoint after `resume_step` steps first drops the records of the steps it will redo."""

    def __init__(self, path: Path, resume_step: int = 0):
        self.path = path
        if resume_step and path.exists():
            def kept_record(r):
                return r["step"] < resume_step or (r["split"] == "val" and
                                                   r["step"] == resume_step)

            kept = [line for line in path.read_text().splitlines()
                    if line.strip() and kept_record(json.loads(line))]
            tmp = path.with_suffix(".jsonl.tmp")
            tmp.write_text("".join(f"{line}\n" for line in kept))
            tmp.replace(path)
        elif path.exists():
            path.unlink()
        self._file = path.open("a")

    def write(self, split: str, step: int, metrics: dict) -> None:
        self._file.write(json.dumps({"step": step, "split": split, **metrics}) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def train_editor(trainer: MetaTrainer, model_params, train_requests, val_requests, tokenizer, *,
                 run_dir: str | Path, cfg: LoopConfig, seed: int, max_length: int,
                 resume: bool = False, progress: bool = True, meta: dict | None = None,
                 mesh: jax.sharding.Mesh | None = None,
                 prepare_editor: Callable[[dict], dict] | None = None) -> dict:
    """Meta-train until max_steps or early stopping; returns the summary (best step, val loss).

    `prepare_editor` maps the fresh editor state before step 0 (the pipeline fills the
    preserved keys with it); a resumed run restores what it saved instead.

    With a `mesh`, the step runs through `make_sharded_step` (batches over its "data" axis,
    large weights over "model"); without one, on the default device."""
    run_dir = Path(run_dir)
    # Every request is checked before step 0 (a bad record names its file and record), not
    # when a batch first samples it mid-training.
    check_requests([*train_requests, *val_requests], tokenizer,
                   max_length=max_length, **trainer.model.pair_format)
    ckpt = Checkpoints(run_dir)
    state = trainer.init(jax.random.key(seed))
    if prepare_editor is not None and not (resume and ckpt.latest_step() is not None):
        state = {**state, "editor": prepare_editor(state["editor"])}
    book = {"step": 0, "best_val": None, "select_on": cfg.select_on, "best_step": None,
            "since_best": 0,
            "n_skipped": 0, "val_history": [], "config": meta or {}}
    if resume:
        got = ckpt.restore_latest(state)
        if got is not None:
            state, book = got
            # runs saved before `select_on` existed kept the best validation edit loss
            book.setdefault("best_val", book.pop("best_val_edit_loss", None))
            book.setdefault("select_on", "edit_loss")
            if book["select_on"] != cfg.select_on:
                raise ValueError(f"{run_dir}: this run selects its best checkpoint on "
                                 f"{book['select_on']!r}; resume it with "
                                 f"alg.loop.select_on={book['select_on']}")
            log.info("resumed from step %d", book["step"])
    elif ckpt.latest_step() is not None:
        raise FileExistsError(f"{run_dir}: holds checkpoints already; pass --resume to continue "
                              "or choose another out_dir")
    if mesh is None:
        step_fn = jax.jit(trainer.step, donate_argnums=0)
        eval_step = jax.jit(trainer.eval_step)
    else:
        step_fn, state, model_params = make_sharded_step(trainer, mesh, state, model_params)
        eval_step = make_sharded_eval(trainer, mesh, state["editor"], model_params)
        log.info("meta-training on a %s mesh of %s devices", dict(mesh.shape), mesh.size)
    from tensorboardX import SummaryWriter

    writer = SummaryWriter(str(run_dir / "tb"), purge_step=book["step"] or None)
    scalars = ScalarLog(run_dir / "metrics.jsonl", book["step"])
    pair_format = trainer.model.pair_format
    width = label_width([*train_requests, *val_requests], tokenizer, max_length=max_length,
                        **pair_format)
    start = book["step"]
    bar = tqdm(range(start, cfg.max_steps), initial=start, total=cfg.max_steps,
               desc="meta-train", disable=not progress, mininterval=1)
    stopped_early = False
    # Training time so far: a resumed run adds its own to what its checkpoint recorded.
    t0 = time.time() - book.get("train_time_s", 0.0)
    skipped_before, logged_at = int(state["n_skipped"]), start
    for step in bar:
        batch = batch_at(train_requests, tokenizer, seed=seed, step=step,
                         batch_size=cfg.batch_size, n_edits=cfg.n_edits, **pair_format,
                         max_length=max_length, loc_neighbors=cfg.loc_neighbors,
                         n_edits_dist=cfg.n_edits_dist, positions_width=width)
        # No value is read back between logging steps, so the host builds the next batch
        # while the device runs this step (JAX dispatches asynchronously).
        state, metrics = step_fn(state, model_params, batch)
        book["step"] = step + 1
        if step % cfg.log_every == 0 or step + 1 == cfg.max_steps:
            n_skipped = int(state["n_skipped"])
            if n_skipped > skipped_before:
                log.warning("steps %d-%d: %d update(s) skipped (non-finite loss or gradient)",
                            logged_at, step, n_skipped - skipped_before)
            skipped_before, logged_at = n_skipped, step + 1
            m = {k: float(v) for k, v in metrics.items()}
            for k, v in m.items():
                writer.add_scalar(f"train/{k}", v, step)
            scalars.write("train", step, m)
            bar.set_postfix(loss=f"{m['loss']:.3f}", ES=f"{m['edit_acc']:.2f}",
                            kl=f"{m['locality_kl']:.3f}")
        done = step + 1 == cfg.max_steps
        if (step + 1) % cfg.val_every == 0 or done:
            val = validate(trainer, eval_step, trainer.selected(state), model_params, val_requests,
                           tokenizer, cfg=cfg, seed=seed, max_length=max_length,
                           positions_width=width)
            for k, v in val.items():
                writer.add_scalar(f"val/{k}", v, step + 1)
            scalars.write("val", step + 1, val)
            book["val_history"].append({"step": step + 1, **val})
            best = book["best_val"]
            if best is None or val[cfg.select_on] < best:
                book.update(best_val=val[cfg.select_on], best_step=step + 1, since_best=0)
                ckpt.save_best(step + 1, {"editor": trainer.selected(state)}, book)
            else:
                book["since_best"] += cfg.val_every
            log.info("step %d val %s", step + 1,
                     json.dumps({k: round(v, 4) for k, v in val.items()}))
            if book["since_best"] >= cfg.early_stop_patience:
                stopped_early = True
        if (step + 1) % cfg.save_every == 0 or done or stopped_early:
            book["n_skipped"] = int(state["n_skipped"])
            book["train_time_s"] = time.time() - t0
            ckpt.save_latest(step + 1, state, book)
        if stopped_early:
            log.info("early stop at step %d (best %s)", step + 1, book["best_step"])
            break
    bar.close()
    writer.close()
    scalars.close()
    ckpt.close()
    book["n_skipped"] = int(state["n_skipped"])
    book["stopped_early"] = stopped_early
    book["train_time_s"] = time.time() - t0
    return book
