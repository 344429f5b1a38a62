"""Editors as artifacts: a self-describing folder a user keeps, loadable without its run.

    editor/
      editor.safetensors   the editor state: networks, step sizes, normalisation statistics
                           (ENN: its meta-learned weights); pytree paths joined with "/"
                           ("params/nets/64x256/uv/layers/0/U")
      editor.json          the kind of editor ("mend", "ke", "enn") and its config, the edited
                           weights (name, shape) and the base model's identity: name or path, a
                           sha256 of its config and one of each edited weight

`load_editor(path, model)` refuses a model that is not the one the editor was trained on, naming
the file and the field that differ. `write_model_card` describes an exported edited model.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from mend_jax.editors import ENN, KE, MEND, ENNConfig, KEConfig, MENDConfig
from mend_jax.errors import CheckpointError
from mend_jax.models import Model, get_path

FORMAT = "mend-jax-editor"
VERSION = 1
CONFIG_FILE = "editor.json"
WEIGHTS_FILE = "editor.safetensors"
# The meta-trained editors an artifact can hold: kind -> (class, config class).
EDITORS = {"mend": (MEND, MENDConfig), "ke": (KE, KEConfig), "enn": (ENN, ENNConfig)}


class ArtifactError(CheckpointError):
    """An editor folder that cannot be loaded, or not for this model."""


# ----------------------------------------------------------------------------- identity
def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def config_sha256(model: Model) -> str:
    """Hash of the architecture and its config (what decides shapes and the forward pass)."""
    blob = {"model_type": model.hf_config.model_type,
            "config": dataclasses.asdict(model.config)}
    return _sha256(json.dumps(blob, sort_keys=True, default=str).encode())


def weight_sha256(model: Model, params: dict, name: str) -> str:
    """Hash of one weight's values as float32 in the pytree layout [d_in, d_out]."""
    leaf = np.asarray(jax.device_get(get_path(params, model.names.path(name))), np.float32)
    return _sha256(str(leaf.shape).encode() + np.ascontiguousarray(leaf).tobytes())


def model_identity(model: Model, name_or_path: str | None = None) -> dict:
    """The base model as editor.json records it (without the weight hashes)."""
    if name_or_path is None:
        name_or_path = getattr(model.hf_config, "name_or_path", None) or None
    if name_or_path and Path(name_or_path).is_dir():
        name_or_path = str(Path(name_or_path).resolve())
    return {"name_or_path": name_or_path, "model_type": model.hf_config.model_type,
            "config_sha256": config_sha256(model)}


# ----------------------------------------------------------------------------- the state
def _key(entry) -> str:
    for attr in ("key", "idx", "name"):
        if hasattr(entry, attr):
            return str(getattr(entry, attr))
    raise TypeError(f"unsupported pytree path entry {entry!r}")


def flatten_state(state: Any) -> dict[str, np.ndarray]:
    """{"params/nets/<group>/uv/layers/0/U": array, ...}: every leaf under a '/'-joined path."""
    leaves = jax.tree_util.tree_flatten_with_path(state)[0]
    return {"/".join(_key(e) for e in path): np.asarray(jax.device_get(leaf))
            for path, leaf in leaves}


