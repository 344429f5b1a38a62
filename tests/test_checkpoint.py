"""Checkpoints: round trip, NaN never written, half-written folders ignored, damaged ones
skipped for the previous one."""

import jax.numpy as jnp
import numpy as np

from mend_jax.checkpoint import Checkpoints


def state(x=1.0):
    return {"editor": {"params": {"w": jnp.full((3, 2), x)}, "stats": {"n": jnp.zeros(())}},
            "step": jnp.asarray(3, jnp.int32)}


def test_round_trip_latest_and_best(tmp_path):
    ck = Checkpoints(tmp_path)
    assert ck.save_latest(5, state(2.0), {"step": 5})
    assert ck.save_best(5, {"editor": state(3.0)["editor"]}, {"best": 1.5})
    got, meta = ck.restore_latest(state())
    np.testing.assert_array_equal(got["editor"]["params"]["w"], np.full((3, 2), 2.0))
    assert meta == {"step": 5}
    best, meta = ck.restore_best({"editor": state()["editor"]})
    np.testing.assert_array_equal(best["editor"]["params"]["w"], np.full((3, 2), 3.0))
    ck.close()


def test_nan_state_is_never_written(tmp_path):
    ck = Checkpoints(tmp_path)
    assert ck.save_latest(1, state(1.0), {})
    assert not ck.save_latest(2, state(float("nan")), {})
    assert ck.latest_step() == 1
    ck.close()


def test_resaving_a_step_after_resume_replaces_it(tmp_path):
    ck = Checkpoints(tmp_path)
    ck.save_latest(4, state(1.0), {"v": 1})
    ck.save_latest(4, state(2.0), {"v": 2})
    got, meta = ck.restore_latest(state())
    assert meta == {"v": 2}
    ck.close()


def test_half_written_checkpoint_is_ignored(tmp_path, monkeypatch):
    """A save interrupted before orbax's final rename (what a kill mid-save leaves: the real,
    complete-looking data in a temporary folder) is ignored, cleaned up, and re-savable."""
    import contextlib

    import pytest
    from orbax.checkpoint._src.path import async_path

    ck = Checkpoints(tmp_path)
    ck.save_latest(1, state(1.0), {"step": 1})

    async def killed(src, dst):
        raise OSError("killed before the rename")

    monkeypatch.setattr(async_path, "rename", killed)
    with pytest.raises(Exception, match="killed before the rename"):
        ck.save_latest(2, state(2.0), {"step": 2})
    monkeypatch.undo()
    with contextlib.suppress(Exception):  # the interrupted manager, as a killed process would
        ck.close()
    latest = tmp_path / "checkpoints" / "latest"
    leftovers = [p for p in latest.iterdir() if not p.name.isdigit()]
    assert leftovers and all(p.name.startswith("2.") for p in leftovers)
    assert any(p.is_file() for p in leftovers[0].rglob("*"))  # real data was written

    ck = Checkpoints(tmp_path)  # the next start
    assert ck.latest_step() == 1
    got, meta = ck.restore_latest(state())
    assert meta == {"step": 1}
    np.testing.assert_array_equal(got["editor"]["params"]["w"], np.full((3, 2), 1.0))
    # orbax removes temporary folders in the background from the start; a save waits for that
    # (step 3, so that no re-save of step 2 replaces its leftover folder instead)
    assert ck.save_latest(3, state(3.0), {"step": 3})
    assert not any(p.exists() for p in leftovers), "temporary folder not cleaned up"
    got, meta = ck.restore_latest(state())
    assert meta == {"step": 3}
    np.testing.assert_array_equal(got["editor"]["params"]["w"], np.full((3, 2), 3.0))
    ck.close()


def _two_steps(tmp_path):
    ck = Checkpoints(tmp_path, keep_latest=3)
    ck.save_latest(1, state(1.0), {"step": 1})
    ck.save_latest(2, state(2.0), {"step": 2})
    ck.close()
    step_dir = tmp_path / "checkpoints" / "latest" / "2"
    files = sorted(p for p in step_dir.rglob("*") if p.is_file())
    assert files, step_dir
    return step_dir, files


def _damage_data_files(step_dir, damage):
    """Damage the array data of a finished checkpoint (not its metadata)."""
    data = [p for p in step_dir.rglob("*") if p.is_file() and "state" in p.parts
            and p.stat().st_size > 0 and p.name not in ("_METADATA", "_sharding")
            and not p.name.startswith("_CHECKPOINT")]
    assert data, sorted(step_dir.rglob("*"))
    for p in data:
        damage(p)


def test_damaged_latest_checkpoint_falls_back_to_the_previous_one(tmp_path, caplog):
    step_dir, _ = _two_steps(tmp_path)
    _damage_data_files(step_dir, lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 3]))
    ck = Checkpoints(tmp_path)
    with caplog.at_level("WARNING", logger="mend_jax.checkpoint"):
        got, meta = ck.restore_latest(state())
    ck.close()
    assert meta == {"step": 1}
    np.testing.assert_array_equal(got["editor"]["params"]["w"], np.full((3, 2), 1.0))
    assert any("latest/2 cannot be restored" in r.getMessage() for r in caplog.records)


def test_deleted_file_in_latest_checkpoint_falls_back(tmp_path):
    step_dir, _ = _two_steps(tmp_path)
    _damage_data_files(step_dir, lambda p: p.unlink())
    ck = Checkpoints(tmp_path)
    got, meta = ck.restore_latest(state())
    ck.close()
    assert meta == {"step": 1}


def test_no_restorable_checkpoint_is_one_named_error(tmp_path):
    import pytest

    from mend_jax.errors import CheckpointError

    ck = Checkpoints(tmp_path)
    ck.save_latest(1, state(1.0), {"step": 1})
    ck.close()
    _damage_data_files(tmp_path / "checkpoints" / "latest" / "1", lambda p: p.write_bytes(b"x"))
    ck = Checkpoints(tmp_path)
    with pytest.raises(CheckpointError, match="latest: no checkpoint restores; step 1: "):
        ck.restore_latest(state())
    ck.close()
