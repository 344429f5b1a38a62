"""A run folder: one process at a time, one config for its whole life."""

import pytest
import yaml

from mend_jax.errors import ConfigError, RunError
from mend_jax.runs import config_differences, run_lock, write_or_check_config


def test_a_second_holder_of_the_lock_fails_at_once(tmp_path):
    with run_lock(tmp_path / "run"):
        with pytest.raises(RunError, match="is in use by another run"):
            with run_lock(tmp_path / "run"):
                pass
    with run_lock(tmp_path / "run"):  # released on exit
        pass


def test_config_is_written_once_and_checked_on_resume(tmp_path):
    cfg = {"seed": 0, "out_dir": str(tmp_path), "progress": True,
           "alg": {"editor": {"rank": 16}, "loop": {"max_steps": 30}}}
    write_or_check_config(tmp_path, cfg, resume=False)
    saved = (tmp_path / "config.yaml").read_bytes()
    assert yaml.safe_load(saved) == cfg
    # same settings (progress and out_dir may differ): accepted, file untouched
    write_or_check_config(tmp_path, dict(cfg, progress=False, out_dir="elsewhere"), resume=True)
    other = {**cfg, "alg": {"editor": {"rank": 1920}, "loop": {"max_steps": 30, "extra": 1}}}
    with pytest.raises(ConfigError) as e:
        write_or_check_config(tmp_path, other, resume=True)
    assert "alg.editor.rank: 16 -> 1920" in str(e.value)
    assert "alg.loop.extra: '<absent>' -> 1" in str(e.value)
    assert (tmp_path / "config.yaml").read_bytes() == saved


def test_config_differences_lists_only_changed_keys():
    a = {"a": {"b": 1, "c": [1, 2]}, "d": "x"}
    assert config_differences(a, a) == []
    assert config_differences(a, {"a": {"b": 1, "c": [1, 3]}}) == ["a.c: [1, 2] -> [1, 3]",
                                                                   "d: 'x' -> '<absent>'"]