def unflatten_state(flat: Mapping[str, np.ndarray], like: Any, source: str) -> Any:
    """The tree of `like` with its leaves taken from `flat` (same keys, shapes and dtypes)."""
    paths, treedef = jax.tree_util.tree_flatten_with_path(like)
    keys = ["/".join(_key(e) for e in path) for path, _ in paths]
    missing = [k for k in keys if k not in flat]
    unexpected = sorted(set(flat) - set(keys))
    if missing or unexpected:
        raise ArtifactError(f"{source}: editor tensors do not match the config "
                            f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    leaves = []
    for key, (_, want) in zip(keys, paths):
        got = flat[key]
        if got.shape != want.shape:
            raise ArtifactError(f"{source}: tensor {key} has shape {got.shape}, the config "
                                f"gives {want.shape}")
        if np.issubdtype(got.dtype, np.inexact) and not np.isfinite(got).all():
            bad = int(np.size(got) - np.isfinite(got).sum())
            raise ArtifactError(f"{source}: tensor {key} holds NaN or inf ({bad} of "
                                f"{np.size(got)} values); every edit would be NaN")
        leaves.append(jax.numpy.asarray(got, dtype=want.dtype))
    return jax.tree_util.tree_unflatten(treedef, leaves)


# ----------------------------------------------------------------------------- save / load
def _write_atomically(path: Path, write) -> Path:
    """Write a folder into a temporary sibling, then rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.tmp-"))
    try:
        write(tmp)
        if path.exists():
            old = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.old-"))
            os.replace(path, old / path.name)
            os.replace(tmp, path)
            shutil.rmtree(old)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def editor_kind(editor) -> str:
    """The artifact kind ("mend", "ke" or "enn") of a meta-trained editor."""
    kinds = [k for k, (cls, _) in EDITORS.items() if type(editor) is cls]
    if not kinds:
        raise TypeError(f"save_editor saves {', '.join(EDITORS)} editors, got "
                        f"{type(editor).__name__}")
    return kinds[0]


def save_editor(path: str | os.PathLike, editor: MEND | KE | ENN, editor_state: dict, *,
                base_model: str | None = None, max_length: int | None = None) -> Path:
    """Write a MEND, KE or ENN editor (state + config + base model identity) as a folder,
    atomically.

    Args:
      base_model: the base model's name or folder to record (default: where it was loaded from).
      max_length: the token length the editor was trained with (the CLIs' default).
    """
    kind = editor_kind(editor)
    _check_destination(Path(path))
    model, layout = editor.model, editor.layout
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "editor": kind,
        "config": dataclasses.asdict(editor.config),
        "inner_params": [{"name": n, "shape": list(s)}
                         for n, s in zip(layout.inner_params, layout.shapes)],
        "base_model": {**model_identity(model, name_or_path=base_model),
                       "weights_sha256": {n: weight_sha256(model, model.params, n)
                                          for n in layout.inner_params}},
        "max_length": max_length,
    }
    tensors = flatten_state(editor_state)
    # The state must load back: the same tensors, shapes and finite values as the editor's.
    unflatten_state(tensors, jax.eval_shape(editor.init, jax.random.key(0)),
                    f"save_editor({path}): editor_state")

    def write(folder: Path) -> None:
        save_file(tensors, str(folder / WEIGHTS_FILE), metadata={"format": FORMAT})
        (folder / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")

    return _write_atomically(Path(path), write)


def _check_destination(path: Path) -> None:
    """save_editor replaces its folder whole: refuse a file, or a folder holding anything but
    an editor (a run folder given by mistake would be deleted)."""
    if path.is_file():
        raise ArtifactError(f"save_editor: {path} is a file; expected a folder to write the "
                            "editor into")
    if path.is_dir():
        others = sorted(p.name for p in path.iterdir() if p.name not in (CONFIG_FILE, WEIGHTS_FILE))
        if others:
            raise ArtifactError(f"save_editor: {path} holds other files ({others[:3]}); it would "
                                "be replaced whole, so give a new or an editor folder")


def _check_meta(meta: dict, file: Path) -> None:
    """The fields of editor.json that loading reads, with their types."""
    for field, kind in (("config", dict), ("inner_params", list), ("base_model", dict)):
        if field not in meta:
            raise ArtifactError(f"{file}: no field {field!r}")
        if not isinstance(meta[field], kind):
            raise ArtifactError(f"{file}: field {field} is {type(meta[field]).__name__}, "
                                f"expected {'an object' if kind is dict else 'a list'}")
    for key in ("model_type", "config_sha256"):
        if not isinstance(meta["base_model"].get(key), str):
            raise ArtifactError(f"{file}: field base_model.{key} is missing or not a string")
    if not isinstance(meta["base_model"].get("weights_sha256", {}), dict):
        raise ArtifactError(f"{file}: field base_model.weights_sha256 is not an object")
    for i, entry in enumerate(meta["inner_params"]):
        ok = (isinstance(entry, dict) and isinstance(entry.get("name"), str)
              and isinstance(entry.get("shape"), list)
              and all(isinstance(d, int) for d in entry["shape"]))
        if not ok:
            raise ArtifactError(f"{file}: field inner_params[{i}] is {entry!r}, expected "
                                '{"name": weight name, "shape": [int, ...]}')


def _config_types(config_cls, values: dict, source: str) -> None:
    """Each config value of the type of its field's default (an int passes for a float)."""
    for f in dataclasses.fields(config_cls):
        if f.name not in values or f.default is None or f.default is dataclasses.MISSING:
            continue
        value, want = values[f.name], type(f.default)
        ok = (isinstance(value, want) and (want is bool or not isinstance(value, bool))
              or want is float and isinstance(value, int) and not isinstance(value, bool))
        if not ok:
            raise ArtifactError(f"{source}: field config.{f.name} is {value!r}, expected "
                                f"{want.__name__}")


def read_editor_config(path: str | os.PathLike) -> dict:
    """editor.json of an editor folder, validated as far as it goes without a model."""
    file = Path(path) / CONFIG_FILE
    if not file.exists():
        raise ArtifactError(f"{file}: missing (is {path} a folder written by save_editor?)")
    try:
        meta = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise ArtifactError(f"{file}: invalid JSON ({e})") from None
    if not isinstance(meta, dict):
        raise ArtifactError(f"{file}: expected a JSON object, got {type(meta).__name__}")
    if meta.get("format") != FORMAT:
        raise ArtifactError(f"{file}: field format is {meta.get('format')!r}, "
                            f"expected {FORMAT!r}")
    if meta.get("version") != VERSION:
        raise ArtifactError(f"{file}: field version is {meta.get('version')!r}; this mend-jax "
                            f"reads version {VERSION}")
    _check_meta(meta, file)
    return meta


def check_model(meta: dict, model: Model, source: str) -> None:
    """Raise ArtifactError naming the first difference between `model` and the recorded one."""
    base = meta["base_model"]
    if model.hf_config.model_type != base["model_type"]:
        raise ArtifactError(f"{source}: field base_model.model_type is {base['model_type']!r}, "
                            f"the model is {model.hf_config.model_type!r}")
    for i, entry in enumerate(meta["inner_params"]):
        name = entry["name"]
        if name not in model.names:
            raise ArtifactError(f"{source}: field inner_params[{i}]: the model has no weight "
                                f"{name!r}")
        shape = list(get_path(model.params, model.names.path(name)).shape)
        if shape != list(entry["shape"]):
            raise ArtifactError(f"{source}: field inner_params[{i}]: {name} has shape "
                                f"{entry['shape']} in the editor, {shape} in the model")
    if config_sha256(model) != base["config_sha256"]:
        raise ArtifactError(f"{source}: field base_model.config_sha256 differs: the model's "
                            f"config is not the one the editor was trained on "
                            f"({base.get('name_or_path')})")
    for name, want in base.get("weights_sha256", {}).items():
        if weight_sha256(model, model.params, name) != want:
            raise ArtifactError(f"{source}: field base_model.weights_sha256[{name!r}] differs: "
                                f"the model's weight is not the one the editor was trained on "
                                f"({base.get('name_or_path')})")


def load_editor(path: str | os.PathLike, model: Model) -> tuple[MEND | KE | ENN, dict]:
    """(editor, editor_state) from a save_editor folder, for `model`.

    The model must be the base model the editor was trained on: its architecture, config,
    edited weight names and shapes, and the values of the edited weights (sha256) are compared
    with editor.json; the first difference raises ArtifactError naming the file and field.
    """
    path = Path(path)
    meta = read_editor_config(path)
    source = str(path / CONFIG_FILE)
    check_model(meta, model, source)
    kind = meta.get("editor", "mend")
    if kind not in EDITORS:
        raise ArtifactError(f"{source}: field editor is {kind!r}, expected one of "
                            f"{list(EDITORS)}")
    cls, config_cls = EDITORS[kind]
    _config_types(config_cls, meta["config"], source)
    try:
        config = config_cls(**meta["config"])
        editor = cls(model, [e["name"] for e in meta["inner_params"]], config)
    except (TypeError, ValueError) as e:
        raise ArtifactError(f"{source}: field config: {e}") from None
    weights = path / WEIGHTS_FILE
    if not weights.exists():
        raise ArtifactError(f"{weights}: missing")
    try:
        flat = load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as e:
        raise ArtifactError(f"{weights}: corrupt or truncated safetensors file ({e})") from None
    like = jax.eval_shape(editor.init, jax.random.key(0))
    return editor, unflatten_state(flat, like, str(weights))


# ----------------------------------------------------------------------------- model card
def write_model_card(out_dir: str | os.PathLike, *, base_model: str | None, editor: str | None,
                     edits: Sequence[Mapping[str, Any]], metrics: Mapping[str, Any]) -> Path:
    """README.md (a Hugging Face model card) next to an exported edited model.

    Args:
      edits: one mapping per applied edit: prompt, target (and optionally rephrases).
      metrics: measured values, e.g. `evaluate_edit`'s reliability / generalization / locality.
    """
    from huggingface_hub import ModelCard, ModelCardData

    data = ModelCardData(library_name="mend-jax", tags=["model-editing", "mend"],
                         base_model=base_model if base_model and not Path(base_model).is_absolute()
                         else None)
    lines = ["# Edited model", "",
             "This model is a base model with the edits below applied in one step by a MEND "
             "editor (Model Editor Networks with Gradient Decomposition, Mitchell et al., "
             "ICLR 2022) with mend-jax; only the weights the editor edits changed.",
             "", f"- base model: `{base_model or 'unknown'}`", f"- editor: `{editor or 'unknown'}`",
             "", "## Edits applied", "", "| prompt | new target | rephrases |", "|---|---|---|"]
    for e in edits:
        reph = "; ".join(e.get("rephrases") or []) or "-"
        lines.append(f"| {_cell(e['prompt'])} | {_cell(e['target'])} | {_cell(reph)} |")
    lines += ["", "## Measured", "", "| metric | value |", "|---|---|"]
    for k, v in metrics.items():
        lines.append(f"| {k} | {'-' if v is None else f'{v:.3f}' if isinstance(v, float) else v} |")
    lines += ["", "reliability: the edited prompts' targets are the greedy prediction; "
              "generalization: the same on rephrasings; locality: share of unrelated prompts' "
              "next-token predictions the edit left unchanged (EasyEdit's definitions).", ""]
    card = ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines))
    out = Path(out_dir) / "README.md"
    card.save(str(out))
    return out


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")
