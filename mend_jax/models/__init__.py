"""Flax models that load and export Hugging Face checkpoints.

Public API: `load_pretrained`, `save_pretrained`, `from_config`, `Model`, `model_inputs`,
`generate`, `supported_model_types`, `CheckpointError`, and the name map (`NameMap`,
`ParamName`, `EditedWeight`).
"""

from mend_jax.models.generation import generate
from mend_jax.models.hf_io import (
    CheckpointError,
    from_config,
    load_pretrained,
    save_pretrained,
)
from mend_jax.models.model import Model, model_inputs
from mend_jax.models.names import EditedWeight, NameMap, ParamName, get_path, set_path
from mend_jax.models.registry import get_architecture, supported_model_types

__all__ = [
    "CheckpointError",
    "EditedWeight",
    "Model",
    "NameMap",
    "ParamName",
    "from_config",
    "generate",
    "get_architecture",
    "get_path",
    "load_pretrained",
    "model_inputs",
    "save_pretrained",
    "set_path",
    "supported_model_types",
]
