"""mend-jax: MEND model editing in JAX/Flax."""

from mend_jax.models import (
    CheckpointError,
    Model,
    from_config,
    load_pretrained,
    save_pretrained,
    supported_model_types,
)

__all__ = [
    "CheckpointError",
    "Model",
    "from_config",
    "load_pretrained",
    "save_pretrained",
    "supported_model_types",
]
