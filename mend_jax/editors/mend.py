"""The MEND editor: low-rank residual MLPs that turn captured (u, δ) into a pseudo-gradient.

Parameters and state are plain pytrees; every function here is pure. An editor state is
`{"params": {"nets": ..., "edit_lrs": ...}, "stats": ...}`: `params` are meta-trained, `stats`
are the running normalisation statistics (updated while training, frozen at evaluation).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

import jax
import jax.numpy as jnp
import jax.scipy.linalg  # noqa: F401  (cho_factor / cho_solve)
import numpy as np

from mend_jax.capture import Captured, capture, labelled_logits, pseudo_gradient
from mend_jax.editing import check_edit_batch
from mend_jax.metrics import sequence_correct, sequence_nll
from mend_jax.models.names import EditedWeight, get_path, set_path


@dataclass(frozen=True)
class MENDConfig:
    """Editor hyperparameters; defaults are the reference's `alg/mend.yaml`."""

    combine: bool = True          # one MLP on [u; δ] instead of two
    one_sided: bool = False       # transform only the smaller of u / δ
    x_only: bool = False          # transform u only
    delta_only: bool = False      # transform δ only
    n_hidden: int = 1             # IDMLP has n_hidden + 1 low-rank residual layers
    rank: int = 1920              # r = min(rank, d)
    init: str = "id"              # "id": U = 0, V ~ N(0, 1): the editor starts as the identity;
                                  # "xavier": U xavier-uniform with ReLU gain √2, V gain 1
    act: str = "relu"
    final_act: bool = False       # the reference's last layer has no activation
    shared: bool = True           # one editor per weight shape, told apart by mode scale/shift
    norm: bool = True             # online standardisation of u and δ
    edit_lr: float = 1e-4         # initial per-layer step size α
    norm_eps: float = 1e-7
    # How the k edits' per-token terms become one update: "sum" (MEND: Σ_t ũ_t δ̃_tᵀ) or
    # "lstsq" (MALMEN: every token's own MEND shift of its layer output, v_t = (u_t·ũ_t) δ̃_t,
    # is demanded of the raw keys u_t at once by the ridge solution (UᵀU + e^λ I)⁻¹ UᵀV, λ
    # learned per weight), which stops the terms of many edits from interfering.
    # "request_lstsq" needs no training of its own and serves a sum-trained editor: each
    # request's own update (the one it would get if edited alone: its summed, projected terms,
    # with δ from its own loss) is asked of that request's answer-token keys only, all k at once
    # by one ridge solve (XᵀX + λC)⁻¹XᵀV, C the keys' running second moment, λ `request_lambda`:
    # the requests' updates stop adding up on each other's keys and on the keys the model
    # usually sees. A single request keeps its own update (the sum's).
    aggregate: str = "sum"
    init_log_lambda: float = 0.0  # initial λ of `aggregate: lstsq` (log scale)
    request_lambda: float = 30.0  # λ of `aggregate: request_lstsq`, in units of C
    # request_lstsq's floor under C: C + ε·s·I (s = mean(diag C)). C's smallest eigenvalues are
    # tiny, so the solve may move rare key directions by far more than the weight's own norm; a
    # larger ε damps them (README: 1e-3 to 1.0 measured by k).
    request_eps: float = 1e-3
    # How many facts of the training split (true prompt → answer pairs) to measure the second
    # moment C_p of each weight's keys at their answer positions on (`MEND.preserve_keys`;
    # before evaluation, and with `preserve_weight` before training too). request_lstsq's ridge
    # term becomes λ(C + C_p), MEMIT's preserved-key covariance. 0: C alone.
    request_preserve: int = 0
    # AlphaEdit's preserved knowledge in the key projection: with `preserve_weight` μ > 0 the
    # key second moment that `project_keys` projects by (and request_lstsq regularises by) is
    # C + μ·C_p, C_p the answer-key second moment of `request_preserve` true facts, so the update
    # is damped along the keys at which the model recalls the facts it knows. The preserved
    # moments are part of the editor state (`MEND.preserve_keys` fills them; training does so
    # before step 0, so the editor learns under the projection) and are saved with it.
    preserve_weight: float = 0.0
    # Lifelong request_lstsq (sequential editing; AlphaEdit's term for earlier edits): the
    # answer keys of every earlier edit call are kept in the state (E = Σ x xᵀ, `edited_keys`),
    # and each later solve asks its update to leave their outputs where those edits put them:
    # (XᵀX + E + λ(C + C_p))⁻¹XᵀV, as if they were rows with value zero. The editor is then
    # stateful (`edit_and_update`), and a single request is solved too (its answer keys asked
    # of its own update, with the rest). Training is unaffected (E stays empty there).
    lifelong: bool = False
    # Which tokens the editor sees: "all" real tokens (MEND) or "answer" tokens only, the
    # positions whose output predicts a target token (MALMEN's `token: ans`).
    tokens: str = "all"
    # lstsq only: regularise by the keys' running second moment C = E[u uᵀ] of each weight
    # (every real token of the edit batches seen in training) instead of the identity, i.e.
    # (UᵀU + e^λ C)⁻¹ UᵀV: the update is the one that moves the layer's output least on the keys
    # the model usually sees (MEMIT's covariance term). A deviation from MALMEN (λI).
    whiten: bool = False
    # sum only, AlphaEdit's null-space projection in its soft form: the summed update Σ ũδ̃ᵀ is
    # multiplied by P = s·(C + ε·s·I)⁻¹, C = E[u uᵀ] the keys' running second moment (as
    # `whiten`), s its mean eigenvalue. That is (I − K₀(K₀ᵀK₀ + ε′I)⁻¹K₀ᵀ)/ε for the n keys K₀
    # (columns) with ε′ = ε·s·n: key directions the model's usual inputs occupy are damped
    # (towards ROME's C⁻¹k), rare ones (the edited subject's own) pass with gain up to 1/ε.
    project_keys: bool = False
    project_eps: float = 0.1
    # The loss whose gradient δ is captured: "batch_mean" (the reference: the mean NLL over all
    # target tokens of the k requests, so each request's δ shrinks as 1/k) or "per_request" (the
    # sum over requests of each one's mean NLL: a request's δ is the same whatever k, as with
    # MALMEN's fixed-size caching batches, so statistics and step sizes learned at one k hold
    # at another).
    capture_loss: str = "batch_mean"
    # Memory: with a number, a weight whose edit has more token rows than this runs the editor
    # over them in chunks of this many (`lax.scan`, each chunk rematerialised in the backward
    # pass), accumulating Σ ũδ̃ᵀ (or, lstsq, KᵀK and KᵀV) instead of holding every row's
    # activations at once. The same update up to float rounding; null: all rows in one pass.
    chunk_tokens: int | None = None
    # Edit-time verification (a deviation; null: off, the reference). With scales (1, 1.5, 2,
    # 3), an edit call is made in as many rounds: after each, every request whose edit prompt
    # does not yet give its target under the greedy, teacher-forced check of edit success moves
    # to the next scale, its share of the update (its tokens' δ̃ terms, or its values in a
    # solve) multiplied by it. The update of the round in which the most requests took is
    # applied (the earliest of equals: one request that never takes keeps the trained step, and
    # a call of many edits whose strengthened shares break more than they make is left as the
    # trained step made it). Edits that take at the trained step keep it. Used by
    # `edit` and `edit_and_update` (evaluation, the API, edit.py), not by meta-training or its
    # validation (the editor learns, and checkpoints are chosen on, the trained step alone).
    edit_scales: tuple[float, ...] | None = None

    def __post_init__(self):
        if sum([self.combine, self.one_sided, self.x_only, self.delta_only]) > 1:
            raise ValueError("choose at most one of combine, one_sided, x_only, delta_only")
        if self.init not in ("id", "xavier"):
            raise ValueError(f"init must be 'id' or 'xavier', got {self.init!r}")
        if self.act not in _ACTS:
            raise ValueError(f"act must be one of {sorted(_ACTS)}, got {self.act!r}")
        if self.aggregate not in AGGREGATES:
            raise ValueError(f"aggregate must be one of {AGGREGATES}, got {self.aggregate!r}")
        if self.edit_scales is not None:
            if isinstance(self.edit_scales, (list, tuple)) and all(
                    isinstance(s, (int, float)) and not isinstance(s, bool)
                    for s in self.edit_scales):
                # hashable, as a config must be (a json list comes back from editor.json)
                object.__setattr__(self, "edit_scales", tuple(float(s) for s in self.edit_scales))
            if (not isinstance(self.edit_scales, tuple) or not self.edit_scales
                    or not all(s > 0 for s in self.edit_scales)):
                raise ValueError(f"edit_scales must be null or a non-empty list of scales > 0, "
                                 f"got {self.edit_scales!r}")
            if self.chunk_tokens is not None:
                raise ValueError("edit_scales is not implemented with chunk_tokens (set one of "
                                 "them to null)")
        if self.aggregate == "request_lstsq" and self.chunk_tokens is not None:
            raise ValueError("chunk_tokens is not implemented for aggregate: request_lstsq "
                             "(set it to null)")
        if (isinstance(self.request_preserve, bool) or not isinstance(self.request_preserve, int)
                or self.request_preserve < 0):
            raise ValueError(f"request_preserve must be an integer >= 0, got "
                             f"{self.request_preserve!r}")
        if self.lifelong and self.aggregate != "request_lstsq":
            raise ValueError("lifelong needs aggregate: request_lstsq")
        if not self.preserve_weight >= 0:
            raise ValueError(f"preserve_weight must be >= 0, got {self.preserve_weight!r}")
        if self.preserve_weight and not self.request_preserve:
            raise ValueError("preserve_weight needs request_preserve > 0 (the number of true facts "
                             "whose answer keys are preserved)")
        if self.preserve_weight and not (self.project_keys or self.aggregate == "request_lstsq"):
            raise ValueError("preserve_weight needs project_keys: true or aggregate: "
                             "request_lstsq (it enters their key second moment)")
        if not self.request_eps > 0:
            raise ValueError(f"request_eps must be > 0, got {self.request_eps!r}")
        if not self.request_lambda > 0:
            raise ValueError(f"request_lambda must be > 0, got {self.request_lambda!r}")
        if self.tokens not in ("all", "answer"):
            raise ValueError(f"tokens must be 'all' or 'answer', got {self.tokens!r}")
        if self.capture_loss not in ("batch_mean", "per_request"):
            raise ValueError(f"capture_loss must be 'batch_mean' or 'per_request', got "
                             f"{self.capture_loss!r}")
        if self.whiten and self.aggregate != "lstsq":
            raise ValueError("whiten needs aggregate: lstsq")
        if self.project_keys and self.aggregate == "lstsq":
            raise ValueError("project_keys needs aggregate: sum or request_lstsq (lstsq has "
                             "whiten); with "
                             "aggregate: lstsq set project_keys: false (the CPU default sets it "
                             "true)")
        if not self.project_eps > 0:
            raise ValueError(f"project_eps must be > 0, got {self.project_eps!r}")
        if self.chunk_tokens is not None and (isinstance(self.chunk_tokens, bool)
                                              or not isinstance(self.chunk_tokens, int)
                                              or self.chunk_tokens < 1):
            raise ValueError(f"chunk_tokens must be a positive integer or null, got "
                             f"{self.chunk_tokens!r}")


