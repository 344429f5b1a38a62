"""Sharded meta-training against one device, run in a subprocess with 8 fake CPU devices.

Usage (tests/test_sharding.py sets the environment):
    python tests/sharding_worker.py OUT_DIR
runs STEPS meta-training steps and one edit without a mesh, then the same under each mesh of
MESHES, and writes OUT_DIR/results.json (metrics, parameter layouts) and one .npz per run
(final editor state and edited weights, keyed by "/"-joined pytree path) for the test to compare.
    python tests/sharding_worker.py --multihost OUT_DIR
is one process of a multi-process run on one machine (see `multihost`).
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import json
import sys
import time
from pathlib import Path

import jax
import numpy as np
import transformers

from mend_jax.editors import MEND, MENDConfig
from mend_jax.models import from_config, get_path
from mend_jax.sharding import (
    EDITOR_FSDP_RULES,
    REPLICATED,
    make_mesh,
    make_sharded_edit,
    make_sharded_step,
    path_str,
    shard_batch,
)
from mend_jax.training import MetaTrainer, TrainConfig

V, T, B, STEPS = 64, 6, 8, 3
METRICS = ("loss", "edit_loss", "locality_kl")
KERNEL = ("transformer", "h_0", "mlp", "c_fc", "kernel")     # [32, 128], edited
MESHES = {  # name: (data, model, editor-state rules)
    "data8": (8, 1, REPLICATED),
    "model8": (1, 8, EDITOR_FSDP_RULES),   # everything big sharded, editor included
    "mixed2x4": (2, 4, REPLICATED),
}


def lm_batch(rng):
    """B random sequences; only the last token is a label (prompt -> one-token answer)."""
    ids = rng.integers(1, V, (B, T)).astype(np.int32)
    labels = np.full_like(ids, -100)
    labels[:, -1] = ids[:, -1]
    return {"input_ids": ids, "attention_mask": np.ones_like(ids), "labels": labels}


def flat(tree, prefix):
    return {f"{prefix}/{path_str(p)}": np.asarray(x)
            for p, x in jax.tree_util.tree_flatten_with_path(jax.device_get(tree))[0]}


def layout(leaf):
    return {"n_devices": len(leaf.sharding.device_set), "shape": list(leaf.shape),
            "shard_shape": list(leaf.addressable_shards[0].data.shape),
            "spec": str(leaf.sharding.spec)}


def run_steps(step, state, params, batch):
    metrics = []
    for _ in range(STEPS):
        state, m = step(state, params, batch)
        metrics.append({k: float(m[k]) for k in METRICS})
    return state, metrics


def setup():
    """(editor, trainer, batch, initial trainer state, model params), all on the host."""
    cfg = transformers.GPT2Config(vocab_size=V, n_positions=8, n_embd=32, n_layer=1, n_head=2,
                                  initializer_range=0.2, bos_token_id=0, eos_token_id=0)
    model = from_config(cfg, seed=0)
    # No input normalisation: with it, u and δ are standardised over the very tokens they come
    # from, so some editor gradients are sums that cancel to rounding noise, and Adam turns
    # noise into lr-sized steps under any change of reduction order, sharded or not. Without
    # it a raw gradient step needs a large α to move the model measurably.
    # One edited weight keeps the compiled graphs (and the test's time) small.
    editor = MEND(model, ["transformer.h.0.mlp.c_fc.weight"],
                  MENDConfig(rank=16, edit_lr=1.0, norm=False))
    trainer = MetaTrainer(editor, TrainConfig(accumulate=1, lr=1e-3))
    rng = np.random.default_rng(0)
    batch = {"edit_inner": lm_batch(rng), "edit_outer": lm_batch(rng), "loc": lm_batch(rng)}
    # Host copies: every run starts from fresh buffers (the sharded step donates its state).
    init_state = jax.device_get(trainer.init(jax.random.key(0)))
    return editor, trainer, batch, init_state, jax.device_get(model.params)


def main(out: Path):
    assert jax.device_count() == 8, jax.devices()
    editor, trainer, batch, init_state, params = setup()

    t = time.time()
    state, metrics = run_steps(jax.jit(trainer.step), init_state, params, batch)
    trained = jax.device_get(state["editor"])
    edited = jax.jit(editor.edit)(trained, params, batch["edit_inner"])
    np.savez(out / "single.npz", **flat(state["editor"], "editor"),
             **flat(get_path(edited, KERNEL[:-2]), "edited"))
    results = {"single": {"metrics": metrics, "n_skipped": int(state["n_skipped"]),
                          "seconds": time.time() - t}}

    for name, (data, model_axis, state_rules) in MESHES.items():
        t = time.time()
        mesh = make_mesh(data, model_axis)
        step, state, placed = make_sharded_step(trainer, mesh, init_state, params, batch,
                                                state_rules=state_rules)
        layouts = {"kernel": layout(get_path(placed, KERNEL)),
                   "bias": layout(get_path(placed, KERNEL[:-1] + ("bias",))),
                   "batch": layout(shard_batch(mesh, batch)["loc"]["input_ids"])}
        state, metrics = run_steps(step, state, placed, batch)
        editor_leaves = jax.tree.leaves(state["editor"]["params"])
        layouts["editor_matrix"] = layout(max(editor_leaves, key=lambda x: x.size))
        # The edit starts from the single-device run's trained editor, so any difference below
        # is the edit's own, not training's.
        edit, editor_state, placed = make_sharded_edit(editor, mesh, trained, params,
                                                       batch["edit_inner"],
                                                       state_rules=state_rules)
        edited = edit(editor_state, placed, batch["edit_inner"])
        layouts["edited_kernel"] = layout(get_path(edited, KERNEL))
        np.savez(out / f"{name}.npz", **flat(state["editor"], "editor"),
                 **flat(get_path(edited, KERNEL[:-2]), "edited"))
        results[name] = {"mesh": dict(mesh.shape), "metrics": metrics, "layouts": layouts,
                         "n_skipped": int(state["n_skipped"]), "seconds": time.time() - t}
    (out / "results.json").write_text(json.dumps(results, indent=1))


def multihost(out: Path):
    """One of several processes (env PROCESS_ID, NUM_PROCESSES, JAX_COORDINATOR_ADDRESS): the
    module docstring's recipe, each process feeding only its slice of the batch."""
    pid, n = int(os.environ["PROCESS_ID"]), int(os.environ["NUM_PROCESSES"])
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU cross-process
    jax.distributed.initialize(num_processes=n, process_id=pid)
    _, trainer, batch, init_state, params = setup()
    mesh = make_mesh(data=-1, model=jax.local_device_count())
    step, state, placed = make_sharded_step(trainer, mesh, init_state, params, batch)
    local = jax.tree.map(lambda x: np.split(x, n)[pid], batch)
    state, metrics = run_steps(step, state, placed, shard_batch(mesh, local))
    (out / f"host{pid}.json").write_text(json.dumps({
        "metrics": metrics, "mesh": dict(mesh.shape), "n_processes": jax.process_count(),
        "kernel": {"shape": list(get_path(placed, KERNEL).shape),
                   "shard_shape": list(get_path(placed, KERNEL).addressable_shards[0].data.shape)},
        "global_batch_shape": list(shard_batch(mesh, local)["loc"]["input_ids"].shape)}))


if __name__ == "__main__":
    if sys.argv[1] == "--multihost":
        multihost(Path(sys.argv[2]))
    else:
        main(Path(sys.argv[1]))
