"""Composable YAML configs with command-line `key=value` overrides (in the spirit of Hydra).

`mend_jax/configs/config.yaml` (package data) names one file per group under `defaults` (model,
data, alg); a `group=name` override picks `configs/<group>/<name>.yaml` instead, and dotted
`a.b.c=value` overrides set any key (values parsed as YAML: numbers, booleans, lists). Unknown
keys fail with the closest ones; the composed config is validated (types and ranges, see
`validate_config`) before it is returned.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import importlib.resources
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from mend_jax.errors import ConfigError

# Shipped inside the package, so an installed (non-editable) mend-jax finds them too.
CONFIG_DIR = Path(str(importlib.resources.files("mend_jax") / "configs"))
GROUPS = ("model", "data", "alg")


def _read(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML ({e})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return data


def _choices(config_dir: Path, group: str) -> list[str]:
    return sorted(p.stem for p in (config_dir / group).glob("*.yaml"))


def _set(cfg: dict, dotted: str, value: Any, allow_new: bool) -> None:
    keys = dotted.split(".")
    node = cfg
    for i, key in enumerate(keys):
        last = i == len(keys) - 1
        if key not in node and not allow_new:
            close = difflib.get_close_matches(key, list(node), n=3)
            where = ".".join(keys[:i]) or "<top>"
            raise ConfigError(f"override {dotted!r}: no key {key!r} under {where}; "
                              f"closest: {close or sorted(node)}")
        if last:
            node[key] = value
        else:
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {dotted!r}: {'.'.join(keys[:i + 1])} is not a mapping")


def load_config(overrides: Sequence[str] = (), config_dir: str | Path | None = None) -> dict:
    """The composed config: base file, group files, then overrides (`+key=value` adds a key)."""
    config_dir = Path(config_dir) if config_dir else CONFIG_DIR
    base = _read(config_dir / "config.yaml")
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
        cfg[group] = _read(path)
        cfg[group]["_name"] = name
    for key, raw in key_overrides:
        allow_new = key.startswith("+")
        value = _parse_value(raw)
        _set(cfg, key.lstrip("+"), value, allow_new)
    return validate_config(cfg)


def _parse_value(raw: str) -> Any:
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


def dump_config(cfg: dict) -> str:
    return yaml.safe_dump(cfg, sort_keys=False)


# ----------------------------------------------------------------------------- validation
# Keys outside the dataclass sections, with their types (None: may be null) and checks.
_PLAIN = {
    "seed": (int,),
    "out_dir": (str,),
    "cache_dir": (str,),
    "progress": (bool,),
    "dtype": (str,),
    "remat": (bool,),
    "alg.method": (str,),
    "eval.split": (str,),
    "eval.n_edits": (int,),
    "eval.methods": (list,),
    "eval.max_examples": (int, None),
    "model.name": (str, None),
    "model.max_length": (int,),
    "model.inner_params": (list, None),
    "data.format": (str, None),
    "data.n_val": (int, None),
    "data.n_test": (int, None),
    "data.n_train": (int, None),
    "data.edit_forms": (list,),
    "model.tokenizer.kind": (str,),
    "model.tokenizer.vocab_size": (int,),
}
_AT_LEAST = {
    "eval.n_edits": 1, "eval.max_examples": 1, "model.max_length": 2,
    "alg.loop.max_steps": 1, "alg.loop.val_every": 1, "alg.loop.n_edits": 1,
    "alg.loop.batch_size": 1, "alg.loop.val_batches": 1, "alg.loop.save_every": 1,
    "alg.loop.log_every": 1, "alg.loop.early_stop_patience": 0, "alg.train.accumulate": 1,
    "alg.train.lr": 0, "alg.train.lr_lr": 0, "alg.editor.rank": 1, "alg.editor.n_hidden": 0,
    "alg.train.c_base": 0, "alg.editor.n_edit_steps": 1, "alg.editor.hidden_dim": 1,
    "alg.editor.condition_dim": 1,
    "alg.baselines.*.steps": 1,
    "model.tokenizer.vocab_size": 259,
}
_TYPE_NAMES = {"int": int, "float": float, "bool": bool, "str": str, "None": None}


def _dataclass_sections(method: str = "mend") -> dict[str, type]:
    """The schema of each `alg` section; `alg.editor`'s is the config of the trained editor."""
    # Imported here: the dataclasses live with the code they configure (and import jax).
    from mend_jax.editors import ENNConfig, FTConfig, KEConfig, MENDConfig
    from mend_jax.loop import LoopConfig
    from mend_jax.training import TrainConfig

    editor = {"mend": MENDConfig, "ke": KEConfig, "enn": ENNConfig}[method]
    return {"alg.editor": editor, "alg.train": TrainConfig, "alg.loop": LoopConfig,
            "alg.baselines.*": FTConfig}


def _BASELINE_SCHEMAS() -> dict[str, type]:  # noqa: N802 (a table, built lazily)
    from mend_jax.editors import UltraEditConfig

    return {"ultraedit": UltraEditConfig}


def _field_types(annotation) -> tuple | None:
    """(int,), (float, None), ... from a dataclass annotation ("int | None"); None if unknown."""
    names = annotation.split("|") if isinstance(annotation, str) else [annotation.__name__]
    names = [n.strip() for n in names]
    if any(n not in _TYPE_NAMES for n in names):
        return None
    return tuple(_TYPE_NAMES[n] for n in names)