AGGREGATES = ("sum", "lstsq", "request_lstsq")


def _clamp_relu(x):
    # torch's clamp(min=0), which the reference uses, passes the gradient at exactly 0; jax.nn.relu
    # does not. With init "id" every pre-activation starts at exactly 0, so jax.nn.relu would
    # leave the editor stuck at the identity forever.
    return jnp.where(x >= 0, x, 0.0)


_ACTS = {"relu": _clamp_relu, "gelu": jax.nn.gelu, "silu": jax.nn.silu, "tanh": jnp.tanh,
         "identity": lambda x: x}


# ----------------------------------------------------------------------------- IDMLP
def _xavier(gain: float):
    # torch's xavier_uniform_(gain): U(±gain·√(6 / (fan_in + fan_out)))
    return jax.nn.initializers.variance_scaling(gain**2, "fan_avg", "uniform")


def init_idmlp(key, dim: int, cfg: MENDConfig, n_modes: int | None) -> dict:
    """n_hidden+1 layers y = x + act(scale_m * (U V x + b) + shift_m).

    As the reference's LRLinear: with init "id", U = 0 and V ~ N(0, 1) (so the first gradient
    step already moves U); with "xavier", U has the ReLU gain √2 and V gain 1. Mode scale/shift
    exist only when one editor is shared by several weights (`n_modes` not None).
    """
    rank = min(cfg.rank, dim)
    layers = []
    for k in jax.random.split(key, cfg.n_hidden + 1):
        kv, ku = jax.random.split(k)
        if cfg.init == "id":
            v = jax.random.normal(kv, (rank, dim), jnp.float32)
            u = jnp.zeros((dim, rank), jnp.float32)
        else:
            v = _xavier(1.0)(kv, (rank, dim), jnp.float32)
            u = _xavier(2.0**0.5)(ku, (dim, rank), jnp.float32)
        layer = {"U": u, "V": v, "b": jnp.zeros((dim,), jnp.float32)}
        if n_modes is not None:
            layer["mode_scale"] = jnp.ones((n_modes, dim), jnp.float32)
            layer["mode_shift"] = jnp.zeros((n_modes, dim), jnp.float32)
        layers.append(layer)
    return {"layers": layers}


