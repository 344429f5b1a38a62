"""Bad input fails early with one named error: config keys, checkpoints, edits, CLIs."""

import json
import math
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers

from mend_jax.config import load_config, validate_config
from mend_jax.errors import (
    CheckpointError,
    ConfigError,
    DataError,
    EditError,
    MendError,
    RunError,
    cli_main,
)


def test_a_missing_extra_names_the_pip_extra(monkeypatch, tmp_path, capsys):
    """datasets and matplotlib are extras; without them, the feature that needs one says which
    extra installs it, in one line (the CLIs print it without a traceback)."""
    import builtins

    from mend_jax.data import load_requests
    from mend_jax.errors import MissingExtraError
    from mend_jax.evaluation import plot_vs_n_edits

    real_import = builtins.__import__

    def no_extras(name, *args, **kwargs):
        if name.split(".")[0] in ("datasets", "matplotlib"):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_extras)
    monkeypatch.setattr("importlib.import_module",
                        lambda name, package=None: no_extras(name, fromlist=["x"]))
    with pytest.raises(MissingExtraError, match=r"^plotting \(--plot\) needs matplotlib, "
                       r"which is not installed: pip install 'mend-jax\[plot\]'$"):
        plot_vs_n_edits({1: {"mend": {}}}, tmp_path / "p.png")
    table = tmp_path / "t.parquet"
    table.write_bytes(b"PAR1")
    with pytest.raises(MissingExtraError, match=rf"^{table}: reading .parquet files needs "
                                                r"datasets, .*mend-jax\[data\]'$"):
        load_requests(table)
    assert cli_main(_raises(MissingExtraError("x needs datasets")), []) == 2
    assert capsys.readouterr().err == "error: x needs datasets\n"


def test_every_error_is_a_mend_error_under_its_old_names():
    from mend_jax import config as config_module
    from mend_jax import data, models

    assert config_module.ConfigError is ConfigError
    assert data.DataError is DataError and models.CheckpointError is CheckpointError
    for cls in (ConfigError, DataError, CheckpointError, EditError):
        assert issubclass(cls, MendError) and issubclass(cls, ValueError)
    assert issubclass(RunError, MendError)


# ----------------------------------------------------------------------------- config
@pytest.mark.parametrize("overrides", [
    [], ["model=gpt2", "data=zsre", "alg=mend"], ["model=t5-small", "data=counterfact"],
    ["model=llama", "data=wikitext"], ["eval.max_examples=5", "alg.loop.max_steps=1000"],
    ["alg.train.lr=1", "+alg.baselines.ft.linf=0.1"],
])
def test_shipped_configs_validate(overrides):
    load_config(overrides)


@pytest.mark.parametrize("override, message", [
    ("eval.methods=[mend", "eval.methods='[mend': expected a list"),
    ("eval.methods=[mend,ftt]", "eval.methods=['mend', 'ftt']: each must be one of"),
    ("eval.methods=[]", "eval.methods=[]: each must be one of"),
    ("eval.max_examples=abc", "eval.max_examples='abc': expected an integer or null"),
    ("alg.loop.max_steps=1e3", "alg.loop.max_steps=1000.0: expected an integer"),
    ("alg.loop.max_steps=abc", "alg.loop.max_steps='abc': expected an integer"),
    ("alg.loop.val_every=0", "alg.loop.val_every=0: must be >= 1"),
    ("alg.loop.max_steps=0", "alg.loop.max_steps=0: must be >= 1"),
    ("alg.loop.n_edits=0", "alg.loop.n_edits=0: must be >= 1"),
    ("eval.n_edits=0", "eval.n_edits=0: must be >= 1"),
    ("alg.train.lr=fast", "alg.train.lr='fast': expected a number"),
    ("alg.train.accumulate=2.5", "alg.train.accumulate=2.5: expected an integer"),
    ("alg.editor.norm=1", "alg.editor.norm=1: expected true/false"),
    ("alg.editor.init=zeros", "alg.editor: init must be 'id' or 'xavier'"),
    ("alg.loop.select_on=acc", "alg.loop: select_on must be"),
    ("alg.baselines.ft.steps=ten", "alg.baselines.ft.steps='ten': expected an integer"),
    ("+alg.baselines.fft={steps: 1}", "alg.baselines.fft: unknown method"),
    ("+alg.loop.max_step=3", "alg.loop.max_step: unknown key; closest: ['max_steps']"),
    ("dtype=float64", "dtype='float64': expected one of"),
    ("eval.split=dev", "eval.split='dev': expected one of train, val, test"),
    ("seed=0.5", "seed=0.5: expected an integer"),
    ("mesh.data=0", "mesh: data=0, model=1: sizes must be positive"),
    ("mesh.model=two", "mesh.model='two': expected an integer"),
    ("model.max_length=1", "model.max_length=1: must be >= 2"),
    ("model.pretrain.stepz=3", "model.pretrain.stepz: unknown key; closest: ['steps']"),
    ("model.tokenizer.kind=wordpiece", "model.tokenizer.kind='wordpiece': expected one of bpe"),
    ("data.edit_forms=[statment]", "data: edit_forms must be a non-empty list of"),
    ("data.n_val=ten", "data.n_val='ten': expected an integer or null"),
    ("alg.baselines.ft_l.linf=wide", "alg.baselines.ft_l.linf='wide': expected a number or null"),
    ("+mesh.pipeline=2", "mesh.pipeline: unknown key; closest"),
    ("+evals.split=val", "evals: unknown key; closest: ['eval']"),
])
def test_bad_values_are_refused_naming_the_key(override, message):
    with pytest.raises(ConfigError) as e:
        load_config([override])
    assert message in str(e.value)


