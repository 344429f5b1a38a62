"""The benchmark scripts in bench/ run end to end on tiny configs, and the PyTorch baseline they
time computes the same meta-loss and gradients as mend-jax. No assertion on wall-clock time."""

import importlib.util
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"


def _load(name: str):
    """A bench/ module under a private name (bench/ is not a package and not on sys.path)."""
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_bench(script: str, *flags: str) -> str:
    results = BENCH / "RESULTS.md"
    before = results.read_text() if results.exists() else None
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", TRANSFORMERS_VERBOSITY="error")
    proc = subprocess.run([sys.executable, str(BENCH / script), "--small", "--steps", "2",
                           "--warmup", "1", "--no-record", *flags],
                          capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    lines = proc.stdout.splitlines()
    assert any(ln.startswith("|---") for ln in lines), proc.stdout  # a markdown table
    assert sum(ln.startswith("| ") for ln in lines) >= 2, proc.stdout
    after = results.read_text() if results.exists() else None
    assert before == after, "--no-record must leave bench/RESULTS.md alone"
    return proc.stdout


@pytest.mark.slow  # three subprocesses, two jit compilations: about 40 s
def test_bench_meta_step_runs():
    out = run_bench("bench_meta_step.py", "--model", "gpt2", "--workers", "jax-mend,torch-mend")
    assert "mend-jax" in out and "pytorch" in out and "MEND meta-step" in out


@pytest.mark.slow  # a subprocess, one compilation per kind of step
def test_bench_logit_positions_runs():
    out = run_bench("bench_logit_positions.py")
    assert "| labelled positions only" in out and "| every position" in out


@pytest.mark.slow  # a subprocess, four compilations
def test_bench_flat_dot_runs():
    out = run_bench("bench_flat_dot.py")
    assert "pretraining step" in out and "forward + backward" in out
    assert "einsum / flat" in out


@pytest.mark.slow  # builds the default benchmark and tokenizer, one or two compilations each
@pytest.mark.parametrize("compare,row", [("logits", "| every position"),
                                         ("lapack-threads", "OpenBLAS threads (one per core)")])
def test_bench_default_step_runs(compare, row):
    out = run_bench("bench_default_step.py", "--compare", compare)
    assert row in out and "the loss after the last step agrees" in out
    assert "DIFFERENT" not in out  # the two steps' losses agree


@pytest.mark.slow  # a subprocess and its compilations: about 30 s
def test_bench_edit_latency_runs():
    out = run_bench("bench_edit_latency.py", "--edits", "2")
    assert "edit/fwd_bwd_inner" in out


@pytest.mark.slow  # a subprocess and its compilations: about 40 s
def test_profile_meta_step_runs():
    out = run_bench("profile_meta_step.py")
    for part in ("capture", "editor forward + backward", "loss passes", "optimizer", "step"):
        assert f"| {part}" in out, part


@pytest.mark.slow  # a subprocess, two compilations per row: about 30 s
def test_bench_many_edits_runs():
    # one row (the whitened solve exercises the most code): each row compiles twice
    out = run_bench("bench_many_edits.py", "--edits", "4", "--aggregates", "lstsq_whiten")
    assert "4_single_calls_s" in out and "lstsq_whiten" in out


@pytest.mark.slow  # a subprocess, a dozen compilations (no execution but one matmul)
def test_flop_bounds_runs():
    out = run_bench("flop_bounds.py", "--edits", "2", "--many", "8")
    rows = {ln.split("|")[1].strip(): ln.split("|")[2:-1] for ln in out.splitlines()
            if ln.startswith("| ") and "program" not in ln}
    gpt2 = rows["gpt2 (tiny), 2 edit(s) of 16 tokens"]
    edit, cap, nets = (float(x) for x in gpt2[:3])
    assert abs(edit - (cap + nets)) < 0.1 * edit  # the edit is its capture plus its editor
    pooled = rows["offline default's shape, 8 edits in one call, sum"]
    assert 0.8 < float(pooled[4]) < 1.2  # pooling k edits does k single edits' arithmetic


@pytest.mark.slow  # one subprocess and compilation per device count
def test_bench_scaling_runs():
    out = run_bench("bench_scaling.py", "--devices", "2")  # 1..8 devices: tests/test_sharding.py
    assert "SIMULATED" in out


@pytest.mark.parametrize("kind", ["gpt2", pytest.param("t5", marks=pytest.mark.slow)])
def test_torch_baseline_matches_mend_jax(kind):
    """Same weights, editor state and batch: the PyTorch step's meta-loss and its gradients
    w.r.t. the editor equal mend-jax's (so the benchmark compares the same computation)."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("torch")
    common, torch_mend = _load("common"), _load("torch_mend")
    from mend_jax.editors import MEND, MENDConfig
    from mend_jax.models import from_config, save_pretrained
    from mend_jax.training import MetaTrainer, TrainConfig

    cfg = common.hf_config(kind, small=True)
    model = from_config(cfg, seed=0)
    mend_cfg, train_cfg = MENDConfig(rank=16), TrainConfig(accumulate=1)
    editor = MEND(model, config=mend_cfg)
    trainer = MetaTrainer(editor, train_cfg)
    state = trainer.init(jax.random.key(1))["editor"]
    # a non-identity editor (U != 0) so every editor parameter gets a gradient
    rng = np.random.default_rng(2)
    state["params"] = jax.tree.map(
        lambda x: np.asarray(x) + 0.01 * rng.standard_normal(x.shape, np.float32)
        if x.ndim == 2 else x, state["params"])
    batch = common.meta_batch(kind, cfg.vocab_size, 2, 2, small=True)
    (loss, (metrics, _)), grads = jax.jit(jax.value_and_grad(trainer.loss, has_aux=True))(
        state["params"], state["stats"], model.params, jax.tree.map(jnp.asarray, batch))

    with tempfile.TemporaryDirectory() as d:
        save_pretrained(model, None, d)
        cls = (transformers.T5ForConditionalGeneration if kind == "t5"
               else transformers.GPT2LMHeadModel)
        hf = cls.from_pretrained(d)
    tm = torch_mend.TorchMEND(hf, editor.layout.inner_params, mend_cfg, train_cfg)
    torch_mend.load_jax_editor(tm, state)
    t_loss, t_metrics = tm.loss(torch_mend.to_torch(batch), train=True)
    t_loss.backward()

    np.testing.assert_allclose(t_loss.item(), float(loss), rtol=1e-4)
    for k in ("edit_loss", "pre_edit_loss"):
        np.testing.assert_allclose(float(t_metrics[k]), float(metrics[k]), rtol=1e-4)
    for g, net in tm.editor.nets.items():
        for layer, want in zip(net.mlp.layers, grads["nets"][g]["uv"]["layers"]):
            for name, got in (("U", layer.u.grad), ("V", layer.v.grad), ("b", layer.bias.grad),
                              ("mode_scale", layer.mode_scale.weight.grad),
                              ("mode_shift", layer.mode_shift.weight.grad)):
                ref = np.asarray(want[name])
                np.testing.assert_allclose(got.numpy(), ref, rtol=1e-3,
                                           atol=1e-4 * np.abs(ref).max() + 1e-12,
                                           err_msg=f"{g} {name}")
    for n in editor.layout.inner_params:
        np.testing.assert_allclose(float(tm.editor.edit_lrs.grad[tm.editor.index[n]]),
                                   float(grads["edit_lrs"][n]), rtol=1e-3)


def test_pairwise_locality_predicts_a_groups_losses_from_its_single_edits():
    """`bench/pairwise_locality.py`: request j's locality fact is lost in a group when some
    edit of that group broke it alone; pairs are counted off the diagonal."""
    mod = _load("pairwise_locality")
    broken = np.zeros((4, 4), bool)
    broken[0, 1] = True      # edit 0 breaks request 1's fact
    broken[2, 2] = True      # edit 2 breaks its own fact
    broken[3, 0] = True      # edit 3 breaks request 0's fact (another group below)
    order = np.array([0, 1, 2, 3])
    assert mod.union_drawdown(broken, order, 2) == 0.5          # groups {0,1}: 1; {2,3}: 2
    assert mod.union_drawdown(broken, order, 4) == 0.75         # 0, 1, 2
    assert mod.union_drawdown(broken, np.array([0, 2, 1, 3]), 2) == 0.25   # {0,2}: 2 only
    assert mod.union_drawdown(broken, order, 3) == 2 / 3        # {0,1,2}; 3 dropped
    rates = mod.pair_rates(broken, {"all": np.ones((4, 4), bool)})
    assert rates["all"] == (12, 2 / 12)
