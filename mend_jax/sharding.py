"""Mesh and partition rules: the same meta-training step on 1 CPU, 8 GPUs or many hosts.

Sharding is declared, not programmed. A `Mesh` has two axes:

- ``"data"``: the batch is split along its leading axis (data parallelism);
- ``"model"``: big weights are split FSDP-style (each device stores a slice, XLA all-gathers
  it where a matmul needs it and reduce-scatters what flows back).

Partition rules are `(regex, spec)` pairs matched, first match wins, against a leaf's pytree
path joined with "/" (``transformer/h_9/mlp/c_fc/kernel``, ``nets/1600x6400/uv/layers/0/U``).
A spec is a `PartitionSpec`, or `Largest(axis)`: "the largest dimension that the axis size
divides". A spec that does not fit a leaf (an axis size that does not divide the dimension, a
rank too small) degrades to replication on that dimension instead of failing, so the same rules
serve every model size and mesh shape.

The step function is never rewritten: `make_sharded_step` jits the unchanged `trainer.step`
with `in_shardings`/`out_shardings`, and XLA's SPMD partitioner inserts the collectives.
Mesh axes are `AxisType.Auto` (compiler-propagated shardings) because the model code is
sharding-agnostic; `jax.make_mesh` would otherwise default to `Explicit` axes.

Editor state (editor networks, running statistics, Adam moments) is replicated by default: it
is small next to the model (rank-limited MLPs over d_in + d_out features). For very wide
models pass ``state_rules=EDITOR_FSDP_RULES``, which shards the editor's U/V matrices and their
Adam moments (optax states reuse the parameter paths, so one rule covers both).

Multi-host
----------
Every host runs the same program; call `jax.distributed.initialize()` first, before any other
JAX call, then build the mesh over all global devices and use the functions below unchanged::

    import jax
    jax.distributed.initialize()      # on Slurm, Open MPI, Cloud TPU, Kubernetes: auto-detected
    mesh = make_mesh(data=-1, model=jax.local_device_count())   # model axis within a host
    step, state, params = make_sharded_step(trainer, mesh, state, model.params)
    for local_batch in loader:        # each host loads only its own slice of the global batch
        state, metrics = step(state, params, shard_batch(mesh, local_batch))

Off a managed cluster, pass the coordinator (host 0's address and a free port), the number
of processes and this process's id; only the coordinator address may come from the
environment (``JAX_COORDINATOR_ADDRESS``). For two hosts, with the script calling
``jax.distributed.initialize(num_processes=2, process_id=int(os.environ["PROCESS_ID"]))``::

    # on host 0 (address 10.0.0.1; it also runs the coordinator):
    JAX_COORDINATOR_ADDRESS=10.0.0.1:1234 PROCESS_ID=0 python my_train.py
    # on host 1:
    JAX_COORDINATOR_ADDRESS=10.0.0.1:1234 PROCESS_ID=1 python my_train.py

or explicitly ``jax.distributed.initialize(coordinator_address="10.0.0.1:1234",
num_processes=2, process_id=i)``. On Slurm or Open MPI a bare ``jax.distributed.initialize()``
reads everything from the launcher and gives each process the one GPU of its local rank, so
launch one task per GPU: ``srun --nodes=2 --ntasks-per-node=8 python my_train.py`` (or one task
per node with ``jax.distributed.initialize(local_device_ids=range(8))``).
A CPU-only cluster also needs ``jax.config.update("jax_cpu_collectives_implementation",
"gloo")`` before `initialize` (tests/test_sharding.py runs this recipe as 2 local processes).
Model parameters may be loaded in full on every host (`device_put` keeps each host's
shards); batches must go through `shard_batch`, which assembles the global array from the
per-host slices with `jax.make_array_from_process_local_data`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

DATA = "data"
MODEL = "model"

P = PartitionSpec


@dataclass(frozen=True)
class Largest:
    """Shard the largest dimension of a ≥2-D leaf that `axis`'s size divides (ties: the first)."""

    axis: str = MODEL


Spec = PartitionSpec | Largest
Rules = Sequence[tuple[str, Spec]]

# FSDP over "model": every 2-D kernel and embedding split along its larger dimension;
# biases, norm scales and anything else replicated.
DEFAULT_RULES: Rules = (
    (r"(^|/)(kernel|embedding)$", Largest(MODEL)),
    (r".*", P()),
)
# Everything on every device (the default for editor state).
REPLICATED: Rules = ((r".*", P()),)
# The editor's low-rank matrices (and, through the same paths, their Adam moments) FSDP-split.
EDITOR_FSDP_RULES: Rules = (
    (r"(^|/)(U|V)$", Largest(MODEL)),
    (r".*", P()),
)