def test_sections_a_config_leaves_out_take_the_schema_defaults():
    from mend_jax.schema import RunConfig

    cfg = validate_config({"seed": 1})
    assert cfg == RunConfig(seed=1) and cfg.alg.train.lr == 1e-6 and cfg.mesh.data == -1
    assert validate_config(cfg.to_dict()) == cfg


# ----------------------------------------------------------------------------- CLIs
def _raises(exc):
    def main(argv):
        raise exc
    return main


@pytest.mark.parametrize("exc", [ConfigError("alg.loop.max_steps=1000.0: expected an integer"),
                                 FileNotFoundError("runs/x: no config.yaml"),
                                 ValueError("n_edits=3 but only 2 requests\nto evaluate")])
def test_cli_prints_one_line_and_exits_2(exc, capsys):
    assert cli_main(_raises(exc), ["a"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err


def test_cli_debug_shows_the_traceback(capsys):
    assert cli_main(_raises(ConfigError("bad key")), ["--debug"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and err.rstrip().endswith("error: bad key")


def test_cli_lets_a_bug_through():
    with pytest.raises(ZeroDivisionError):
        cli_main(_raises(ZeroDivisionError("a bug, not bad input")), [])


def test_cli_logging_reaches_stderr_although_a_handler_exists(capsys):
    import logging

    def main(argv):
        logging.getLogger("mend_jax.loop").info("resumed from step %d", 7)
        return 0

    root = logging.getLogger()
    extra = logging.NullHandler()  # what absl installs first, making basicConfig a no-op
    root.addHandler(extra)
    try:
        assert cli_main(main, []) == 0
    finally:
        root.removeHandler(extra)
    assert "resumed from step 7" in capsys.readouterr().err


def test_train_cli_refuses_a_bad_override_without_traceback(capsys):
    import train

    assert train.main(["alg.loop.max_steps=1e3"]) == 2
    err = capsys.readouterr().err
    assert err == "error: alg.loop.max_steps=1000.0: expected an integer (write 1000)\n"


def test_eval_cli_on_a_missing_run_is_one_line(tmp_path, capsys):
    import eval as eval_cli

    assert eval_cli.main([str(tmp_path / "nothing")]) == 2
    assert capsys.readouterr().err.startswith(f"error: {tmp_path / 'nothing'}: no config.yaml")


# ----------------------------------------------------------------------------- results files
def test_results_are_strict_json(tmp_path):
    from mend_jax.pipeline import write_results

    path = tmp_path / "results.json"
    write_results(path, {"mend": {"edit_success": float("nan"), "drawdown": np.float32(0.25),
                                  "kl": [float("inf"), -math.inf, 1.0]}, "n": np.int64(3)})

    def refuse(name):
        raise AssertionError(f"non-standard JSON constant {name}")

    got = json.loads(path.read_text(), parse_constant=refuse)
    assert got == {"mend": {"edit_success": None, "drawdown": 0.25, "kl": [None, None, 1.0]},
                   "n": 3}


# ----------------------------------------------------------------------------- base weights
def test_non_finite_base_weights_are_refused_naming_the_tensor(tmp_path):
    import torch

    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=61, n_positions=16, n_embd=24, n_layer=2, n_head=3)
    hf = transformers.GPT2LMHeadModel(cfg)
    with torch.no_grad():
        hf.transformer.h[1].mlp.c_fc.weight[3, 5] = float("nan")
        hf.transformer.h[0].attn.c_proj.weight[0, 0] = float("inf")
    hf.save_pretrained(str(tmp_path))
    from mend_jax.models import load_pretrained

    with pytest.raises(CheckpointError) as e:
        load_pretrained(tmp_path)
    msg = str(e.value)
    assert "tensors holding NaN or inf" in msg
    assert "transformer.h.1.mlp.c_fc.weight (1 of 2304 values)" in msg
    assert "transformer.h.0.attn.c_proj.weight (1 of 576 values)" in msg


# ----------------------------------------------------------------------------- edit requests
@pytest.fixture(scope="module")
def tiny_mend():
    from mend_jax.editors import MEND, MENDConfig
    from mend_jax.models import from_config

    model = from_config(transformers.GPT2Config(vocab_size=61, n_positions=16, n_embd=24,
                                                n_layer=2, n_head=3), seed=0)
    editor = MEND(model, ["transformer.h.1.mlp.c_fc.weight"], MENDConfig(rank=8))
    return model, editor, editor.init(jax.random.key(0))


def _batch(ids):
    ids = jnp.asarray(ids, jnp.int32)
    return {"input_ids": ids, "attention_mask": jnp.ones_like(ids),
            "labels": ids.at[:, :2].set(-100)}


def test_edit_refuses_token_ids_outside_the_vocabulary(tiny_mend):
    model, editor, state = tiny_mend
    with pytest.raises(EditError, match=r"input_ids\[0, 3\] = 61: token id outside the model's "
                                        r"vocabulary of 61"):
        editor.edit(state, model.params, _batch([[1, 2, 3, 61, 4]]))
    with pytest.raises(EditError, match=r"input_ids\[1, 0\] = -1"):
        editor.edit(state, model.params, _batch([[1, 2, 3], [-1, 2, 3]]))
    new = editor.edit(state, model.params, _batch([[1, 2, 3, 60, 4]]))
    assert all(bool(jnp.isfinite(x).all()) for x in jax.tree.leaves(new))


def test_edit_refuses_sequences_longer_than_the_positions_even_under_jit(tiny_mend):
    model, editor, state = tiny_mend
    too_long = _batch([list(range(1, 18))])  # 17 tokens, 16 positions
    with pytest.raises(EditError, match="input_ids: sequences of 17 tokens, but the model has 16 "
                                        "positions"):
        editor.edit(state, model.params, too_long)
    with pytest.raises(EditError, match="17 tokens"):
        jax.jit(editor.edit)(state, model.params, too_long)


def test_fine_tuning_and_nested_batches_are_checked_too(tiny_mend):
    from mend_jax.editing import check_edit_batch
    from mend_jax.editors import make_editor

    model, _, _ = tiny_mend
    ft = make_editor("ft", model, ["transformer.h.1.mlp.c_fc.weight"], steps=1)
    with pytest.raises(EditError, match="99"):
        ft.edit({}, model.params, _batch([[1, 99]]))
    nested = {"edit_inner": _batch([[1, 2]]), "loc": _batch(np.array([[[1, 70]]]))}
    with pytest.raises(EditError, match=r"loc\.input_ids\[0, 0, 1\] = 70"):
        check_edit_batch(model, nested)


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))


def test_a_corrupt_run_config_is_one_line_naming_the_file(tmp_path, capsys):
    from mend_jax.cli.eval import main as eval_main

    (tmp_path / "config.yaml").write_text("seed: [0\nmodel: {\n")
    assert eval_main([str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {tmp_path / 'config.yaml'}: invalid YAML (") and \
        err.count("\n") == 1, err
    from mend_jax.pipeline import load_run

    with pytest.raises(ConfigError) as e:      # through the API as well: one line
        load_run(tmp_path)
    assert "\n" not in str(e.value) and "invalid YAML" in str(e.value)
    (tmp_path / "config.yaml").write_text("- a list\n")
    assert eval_main([str(tmp_path)]) == 2
    assert "config.yaml: expected a mapping at the top level" in capsys.readouterr().err


def test_the_command_line_tools_start_openblas_with_one_thread_unless_told_otherwise():
    """JAX's LAPACK calls on CPU go through OpenBLAS, whose thread pool fights XLA's for the
    cores (the default's step ran 1.8x slower): the CLIs set one thread, a user's value wins."""
    import os
    import subprocess

    code = ("import os, mend_jax.cli.train, mend_jax.cli.eval, mend_jax.cli.edit; "
            "print(os.environ['OPENBLAS_NUM_THREADS'])")
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_NUM_THREADS"}
    for given, expected in ((None, "1"), ("3", "3")):
        if given is not None:
            env["OPENBLAS_NUM_THREADS"] = given
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                             text=True, check=True)
        assert out.stdout.strip().splitlines()[-1] == expected
