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
    from mend_jax.schema import RunConfig

    cfg = RunConfig.from_dict({"seed": 0, "out_dir": str(tmp_path), "progress": True,
                               "alg": {"editor": {"rank": 16}, "loop": {"max_steps": 30}}})
    write_or_check_config(tmp_path, cfg, resume=False)
    saved = (tmp_path / "config.yaml").read_bytes()
    assert RunConfig.from_dict(yaml.safe_load(saved)) == cfg
    # same settings (progress and out_dir may differ): accepted, file untouched
    write_or_check_config(tmp_path, cfg.replace(progress=False, out_dir="elsewhere"),
                          resume=True)
    other = cfg.replace(**{"alg.editor.rank": 1920, "alg.loop.max_steps": 40})
    with pytest.raises(ConfigError) as e:
        write_or_check_config(tmp_path, other, resume=True)
    assert "alg.editor.rank: 16 -> 1920" in str(e.value)
    assert "alg.loop.max_steps: 30 -> 40" in str(e.value)
    # a saved file that leaves keys out compares them as the schema's defaults
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"seed": 0, "out_dir": str(tmp_path),
        "alg": {"editor": {"rank": 16}, "loop": {"max_steps": 30}}}))
    write_or_check_config(tmp_path, cfg, resume=True)
    (tmp_path / "config.yaml").write_bytes(saved)
    assert (tmp_path / "config.yaml").read_bytes() == saved


def test_config_differences_lists_only_changed_keys():
    a = {"a": {"b": 1, "c": [1, 2]}, "d": "x"}
    assert config_differences(a, a) == []
    assert config_differences(a, {"a": {"b": 1, "c": [1, 3]}}) == ["a.c: [1, 2] -> [1, 3]",
                                                                   "d: 'x' -> '<absent>'"]
