"""mend-jax: MEND model editing in JAX/Flax.

Everything a user is meant to call:
- text in, edited params out: `edit`, `evaluate_edit` (EasyEdit's metric names), `EditInputError`
- editors as artifacts: `save_editor`, `load_editor`, `ArtifactError`
- models: `load_pretrained`, `save_pretrained`, `from_config`, `generate`, `Model`
- capture: `capture` (per-token layer inputs and output gradients of named weights)
- editors: `MEND`, `MENDConfig`, `KE`, `KEConfig`, `ENN`, `ENNConfig`, `FineTune`, `FTConfig`,
  `make_editor`
- training: `MetaTrainer`, `TrainConfig` (the pure, jit-able meta-training step)
- evaluation: `evaluate_editor`, `format_table`
- the whole job: `load_config` -> `RunConfig` (the typed schema, `mend_jax.schema`), then
  `mend_jax.pipeline` (`prepare`, `train`, `evaluate_all`, `load_run`)
- data: `mend_jax.data` (loaders, the offline geonames benchmarks, batching)
- scale: `mend_jax.sharding` (mesh and partition rules), `mend_jax.checkpoint`
- errors: `MendError` and one subclass per layer (`ConfigError`, `DataError`, `CheckpointError`,
  `EditError`, `RunError`), in `mend_jax.errors`
"""

from mend_jax.api import EditInputError, edit, evaluate_edit
from mend_jax.artifacts import ArtifactError, load_editor, save_editor
from mend_jax.capture import Captured, capture
from mend_jax.config import load_config
from mend_jax.editors import (
    ENN,
    KE,
    MEND,
    ENNConfig,
    FineTune,
    FTConfig,
    KEConfig,
    MENDConfig,
    make_editor,
)
from mend_jax.errors import (
    CheckpointError,
    ConfigError,
    DataError,
    EditError,
    MendError,
    RunError,
)
from mend_jax.evaluation import evaluate_editor, format_table
from mend_jax.models import (
    Model,
    from_config,
    generate,
    load_pretrained,
    save_pretrained,
    supported_model_types,
)
from mend_jax.schema import RunConfig
from mend_jax.training import MetaTrainer, TrainConfig

__all__ = [
    "ENN",
    "KE",
    "MEND",
    "ArtifactError",
    "Captured",
    "CheckpointError",
    "ConfigError",
    "DataError",
    "EditError",
    "ENNConfig",
    "EditInputError",
    "FTConfig",
    "FineTune",
    "KEConfig",
    "MENDConfig",
    "MendError",
    "MetaTrainer",
    "Model",
    "RunConfig",
    "RunError",
    "TrainConfig",
    "capture",
    "edit",
    "evaluate_edit",
    "evaluate_editor",
    "format_table",
    "from_config",
    "generate",
    "load_config",
    "load_editor",
    "load_pretrained",
    "make_editor",
    "save_editor",
    "save_pretrained",
    "supported_model_types",
]