def apply_idmlp(net: dict, x: jax.Array, mode: int | jax.Array, cfg: MENDConfig) -> jax.Array:
    """The IDMLP on token rows x [tokens, dim]; `mode` is one weight's mode index, or an int
    array [tokens] giving each row its own (several weights' tokens in one pass)."""
    act = _ACTS[cfg.act]
    n = len(net["layers"])
    for i, layer in enumerate(net["layers"]):
        pre = (x @ layer["V"].T) @ layer["U"].T + layer["b"]      # tokens dim
        if "mode_scale" in layer:
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


def selected_tokens(cap: Captured, answer_only: bool = False) -> jax.Array:
    """Tokens that count: real (unpadded) and with both u and δ non-zero (and, with
    `answer_only`, predicting a target token).

    The reference drops rows whose u or δ is all zero before the statistics and the editor
    (e.g. GPT-2's last block has δ = 0 on every prompt token). Standardised, such a zero δ would
    become −μ/σ and write a spurious u·(−μ/σ)ᵀ term into the update; a mask keeps shapes static.
    """
    nonzero = (jnp.any(cap.layer_inputs != 0, -1) & jnp.any(cap.output_grads != 0, -1))
    mask = cap.token_mask * nonzero.astype(jnp.float32)
    if answer_only:
        if cap.answer_mask is None:
            raise ValueError("tokens='answer' needs a batch with labels")
        mask = mask * cap.answer_mask
    return mask


