"""Import and export of Hugging Face checkpoints (config.json + safetensors), no torch needed."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from mend_jax.errors import CheckpointError
from mend_jax.models.model import Model
from mend_jax.models.names import NameMap, flatten, get_path, set_path
from mend_jax.models.registry import get_architecture, supported_model_types


def from_config(hf_config, *, dtype=jnp.float32, seed: int = 0, tokenizer=None,
                remat: bool = False) -> Model:
    """A randomly initialised model of a transformers config (for tests and benchmarks)."""
    arch = get_architecture(hf_config.model_type)
    config = arch.config_from_hf(hf_config)
    module = arch.module(config, dtype, remat)
    ids = jnp.zeros((1, 4), jnp.int32)
    dec = ids if arch.seq2seq else None
    params = jax.jit(module.init)(jax.random.key(seed), ids, None, dec, None)["params"]
    return Model(arch, config, hf_config, module, params, tokenizer, dtype)


def _resolve(name_or_path: str | os.PathLike) -> Path:
    path = Path(name_or_path)
    if path.is_dir():
        return path
    if path.exists():
        raise CheckpointError(f"{path} is a file; expected a folder holding config.json")
    name = str(name_or_path)
    if path.is_absolute() or name.startswith((".", "~")) or name.count("/") > 1:
        # Clearly meant as a local path: a hub lookup would only add a confusing repo-id error.
        raise CheckpointError(f"{path}: no such folder (expected a folder holding config.json "
                              "and model.safetensors, or a Hugging Face hub name)")
    offline = os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")
    try:
        from huggingface_hub import snapshot_download

        local = snapshot_download(
            name,
            allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken"],
        )
    except Exception as e:  # offline, unknown repo, auth...
        reason = str(e).strip().splitlines()[0] if str(e).strip() else ""
        hint = (" HF_HUB_OFFLINE is set, so only the local hub cache was searched."
                if offline and type(e).__name__ != "HFValidationError" else "")
        raise CheckpointError(
            f"{name!r} is not a local folder and could not be fetched from the Hugging Face "
            f"hub ({type(e).__name__}: {reason}).{hint} Pass a local folder holding config.json "
            "and model.safetensors, or a hub name that is cached or reachable."
        ) from None
    return Path(local)


def _read_tensors(folder: Path) -> dict[str, np.ndarray]:
    index = folder / "model.safetensors.index.json"
    if index.exists():
        try:
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index}: not a safetensors index ({e})") from None
    elif (folder / "model.safetensors").exists():
        files = ["model.safetensors"]
    else:
        raise CheckpointError(
            f"{folder}: no model.safetensors or model.safetensors.index.json "
            "(PyTorch .bin checkpoints are not read; convert them with transformers first)"
        )
    tensors: dict[str, np.ndarray] = {}
    for name in files:
        f = folder / name
        if not f.exists():
            raise CheckpointError(f"{f}: missing (listed in {index.name})")
        try:
            with safe_open(str(f), framework="flax") as st:
                for key in st.keys():
                    tensors[key] = np.asarray(st.get_tensor(key))
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{f}: corrupt or truncated safetensors file ({e})") from None
    return tensors


def load_pretrained(name_or_path: str | os.PathLike, dtype=jnp.float32,
                    remat: bool = False) -> Model:
    """Load a Hugging Face checkpoint (local folder or hub name) as a mend-jax `Model`."""
    import transformers

    folder = _resolve(name_or_path)
    config_file = folder / "config.json"
    if not config_file.exists():
        raise CheckpointError(f"{folder}: missing config.json")
    try:
        raw = json.loads(config_file.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{config_file}: invalid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{config_file}: expected a JSON object, got {type(raw).__name__}")
    model_type = raw.get("model_type")
    if model_type not in supported_model_types():
        what = "no model_type" if model_type is None else f"unsupported model_type {model_type!r}"
        raise CheckpointError(f"{config_file}: {what}; supported model types: "
                              f"{supported_model_types()}")
    arch = get_architecture(model_type)
    hf_config = transformers.AutoConfig.from_pretrained(str(folder))
    config = arch.config_from_hf(hf_config)
    module = arch.module(config, dtype, remat)
    params = _params_from_tensors(arch, config, _read_tensors(folder), dtype, folder)
    tokenizer = None
    if any((folder / f).exists() for f in ("tokenizer.json", "tokenizer_config.json",
                                            "vocab.json", "spiece.model")):
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder))
    return Model(arch, config, hf_config, module, params, tokenizer, dtype)


def _params_from_tensors(arch, config, tensors, dtype, source) -> dict:
    names = NameMap(arch.param_names(config))
    # Expected shapes come from the module itself, so mis-shaped tensors are caught by name.
    module = arch.module(config, dtype, False)
    ids = jnp.zeros((1, 4), jnp.int32)
    shapes = jax.eval_shape(module.init, jax.random.key(0), ids, None,
                            ids if arch.seq2seq else None, None)["params"]
    expected = flatten(shapes)
    missing, unexpected, misshaped, nonfinite = [], [], [], []
    params: dict = {}
    for n in names.names:
        key = n.hf if n.hf in tensors else n.fallback if n.fallback in tensors else None
        if key is None:
            if not (n.optional or n.tied_to):
                missing.append(n.hf)
            continue
        if n.tied_to is not None:
            continue
        leaf = n.to_leaf(tensors[key])
        want = expected.get(n.path)
        if want is None or tuple(leaf.shape) != tuple(want.shape):
            misshaped.append(f"{n.hf}: got {tuple(tensors[key].shape)}, expected "
                             f"{tuple(n.to_hf(np.zeros(want.shape)).shape) if want else '?'}")
            continue
        n_bad = _count_nonfinite(leaf)
        if n_bad:
            nonfinite.append(f"{key} ({n_bad} of {leaf.size} values)")
            continue
        params = set_path(params, n.path, jnp.asarray(leaf, dtype=dtype))
    known = set(names.by_hf) | {n.fallback for n in names.names if n.fallback}
    unexpected = sorted(k for k in tensors if k not in known and not _ignorable(k))
    problems = []
    if missing:
        problems.append(f"missing tensors: {missing}")
    if misshaped:
        problems.append(f"mis-shaped tensors: {misshaped}")
    if unexpected:
        problems.append(f"unexpected tensors: {unexpected}")
    if nonfinite:
        problems.append(f"tensors holding NaN or inf: {nonfinite}")
    if problems:
        raise CheckpointError(f"{source}: " + "; ".join(problems))
    got = set(flatten(params))
    absent = [p for p in expected if p not in got]
    if absent:
        raise CheckpointError(f"{source}: no tensor for parameters {absent}")
    return params


def _count_nonfinite(array) -> int:
    if not jnp.issubdtype(array.dtype, jnp.inexact):
        return 0
    return int(np.size(array) - np.count_nonzero(np.isfinite(np.asarray(array, np.float32))))


def _ignorable(name: str) -> bool:
    # Buffers some transformers versions store in checkpoints; they carry no parameters.
    return name.endswith((".attn.bias", ".attn.masked_bias", ".rotary_emb.inv_freq",
                          "embeddings.position_ids")) or (
        ".attention.bias" in name or ".attention.masked_bias" in name
        # BERT pretraining checkpoints: the NSP head, and the pooler a masked LM does not use
        # (a classifier names the pooler, so there it is never unexpected).
        or name.startswith(("cls.seq_relationship.", "bert.pooler."))
    )


def save_pretrained(model: Model, params: dict | None, out_dir: str | os.PathLike,
                    dtype=None) -> Path:
    """Write config.json + model.safetensors (+ tokenizer) in Hugging Face layout, atomically."""
    params = model.params if params is None else params
    out = Path(out_dir)
    if out.is_file():
        raise CheckpointError(f"{out} is a file; expected a folder to write the model into")
    out.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for n in model.names.names:
        # Tied names (lm_head -> wte, T5's embed_tokens -> shared) are written as copies, as
        # transformers' own checkpoints often hold them; transformers re-ties them on load.
        src = model.names.by_hf[n.tied_to] if n.tied_to else n
        leaf = np.asarray(jax.device_get(get_path(params, src.path)))
        if dtype is not None:
            leaf = leaf.astype(dtype)
        tensors[n.hf] = np.ascontiguousarray(n.to_hf(leaf))
    with tempfile.NamedTemporaryFile(dir=out, suffix=".tmp", delete=False) as tmp:
        tmp_name = tmp.name
    save_file(tensors, tmp_name, metadata={"format": "pt"})
    os.replace(tmp_name, out / "model.safetensors")
    model.hf_config.save_pretrained(str(out))
    if model.tokenizer is not None:
        model.tokenizer.save_pretrained(str(out))
    return out
