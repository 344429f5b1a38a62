"""Editors: MEND, the KE and ENN baselines and the fine-tuning baselines, all with
`edit(state, model_params, batch)`.

Every editor has `init(key) -> state` and a pure, jit-able
`edit(state, model_params, edit_batch) -> new_model_params`.
"""

from mend_jax.editors.enn import ENN, ENNConfig
from mend_jax.editors.ft import FineTune, FTConfig
from mend_jax.editors.ke import KE, KEConfig
from mend_jax.editors.mend import MEND, MENDConfig
from mend_jax.editors.ultraedit import UltraEdit, UltraEditConfig

__all__ = ["ENN", "KE", "MEND", "ENNConfig", "FTConfig", "FineTune", "KEConfig", "MENDConfig",
           "UltraEdit", "UltraEditConfig", "editor_config", "make_editor"]


_CLASSES = {"mend": (MEND, MENDConfig), "ke": (KE, KEConfig), "enn": (ENN, ENNConfig),
            "ultraedit": (UltraEdit, UltraEditConfig), "ft": (FineTune, FTConfig),
            "ft_l": (FineTune, FTConfig), "ft_kl": (FineTune, FTConfig)}
# What makes FT+L and FT+KL differ from FT when their options leave it out.
_METHOD_DEFAULTS = {"ft_l": {"linf": 5e-4}, "ft_kl": {"c_loc": 1.0}}


def editor_config(name: str, **options):
    """The config dataclass of editor `name` (MENDConfig, FTConfig, ...) built from `options`."""
    if name not in _CLASSES:
        raise ValueError(f"unknown editor {name!r}; choose mend, ke, enn, ultraedit, ft, ft_l or "
                         "ft_kl")
    return _CLASSES[name][1](**{**_METHOD_DEFAULTS.get(name, {}), **options})


def make_editor(name: str, model, inner_params=None, config=None, **options):
    """Build an editor by name: "mend", "ke", "enn" (meta-trained), "ultraedit" (training-free),
    "ft", "ft_l" (L∞-bounded), "ft_kl"; from its `config` dataclass or from `options`."""
    if config is None:
        config = editor_config(name, **options)
    elif options:
        raise TypeError("make_editor: pass a config or options, not both")
    return _CLASSES[name][0](model, inner_params, config)