def ridge_solve(keys: jax.Array, values: jax.Array, lam: jax.Array,
                reg: jax.Array | None = None) -> jax.Array:
    """argmin_X ‖K X − V‖² + λ‖X‖²_R = (KᵀK + λR)⁻¹ KᵀV, [d_in, d_out], differentiable.

    R is the identity unless `reg` (symmetric positive definite, d_in × d_in) is given. Zero
    (unselected) token rows drop out of both forms. With R = I the smaller of the primal
    (d_in × d_in) and dual Kᵀ(KKᵀ + λI)⁻¹V (tokens × tokens) systems is solved (shapes are
    static), by a Cholesky factorisation in float32.
    """
    k = keys.astype(jnp.float32)
    v = values.astype(jnp.float32)
    n, d_in = k.shape
    if reg is not None:
        return _spd_solve(k.T @ k + lam * reg.astype(jnp.float32), k.T @ v)
    if d_in <= n:
        gram = k.T @ k + lam * jnp.eye(d_in, dtype=jnp.float32)
        return _spd_solve(gram, k.T @ v)
    gram = k @ k.T + lam * jnp.eye(n, dtype=jnp.float32)
    return k.T @ _spd_solve(gram, v)


def _spd_solve(a: jax.Array, b: jax.Array) -> jax.Array:
    return jax.scipy.linalg.cho_solve(jax.scipy.linalg.cho_factor(a), b)


def update_second_moment(acc: dict, u: jax.Array, mask: jax.Array) -> dict:
    """Running E[u uᵀ] over masked tokens: {"count", "mean_uu"} (merged as a weighted mean)."""
    n_b = mask.sum()
    count = acc["count"] + n_b
    batch = (u * mask[:, None]).T @ u
    mean = acc["mean_uu"] + (batch - n_b * acc["mean_uu"]) / jnp.maximum(count, 1.0)
    return {"count": count, "mean_uu": mean}


def whitening_matrix(acc: dict, eps: float = 1e-3) -> jax.Array:
    """C + ε·mean(diag C)·I (the identity before any token was seen): positive definite."""
    c = acc["mean_uu"]
    d = c.shape[0]
    scale = jnp.maximum(jnp.trace(c) / d, 1e-12)
    eye = jnp.eye(d, dtype=c.dtype)
    return jnp.where(acc["count"] > 0, c + eps * scale * eye, eye)


def key_projection(acc: dict, eps: float) -> jax.Array:
    """P = s·(C + ε·s·I)⁻¹ (s = mean(diag C)); the identity before any token was seen."""
    d = acc["mean_uu"].shape[0]
    return project_keys(acc, jnp.eye(d, dtype=jnp.float32), eps)


def project_keys(acc: dict, update: jax.Array, eps: float) -> jax.Array:
    """P·update for P = `key_projection(acc, eps)` = s·(C + ε·s·I)⁻¹ = (`whitening_matrix` / s)⁻¹,
    by one Cholesky solve against the update's columns (P itself is never formed)."""
    c = acc["mean_uu"]
    s = jnp.maximum(jnp.trace(c) / c.shape[0], 1e-12)
    solved = _spd_solve(whitening_matrix(acc, eps) / s, update)
    return jnp.where(acc["count"] > 0, solved, update)


def _standardise(x, mean, m2, count, eps):
    std = jnp.where(count > 1, jnp.sqrt(m2 / jnp.maximum(count - 1, 1.0)), 1.0)
    return (x - mean) / (std + eps)


# ----------------------------------------------------------------------------- the editor
@dataclass(frozen=True)
class EditorLayout:
    """Static description of which editor network serves which weight (hashable): one
    `EditedWeight` per edited weight, in the order of `inner_params`."""

    weights: tuple[EditedWeight, ...]
    _by_name: dict = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        object.__setattr__(self, "_by_name", {w.name: w for w in self.weights})

    def weight(self, name: str) -> EditedWeight:
        return self._by_name[name]

    @property
    def inner_params(self) -> tuple[str, ...]:
        return tuple(w.name for w in self.weights)

    @property
    def shapes(self) -> tuple[tuple[int, int], ...]:
        return tuple(w.shape for w in self.weights)      # (d_in, d_out) per inner param

    @property
    def groups(self) -> tuple[str, ...]:
        return tuple(w.group for w in self.weights)      # editor key per inner param

    @property
    def modes(self) -> tuple[int, ...]:
        return tuple(w.mode for w in self.weights)       # mode index inside its group

    @property
    def group_sizes(self) -> tuple[tuple[str, int], ...]:
        """(group, number of weights it serves), groups in order of first appearance."""
        groups = self.groups
        return tuple((g, groups.count(g)) for g in dict.fromkeys(groups))


