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
           "UltraEdit", "UltraEditConfig", "make_editor"]


def make_editor(name: str, model, inner_params=None, **options):
    """Build an editor by name: "mend", "ke", "enn" (meta-trained), "ultraedit" (training-free),
    "ft", "ft_l" (L∞-bounded), "ft_kl"."""
    if name == "mend":
        return MEND(model, inner_params, MENDConfig(**options))
    if name == "ke":
        return KE(model, inner_params, KEConfig(**options))
    if name == "enn":
        return ENN(model, inner_params, ENNConfig(**options))
    if name == "ultraedit":
        return UltraEdit(model, inner_params, UltraEditConfig(**options))
    if name == "ft":
        return FineTune(model, inner_params, FTConfig(**options))
    if name == "ft_l":
        options.setdefault("linf", 5e-4)
        return FineTune(model, inner_params, FTConfig(**options))
    if name == "ft_kl":
        options.setdefault("c_loc", 1.0)
        return FineTune(model, inner_params, FTConfig(**options))
    raise ValueError(f"unknown editor {name!r}; choose mend, ke, enn, ultraedit, ft, ft_l or "
                     "ft_kl")
