"""The MEND editor: low-rank residual MLPs that turn captured (u, δ) into a pseudo-gradient.

Parameters and state are plain pytrees; every function here is pure. An editor state is
`{"params": {"nets": ..., "edit_lrs": ...}, "stats": ...}`: `params` are meta-trained, `stats`
are the running normalisation statistics (updated while training, frozen at evaluation).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import jax
import jax.numpy as jnp

from mend_jax.capture import Captured, capture, pseudo_gradient
from mend_jax.editing import check_edit_batch
from mend_jax.models.names import get_path, set_path


@dataclass(frozen=True)
class MENDConfig:
    """Editor hyperparameters; defaults are the reference's `alg/mend.yaml`."""

    combine: bool = True          # one MLP on [u; δ] instead of two
    one_sided: bool = False       # transform only the smaller of u / δ
    x_only: bool = False          # transform u only
    delta_only: bool = False      # transform δ only
    n_hidden: int = 1             # IDMLP has n_hidden + 1 low-rank residual layers
    rank: int = 1920              # r = min(rank, d)
    init: str = "id"              # "id": U = 0 so the editor starts as the identity; "xavier"
    act: str = "relu"
    final_act: bool = True        # the reference applies the activation in the last layer too
    shared: bool = True           # one editor per weight shape, told apart by mode scale/shift
    norm: bool = True             # online standardisation of u and δ
    edit_lr: float = 1e-4         # initial per-layer step size α
    norm_eps: float = 1e-7

    def __post_init__(self):
        if sum([self.combine, self.one_sided, self.x_only, self.delta_only]) > 1:
            raise ValueError("choose at most one of combine, one_sided, x_only, delta_only")
        if self.init not in ("id", "xavier"):
            raise ValueError(f"init must be 'id' or 'xavier', got {self.init!r}")
        if self.act not in _ACTS:
            raise ValueError(f"act must be one of {sorted(_ACTS)}, got {self.act!r}")


def _clamp_relu(x):
    # torch's clamp(min=0), which the reference uses, passes the gradient at exactly 0; jax.nn.relu
    # does not. With init "id" every pre-activation starts at exactly 0, so jax.nn.relu would
    # leave the editor stuck at the identity forever.
    return jnp.where(x >= 0, x, 0.0)


_ACTS = {"relu": _clamp_relu, "gelu": jax.nn.gelu, "silu": jax.nn.silu, "tanh": jnp.tanh,
         "identity": lambda x: x}


# ----------------------------------------------------------------------------- IDMLP
def init_idmlp(key, dim: int, cfg: MENDConfig, n_modes: int) -> dict:
    """n_hidden+1 layers y = x + act(scale_m * (U V x + b) + shift_m)."""
    rank = min(cfg.rank, dim)
    layers = []
    for k in jax.random.split(key, cfg.n_hidden + 1):
        kv, ku = jax.random.split(k)
        v = jax.nn.initializers.xavier_uniform()(kv, (rank, dim), jnp.float32)
        u = (jnp.zeros((dim, rank), jnp.float32) if cfg.init == "id"
             else jax.nn.initializers.xavier_uniform()(ku, (dim, rank), jnp.float32))
        layers.append({
            "U": u, "V": v, "b": jnp.zeros((dim,), jnp.float32),
            "mode_scale": jnp.ones((n_modes, dim), jnp.float32),
            "mode_shift": jnp.zeros((n_modes, dim), jnp.float32),
        })
    return {"layers": layers}


def apply_idmlp(net: dict, x: jax.Array, mode: int, cfg: MENDConfig) -> jax.Array:
    act = _ACTS[cfg.act]
    n = len(net["layers"])
    for i, layer in enumerate(net["layers"]):
        pre = (x @ layer["V"].T) @ layer["U"].T + layer["b"]      # tokens dim
        pre = pre * layer["mode_scale"][mode] + layer["mode_shift"][mode]
        out = act(pre) if (i < n - 1 or cfg.final_act) else pre
        x = x + out if cfg.init == "id" else out
    return x


