"""Sharded meta-training is the single-device step, laid out over a device mesh.

The equivalence tests run tests/sharding_worker.py ONCE in a subprocess with 8 fake CPU devices
(this process has already initialised JAX with one device) and compare its results here.
The partition-rule tests need no devices: rules only read the mesh's axis sizes.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from jax.sharding import AbstractMesh
from jax.sharding import PartitionSpec as P

from mend_jax.sharding import (
    DEFAULT_RULES,
    EDITOR_FSDP_RULES,
    Largest,
    make_mesh,
    partition_spec,
)

ROOT = Path(__file__).resolve().parents[1]
MESHES = ("data8", "model8", "mixed2x4")
METRICS = ("loss", "edit_loss", "locality_kl")
# Adam divides each gradient entry by its own RMS, so an entry whose gradient is ~0 moves by up
# to lr (1e-3) whichever way reduction-order rounding tips it; atol is 1% of that.
RTOL, ATOL = 1e-4, 1e-5


WORKER = str(ROOT / "tests" / "sharding_worker.py")


def worker_env(n_devices: int, **extra) -> dict:
    # Compile time dominates (one meta-training step per mesh); LLVM's optimisation level
    # changes nothing the tests compare, since every run is compiled alike.
    return dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT),
                XLA_FLAGS=f"--xla_force_host_platform_device_count={n_devices} "
                          "--xla_backend_optimization_level=0 "
                          "--xla_llvm_disable_expensive_passes=true", **extra)


# one meta-training step compiled per mesh in a subprocess (about 40 s): every test that reads
# its results is marked slow, so the default run deselects them and .ci/run runs them (-m slow)
@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    out = tmp_path_factory.mktemp("sharding")
    proc = subprocess.run([sys.executable, WORKER, str(out)], env=worker_env(8), cwd=ROOT,
                          capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads((out / "results.json").read_text())
    arrays = {name: dict(np.load(out / f"{name}.npz")) for name in ("single", *MESHES)}
    return results, arrays


@pytest.mark.slow
@pytest.mark.parametrize("mesh", MESHES)
def test_sharded_metrics_match_single_device(sharded, mesh):
    results, _ = sharded
    assert results[mesh]["n_skipped"] == 0
    for got, want in zip(results[mesh]["metrics"], results["single"]["metrics"], strict=True):
        for k in METRICS:
            np.testing.assert_allclose(got[k], want[k], rtol=RTOL, err_msg=f"{mesh} {k}")


@pytest.mark.slow
@pytest.mark.parametrize("mesh", MESHES)
def test_sharded_editor_state_matches_single_device(sharded, mesh):
    _, arrays = sharded
    got, want = arrays[mesh], arrays["single"]
    keys = [k for k in want if k.startswith("editor/")]
    assert keys and set(keys) == {k for k in got if k.startswith("editor/")}
    for k in keys:
        np.testing.assert_allclose(got[k], want[k], rtol=RTOL, atol=ATOL, err_msg=f"{mesh} {k}")


@pytest.mark.slow
@pytest.mark.parametrize("mesh", MESHES)
def test_sharded_edit_matches_single_device(sharded, mesh):
    _, arrays = sharded
    got, want = arrays[mesh], arrays["single"]
    keys = [k for k in want if k.startswith("edited/")]
    assert keys
    for k in keys:
        np.testing.assert_allclose(got[k], want[k], rtol=RTOL, atol=1e-6, err_msg=f"{mesh} {k}")


@pytest.mark.slow
def test_model_axis_really_shards(sharded):
    results, _ = sharded
    for mesh, model_size in (("model8", 8), ("mixed2x4", 4)):
        lay = results[mesh]["layouts"]
        # c_fc kernel [32, 128]: its larger dimension split over "model"
        assert lay["kernel"]["spec"] == "P(None, 'model')"
        assert lay["kernel"]["n_devices"] == 8
        assert lay["kernel"]["shard_shape"] == [32, 128 // model_size]
        assert lay["edited_kernel"] == lay["kernel"]          # the edit keeps the layout
        assert lay["bias"]["shard_shape"] == lay["bias"]["shape"]   # vectors replicated
    data_only = results["data8"]["layouts"]
    assert data_only["kernel"]["shard_shape"] == data_only["kernel"]["shape"]


@pytest.mark.slow
def test_batch_split_over_data_axis(sharded):
    results, _ = sharded
    for mesh, data_size in (("data8", 8), ("model8", 1), ("mixed2x4", 2)):
        assert results[mesh]["layouts"]["batch"]["shard_shape"] == [8 // data_size, 6]


@pytest.mark.slow
def test_editor_state_replicated_or_sharded_by_its_rules(sharded):
    results, _ = sharded
    replicated = results["mixed2x4"]["layouts"]["editor_matrix"]
    assert replicated["shard_shape"] == replicated["shape"]
    fsdp = results["model8"]["layouts"]["editor_matrix"]    # EDITOR_FSDP_RULES
    assert fsdp["shard_shape"] != fsdp["shape"]


@pytest.mark.slow
def test_multi_process_run_matches_single_device(sharded, tmp_path):
    """The module docstring's multi-host recipe, as 2 processes x 2 CPU devices on localhost."""
    results, _ = sharded
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    procs = [subprocess.Popen([sys.executable, WORKER, "--multihost", str(tmp_path)],
                              env=worker_env(2, PROCESS_ID=str(i), NUM_PROCESSES="2",
                                             JAX_COORDINATOR_ADDRESS=f"localhost:{port}"),
                              cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True)
             for i in range(2)]
    for proc in procs:
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-4000:]
    for i in range(2):
        host = json.loads((tmp_path / f"host{i}.json").read_text())
        assert host["n_processes"] == 2 and host["mesh"] == {"data": 2, "model": 2}
        assert host["global_batch_shape"] == [8, 6]      # each host fed 4 rows
        assert host["kernel"]["shard_shape"] == [32, 64]
        for got, want in zip(host["metrics"], results["single"]["metrics"], strict=True):
            for k in METRICS:
                np.testing.assert_allclose(got[k], want[k], rtol=RTOL, err_msg=f"host{i} {k}")