# ----------------------------------------------------------------------------- the mesh
def make_mesh(data: int = -1, model: int = 1, devices: Sequence[Any] | None = None) -> Mesh:
    """A ("data", "model") mesh; -1 on one axis takes all remaining devices."""
    devices = list(jax.devices() if devices is None else devices)
    n, asked = len(devices), f"data={data} x model={model}"
    if data == -1 and model != -1:
        data = n // model if model > 0 and n % model == 0 else 0
    elif model == -1 and data != -1:
        model = n // data if data > 0 and n % data == 0 else 0
    if data < 1 or model < 1 or data * model > n:
        raise ValueError(f"cannot build a {asked} mesh from {n} devices: sizes must be "
                         f"positive (at most one -1) and their product at most {n}, with -1 "
                         f"dividing the devices left evenly")
    return jax.make_mesh((data, model), (DATA, MODEL), axis_types=(AxisType.Auto,) * 2,
                         devices=devices[: data * model])


# ----------------------------------------------------------------------------- rules
def path_str(path) -> str:
    """The "/"-joined pytree path that partition rules match against."""
    return jax.tree_util.keystr(path, simple=True, separator="/")


def _check_rules(mesh: Mesh, rules: Rules) -> list[tuple[re.Pattern, Spec]]:
    compiled = []
    for i, rule in enumerate(rules):
        try:
            pattern, spec = rule
            compiled.append((re.compile(pattern), spec))
        except (TypeError, ValueError, re.error) as e:
            raise ValueError(f"partition rule {i} {rule!r}: expected (regex, PartitionSpec "
                             f"or Largest) ({e})") from None
        if not isinstance(spec, (PartitionSpec, Largest)):
            raise TypeError(f"partition rule {i} {rule!r}: spec must be a PartitionSpec or "
                            f"Largest, got {type(spec).__name__}")
        entries = [spec.axis] if isinstance(spec, Largest) else list(spec)
        for entry in entries:
            for axis in entry if isinstance(entry, tuple) else (entry,):
                if axis is not None and axis not in mesh.shape:
                    raise ValueError(f"partition rule {i} {rule!r}: unknown mesh axis {axis!r};"
                                     f" the mesh has {tuple(mesh.shape)}")
    return compiled


def _fit(spec: Spec, shape: tuple[int, ...], mesh: Mesh) -> PartitionSpec:
    """The spec made valid for `shape`: entries that do not divide their dimension dropped."""
    if isinstance(spec, Largest):
        size = mesh.shape[spec.axis]
        if len(shape) < 2 or size == 1:
            return P()
        for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):  # stable: ties -> first
            if shape[dim] % size == 0:
                return P(*[spec.axis if d == dim else None for d in range(len(shape))])
        return P()
    entries = list(spec)[: len(shape)]
    fitted = []
    for dim, entry in enumerate(entries):
        axes = entry if isinstance(entry, tuple) else (entry,)
        size = int(np.prod([mesh.shape[a] for a in axes if a is not None]))
        fitted.append(entry if entry is not None and shape[dim] % size == 0 else None)
    while fitted and fitted[-1] is None:
        fitted.pop()
    return P(*fitted)


def partition_spec(path: str, shape: tuple[int, ...], mesh: Mesh,
                   rules: Rules = DEFAULT_RULES) -> PartitionSpec:
    """The PartitionSpec of one leaf: the first matching rule, fitted to the leaf's shape."""
    for pattern, spec in _check_rules(mesh, rules):
        if pattern.search(path):
            return _fit(spec, tuple(shape), mesh)
    return P()


def tree_shardings(mesh: Mesh, tree, rules: Rules):
    """A pytree of NamedSharding matching `tree` (arrays or ShapeDtypeStructs)."""
    compiled = _check_rules(mesh, rules)

    def one(path, leaf):
        name, shape = path_str(path), tuple(np.shape(leaf))
        spec = next((s for p, s in compiled if p.search(name)), P())
        return NamedSharding(mesh, _fit(spec, shape, mesh))

    return jax.tree_util.tree_map_with_path(one, tree)


def param_shardings(mesh: Mesh, params, rules: Rules = DEFAULT_RULES):
    """NamedShardings of model parameters under the partition rules."""
    return tree_shardings(mesh, params, rules)


def shard_params(mesh: Mesh, params, rules: Rules = DEFAULT_RULES):
    """Model parameters placed on the mesh (each device holds only its shards)."""
    return jax.device_put(params, param_shardings(mesh, params, rules))


def batch_sharding(mesh: Mesh, batch):
    """Leading (batch) axis over "data"; a leaf whose batch the axis does not divide (e.g. a
    single edit request next to a locality batch of 8), or a scalar, is replicated."""
    size = mesh.shape[DATA]

    def one(leaf):
        shape = np.shape(leaf)
        spec = P(DATA) if shape and shape[0] % size == 0 else P()
        return NamedSharding(mesh, spec)

    return jax.tree.map(one, batch)


