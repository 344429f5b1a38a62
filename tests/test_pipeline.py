"""The default pipeline, reduced to tiny sizes, through the real CLIs (train.py, eval.py, edit.py),
and crash safety: training killed with SIGKILL at random points resumes to the same result."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent


def tiny_overrides(run_dir: Path, cache_dir: Path, max_steps: int = 30) -> list[str]:
    return [
        "model.build.n_embd=32", "model.build.n_layer=2", "model.build.n_head=2",
        "model.pretrain.steps=60",
        "model.inner_params=[transformer.h.1.mlp.c_fc.weight,transformer.h.1.mlp.c_proj.weight]",
        "data.n_val=10", "data.n_test=12", "data.n_train=60",
        f"alg.loop.max_steps={max_steps}", "alg.loop.val_every=10", "alg.loop.val_batches=2",
        "alg.loop.save_every=5", "alg.loop.log_every=5", "alg.editor.rank=16",
        "eval.max_examples=6", "eval.methods=[mend,untrained,ft,ft_l]",
        f"out_dir={run_dir}", f"cache_dir={cache_dir}", "progress=false",
    ]


EXPECTED_KEYS = {"edit_success", "generality", "drawdown", "locality_kl", "n_edits", "n_examples"}


# train.py end to end (about a minute): every test that reads this run is marked slow, so the
# default run deselects them and .ci/run runs them with `-m slow`
@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    import train

    root = tmp_path_factory.mktemp("pipeline")
    run_dir = root / "run"
    assert train.main(tiny_overrides(run_dir, root / "cache")) == 0
    return run_dir, root


@pytest.mark.slow
def test_train_writes_results_for_every_method(trained_run):
    run_dir, _ = trained_run
    results = json.loads((run_dir / "results.json").read_text())
    for method in ("mend", "untrained", "ft", "ft_l"):
        assert EXPECTED_KEYS <= set(results[method]), method
        assert results[method]["n_examples"] == 6
    assert (run_dir / "checkpoints" / "best").is_dir()
    assert any((run_dir / "tb").iterdir())
    assert results["_run"]["steps"] == 30


@pytest.mark.slow
def test_base_model_is_cached(trained_run, capsys):
    _, root = trained_run
    cached = list((root / "cache").glob("base-*/model.safetensors"))
    assert len(cached) == 1


@pytest.mark.slow
def test_eval_cli_batched_edits_and_plot(trained_run):
    import eval as eval_cli

    run_dir, _ = trained_run
    out = run_dir / "eval_k.json"
    assert eval_cli.main([str(run_dir), "--n-edits", "1", "3", "--methods", "mend", "ft",
                          "--plot", "--out", str(out)]) == 0
    results = json.loads(out.read_text())
    assert set(results) == {"1", "3"}
    assert results["3"]["mend"]["n_edits"] == 3 and results["3"]["mend"]["n_examples"] == 6
    assert out.with_suffix(".png").stat().st_size > 0


@pytest.mark.slow
def test_eval_cli_on_a_data_file(trained_run):
    import eval as eval_cli

    run_dir, _ = trained_run
    data_file = run_dir / "data" / "test.counterfact.json"
    out = run_dir / "eval_cf.json"
    assert eval_cli.main([str(run_dir), "--data", str(data_file), "--format", "counterfact",
                          "--methods", "mend", "--max-examples", "4", "--out", str(out)]) == 0
    assert json.loads(out.read_text())["mend"]["n_examples"] == 4


@pytest.mark.slow
def test_eval_cli_sets_the_baselines_options(trained_run):
    import eval as eval_cli

    run_dir, _ = trained_run
    runs = {}
    # two --set flags: both count (the second does not replace the first)
    for name, extra in (("default", []), ("set", ["--set", "alg.baselines.ultraedit.lr=0.5",
                                                   "--set", "alg.baselines.ft.steps=2"])):
        out = run_dir / f"eval_{name}.json"
        assert eval_cli.main([str(run_dir), "--methods", "ultraedit", "ft", "--out", str(out),
                              *extra]) == 0
        runs[name] = json.loads(out.read_text())
    assert runs["default"]["ultraedit"]["options"]["lr"] == 1e-4
    assert runs["set"]["ultraedit"]["options"]["lr"] == 0.5
    assert runs["set"]["ft"]["options"]["steps"] == 2
    assert runs["set"]["ft"]["options"]["lr"] == runs["default"]["ft"]["options"]["lr"]
    # the options are used, not only recorded: a 5000x step moves the model further
    assert (runs["set"]["ultraedit"]["locality_kl"]
            > runs["default"]["ultraedit"]["locality_kl"] + 1e-6)
    # the run's own config is unchanged
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["alg"]["baselines"]["ultraedit"]["lr"] == 1e-4


@pytest.mark.slow
def test_eval_cli_sets_the_editors_capture_loss(trained_run):
    import eval as eval_cli

    run_dir, _ = trained_run
    runs = {}
    summed = ["--set", "alg.editor.aggregate=sum"]
    for name, extra in (("default", summed),
                        ("per_request", [*summed, "alg.editor.capture_loss=per_request"]),
                        ("request_lstsq", ["--set", "alg.editor.request_lambda=0.5"]),
                        # the CPU default trains with preserved facts (all of this split's)
                        ("preserved", ["--set", "alg.editor.aggregate=request_lstsq",
                                       "alg.editor.request_lambda=0.5",
                                       "alg.editor.request_preserve=40"])):
        out = run_dir / f"eval_capture_{name}.json"
        assert eval_cli.main([str(run_dir), "--methods", "mend", "--n-edits", "1", "3",
                              "--max-examples", "6", "--out", str(out), *extra]) == 0
        runs[name] = json.loads(out.read_text())
    # the run trained with the CPU default's request_lstsq (one request per step: the sum's
    # update) and is evaluated with sum for these two
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["alg"]["editor"]["aggregate"] == "request_lstsq"
    assert runs["default"]["3"]["mend"]["options"]["aggregate"] == "sum"
    assert runs["default"]["3"]["mend"]["options"]["capture_loss"] == "batch_mean"
    assert runs["per_request"]["3"]["mend"]["options"]["capture_loss"] == "per_request"
    solved_one = runs["request_lstsq"]["1"]["mend"]["locality_kl"]
    solved, preserved = runs.pop("request_lstsq")["3"]["mend"], runs.pop("preserved")["3"]["mend"]
    assert solved["options"]["aggregate"] == "request_lstsq"
    assert solved["options"]["request_lambda"] == 0.5
    assert (solved["options"]["request_preserve"], preserved["options"]["request_preserve"]) \
        == (2000, 40)
    assert solved["options"]["preserve_weight"] == 4.0
    assert abs(solved["locality_kl"] - runs["per_request"]["3"]["mend"]["locality_kl"]) > 1e-6
    assert abs(solved["locality_kl"] - preserved["locality_kl"]) > 1e-7
    # request_lstsq at k = 1: the request's own update, as with sum
    assert solved_one == pytest.approx(runs["default"]["1"]["mend"]["locality_kl"], rel=1e-4,
                                       abs=1e-7)
    # lstsq learns its own λ (and this run projects its keys): refused before loading
    with pytest.raises(SystemExit):
        eval_cli.main([str(run_dir), "--methods", "mend", "--set",
                       "alg.editor.aggregate=lstsq"])
    # one request: the two losses are the same; three: each request's δ no longer shrinks as 1/3
    one = [runs[n]["1"]["mend"]["locality_kl"] for n in runs]
    assert one[0] == pytest.approx(one[1], rel=1e-4, abs=1e-7)
    three = [runs[n]["3"]["mend"]["locality_kl"] for n in runs]
    assert abs(three[0] - three[1]) > 1e-6
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["alg"]["editor"]["capture_loss"] == "batch_mean"


@pytest.mark.slow
def test_edit_cli_reports_and_exports(trained_run, capsys):
    import transformers

    import edit as edit_cli

    run_dir, _ = trained_run
    save = run_dir / "edited"
    assert edit_cli.main([str(run_dir), "--prompt", "The capital of France is", "--target",
                          "Berlin", "--rephrase", "France's capital city is",
                          "--neighbor", "The capital of Spain is", "--save", str(save)]) == 0
    out = capsys.readouterr().out
    assert "[edit]" in out and "[rephrase]" in out and "[neighbor]" in out
    assert "p(target)" in out
    transformers.AutoModelForCausalLM.from_pretrained(str(save))


@pytest.mark.slow
def test_editor_artifact_works_without_the_run(trained_run, capsys):
    import edit as edit_cli
    import eval as eval_cli

    run_dir, _ = trained_run
    editor, base = run_dir / "editor", run_dir / "base_model"
    assert (editor / "editor.safetensors").exists() and (base / "tokenizer.json").exists()
    # the same held-out file, through the run and through the artifact alone
    data_file = run_dir / "data" / "test.counterfact.json"
    by_run, by_artifact = run_dir / "eval_run.json", run_dir / "eval_artifact.json"
    common = ["--data", str(data_file), "--methods", "mend", "--max-examples", "4"]
    assert eval_cli.main([str(run_dir), *common, "--out", str(by_run)]) == 0
    assert eval_cli.main(["--editor", str(editor), "--model", str(base), *common,
                          "--out", str(by_artifact)]) == 0
    got = json.loads(by_artifact.read_text())["mend"]
    want = json.loads(by_run.read_text())["mend"]
    for key in ("edit_success", "generality", "drawdown", "locality_kl", "locality"):
        assert got[key] == pytest.approx(want[key], abs=1e-6), key

    save = run_dir / "edited-from-artifact"
    assert edit_cli.main(["--editor", str(editor), "--prompt", "The capital of France is",
                          "--target", "Berlin", "--rephrase", "France's capital city is",
                          "--neighbor", "The capital of Spain is", "--save", str(save)]) == 0
    assert "[edit]" in capsys.readouterr().out
    card = (save / "README.md").read_text()
    assert "library_name: mend-jax" in card and "| The capital of France is | Berlin |" in card
    assert str(base.resolve()) in card and "| reliability |" in card and "| locality |" in card


def test_config_errors_name_the_key(tmp_path):
    from mend_jax.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="closest"):
        load_config(["alg.train.lrr=1"])
    with pytest.raises(ConfigError, match="choices"):
        load_config(["model=nonexistent"])
    cfg = load_config(["model=gpt2", "data=zsre", "alg=mend", "alg.train.lr=3e-5"])
    assert cfg.model.name == "gpt2" and cfg.alg.train.lr == 3e-5


def _train_cmd(run_dir, cache_dir, resume):
    cmd = [sys.executable, str(ROOT / "train.py"), *tiny_overrides(run_dir, cache_dir, 40),
           "eval.methods=[mend]"]
    return cmd + (["--resume"] if resume else [])


@pytest.mark.slow
def test_sigkill_at_random_points_then_resume_matches_uninterrupted(trained_run, tmp_path):
    _, root = trained_run  # reuses the cached base model
    cache = root / "cache"
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
    ref_dir = tmp_path / "ref"
    start = time.time()
    subprocess.run(_train_cmd(ref_dir, cache, False), check=True, env=env, capture_output=True)
    duration = time.time() - start
    ref = json.loads((ref_dir / "results.json").read_text())

    run_dir = tmp_path / "killed"
    rng = np.random.default_rng(0)
    steps_at_kill = []
    for attempt in range(3):
        proc = subprocess.Popen(_train_cmd(run_dir, cache, attempt > 0), env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        # anywhere from start-up through training to evaluation
        time.sleep(float(rng.uniform(0.3, 0.95)) * duration)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        proc.wait()
        latest = run_dir / "checkpoints" / "latest"
        # finished checkpoints only: a kill during a save leaves "<step>.orbax-checkpoint-tmp"
        steps_at_kill.append(sorted(int(p.name) for p in latest.iterdir() if p.name.isdigit())
                             if latest.exists() else [])
    final = subprocess.run(_train_cmd(run_dir, cache, True), env=env, capture_output=True,
                           text=True)
    assert final.returncode == 0, final.stderr[-2000:]
    # checkpoints that survived the kills are complete (the resumed run restored from them)
    assert any(steps_at_kill), f"no checkpoint was ever written before a kill: {steps_at_kill}"
    got = json.loads((run_dir / "results.json").read_text())
    for key in ("edit_success", "generality", "drawdown", "locality_kl"):
        assert got["mend"][key] == pytest.approx(ref["mend"][key], abs=1e-6), key
    assert got["_run"]["steps"] == ref["_run"]["steps"] == 40
    assert got["_run"]["best_step"] == ref["_run"]["best_step"]


def test_wikitext_data_targets_come_from_the_base_model(tmp_path):
    import transformers

    from mend_jax.config import load_config
    from mend_jax.models import from_config, save_pretrained
    from mend_jax.offline import build_word_tokenizer
    from mend_jax.pipeline import prepare

    texts = [f"the river flows into the sea near the old town and the bridge number {i} " * 2
             for i in range(6)]
    (tmp_path / "wiki.txt").write_text("\n\n".join(texts))
    tok = build_word_tokenizer(texts)
    model = from_config(transformers.GPT2Config(vocab_size=len(tok), n_positions=64, n_embd=16,
                                                n_layer=1, n_head=2), tokenizer=tok)
    save_pretrained(model, None, tmp_path / "m")
    wiki = tmp_path / "wiki.txt"
    cfg = load_config(["data=wikitext", f"model.name={tmp_path / 'm'}", f"data.train_path={wiki}",
                       f"data.val_path={wiki}", f"data.test_path={wiki}", "data.prefix_tokens=8",
                       f"out_dir={tmp_path / 'run'}", "model.max_length=24"])
    prep = prepare(cfg, progress=False)
    req = prep.splits["test"][0]
    assert len(prep.splits["test"]) == 6
    assert len(req.prompt.split()) == 8 and len(req.target_new.split()) == 10


@pytest.mark.slow
def test_a_second_run_never_overwrites_the_first(trained_run):
    from mend_jax.config import load_config
    from mend_jax.pipeline import train

    run_dir, root = trained_run
    before = (run_dir / "results.json").read_bytes()
    overrides = tiny_overrides(run_dir, root / "cache", max_steps=5) + ["eval.methods=[mend]"]
    second, _ = train(load_config(overrides))
    assert second == run_dir.parent / f"{run_dir.name}-1"
    assert (second / "results.json").exists()
    assert (run_dir / "results.json").read_bytes() == before


def _files(run_dir: Path) -> dict:
    return {str(p.relative_to(run_dir)): (p.stat().st_mtime_ns, p.stat().st_size)
            for p in run_dir.rglob("*") if p.is_file() and p.name != ".lock"}


@pytest.mark.slow
def test_resume_with_another_config_is_refused_before_anything_is_written(trained_run):
    from mend_jax.config import ConfigError, load_config
    from mend_jax.pipeline import train

    run_dir, root = trained_run
    before = _files(run_dir)
    # the case: one override left out (the editor rank) on --resume
    overrides = [o for o in tiny_overrides(run_dir, root / "cache") if "rank" not in o]
    with pytest.raises(ConfigError) as e:
        train(load_config(overrides + ["alg.loop.log_every=7"]), resume=True)
    msg = str(e.value)
    assert "alg.editor.rank: 16 -> 1920" in msg and "alg.loop.log_every: 5 -> 7" in msg
    assert "config.yaml" in msg
    assert _files(run_dir) == before


@pytest.mark.slow
def test_a_second_concurrent_run_fails_with_one_line(trained_run, capsys):
    import train
    from mend_jax.runs import run_lock

    run_dir, root = trained_run
    with run_lock(run_dir):
        assert train.main(tiny_overrides(run_dir, root / "cache") + ["--resume"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {run_dir} is in use by another run (pid {os.getpid()})")
    assert err.count("\n") == 1
    with run_lock(run_dir):  # released again
        pass


@pytest.mark.slow
def test_resume_logs_to_stderr_and_accumulates_train_time(trained_run, capfd):
    import train

    run_dir, root = trained_run
    first = json.loads((run_dir / "results.json").read_text())["_run"]["train_time_s"]
    assert train.main(tiny_overrides(run_dir, root / "cache") + ["--resume"]) == 0
    assert "resumed from step 30" in capfd.readouterr().err
    again = json.loads((run_dir / "results.json").read_text())["_run"]
    assert again["steps"] == 30
    # the resumed run trained no further step: its time is the first run's, not ~0
    assert again["train_time_s"] >= 0.9 * first > 0


def test_the_batched_config_is_the_measured_override_set():
    """`alg=mend_batched` is exactly the override set whose results the README quotes (on
    the default of the time: no key projection, no preserved facts, no edit_scales, checkpoint
    of lowest edit loss; the preset keeps the schema's project_eps, unused without the
    projection)."""
    import dataclasses

    from mend_jax.config import load_config

    measured = load_config([
        "alg.editor.project_keys=false", "alg.editor.project_eps=0.1",
        "alg.editor.request_preserve=0", "alg.editor.preserve_weight=0.0",
        "alg.editor.edit_scales=null", "alg.loop.select_on=edit_loss", "alg.editor.aggregate=lstsq",
        "alg.editor.tokens=answer", "alg.editor.whiten=true",
        "alg.editor.capture_loss=per_request", "alg.editor.init_log_lambda=4.6",
        "alg.loop.n_edits=100", "alg.loop.n_edits_dist=log_uniform", "alg.loop.max_steps=3000",
        "alg.loop.val_every=500", "alg.loop.val_batches=20"])
    batched = load_config(["alg=mend_batched"]).alg
    assert batched.preset == "mend_batched" and measured.alg.preset == "mend_small"
    assert dataclasses.replace(batched, preset=None) == dataclasses.replace(measured.alg,
                                                                           preset=None)


def test_evaluation_time_aggregate_needs_nothing_the_run_did_not_train(tmp_path):
    from mend_jax.editors import MENDConfig
    from mend_jax.pipeline import _check_eval_aggregate

    summed, projected = MENDConfig(), MENDConfig(project_keys=True)
    solved = MENDConfig(project_keys=True, aggregate="request_lstsq")
    _check_eval_aggregate(tmp_path, projected, solved)
    _check_eval_aggregate(tmp_path, solved, projected)
    _check_eval_aggregate(tmp_path, summed, summed)
    with pytest.raises(ValueError, match="second moments"):
        _check_eval_aggregate(tmp_path, summed, MENDConfig(aggregate="request_lstsq"))
    with pytest.raises(ValueError, match="learns its own"):
        _check_eval_aggregate(tmp_path, summed, MENDConfig(aggregate="lstsq"))
    with pytest.raises(ValueError, match="learns its own"):
        _check_eval_aggregate(tmp_path, MENDConfig(aggregate="lstsq"), summed)
