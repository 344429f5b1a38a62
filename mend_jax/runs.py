"""A training run's folder, kept whole: one process at a time, one config for its whole life.

`open_run(run_dir, cfg, resume)` takes the folder's lock (`RUN/.lock`, an `fcntl.flock` that
the operating system releases when the process dies), then writes `config.yaml` when the run is
created or, on `--resume`, refuses a config that differs from the saved one, before anything
else is written.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from mend_jax.config import dump_config, read_mapping
from mend_jax.errors import ConfigError, RunError
from mend_jax.schema import RunConfig

CONFIG_FILE = "config.yaml"
LOCK_FILE = ".lock"
# Keys that may differ between the runs of one folder: they change nothing that is saved.
RESUMABLE_KEYS = ("progress",)


@contextlib.contextmanager
def run_lock(run_dir: str | Path) -> Iterator[None]:
    """Hold RUN/.lock for the duration; a second holder fails at once with a `RunError`."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(run_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
            raise RunError(f"{run_dir} is in use by another run (pid {holder}); wait for it "
                           "to finish or choose another out_dir") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(tree, dict):
        return {prefix: tree}
    out = {}
    for k, v in tree.items():
        out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def config_differences(saved: dict, current: dict) -> list[str]:
    """Dotted keys whose values differ (or exist on one side only), as `key: saved -> now`."""
    a, b = _flatten(saved), _flatten(current)
    ignored = {"out_dir", *RESUMABLE_KEYS}
    diffs = []
    for key in sorted(set(a) | set(b)):
        if key in ignored or key.split(".")[0] in ignored:
            continue
        if a.get(key, "<absent>") != b.get(key, "<absent>"):
            diffs.append(f"{key}: {a.get(key, '<absent>')!r} -> {b.get(key, '<absent>')!r}")
    return diffs


def write_or_check_config(run_dir: str | Path, cfg: RunConfig, resume: bool) -> None:
    """Write config.yaml when the run is created; on resume, refuse a different config."""
    path = Path(run_dir) / CONFIG_FILE
    if resume and path.exists():
        saved = read_mapping(path)
        # Both through the schema: keys a saved file leaves out compare as their defaults.
        diffs = config_differences(RunConfig.from_dict(saved).to_dict(), cfg.to_dict())
        if diffs:
            raise ConfigError(f"--resume: the config differs from the run's {path} in "
                              f"{'; '.join(diffs)} (resume with the run's settings)")
        return
    tmp = path.with_suffix(".yaml.tmp")
    tmp.write_text(dump_config(cfg))
    tmp.replace(path)