def _check_type(key: str, value: Any, types: tuple) -> None:
    if value is None:
        if None in types:
            return
    elif isinstance(value, bool):
        if bool in types:
            return
    elif isinstance(value, int) and (int in types or float in types):
        return
    elif isinstance(value, float) and float in types:
        return
    elif isinstance(value, (str, list)) and type(value) in types:
        return
    want = " or ".join({int: "an integer", float: "a number", bool: "true/false", str: "a string",
                        list: "a list", None: "null"}[t] for t in types)
    hint = ""
    if int in types and isinstance(value, float) and value.is_integer():
        hint = f" (write {int(value)})"
    elif list in types and isinstance(value, str):
        hint = " (YAML list syntax: [a, b])"
    raise ConfigError(f"{key}={value!r}: expected {want}{hint}")


def _check_range(key: str, value: Any) -> None:
    pattern = key
    parts = key.split(".")
    if key.startswith("alg.baselines.") and len(parts) == 4:
        pattern = f"alg.baselines.*.{parts[3]}"
    low = _AT_LEAST.get(pattern)
    if low is not None and value is not None and value < low:
        raise ConfigError(f"{key}={value!r}: must be >= {low}")


def _lookup(cfg: dict, dotted: str) -> tuple[bool, Any]:
    node = cfg
    for key in dotted.split("."):
        if not isinstance(node, dict) or key not in node:
            return False, None
        node = node[key]
    return True, node


def _check_section(section: str, values: Any, schema: type) -> None:
    if not isinstance(values, dict):
        raise ConfigError(f"{section}: expected a mapping, got {values!r}")
    fields = {f.name: f for f in dataclasses.fields(schema)}
    for key, value in values.items():
        if key not in fields:
            close = difflib.get_close_matches(key, list(fields), n=3)
            raise ConfigError(f"{section}.{key}: unknown key; closest: {close or sorted(fields)}")
        types = _field_types(fields[key].type)
        if types is not None:
            _check_type(f"{section}.{key}", value, types)
        _check_range(f"{section}.{key}", value)
    kwargs = dict(values)
    if kwargs.get("lr_schedule") == "cosine" and not kwargs.get("decay_steps"):
        kwargs["decay_steps"] = 1  # the pipeline derives it from alg.loop.max_steps
    try:
        schema(**kwargs)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"{section}: {e}") from None


def validate_config(cfg: dict) -> dict:
    """Check every key's type and range before any work starts; returns cfg unchanged.

    The dataclasses that read the `alg` sections (MENDConfig, KEConfig or ENNConfig as
    `alg.method` says, TrainConfig, LoopConfig, FTConfig) are their schema; the other keys are
    listed above. Sections a config leaves out are skipped.
    """
    from mend_jax.pipeline import DTYPES, METHODS, TRAINED, alg_method

    for key, types in _PLAIN.items():
        present, value = _lookup(cfg, key)
        if present:
            _check_type(key, value, types)
            _check_range(key, value)
    trained = alg_method(cfg)
    if trained not in TRAINED:
        raise ConfigError(f"alg.method={trained!r}: expected one of {list(TRAINED)}")
    present, c_base = _lookup(cfg, "alg.train.c_base")
    if present and c_base and trained != "enn":
        raise ConfigError(f"alg.train.c_base={c_base!r}: only ENN (alg.method: enn) meta-learns "
                          f"the model's weights; remove it or set 0 for alg.method={trained}")
    sections = _dataclass_sections(trained)
    for section, schema in sections.items():
        if section.endswith(".*"):
            present, group = _lookup(cfg, section[:-2])
            if not present:
                continue
            if not isinstance(group, dict):
                raise ConfigError(f"{section[:-2]}: expected a mapping, got {group!r}")
            for method, values in group.items():
                if method not in METHODS:
                    raise ConfigError(f"{section[:-2]}.{method}: unknown method; choose from "
                                      f"{list(METHODS)}")
                _check_section(f"{section[:-2]}.{method}", values or {},
                               _BASELINE_SCHEMAS().get(method, schema))
            continue
        present, values = _lookup(cfg, section)
        if present:
            _check_section(section, values, schema)
    present, methods = _lookup(cfg, "eval.methods")
    if present:
        unknown = [m for m in methods if m not in METHODS]
        if unknown or not methods:
            raise ConfigError(f"eval.methods={methods!r}: each must be one of {list(METHODS)}")
        # "mend" (the default list's entry) stands for whichever editor the run trains.
        other = [m for m in methods if m in TRAINED and m not in ("mend", trained)]
        if other:
            raise ConfigError(f"eval.methods={methods!r}: this run trains {trained} "
                              f"(alg.method), so it has no {other[0]} editor to evaluate")
    present, split = _lookup(cfg, "eval.split")
    if present and split not in ("train", "val", "test"):
        raise ConfigError(f"eval.split={split!r}: expected train, val or test")
    present, dtype = _lookup(cfg, "dtype")
    if present and dtype not in DTYPES:
        raise ConfigError(f"dtype={dtype!r}: expected one of {sorted(DTYPES)}")
    present, kind = _lookup(cfg, "model.tokenizer.kind")
    if present and kind not in ("bpe", "word"):
        raise ConfigError(f"model.tokenizer.kind={kind!r}: expected bpe or word")
    from mend_jax.data.geonames import FORMS

    present, forms = _lookup(cfg, "data.edit_forms")
    if present and (not forms or any(f not in FORMS for f in forms)):
        raise ConfigError(f"data.edit_forms={forms!r}: expected a non-empty list of {list(FORMS)}")
    present, names = _lookup(cfg, "model.inner_params")
    if present and names is not None and not all(isinstance(n, str) for n in names):
        raise ConfigError(f"model.inner_params={names!r}: expected a list of parameter names")
    return cfg