# ----------------------------------------------------------------------------- rules, no devices
MESH_2x4 = AbstractMesh((2, 4), ("data", "model"))


@pytest.mark.parametrize("path, shape, want", [
    ("transformer/h_0/mlp/c_fc/kernel", (32, 128), P(None, "model")),
    ("transformer/h_0/mlp/c_proj/kernel", (128, 32), P("model", None)),
    ("transformer/wte/embedding", (64, 32), P("model", None)),
    ("transformer/h_0/attn/c_proj/kernel", (32, 32), P("model", None)),      # tie: first dim
    ("transformer/h_0/mlp/c_fc/kernel", (30, 128), P(None, "model")),
    ("transformer/h_0/mlp/c_fc/kernel", (36, 126), P("model", None)),       # larger one odd
    ("transformer/wte/embedding", (50257, 33), P()),                        # neither divides
    ("transformer/h_0/mlp/c_fc/bias", (128,), P()),
    ("transformer/ln_f/scale", (32,), P()),
])
def test_default_rules(path, shape, want):
    assert partition_spec(path, shape, MESH_2x4, DEFAULT_RULES) == want


def test_explicit_spec_degrades_per_dimension():
    rules = [(r"kernel$", P("data", "model")), (r".*", P())]
    assert partition_spec("a/kernel", (4, 8), MESH_2x4, rules) == P("data", "model")
    assert partition_spec("a/kernel", (4, 6), MESH_2x4, rules) == P("data")
    assert partition_spec("a/kernel", (3, 6), MESH_2x4, rules) == P()
    assert partition_spec("a/kernel", (8,), MESH_2x4, rules) == P("data")    # rank too small
    assert partition_spec("a/other", (8, 8), MESH_2x4, rules) == P()


def test_editor_rules_cover_adam_moments():
    adam_mu = "opt_state/inner_opt_state/1/inner_states/nets/inner_state/0/mu"
    for path in ("editor/params/nets/32x128/uv/layers/0/U", f"{adam_mu}/nets/32x128/uv/layers/0/V"):
        assert partition_spec(path, (160, 16), MESH_2x4, EDITOR_FSDP_RULES) == P("model", None)
    assert partition_spec("editor/stats/32x128/u_mean", (32,), MESH_2x4, EDITOR_FSDP_RULES) == P()


def test_bad_rules_fail_with_the_rule():
    with pytest.raises(ValueError, match="unknown mesh axis 'tensor'"):
        partition_spec("a/kernel", (8, 8), MESH_2x4, [(r"kernel", P("tensor"))])
    with pytest.raises(ValueError, match="unknown mesh axis 'tensor'"):
        partition_spec("a/kernel", (8, 8), MESH_2x4, [(r"kernel", Largest("tensor"))])
    with pytest.raises(ValueError, match="rule 0"):
        partition_spec("a/kernel", (8, 8), MESH_2x4, [(r"kernel(", P())])
    with pytest.raises(TypeError, match="spec must be a PartitionSpec or Largest"):
        partition_spec("a/kernel", (8, 8), MESH_2x4, [(r"kernel", ("model", None))])


def test_make_mesh_sizes():
    mesh = make_mesh()                     # this process: 1 CPU device
    assert dict(mesh.shape) == {"data": 1, "model": 1}
    with pytest.raises(ValueError, match="data=-1 x model=2 mesh from 1 devices"):
        make_mesh(data=-1, model=2)