# ----------------------------------------------------------------------------- stats
def init_stats(d_in: int, d_out: int) -> dict:
    z = lambda d: jnp.zeros((d,), jnp.float32)
    return {"count": jnp.zeros((), jnp.float32), "u_mean": z(d_in), "u_m2": z(d_in),
            "d_mean": z(d_out), "d_m2": z(d_out)}


def update_stats(stats: dict, u: jax.Array, d: jax.Array, mask: jax.Array) -> dict:
    """Merge a batch of tokens into running mean/M2 (Chan et al.'s parallel Welford update)."""
    n_b = mask.sum()
    out = {"count": stats["count"] + n_b}
    for key, x in (("u", u), ("d", d)):
        mean_b = (x * mask[:, None]).sum(0) / jnp.maximum(n_b, 1.0)
        m2_b = (jnp.square(x - mean_b) * mask[:, None]).sum(0)
        delta = mean_b - stats[f"{key}_mean"]
        total = jnp.maximum(out["count"], 1.0)
        out[f"{key}_mean"] = stats[f"{key}_mean"] + delta * n_b / total
        out[f"{key}_m2"] = (stats[f"{key}_m2"] + m2_b
                            + jnp.square(delta) * stats["count"] * n_b / total)
    return out


def _standardise(x, mean, m2, count, eps):
    std = jnp.where(count > 1, jnp.sqrt(m2 / jnp.maximum(count - 1, 1.0)), 1.0)
    return (x - mean) / (std + eps)


# ----------------------------------------------------------------------------- the editor
@dataclass(frozen=True)
class EditorLayout:
    """Static description of which editor network serves which weight (hashable)."""

    inner_params: tuple[str, ...]
    shapes: tuple[tuple[int, int], ...]           # (d_in, d_out) per inner param
    groups: tuple[str, ...]                        # editor key per inner param
    modes: tuple[int, ...]                         # mode index inside its group
    group_sizes: tuple[tuple[str, int], ...] = field(default=())


def make_layout(model, inner_params: Sequence[str], shared: bool) -> EditorLayout:
    shapes, groups, modes, counts = [], [], [], {}
    for name in inner_params:
        kernel = get_path(model.params, model.names.path(name))
        if kernel.ndim != 2:
            raise ValueError(f"inner param {name} is not a weight matrix (shape {kernel.shape})")
        d_in, d_out = kernel.shape
        group = f"{d_in}x{d_out}" if shared else name.replace(".", "_")
        modes.append(counts.get(group, 0))
        counts[group] = counts.get(group, 0) + 1
        shapes.append((d_in, d_out))
        groups.append(group)
    return EditorLayout(tuple(inner_params), tuple(shapes), tuple(groups), tuple(modes),
                        tuple(counts.items()))


