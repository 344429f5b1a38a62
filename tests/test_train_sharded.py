"""One training path from 1 to N devices: `train.py mesh.data=D mesh.model=M` runs the CLI's
loop through `make_sharded_step`, and its metrics equal the 1-device run's."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mend_jax.loop import ScalarLog

ROOT = Path(__file__).resolve().parent.parent


def _tiny(run_dir: Path, cache_dir: Path) -> list[str]:
    return [
        "model.build.n_embd=32", "model.build.n_layer=2", "model.build.n_head=2",
        "model.pretrain.steps=60",
        "model.inner_params=[transformer.h.1.mlp.c_fc.weight,transformer.h.1.mlp.c_proj.weight]",
        "data.n_val=10", "data.n_test=12", "data.n_train=60",
        "alg.loop.max_steps=6", "alg.loop.val_every=3", "alg.loop.val_batches=2",
        "alg.loop.save_every=3", "alg.loop.log_every=1", "alg.loop.batch_size=8",
        # k drawn per step (1 or 4 edit rows): batch layouts change from step to step
        "alg.loop.n_edits=4", "alg.loop.n_edits_dist=log_uniform", "alg.editor.rank=16",
        # the summed update (the CPU default's request_lstsq would train through a float32
        # ridge solve at k > 1, whose rounding differs between layouts by ~4e-4 relative), and
        # no preserved facts: the projection by C + 4·C_p is worse conditioned than by C, and
        # its float32 rounding differs between layouts by ~1.4e-4 relative in the grad norm
        "alg.editor.aggregate=sum", "alg.editor.preserve_weight=0.0",
        "alg.editor.request_preserve=0",
        "eval.max_examples=4", "eval.methods=[mend]",
        f"out_dir={run_dir}", f"cache_dir={cache_dir}", "progress=false",
    ]


def _train(tmp_path: Path, name: str, mesh: list[str]) -> tuple[Path, str]:
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
               JAX_PLATFORMS="cpu")
    run_dir = tmp_path / name
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"),
                           *_tiny(run_dir, tmp_path / "cache"), *mesh],
                          env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir, proc.stderr


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_the_cli_on_8_devices_matches_the_1_device_run(tmp_path):
    one, log_one = _train(tmp_path, "one", ["mesh.data=1", "mesh.model=1"])
    eight, log_eight = _train(tmp_path, "eight", ["mesh.data=4", "mesh.model=2"])
    assert "{'data': 1, 'model': 1} mesh of 1 devices" in log_one
    assert "{'data': 4, 'model': 2} mesh of 8 devices" in log_eight
    a, b = _records(one), _records(eight)
    assert [(r["step"], r["split"]) for r in a] == [(r["step"], r["split"]) for r in b]
    assert sum(r["split"] == "train" for r in a) == 6 and sum(r["split"] == "val" for r in a) == 2
    # k of 1 (one edit row) and of 2-4 (padded to four rows: sharded over data=4) both ran
    ks = {r["n_edits"] for r in a if r["split"] == "train"}
    assert 1.0 in ks and ks - {1.0}
    for ra, rb in zip(a, b, strict=True):
        for key, value in ra.items():
            if key != "split":
                assert rb[key] == pytest.approx(value, rel=1e-4, abs=1e-5), (ra["step"], key)
    res_a = json.loads((one / "results.json").read_text())
    res_b = json.loads((eight / "results.json").read_text())
    assert res_a["_run"]["best_step"] == res_b["_run"]["best_step"]
    for key in ("edit_success", "generality", "drawdown", "locality_kl"):
        assert res_b["mend"][key] == pytest.approx(res_a["mend"][key], rel=1e-4, abs=1e-5), key


def test_the_scalar_log_drops_records_past_the_resumed_step(tmp_path):
    path = tmp_path / "metrics.jsonl"
    log = ScalarLog(path)
    for step in range(6):                    # train records: the index of the step taken
        log.write("train", step, {"loss": float(step)})
        if (step + 1) % 3 == 0:              # val records: the number of steps taken
            log.write("val", step + 1, {"loss": step + 0.5})
    log.close()
    log = ScalarLog(path, resume_step=3)     # the checkpoint holds 3 steps: step 3 is redone
    log.write("train", 3, {"loss": 30.0})
    log.close()
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert [(r["split"], r["step"], r["loss"]) for r in records] == [
        ("train", 0, 0.0), ("train", 1, 1.0), ("train", 2, 2.0), ("val", 3, 2.5),
        ("train", 3, 30.0)]
    ScalarLog(path).close()                  # a fresh run starts a fresh log
    assert path.read_text() == ""
