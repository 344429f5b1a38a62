"""mend-jax follows the reference implementation (eric-mitchell/mend) where README lists no
deviation: which tokens the editor sees, the editor's initialisation, how the statistics are
merged in training, and which optimizer moves the per-layer step sizes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers

from mend_jax.capture import capture
from mend_jax.editors import MEND, MENDConfig
from mend_jax.models import from_config, get_path
from mend_jax.training import MetaTrainer, TrainConfig
from tests.test_capture import decoder_batch

EPS = 1e-7


@pytest.fixture(scope="module")
def model():
    cfg = transformers.GPT2Config(vocab_size=61, n_positions=16, n_embd=24, n_layer=3, n_head=3)
    return from_config(cfg, seed=0)


def _perturbed(state, seed=1, scale=0.05):
    """An editor that is not the identity: U, b, mode scale/shift random."""
    leaves, tree = jax.tree.flatten_with_path(state["params"]["nets"])
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    new = []
    for (path, x), k in zip(leaves, keys):
        name = str(path[-1])
        if "U" in name or "'b'" in name or "mode_shift" in name:
            x = x + scale * jax.random.normal(k, x.shape)
        elif "mode_scale" in name:
            x = x + 0.3 * jax.random.normal(k, x.shape)
        new.append(x)
    nets = jax.tree.unflatten(tree, new)
    return {**state, "params": {**state["params"], "nets": nets}}


def reference_updates(editor, state, captured, train):
    """The reference's GradientTransform in numpy, token by token: rows with an all-zero u or δ
    dropped, Welford counters updated one token at a time (per weight, in order, when training),
    standardised, the IDMLP (ReLU on every layer but the last), Σ_t ũ_t δ̃_tᵀ times the step size.
    """
    lay, cfg = editor.layout, editor.config
    stats = {g: {k: np.asarray(v, np.float64) for k, v in s.items()}
             for g, s in state["stats"].items()}
    updates = {}
    for i, name in enumerate(lay.inner_params):
        group, mode = lay.groups[i], lay.modes[i]
        cap = captured[name]
        u = np.asarray(cap.layer_inputs, np.float64)
        d = np.asarray(cap.output_grads, np.float64)
        keep = (np.asarray(cap.token_mask) > 0) & (u != 0).any(-1) & (d != 0).any(-1)
        u, d = u[keep], d[keep]
        s = stats[group]
        if train:
            for x_u, x_d in zip(u, d):
                s["count"] = s["count"] + 1
                for key, x in (("u", x_u), ("d", x_d)):
                    m = s[f"{key}_mean"]
                    new_m = m + (x - m) / s["count"]
                    s[f"{key}_m2"] = s[f"{key}_m2"] + (x - m) * (x - new_m)
                    s[f"{key}_mean"] = new_m
        k = s["count"]
        u = (u - s["u_mean"]) / (np.sqrt(s["u_m2"] / (k - 1)) + EPS)
        d = (d - s["d_mean"]) / (np.sqrt(s["d_m2"] / (k - 1)) + EPS)
        x = np.concatenate([u, d], -1)
        layers = state["params"]["nets"][group]["uv"]["layers"]
        for j, layer in enumerate(layers):
            ly = {kk: np.asarray(v, np.float64) for kk, v in layer.items()}
            pre = x @ ly["V"].T @ ly["U"].T + ly["b"]
            pre = pre * ly["mode_scale"][mode] + ly["mode_shift"][mode]
            x = x + (np.maximum(pre, 0) if j < cfg.n_hidden else pre)
        u_t, d_t = x[:, : u.shape[1]], x[:, u.shape[1]:]
        lr = float(state["params"]["edit_lrs"][name])
        updates[name] = lr * u_t.T @ d_t
    return updates


def _prime(editor, state, model):
    """Statistics from a first training edit, so standardising is defined."""
    _, stats, _ = editor.edit_with_stats(state, model.params, decoder_batch(61, [9, 8, 7],
                                                                            seed=5), train=True)
    return {**state, "stats": stats}


@pytest.mark.parametrize("train", [False, True])
def test_edited_weights_match_the_reference_transform(model, train):
    # The last block's δ is exactly zero on prompt tokens (no later layer mixes positions):
    # those tokens must neither enter the statistics nor add u·(−μ/σ)ᵀ terms to the update.
    editor = MEND(model, ["transformer.h.1.mlp.c_fc.weight", "transformer.h.2.mlp.c_fc.weight",
                          "transformer.h.2.mlp.c_proj.weight"], MENDConfig(rank=16, edit_lr=0.1))
    state = _prime(editor, _perturbed(editor.init(jax.random.key(0))), model)
    batch = decoder_batch(61, [7, 4, 9], prompt_len=3)
    _, captured, _ = capture(model, model.params, batch, editor.layout.inner_params)
    d_last = np.asarray(captured["transformer.h.2.mlp.c_fc.weight"].output_grads)
    assert (np.abs(d_last).sum(-1) == 0).sum() >= 9  # prompt + padding tokens of block 2
    new, _, _ = editor.edit_with_stats(state, model.params, batch, train=train)
    ref = reference_updates(editor, state, captured, train)
    for name, upd in ref.items():
        w0 = np.asarray(get_path(model.params, model.names.path(name)), np.float64)
        got = w0 - np.asarray(get_path(new, model.names.path(name)), np.float64)
        np.testing.assert_allclose(got, upd, rtol=2e-4, atol=2e-6 * np.abs(upd).max())


def test_statistics_count_only_tokens_with_nonzero_u_and_delta(model):
    editor = MEND(model, ["transformer.h.0.mlp.c_fc.weight", "transformer.h.2.mlp.c_fc.weight"])
    state = editor.init(jax.random.key(0))
    batch = decoder_batch(61, [7, 4, 9], prompt_len=3)
    _, stats, _ = editor.edit_with_stats(state, model.params, batch, train=True)
    # block 0: every position before a row's last loss position (6 + 3 + 8); the last block:
    # only the loss positions (4 + 1 + 6)
    _, cap, _ = capture(model, model.params, batch, editor.layout.inner_params)
    expected = 0
    for c in cap.values():
        nz = (np.abs(np.asarray(c.layer_inputs)).sum(-1) > 0) & (
            np.abs(np.asarray(c.output_grads)).sum(-1) > 0)
        expected += int((nz & (np.asarray(c.token_mask) > 0)).sum())
    assert float(stats["24x96"]["count"]) == expected == 17 + 11


def test_identity_init_draws_v_from_a_standard_normal(model):
    state = MEND(model, config=MENDConfig(rank=1920)).init(jax.random.key(0))
    layer = state["params"]["nets"]["24x96"]["uv"]["layers"][0]
    v = np.asarray(layer["V"])
    assert v.shape == (120, 120)
    assert abs(v.std() - 1.0) < 0.03 and abs(v.mean()) < 0.03
    assert not np.asarray(layer["U"]).any()


def test_xavier_init_uses_relu_gain_on_u(model):
    state = MEND(model, config=MENDConfig(rank=1920, init="xavier")).init(jax.random.key(0))
    layer = state["params"]["nets"]["24x96"]["uv"]["layers"][0]
    # torch xavier_uniform_(gain): std = gain * sqrt(2 / (fan_in + fan_out)), here 120 x 120
    base = np.sqrt(2.0 / 240)
    assert abs(np.asarray(layer["U"]).std() / (np.sqrt(2) * base) - 1) < 0.03
    assert abs(np.asarray(layer["V"]).std() / base - 1) < 0.03


def test_unshared_editor_has_no_mode_parameters(model):
    state = MEND(model, config=MENDConfig(shared=False)).init(jax.random.key(0))
    for net in state["params"]["nets"].values():
        assert all("mode_scale" not in layer for layer in net["uv"]["layers"])


def test_last_editor_layer_has_no_activation(model):
    # n_hidden=1: two layers; a large negative bias on the last one must pass through unclipped
    editor = MEND(model, ["transformer.h.2.mlp.c_fc.weight"], MENDConfig(norm=False, rank=8))
    state = editor.init(jax.random.key(0))
    state["params"]["nets"]["24x96"]["uv"]["layers"][1]["b"] = -jnp.ones(120)
    batch = decoder_batch(61, [7, 4, 9])
    _, cap, _ = capture(model, model.params, batch, editor.layout.inner_params)
    u, d = editor.transform(state["params"], state["stats"], "transformer.h.2.mlp.c_fc.weight",
                            cap["transformer.h.2.mlp.c_fc.weight"])
    counted = np.asarray(d).any(-1)
    raw_u = np.asarray(cap["transformer.h.2.mlp.c_fc.weight"].layer_inputs)
    np.testing.assert_allclose(np.asarray(u)[counted], raw_u[counted] - 1.0, atol=1e-5)


@pytest.mark.parametrize("lr_lr", [None, 0.5])
def test_step_sizes_move_with_the_editor_optimizer_unless_lr_lr_is_set(model, lr_lr):
    editor = MEND(model, ["transformer.h.1.mlp.c_fc.weight"], MENDConfig(rank=8, edit_lr=0.1))
    trainer = MetaTrainer(editor, TrainConfig(lr=1e-3, lr_lr=lr_lr, accumulate=1))
    batch = {"edit_inner": decoder_batch(61, [7, 5]), "edit_outer": decoder_batch(61, [6, 7],
                                                                                   seed=2),
             "loc": decoder_batch(61, [8, 8], seed=3)}
    state0 = trainer.init(jax.random.key(0))
    grads = jax.jit(jax.grad(lambda p: trainer.loss(p, state0["editor"]["stats"], model.params,
                                                    batch)[0]))(state0["editor"]["params"])
    state1, _ = jax.jit(trainer.step)(state0, model.params, batch)
    name = "transformer.h.1.mlp.c_fc.weight"
    g = float(grads["edit_lrs"][name])
    assert g != 0.0
    # Adam's first step moves each parameter by lr·g/(|g| + ε) ≈ lr·sign(g)
    step_lr = 1e-3 if lr_lr is None else lr_lr
    moved = float(state0["editor"]["params"]["edit_lrs"][name]) - float(
        state1["editor"]["params"]["edit_lrs"][name])
    np.testing.assert_allclose(moved, step_lr * np.sign(g), rtol=1e-4)