class MEND:
    """MEND for one model and one list of edited weights. Holds only static configuration."""

    def __init__(self, model, inner_params: Sequence[str] | None = None,
                 config: MENDConfig | None = None):
        self.model = model
        self.config = config or MENDConfig()
        inner = list(inner_params) if inner_params is not None else model.default_inner_params()
        for n in inner:
            model.names.lookup(n)  # fails early with the closest valid names
        self.layout = make_layout(model, inner, self.config.shared)

    # -- state
    def init(self, key: jax.Array) -> dict:
        cfg, lay = self.config, self.layout
        nets, stats = {}, {}
        first = {}
        for group, shape in zip(lay.groups, lay.shapes):
            first.setdefault(group, shape)
        sizes = dict(lay.group_sizes)
        for (group, (d_in, d_out)), k in zip(first.items(), jax.random.split(key, len(first))):
            ku, kd = jax.random.split(k)
            n_modes = sizes[group]
            if cfg.combine:
                nets[group] = {"uv": init_idmlp(k, d_in + d_out, cfg, n_modes)}
            else:
                nets[group] = {}
                if self._transforms_u(d_in, d_out):
                    nets[group]["u"] = init_idmlp(ku, d_in, cfg, n_modes)
                if self._transforms_delta(d_in, d_out):
                    nets[group]["delta"] = init_idmlp(kd, d_out, cfg, n_modes)
            stats[group] = init_stats(d_in, d_out)
        edit_lrs = {n: jnp.asarray(cfg.edit_lr, jnp.float32) for n in lay.inner_params}
        return {"params": {"nets": nets, "edit_lrs": edit_lrs}, "stats": stats}

    def _transforms_u(self, d_in, d_out) -> bool:
        c = self.config
        if c.x_only:
            return True
        if c.delta_only:
            return False
        if c.one_sided:
            return d_in <= d_out
        return True

    def _transforms_delta(self, d_in, d_out) -> bool:
        c = self.config
        if c.delta_only:
            return True
        if c.x_only:
            return False
        if c.one_sided:
            return d_in > d_out
        return True

    # -- the transform of captured vectors
    def transform(self, params: dict, stats: dict, name: str, cap: Captured):
        """(ũ, δ̃) for one weight, in float32, padding tokens zeroed."""
        cfg = self.config
        i = self.layout.inner_params.index(name)
        group, mode = self.layout.groups[i], self.layout.modes[i]
        u = cap.layer_inputs.astype(jnp.float32)
        d = cap.output_grads.astype(jnp.float32)
        m = cap.token_mask
        if cfg.norm:
            s = stats[group]
            u = _standardise(u, s["u_mean"], s["u_m2"], s["count"], cfg.norm_eps)
            d = _standardise(d, s["d_mean"], s["d_m2"], s["count"], cfg.norm_eps)
        nets = params["nets"][group]
        if cfg.combine:
            out = apply_idmlp(nets["uv"], jnp.concatenate([u, d], -1), mode, cfg)
            u, d = out[:, : u.shape[-1]], out[:, u.shape[-1]:]
        else:
            if "u" in nets:
                u = apply_idmlp(nets["u"], u, mode, cfg)
            if "delta" in nets:
                d = apply_idmlp(nets["delta"], d, mode, cfg)
        return u * m[:, None], d * m[:, None]

    def updated_stats(self, stats: dict, captured: Mapping[str, Captured]) -> dict:
        """Running statistics after seeing this edit's tokens (what training does)."""
        stats = dict(stats)
        for i, name in enumerate(self.layout.inner_params):
            c, group = captured[name], self.layout.groups[i]
            stats[group] = update_stats(stats[group], jax.lax.stop_gradient(c.layer_inputs),
                                        jax.lax.stop_gradient(c.output_grads), c.token_mask)
        return stats

    def apply_captured(self, params: dict, stats: dict, model_params: dict,
                       captured: Mapping[str, Captured]) -> dict:
        """W' = W − α_ℓ Σ_t δ̃_t ũ_tᵀ for every edited weight; other leaves are shared, not
        copied."""
        new = model_params
        for name in self.layout.inner_params:
            path = self.model.names.path(name)
            w = get_path(model_params, path)
            u, d = self.transform(params, stats, name, captured[name])
            update = params["edit_lrs"][name] * pseudo_gradient(u, d)
            new = set_path(new, path, (w.astype(jnp.float32) - update).astype(w.dtype))
        return new

    def edit_with_stats(self, editor_state: dict, model_params: dict, edit_batch,
                        train: bool = False) -> tuple[dict, dict, jax.Array]:
        """(new model params, new stats, pre-edit loss). With train=True stats absorb the edit."""
        # The editor is not trained through the base model's backward pass (as the reference).
        loss, captured, _ = capture(self.model, jax.lax.stop_gradient(model_params), edit_batch,
                                    self.layout.inner_params)
        captured = jax.lax.stop_gradient(captured)
        stats = editor_state["stats"]
        if train:
            stats = self.updated_stats(stats, captured)
        new = self.apply_captured(editor_state["params"], stats, model_params, captured)
        return new, stats, loss

    def edit(self, editor_state: dict, model_params: dict, edit_batch) -> dict:
        """Pure, jit-able edit: one request or k requests at once (their tokens are pooled)."""
        check_edit_batch(self.model, edit_batch)
        return self.edit_with_stats(editor_state, model_params, edit_batch, train=False)[0]