def make_layout(model, inner_params: Sequence[str], shared: bool) -> EditorLayout:
    """The `EditedWeight` of every inner param, resolved once from the model's name map (an
    unknown name fails with the closest valid ones)."""
    weights, counts = [], {}
    for name in inner_params:
        param = model.names.lookup(name)
        kernel = get_path(model.params, param.path)
        if kernel.ndim != 2:
            raise ValueError(f"inner param {name} is not a weight matrix (shape {kernel.shape})")
        d_in, d_out = kernel.shape
        group = f"{d_in}x{d_out}" if shared else name.replace(".", "_")
        weights.append(EditedWeight(name, param.path, (d_in, d_out), group,
                                    counts.get(group, 0), param.tokens, param.local))
        counts[group] = counts.get(group, 0) + 1
    return EditorLayout(tuple(weights))


class MEND:
    """MEND for one model and one list of edited weights. Holds only static configuration."""

    def __init__(self, model, inner_params: Sequence[str] | None = None,
                 config: MENDConfig | None = None):
        self.model = model
        self.config = config or MENDConfig()
        inner = list(inner_params) if inner_params is not None else model.default_inner_params()
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
            n_modes = sizes[group] if cfg.shared else None
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
        params = {"nets": nets, "edit_lrs": edit_lrs}
        if cfg.aggregate == "lstsq":
            params["log_lambdas"] = {n: jnp.asarray(cfg.init_log_lambda, jnp.float32)
                                     for n in lay.inner_params}
        if self._second_moments:
            stats["second_moments"] = self.zero_moments()
        if cfg.preserve_weight:
            stats["preserved_keys"] = self.zero_moments()  # filled by `preserve_keys`
        if cfg.lifelong:
            stats["edited_keys"] = self.zero_moments()     # grows with every edit call
        return {"params": params, "stats": stats}

    def zero_moments(self) -> dict:
        """{weight key: an empty running second moment of its keys}."""
        return {n.replace(".", "_"): {"count": jnp.zeros((), jnp.float32),
                                      "mean_uu": jnp.zeros((d_in, d_in), jnp.float32)}
                for n, (d_in, _) in zip(self.layout.inner_params, self.layout.shapes)}

    def _key_moment(self, stats: dict, name: str) -> dict:
        """The keys' second moment the projection and request_lstsq use: C, or with
        `preserve_weight` μ and preserved keys in the state, C + μ·C_p."""
        key = name.replace(".", "_")
        acc = stats["second_moments"][key]
        mu = self.config.preserve_weight
        if not mu or "preserved_keys" not in stats:
            return acc
        kept = stats["preserved_keys"][key]
        return {"count": acc["count"] + kept["count"],
                "mean_uu": acc["mean_uu"] + mu * kept["mean_uu"]}

    @property
    def stateful(self) -> bool:
        """Whether an edit changes the editor state (`lifelong`: `edit_and_update`)."""
        return self.config.lifelong

    @property
    def _second_moments(self) -> bool:
        c = self.config
        return c.whiten or c.project_keys or c.aggregate == "request_lstsq"

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
        """(ũ, δ̃) for one weight, in float32; tokens that do not count are zeroed."""
        return self._transform_group(params, [(name, self._standardised(stats, name, cap))])[0]

    def _standardised(self, stats: dict, name: str, cap: Captured):
        """(u, δ, counted-token mask) of one weight, standardised by its group's statistics."""
        cfg = self.config
        group = self.layout.weight(name).group
        u = cap.layer_inputs.astype(jnp.float32)
        d = cap.output_grads.astype(jnp.float32)
        m = selected_tokens(cap, cfg.tokens == "answer")
        if cfg.norm:
            s = stats[group]
            u = _standardise(u, s["u_mean"], s["u_m2"], s["count"], cfg.norm_eps)
            d = _standardise(d, s["d_mean"], s["d_m2"], s["count"], cfg.norm_eps)
        return u, d, m

    def _transform_group(self, params: dict, members: list) -> list:
        """[(ũ, δ̃)] of weights that share one editor network, [(name, (u, δ, mask))] in: their
        token rows go through the network in ONE pass, each row with its weight's mode scale and
        shift. Row by row this is the per-weight transform; it reads the network's weights once
        instead of once per weight, which is what small edits are bound by."""
        weights = [self.layout.weight(name) for name, _ in members]
        group = weights[0].group
        assert all(w.group == group for w in weights)
        sizes = [u.shape[0] for _, (u, _, _) in members]
        modes = jnp.concatenate([jnp.full((n,), w.mode, jnp.int32)
                                 for n, w in zip(sizes, weights)])
        u = jnp.concatenate([u for _, (u, _, _) in members])
        d = jnp.concatenate([d for _, (_, d, _) in members])
        m = jnp.concatenate([m for _, (_, _, m) in members])
        u, d = self._apply_nets(params["nets"][group], u, d, m, modes)
        bounds = np.cumsum(sizes)[:-1].tolist()
        return list(zip(jnp.split(u, bounds), jnp.split(d, bounds)))

    def _apply_nets(self, nets: dict, u, d, m, modes):
        """(ũ, δ̃) of standardised rows through one group's networks; rows off the mask zeroed."""
        cfg = self.config
        if cfg.combine:
            out = apply_idmlp(nets["uv"], jnp.concatenate([u, d], -1), modes, cfg)
            u, d = out[:, : u.shape[-1]], out[:, u.shape[-1]:]
        else:
            if "u" in nets:
                u = apply_idmlp(nets["u"], u, modes, cfg)
            if "delta" in nets:
                d = apply_idmlp(nets["delta"], d, modes, cfg)
        return u * m[:, None], d * m[:, None]

    def _chunked_aggregate(self, params: dict, name: str, standardised, keys, reg):
        """The aggregate of one weight with the editor run over `chunk_tokens` rows at a time:
        Σ ũδ̃ᵀ, or for lstsq the primal ridge solve from the accumulated KᵀK and KᵀV."""
        cfg, weight = self.config, self.layout.weight(name)
        nets, mode = params["nets"][weight.group], weight.mode
        u, d, m = standardised
        size = cfg.chunk_tokens
        pad = (-u.shape[0]) % size
        n_chunks = (u.shape[0] + pad) // size

        def chunks(x):
            x = jnp.pad(x, ((0, pad),) + ((0, 0),) * (x.ndim - 1))
            return x.reshape((n_chunks, size) + x.shape[1:])

        lstsq = cfg.aggregate == "lstsq"
        d_in, d_out = weight.shape

        @jax.checkpoint
        def body(acc, chunk):
            uc, dc, mc, kc = chunk
            ut, dt = self._apply_nets(nets, uc, dc, mc, mode)
            if not lstsq:
                return acc + pseudo_gradient(ut, dt), None
            values = jnp.sum(kc * ut, -1, keepdims=True) * dt
            return (acc[0] + kc.T @ kc, acc[1] + kc.T @ values), None

        zero = (jnp.zeros((d_in, d_in), jnp.float32), jnp.zeros((d_in, d_out), jnp.float32))
        acc, _ = jax.lax.scan(body, zero if lstsq else jnp.zeros((d_in, d_out), jnp.float32),
                              (chunks(u), chunks(d), chunks(m), chunks(keys)))
        if not lstsq:
            return acc
        lam = jnp.exp(params["log_lambdas"][name])
        eye = jnp.eye(d_in, dtype=jnp.float32)
        return _spd_solve(acc[0] + lam * (eye if reg is None else reg.astype(jnp.float32)),
                          acc[1])

    def _merge(self, stats: dict, name: str, cap: Captured) -> dict:
        group = self.layout.weight(name).group
        mask = selected_tokens(cap, self.config.tokens == "answer")
        out = {**stats, group: update_stats(stats[group],
                                            jax.lax.stop_gradient(cap.layer_inputs),
                                            jax.lax.stop_gradient(cap.output_grads), mask)}
        if self._second_moments:
            key = name.replace(".", "_")
            out["second_moments"] = {**stats["second_moments"], key: update_second_moment(
                stats["second_moments"][key], cap.layer_inputs.astype(jnp.float32),
                cap.token_mask)}
        return out

    def _request_solve(self, stats: dict, name: str, cap: Captured, mask: jax.Array,
                       transformed: tuple[jax.Array, jax.Array], n_requests: int | None):
        """`aggregate: request_lstsq` for one weight, without the step size: X the raw keys of
        the answer tokens, v_s = x_sᵀ Σ_{t in s's request} (P ũ_t) δ̃_tᵀ the output shift the
        request's own (projected) update makes on its key, and (XᵀX + λC)⁻¹XᵀV."""
        if n_requests is None:
            raise ValueError("aggregate: request_lstsq needs the number of requests (the edit "
                             "batch's rows)")
        if cap.answer_mask is None:
            raise ValueError("aggregate: request_lstsq needs a batch with labels")
        acc = self._key_moment(stats, name)
        u, d = transformed
        if self.config.project_keys:
            u = project_keys(acc, u.T, self.config.project_eps).T    # P ũ_t (P is symmetric)
        keys = cap.layer_inputs.astype(jnp.float32) * (mask * cap.answer_mask)[:, None]
        rows = lambda x: x.reshape(n_requests, -1, x.shape[-1])  # noqa: E731
        gram = jnp.einsum("bsi,bti->bst", rows(keys), rows(u))    # within each request only
        values = jnp.einsum("bst,bto->bso", gram, rows(d)).reshape(-1, d.shape[-1])
        key = name.replace(".", "_")
        lam = jnp.asarray(self.config.request_lambda, jnp.float32)
        reg = whitening_matrix(acc, self.config.request_eps)
        if "preserved_keys" in stats:
            reg = reg + stats["preserved_keys"][key]["mean_uu"]
        reg = lam * reg
        if "edited_keys" in stats:   # lifelong: earlier edits' keys, as rows of value zero
            reg = reg + stats["edited_keys"][key]["count"] * stats["edited_keys"][key]["mean_uu"]
        return ridge_solve(keys, values, jnp.asarray(1.0, jnp.float32), reg)

    def preserve_keys(self, editor_state: dict, model_params: dict, batches) -> dict:
        """The editor state with `stats["preserved_keys"]`: for every edited weight the second
        moment C_p of its keys at the answer positions of `batches` (labelled facts the edits
        should leave alone), which `aggregate: request_lstsq` adds to its ridge term and which,
        with `preserve_weight` μ, joins the keys' second moment as μ·C_p."""
        acc = self.zero_moments()

        @jax.jit
        def merge(acc, batch):
            _, captured, _ = capture(self.model, model_params, batch, self.layout.weights)
            out = dict(acc)
            for name, cap in captured.items():
                key = name.replace(".", "_")
                out[key] = update_second_moment(acc[key], cap.layer_inputs.astype(jnp.float32),
                                                cap.token_mask * cap.answer_mask)
            return out

        for batch in batches:
            acc = merge(acc, batch)
        return {**editor_state, "stats": {**editor_state["stats"], "preserved_keys": acc}}

    def pseudo_gradients(self, params: dict, stats: dict, captured: Mapping[str, Captured],
                         train: bool = False, n_requests: int | None = None,
                         request_scales: jax.Array | None = None) -> tuple[dict, dict]:
        """({name: α_ℓ Σ_t ũ_t δ̃_tᵀ} or, lstsq, {name: α_ℓ (UᵀU + e^λ I)⁻¹ Uᵀ V}, stats).

        lstsq follows MALMEN: the keys U are the raw layer inputs of the selected tokens and
        each value v_t = (u_t · ũ_t) δ̃_t is the shift of the layer's output on u_t that the
        token's own MEND term ũ_t δ̃_tᵀ would make; the solve asks all of them of one matrix at
        once instead of summing the terms. request_lstsq (`n_requests`: the edit batch's rows,
        one request each) asks each request's own summed update of its answer keys, all at once
        (`_request_solve`); one request keeps its own update. With `train`, as the reference,
        each weight's tokens are merged into its group's statistics right before that weight is
        normalised, so in a shared group later weights see the statistics of earlier ones
        too. `request_scales` ([n_requests]) multiplies each request's share of the update: its
        tokens' transformed δ̃ (every aggregate is linear in them)."""
        parts, stats = self._transform(params, stats, captured, train)
        return self._aggregate(params, stats, captured, parts, train, n_requests,
                               request_scales), stats

    def _transform(self, params: dict, stats: dict, captured: Mapping[str, Captured],
                   train: bool) -> tuple[tuple, dict]:
        """`pseudo_gradients`' first half: ((standardised, transformed, chunked names), stats),
        the editor networks run once for any number of aggregations."""
        lay = self.layout
        standardised = {}
        for name in lay.inner_params:
            if train:
                stats = self._merge(stats, name, captured[name])
            standardised[name] = self._standardised(stats, name, captured[name])
        cfg = self.config
        chunked = {n for n in lay.inner_params
                   if cfg.chunk_tokens and standardised[n][0].shape[0] > cfg.chunk_tokens}
        transformed = {}
        for group in dict.fromkeys(lay.groups):
            names = [n for n, g in zip(lay.inner_params, lay.groups)
                     if g == group and n not in chunked]
            if names:
                out = self._transform_group(params, [(n, standardised[n]) for n in names])
                transformed.update(zip(names, out))
        return (standardised, transformed, chunked), stats

    def _aggregate(self, params: dict, stats: dict, captured: Mapping[str, Captured],
                   parts: tuple, train: bool, n_requests: int | None,
                   request_scales: jax.Array | None) -> dict:
        """`pseudo_gradients`' second half: the update of each weight from `_transform`'s
        parts, each request's share times its `request_scales`."""
        lay, cfg = self.layout, self.config
        standardised, transformed, chunked = parts
        if request_scales is not None:
            if chunked:
                raise ValueError("request_scales is not implemented with chunk_tokens")
            transformed = {
                name: (u, (d.reshape(request_scales.shape[0], -1, d.shape[-1])
                           * request_scales[:, None, None]).reshape(d.shape))
                for name, (u, d) in transformed.items()}
        # request_lstsq: one request has nothing to reconcile and keeps its own update (the
        # solve would give the minimum-norm update meeting it on its answer keys only)
        solve_requests = cfg.aggregate == "request_lstsq" and (
            n_requests != 1 or ("edited_keys" in stats and not train))
        updates = {}
        for name in lay.inner_params:
            keys = reg = None
            if cfg.aggregate == "lstsq":
                cap = captured[name]
                keys = cap.layer_inputs.astype(jnp.float32) * standardised[name][2][:, None]
                reg = (whitening_matrix(stats["second_moments"][name.replace(".", "_")])
                       if cfg.whiten else None)
            if name in chunked:
                agg = self._chunked_aggregate(
                    params, name, standardised[name],
                    keys if keys is not None else standardised[name][0][:, :0], reg)
            elif cfg.aggregate == "lstsq":
                u, d = transformed[name]
                values = jnp.sum(keys * u, -1, keepdims=True) * d
                agg = ridge_solve(keys, values, jnp.exp(params["log_lambdas"][name]), reg)
            elif solve_requests:
                agg = self._request_solve(stats, name, captured[name], standardised[name][2],
                                          transformed[name], n_requests)
            else:
                agg = pseudo_gradient(*transformed[name])
            if cfg.project_keys and not solve_requests:
                agg = project_keys(self._key_moment(stats, name), agg, cfg.project_eps)
            updates[name] = params["edit_lrs"][name] * agg
        return updates

    def apply_updates(self, model_params: dict, updates: Mapping[str, jax.Array]) -> dict:
        """W' = W − update for every edited weight; other leaves are shared, not copied."""
        new = model_params
        for name, update in updates.items():
            path = self.layout.weight(name).path
            w = get_path(model_params, path)
            new = set_path(new, path, (w.astype(jnp.float32) - update).astype(w.dtype))
        return new

    def edit_with_stats(self, editor_state: dict, model_params: dict, edit_batch,
                        train: bool = False) -> tuple[dict, dict, jax.Array]:
        """(new model params, new stats, pre-edit loss). With train=True stats absorb the edit."""
        return self._edit(editor_state, model_params, edit_batch, train)[:3]

    def _edit(self, editor_state: dict, model_params: dict, edit_batch, train: bool,
              verify: bool = False):
        """`edit_with_stats`'s (params, stats, loss) and the captured (u, δ); with `verify`
        (the edits of `edit` and `edit_and_update`, not meta-training's nor its validation's)
        the `edit_scales` rounds."""
        # The editor is not trained through the base model's backward pass (as the reference).
        shift = self.model.shift_labels
        loss_fn = None
        if self.config.capture_loss == "per_request" or self.config.aggregate == "request_lstsq":
            loss_fn = lambda logits, b: sequence_nll(logits, b["labels"], shift).sum()  # noqa: E731
        weights = self.layout.weights
        if train and self._second_moments:
            # the keys' running second moment counts every real token, δ = 0 or not: keep the
            # rows that the position-local capture would drop (`ParamName.local`)
            weights = tuple(replace(w, local=False) for w in weights)
        loss, captured, _ = capture(self.model, jax.lax.stop_gradient(model_params), edit_batch,
                                    weights, loss_fn=loss_fn)
        captured = jax.lax.stop_gradient(captured)
        n_requests = edit_batch["input_ids"].shape[0]
        scales = self.config.edit_scales if verify and not train else None
        if not scales:
            updates, stats = self.pseudo_gradients(editor_state["params"], editor_state["stats"],
                                                   captured, train=train, n_requests=n_requests)
            return self.apply_updates(model_params, updates), stats, loss, captured
        table = jnp.asarray(scales, jnp.float32)
        level = jnp.zeros((n_requests,), jnp.int32)
        rounds, counts = [], []
        params = editor_state["params"]
        parts, stats = self._transform(params, editor_state["stats"], captured, train=False)
        for _ in scales:
            updates = self._aggregate(params, stats, captured, parts, False, n_requests,
                                      table[level])
            logits, labels = labelled_logits(self.model, self.apply_updates(model_params, updates),
                                             edit_batch)
            took = sequence_correct(logits, labels, shift)
            rounds.append(updates)
            counts.append(took.sum())
            level = jnp.where(took, level, level + 1)
        # the round in which the most requests took (the earliest of equals): strengthening
        # never costs edits that the trained step made
        best = jnp.argmax(jnp.stack(counts))
        updates = jax.tree.map(lambda *u: jnp.stack(u)[best], *rounds)
        return self.apply_updates(model_params, updates), stats, loss, captured

    def edit(self, editor_state: dict, model_params: dict, edit_batch) -> dict:
        """Pure, jit-able edit: one request or k requests at once (their tokens are pooled)."""
        check_edit_batch(self.model, edit_batch)
        return self._edit(editor_state, model_params, edit_batch, train=False, verify=True)[0]

    def edit_and_update(self, editor_state: dict, model_params: dict, edit_batch
                        ) -> tuple[dict, dict]:
        """(edited params, editor state): `edit`, and with `lifelong` the state's `edited_keys`
        grown by this call's answer keys, which later calls leave alone."""
        check_edit_batch(self.model, edit_batch)
        new, _, _, captured = self._edit(editor_state, model_params, edit_batch, train=False,
                                         verify=True)
        if not self.config.lifelong:
            return new, editor_state
        kept = dict(editor_state["stats"]["edited_keys"])
        for name, cap in captured.items():
            key = name.replace(".", "_")
            kept[key] = update_second_moment(kept[key], cap.layer_inputs.astype(jnp.float32),
                                             selected_tokens(cap) * cap.answer_mask)
        return new, {**editor_state, "stats": {**editor_state["stats"], "edited_keys": kept}}