def shard_batch(mesh: Mesh, batch):
    """A batch placed on the mesh. Multi-host: `batch` is this host's slice of the leading
    axis (hosts in process order), and the global array is assembled from all hosts."""
    if jax.process_count() == 1:
        return jax.device_put(batch, batch_sharding(mesh, batch))
    n = jax.process_count()
    global_shapes = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct((x.shape[0] * n, *x.shape[1:]) if x.ndim else (),
                                       x.dtype), batch)
    shardings = batch_sharding(mesh, global_shapes)
    for (path, g), sh in zip(jax.tree_util.tree_flatten_with_path(global_shapes)[0],
                             jax.tree.leaves(shardings), strict=True):
        if g.shape and sh.spec == P():
            raise ValueError(f"batch leaf {path_str(path)}: global batch {g.shape[0]} "
                             f"({n} hosts x {g.shape[0] // n}) is not divisible by the "
                             f"{mesh.shape[DATA]}-way data axis; each host must feed a slice")
    return jax.tree.map(
        lambda s, x, g: jax.make_array_from_process_local_data(s, np.asarray(x), g.shape),
        shardings, batch, global_shapes)


# ----------------------------------------------------------------------------- jitted entry points
def _per_layout_jit(fn, mesh: Mesh, leading: tuple, out_shardings, donate: tuple):
    """`fn(*leading, batch)` jitted with fixed shardings for the leading arguments and the
    batch's own: each batch layout (leading sizes the data axis divides or not) compiles once,
    so batches whose row counts change (k edits drawn per step) keep working."""
    compiled = {}

    def call(*args):
        *rest, batch = args
        batch_sh = batch_sharding(mesh, batch)
        key = (jax.tree.structure(batch_sh), tuple(jax.tree.leaves(batch_sh)))
        if key not in compiled:
            compiled[key] = jax.jit(fn, in_shardings=(*leading, batch_sh),
                                    out_shardings=out_shardings, donate_argnums=donate)
        return compiled[key](*rest, batch)

    return call


def make_sharded_step(trainer, mesh: Mesh, state: dict, model_params: dict,
                      batch: dict | None = None, *, rules: Rules = DEFAULT_RULES,
                      state_rules: Rules = REPLICATED,
                      donate: bool = True) -> tuple[Callable, dict, dict]:
    """(step, placed_state, placed_params): `trainer.step` jitted for the mesh.

    Each batch's leading axis goes over "data" where the axis divides it (else the leaf is
    replicated); a new batch layout compiles anew (`batch`, an example, is no longer needed).
    Host batches are placed by jit itself on one host; place them with `shard_batch` on
    several. Metrics come back replicated.
    The placed state is donated to each call unless `donate=False` (it may share buffers with
    `state` when that already has the right layout).
    """
    del batch
    state_sh = tree_shardings(mesh, state, state_rules)
    params_sh = param_shardings(mesh, model_params, rules)
    replicated = NamedSharding(mesh, P())    # a pytree prefix: every metric replicated
    step = _per_layout_jit(trainer.step, mesh, (state_sh, params_sh), (state_sh, replicated),
                           (0,) if donate else ())
    return step, jax.device_put(state, state_sh), jax.device_put(model_params, params_sh)


def make_sharded_eval(trainer, mesh: Mesh, editor_state: dict, model_params: dict, *,
                      rules: Rules = DEFAULT_RULES,
                      state_rules: Rules = REPLICATED) -> Callable:
    """`trainer.eval_step(editor_state, params, batch)` jitted for the mesh (metrics
    replicated); the arguments must be placed as `make_sharded_step` placed them."""
    leading = (tree_shardings(mesh, editor_state, state_rules),
               param_shardings(mesh, model_params, rules))
    return _per_layout_jit(trainer.eval_step, mesh, leading, NamedSharding(mesh, P()), ())


def make_sharded_edit(editor, mesh: Mesh, editor_state: dict, model_params: dict,
                      edit_batch: dict, *, rules: Rules = DEFAULT_RULES,
                      state_rules: Rules = REPLICATED) -> tuple[Callable, dict, dict]:
    """(edit, placed_editor_state, placed_params): `editor.edit` jitted for the mesh; the edited
    parameters come back with the same shardings as the input parameters."""
    state_sh = tree_shardings(mesh, editor_state, state_rules)
    params_sh = param_shardings(mesh, model_params, rules)
    edit = jax.jit(editor.edit, in_shardings=(state_sh, params_sh,
                                              batch_sharding(mesh, edit_batch)),
                   out_shardings=params_sh)
    return edit, jax.device_put(editor_state, state_sh), jax.device_put(model_params, params_sh)
