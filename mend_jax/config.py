"""Composable YAML configs with command-line `key=value` overrides (in the spirit of Hydra).

`mend_jax/configs/config.yaml` (package data) names one file per group under `defaults` (model,
data, alg); a `group=name` override picks `configs/<group>/<name>.yaml` instead, and dotted
`a.b.c=value` overrides set any key of the schema (values parsed as YAML: numbers, booleans,
lists), whether or not the files name it. Unknown keys fail with the closest ones; the
composed mapping becomes the typed `RunConfig` of `mend_jax.schema` (types and ranges
checked) before it is returned.
"""

from __future__ import annotations

import copy
import importlib.resources
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from mend_jax.errors import ConfigError
from mend_jax.schema import RunConfig, set_dotted

# Shipped inside the package, so an installed (non-editable) mend-jax finds them too.
CONFIG_DIR = Path(str(importlib.resources.files("mend_jax") / "configs"))
GROUPS = ("model", "data", "alg")


def read_mapping(path: Path) -> dict:
    """A YAML file holding a mapping (empty: {}), or a ConfigError naming the file."""
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML ({' '.join(str(e).split())})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return data


def _choices(config_dir: Path, group: str) -> list[str]:
    return sorted(p.stem for p in (config_dir / group).glob("*.yaml"))


def load_config(overrides: Sequence[str] = (),
                config_dir: str | Path | None = None) -> RunConfig:
    """The typed config composed from the base file, the group files and the overrides
    (`+key=value` adds a key the files leave out; the schema still has to know it)."""
    config_dir = Path(config_dir) if config_dir else CONFIG_DIR
    base = read_mapping(config_dir / "config.yaml")
    defaults = dict(base.pop("defaults", {}))
    group_picks, key_overrides = {}, []
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key=value")
        key, raw = item.split("=", 1)
        if key in GROUPS:
            group_picks[key] = raw
        else:
            key_overrides.append((key, raw))
    cfg = copy.deepcopy(base)
    for group in GROUPS:
        name = group_picks.get(group, defaults.get(group))
        if name is None:
            continue
        path = config_dir / group / f"{name}.yaml"
        if not path.exists():
            raise ConfigError(f"{group}={name}: no {path}; choices: {_choices(config_dir, group)}")
        cfg[group] = read_mapping(path)
        cfg[group]["_name"] = name
    for key, raw in key_overrides:
        # "+key" (Hydra's "add a key") is accepted too: any key the schema knows may be set.
        set_dotted(cfg, key.lstrip("+"), parse_value(raw))
    return validate_config(cfg)


def parse_value(raw: str) -> Any:
    """A command-line value as YAML reads it (`1e-2` and `3e-5` are numbers)."""
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw
    if isinstance(value, str):
        try:  # YAML 1.1 reads "3e-5" (no dot) as a string; a user means the number
            return float(value)
        except ValueError:
            pass
    return value


def dump_config(cfg: RunConfig | dict) -> str:
    return yaml.safe_dump(cfg.to_dict() if isinstance(cfg, RunConfig) else cfg, sort_keys=False)


def validate_config(cfg: dict) -> RunConfig:
    """The typed `RunConfig` of a composed mapping: every key's type and range checked before
    any work starts (`mend_jax.schema`); a `ConfigError` names the key at fault."""
    return RunConfig.from_dict(cfg)
