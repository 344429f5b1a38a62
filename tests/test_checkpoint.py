"""Checkpoints: round trip, NaN never written, half-written folders ignored."""

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


def test_half_written_checkpoint_is_ignored(tmp_path):
    ck = Checkpoints(tmp_path)
    ck.save_latest(1, state(1.0), {})
    ck.close()
    # what a process killed mid-save leaves behind: an orbax temporary folder
    tmp = tmp_path / "checkpoints" / "latest" / "2.orbax-checkpoint-tmp-123"
    (tmp / "state").mkdir(parents=True)
    (tmp / "state" / "garbage").write_bytes(b"\x00" * 10)
    ck = Checkpoints(tmp_path)
    assert ck.latest_step() == 1
    got, _ = ck.restore_latest(state())
    np.testing.assert_array_equal(got["editor"]["params"]["w"], np.full((3, 2), 1.0))
    ck.close()
