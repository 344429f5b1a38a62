"""The editor as a specification: identity init == one SGD step; options; batched edits."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers

from mend_jax.editors import MEND, MENDConfig, make_editor
from mend_jax.metrics import masked_nll
from mend_jax.models import from_config, get_path
from tests.conftest import optimised_xla
from tests.test_capture import decoder_batch


@pytest.fixture(scope="module")
def model():
    cfg = transformers.GPT2Config(vocab_size=61, n_positions=16, n_embd=24, n_layer=3, n_head=3)
    with optimised_xla():  # the weights test_chunked_editor_equals_one_pass_... was measured on
        return from_config(cfg, seed=0)


def sgd_step(model, params, batch, names, lr):
    def loss(p):
        logits = model.logits(p, batch["input_ids"], batch["attention_mask"])
        return masked_nll(logits, batch["labels"], shift=True)

    g = jax.grad(loss)(params)
    return {n: get_path(params, model.names.path(n)) - lr * get_path(g, model.names.path(n))
            for n in names}


@pytest.mark.parametrize("opts", [dict(), dict(combine=False), dict(combine=False, one_sided=True),
                                  dict(combine=False, x_only=True), dict(shared=False)])
def test_fresh_editor_without_norm_is_one_sgd_step(model, opts):
    editor = MEND(model, config=MENDConfig(norm=False, edit_lr=0.3, **opts))
    state = editor.init(jax.random.key(0))
    batch = decoder_batch(61, [7, 4, 9])
    new = jax.jit(editor.edit)(state, model.params, batch)
    ref = sgd_step(model, model.params, batch, editor.layout.inner_params, 0.3)
    for n, w in ref.items():
        np.testing.assert_allclose(get_path(new, model.names.path(n)), w, atol=1e-6)


def test_edit_copies_only_edited_weights(model):
    editor = MEND(model, config=MENDConfig(norm=False))
    state = editor.init(jax.random.key(0))
    new = editor.edit(state, model.params, decoder_batch(61, [7, 4, 9]))  # eager: no jit copies
    assert new["transformer"]["wte"] is model.params["transformer"]["wte"]
    assert new["transformer"]["h_0"]["ln_1"] is model.params["transformer"]["h_0"]["ln_1"]
    assert new["transformer"]["h_2"]["attn"] is model.params["transformer"]["h_2"]["attn"]


def test_batched_edit_pools_requests(model):
    editor = MEND(model, config=MENDConfig(norm=False, edit_lr=0.3))
    state = editor.init(jax.random.key(0))
    batch = decoder_batch(61, [7, 4, 9, 5, 6])
    new = jax.jit(editor.edit)(state, model.params, batch)
    ref = sgd_step(model, model.params, batch, editor.layout.inner_params, 0.3)
    n = editor.layout.inner_params[0]
    np.testing.assert_allclose(get_path(new, model.names.path(n)), ref[n], atol=1e-6)


def test_shared_editor_groups_by_shape_with_modes(model):
    editor = MEND(model)
    state = editor.init(jax.random.key(0))
    groups = set(editor.layout.groups)
    assert groups == {"24x96", "96x24"}
    layer = state["params"]["nets"]["24x96"]["uv"]["layers"][0]
    assert layer["mode_scale"].shape == (3, 120) and layer["U"].shape == (120, 120)
    assert len(state["params"]["nets"]["24x96"]["uv"]["layers"]) == 2  # n_hidden + 1


def test_layout_resolves_each_weight_once_with_its_own_mode(model):
    """One EditedWeight per inner param, read from the name map when the editor is built; the
    weights that share a network are told apart by modes 0, 1, 2 in their order."""
    from mend_jax.models import EditedWeight

    layout = MEND(model).layout
    assert layout.weights[1] == EditedWeight(
        "transformer.h.0.mlp.c_proj.weight", ("transformer", "h_0", "mlp", "c_proj", "kernel"),
        (96, 24), "96x24", 0, "input")
    modes = {}
    for w in layout.weights:
        assert w.path == model.names.path(w.name) and layout.weight(w.name) is w
        modes.setdefault(w.group, []).append(w.mode)
    assert modes == {"24x96": [0, 1, 2], "96x24": [0, 1, 2]}
    assert layout.group_sizes == (("24x96", 3), ("96x24", 3))
    unshared = MEND(model, config=MENDConfig(shared=False)).layout
    assert unshared.modes == (0,) * 6 and unshared.groups[0] == "transformer_h_0_mlp_c_fc_weight"


def test_norm_stats_update_only_when_training(model):
    editor = MEND(model)
    state = editor.init(jax.random.key(0))
    batch = decoder_batch(61, [7, 4, 9])
    _, stats_eval, _ = editor.edit_with_stats(state, model.params, batch, train=False)
    _, stats_train, _ = editor.edit_with_stats(state, model.params, batch, train=True)
    assert float(stats_eval["24x96"]["count"]) == 0
    # 3 layers share the group; a token counts when its δ is non-zero: every position before
    # the row's last loss position in blocks 0-1 (6 + 3 + 8), only the loss positions in the
    # last block (4 + 1 + 6), whose δ no later attention spreads
    assert float(stats_train["24x96"]["count"]) == 2 * 17 + 11


def test_welford_matches_numpy():
    from mend_jax.editors.mend import init_stats, update_stats

    rng = np.random.default_rng(0)
    xs = [rng.normal(size=(6, 4)).astype(np.float32) for _ in range(3)]
    masks = [np.array([1, 1, 0, 1, 1, 1], np.float32)] * 3
    s = init_stats(4, 4)
    for x, m in zip(xs, masks):
        s = update_stats(s, jnp.asarray(x), jnp.asarray(x), jnp.asarray(m))
    allx = np.concatenate([x[m.astype(bool)] for x, m in zip(xs, masks)])
    np.testing.assert_allclose(s["u_mean"], allx.mean(0), atol=1e-5)
    np.testing.assert_allclose(s["u_m2"] / (s["count"] - 1), allx.var(0, ddof=1), atol=1e-5)


def test_ft_baselines_reduce_edit_loss_and_ftl_respects_bound(model):
    batch = decoder_batch(61, [7, 4, 9])
    for name, opts in (("ft", dict(steps=5, lr=1e-2)), ("ft_l", dict(steps=5, lr=1e-2, linf=1e-3))):
        ed = make_editor(name, model, **opts)
        new = jax.jit(ed.edit)(ed.init(None), model.params, batch)
        before = masked_nll(model.logits(model.params, batch["input_ids"],
                                         batch["attention_mask"]), batch["labels"], True)
        after = masked_nll(model.logits(new, batch["input_ids"], batch["attention_mask"]),
                           batch["labels"], True)
        assert after < before
        if name == "ft_l":
            for n in ed.inner_params:
                p = model.names.path(n)
                diff = jnp.abs(get_path(new, p) - get_path(model.params, p)).max()
                assert float(diff) <= 1e-3 + 1e-7


def test_unknown_inner_param_names_closest(model):
    with pytest.raises(KeyError, match="transformer.h.1.mlp.c_fc.weight"):
        MEND(model, ["transformer.h.1.mlp.c_fcc.weight"])


def test_conflicting_options_rejected():
    with pytest.raises(ValueError, match="at most one"):
        MENDConfig(combine=True, x_only=True)


@pytest.mark.parametrize("n_tokens", [5, 40])  # the dual (tokens < d_in) and primal forms
def test_ridge_solve_equals_the_closed_form(n_tokens):
    from mend_jax.editors.mend import ridge_solve

    rng = np.random.default_rng(0)
    k = rng.normal(size=(n_tokens, 12))
    k[1] = 0.0  # an unselected token row drops out
    v = rng.normal(size=(n_tokens, 7))
    want = np.linalg.solve(k.T @ k + 0.7 * np.eye(12), k.T @ v)
    got = ridge_solve(jnp.asarray(k, jnp.float32), jnp.asarray(v, jnp.float32), 0.7)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-5)


def test_ridge_solve_gradients_match_finite_differences():
    from mend_jax.editors.mend import ridge_solve

    jax.config.update("jax_enable_x64", True)
    try:
        rng = np.random.default_rng(1)
        k, v = rng.normal(size=(6, 4)), rng.normal(size=(6, 3))
        probe = rng.normal(size=(4, 3))

        def f(k, v, log_lam):
            return jnp.sum(ridge_solve(k, v, jnp.exp(log_lam)) * probe)

        # float64 inside: ridge_solve casts to float32, so compare with a float32 tolerance
        grads = jax.grad(f, argnums=(0, 1, 2))(k, v, 0.3)
        eps = 1e-3
        for arg, g in ((0, grads[0]), (1, grads[1])):
            x = [k, v][arg]
            idx = (2, 1)
            xp, xm = x.copy(), x.copy()
            xp[idx] += eps
            xm[idx] -= eps
            args_p = [k, v, 0.3]
            args_m = [k, v, 0.3]
            args_p[arg], args_m[arg] = xp, xm
            fd = (f(*args_p) - f(*args_m)) / (2 * eps)
            np.testing.assert_allclose(float(g[idx]), float(fd), rtol=2e-2, atol=1e-4)
        fd = (f(k, v, 0.3 + eps) - f(k, v, 0.3 - eps)) / (2 * eps)
        np.testing.assert_allclose(float(grads[2]), float(fd), rtol=2e-2, atol=1e-4)
    finally:
        jax.config.update("jax_enable_x64", False)


def test_lstsq_editor_fits_the_edit_keys(model):
    """With a tiny λ and norm off, the fresh (identity) lstsq editor's update maps each selected
    raw key u_t to its own MEND shift α·(u_t·u_t)·δ_t (least squares over more unknowns than
    tokens: an exact fit), as MALMEN's solve."""
    from mend_jax.capture import capture

    name = "transformer.h.2.mlp.c_fc.weight"
    editor = MEND(model, [name], MENDConfig(norm=False, aggregate="lstsq", edit_lr=1.0,
                                            init_log_lambda=-12.0))
    state = editor.init(jax.random.key(0))
    assert set(state["params"]) == {"nets", "edit_lrs", "log_lambdas"}
    batch = decoder_batch(61, [7, 4, 9])
    new = jax.jit(editor.edit)(state, model.params, batch)
    delta_w = get_path(model.params, model.names.path(name)) - get_path(new, model.names.path(name))
    _, cap, _ = capture(model, model.params, batch, [name])
    u, d = np.asarray(cap[name].layer_inputs), np.asarray(cap[name].output_grads)
    sel = (np.abs(d).sum(-1) > 0) & (np.asarray(cap[name].token_mask) > 0)
    want = (u[sel] * u[sel]).sum(-1, keepdims=True) * d[sel]
    np.testing.assert_allclose(u[sel] @ np.asarray(delta_w), want, atol=1e-3 * np.abs(want).max())
    # λ is meta-trained with the step sizes (lr_lr)
    from mend_jax.training import MetaTrainer, TrainConfig

    trainer = MetaTrainer(editor, TrainConfig(accumulate=1, lr=1e-3, lr_lr=0.1))
    s0 = trainer.init(jax.random.key(0))
    s1, m = jax.jit(trainer.step)(s0, model.params, {"edit_inner": batch, "edit_outer": batch,
                                                      "loc": decoder_batch(61, [8, 8], seed=3)})
    assert np.isfinite(float(m["loss"]))
    moved = abs(float(s1["editor"]["params"]["log_lambdas"][name]) + 12.0)
    assert 0.05 < moved <= 0.1 + 1e-6  # one Adam step of lr_lr (its ε damps a tiny gradient)
    with pytest.raises(ValueError, match="aggregate"):
        MENDConfig(aggregate="mean")


def test_whitened_lstsq_solves_with_the_running_key_second_moment(model):
    """`whiten`: the ridge term is e^λ·C with C = E[u uᵀ] over the real tokens merged so far."""
    from mend_jax.capture import capture
    from mend_jax.editors.mend import ridge_solve, whitening_matrix

    rng = np.random.default_rng(2)
    k, v = rng.normal(size=(9, 5)), rng.normal(size=(9, 3))
    a = rng.normal(size=(5, 5))
    reg = a @ a.T + np.eye(5)
    want = np.linalg.solve(k.T @ k + 0.4 * reg, k.T @ v)
    got = ridge_solve(jnp.asarray(k, jnp.float32), jnp.asarray(v, jnp.float32), 0.4,
                      jnp.asarray(reg, jnp.float32))
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-3, atol=1e-4)

    name = "transformer.h.2.mlp.c_fc.weight"
    editor = MEND(model, [name], MENDConfig(aggregate="lstsq", whiten=True, tokens="answer"))
    state = editor.init(jax.random.key(0))
    b1, b2 = decoder_batch(61, [7, 4, 9]), decoder_batch(61, [6, 8], seed=4)
    stats = state["stats"]
    us = []
    for b in (b1, b2):
        _, cap, _ = capture(model, model.params, b, [name])
        _, stats = editor.pseudo_gradients(state["params"], stats, cap, train=True)
        real = np.asarray(cap[name].token_mask) > 0
        us.append(np.asarray(cap[name].layer_inputs)[real].astype(np.float64))
    u = np.concatenate(us)
    acc = stats["second_moments"][name.replace(".", "_")]
    assert float(acc["count"]) == len(u)  # every real token, not only the answer tokens
    np.testing.assert_allclose(np.asarray(acc["mean_uu"]), u.T @ u / len(u), rtol=1e-4,
                               atol=1e-5)
    c = np.asarray(whitening_matrix(acc))
    assert np.all(np.linalg.eigvalsh(c) > 0)
    with pytest.raises(ValueError, match="whiten"):
        MENDConfig(whiten=True)


def test_projected_keys_multiply_the_summed_update_by_the_damped_inverse_key_moment(model):
    """`project_keys`: the summed update becomes s·(C + ε·s·I)⁻¹ Σ ũδ̃ᵀ with C the running
    E[u uᵀ] of the weight's real tokens and s = tr(C)/d; a key direction common to the model's
    inputs moves the output less than with the plain sum."""
    from mend_jax.capture import capture

    name = "transformer.h.2.mlp.c_fc.weight"
    path = model.names.path(name)
    b1, b2 = decoder_batch(61, [7, 4, 9]), decoder_batch(61, [6, 8], seed=4)
    plain = MEND(model, [name], MENDConfig(norm=False, edit_lr=1.0))
    proj = MEND(model, [name], MENDConfig(norm=False, edit_lr=1.0, project_keys=True,
                                          project_eps=0.05))
    state = proj.init(jax.random.key(0))
    _, cap, _ = capture(model, model.params, b1, [name])
    _, stats = proj.pseudo_gradients(state["params"], state["stats"], cap, train=True)
    real = np.asarray(cap[name].token_mask) > 0
    u = np.asarray(cap[name].layer_inputs)[real].astype(np.float64)
    c = u.T @ u / len(u)
    s = np.trace(c) / len(c)
    p = s * np.linalg.inv(c + 0.05 * s * np.eye(len(c)))
    k0 = u.T                                   # the keys as columns: the soft projector off
    soft = np.eye(len(c)) - k0 @ np.linalg.solve(k0.T @ k0 + 0.05 * s * len(u) * np.eye(len(u)),
                                                 k0.T)
    np.testing.assert_allclose(p, soft / 0.05, rtol=1e-6, atol=1e-8)

    frozen = {"params": state["params"], "stats": stats}
    change = lambda ed, st: np.asarray(get_path(model.params, path)  # noqa: E731
                                       - get_path(ed.edit(st, model.params, b2), path))
    base = change(plain, plain.init(jax.random.key(0)))
    got = change(proj, frozen)
    np.testing.assert_allclose(got, p @ base, rtol=2e-3, atol=1e-4 * np.abs(p @ base).max())
    top = np.linalg.eigh(c)[1][:, -1]           # the most common key direction
    assert abs(top @ got).sum() < 0.5 * abs(top @ base).sum()
    with pytest.raises(ValueError, match="project_keys"):
        MENDConfig(project_keys=True, aggregate="lstsq")


def test_per_request_capture_loss_makes_each_requests_delta_independent_of_k(model):
    """`capture_loss: per_request`: with an identity editor and norm off, editing k requests
    together changes the weights by the sum of their one-at-a-time changes (with the batch mean
    each request's δ would shrink with the batch's token count)."""
    name = "transformer.h.2.mlp.c_fc.weight"
    batch = decoder_batch(61, [7, 4, 9])
    path = model.names.path(name)

    def change(cfg, b):
        editor = MEND(model, [name], cfg)
        new = editor.edit(editor.init(jax.random.key(0)), model.params, b)
        return np.asarray(get_path(model.params, path) - get_path(new, path))

    rows = [jax.tree.map(lambda x, i=i: x[i:i + 1], batch) for i in range(3)]
    for loss, additive in (("per_request", True), ("batch_mean", False)):
        cfg = MENDConfig(norm=False, edit_lr=1.0, capture_loss=loss)
        together, alone = change(cfg, batch), sum(change(cfg, r) for r in rows)
        close = np.allclose(together, alone, rtol=1e-4, atol=1e-6 * np.abs(alone).max())
        assert close == additive, loss
    with pytest.raises(ValueError, match="capture_loss"):
        MENDConfig(capture_loss="sum")


@pytest.mark.parametrize("opts", [dict(), dict(combine=False), dict(aggregate="lstsq")])
@pytest.mark.parametrize("train", [False, True])
def test_shared_groups_in_one_pass_equal_the_editor_weight_by_weight(model, opts, train):
    """pseudo_gradients runs each shared network once over all its weights' tokens (each row
    with its weight's mode); this equals transforming weight by weight, merging each weight's
    tokens into the statistics right before it is normalised (the reference's order)."""
    from mend_jax.capture import capture, pseudo_gradient
    from mend_jax.editors.mend import apply_idmlp

    editor = MEND(model, config=MENDConfig(rank=8, **opts))
    names = editor.layout.inner_params
    assert len(set(editor.layout.groups)) < len(names)  # groups are shared
    state = editor.init(jax.random.key(0))
    params = jax.tree.map(lambda x: x, state["params"])
    for net in params["nets"].values():  # move off the identity and the neutral modes
        for sub in net.values():
            for i, layer in enumerate(sub["layers"]):
                k = jax.random.key(i)
                layer["U"] = 0.1 * jax.random.normal(k, layer["U"].shape)
                layer["mode_scale"] = 1 + 0.5 * jax.random.normal(k, layer["mode_scale"].shape)
                layer["mode_shift"] = 0.1 * jax.random.normal(k, layer["mode_shift"].shape)
    _, cap, _ = capture(model, model.params, decoder_batch(61, [7, 4, 9]), names)
    stats = editor.pseudo_gradients(params, state["stats"], cap, train=True)[1]  # non-trivial
    got, got_stats = editor.pseudo_gradients(params, stats, cap, train=train)
    want_stats = stats
    for name in names:
        if train:
            want_stats = editor._merge(want_stats, name, cap[name])
        u, d, m = editor._standardised(want_stats, name, cap[name])
        i = names.index(name)
        nets, mode = params["nets"][editor.layout.groups[i]], editor.layout.modes[i]
        if editor.config.combine:
            out = apply_idmlp(nets["uv"], jnp.concatenate([u, d], -1), mode, editor.config)
            u, d = out[:, : u.shape[-1]], out[:, u.shape[-1]:]
        else:
            u = apply_idmlp(nets["u"], u, mode, editor.config)
            d = apply_idmlp(nets["delta"], d, mode, editor.config)
        u, d = u * m[:, None], d * m[:, None]
        if opts.get("aggregate") == "lstsq":
            continue  # the solve itself is tested on its own; compare the statistics only
        want = params["edit_lrs"][name] * pseudo_gradient(u, d)
        np.testing.assert_allclose(np.asarray(got[name]), np.asarray(want), rtol=1e-5,
                                   atol=1e-6)
    for a, b in zip(jax.tree.leaves(got_stats), jax.tree.leaves(want_stats)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6)


def test_jit_edit_returns_the_edit_sharing_every_unchanged_leaf(model):
    from mend_jax.editing import jit_edit

    editor = MEND(model, config=MENDConfig(rank=8))
    state = editor.init(jax.random.key(0))
    batch = decoder_batch(61, [7, 4, 9])
    want = jax.jit(editor.edit)(state, model.params, batch)
    got = jit_edit(editor)(state, model.params, batch)
    assert jax.tree.structure(got) == jax.tree.structure(want)
    edited = {model.names.path(n) for n in editor.layout.inner_params}
    from mend_jax.models.names import flatten

    old, new_w, new_g = flatten(model.params), flatten(want), flatten(got)
    for path, leaf in new_g.items():
        np.testing.assert_allclose(np.asarray(leaf), np.asarray(new_w[path]), atol=1e-6)
        assert (leaf is old[path]) == (path not in edited), path


@pytest.mark.parametrize("opts", [dict(), dict(aggregate="lstsq", tokens="answer"),
                                  # the slowest compile: with the slow tests (`-m slow`)
                                  pytest.param(dict(aggregate="lstsq", whiten=True,
                                                    init_log_lambda=3.0),
                                               marks=pytest.mark.slow)])
def test_chunked_editor_equals_one_pass_with_its_gradient(model, opts, request):
    """chunk_tokens runs the editor over a few rows at a time (padding the last chunk): the
    updates and the editor's gradient equal the one-pass editor's."""
    from mend_jax.capture import capture

    if opts.get("whiten"):
        # Float32 rounding, amplified by the whitened solve, is the whole difference here: 2e-2
        # holds for these weights and the optimised code's summation order (3.2e-3 before the
        # layers became one 2-D matmul, 1.1e-2 since: the captured u and δ round differently),
        # so this case compiles optimised
        request.getfixturevalue("full_xla_optimizations")

    batch = decoder_batch(61, [7, 4, 9, 5, 6])  # 5 rows x 8 positions = 40 token rows
    one = MEND(model, config=MENDConfig(rank=8, **opts))
    names = one.layout.inner_params
    state = one.init(jax.random.key(0))
    _, cap, _ = capture(model, model.params, batch, names)
    # off the identity, and non-trivial statistics
    params = jax.tree.map(lambda x: x, state["params"])
    for net in params["nets"].values():
        for layer in net["uv"]["layers"]:
            layer["U"] = 0.1 * jax.random.normal(jax.random.key(3), layer["U"].shape)
    stats = one.pseudo_gradients(params, state["stats"], cap, train=True)[1]

    def run(editor, p):
        updates, new_stats = editor.pseudo_gradients(p, stats, cap, train=True)
        return sum(jnp.sum(u * jnp.sin(jnp.arange(u.size).reshape(u.shape))) for u in
                   updates.values()), (updates, new_stats)

    chunked = MEND(model, config=MENDConfig(rank=8, chunk_tokens=7, **opts))
    (v1, (u1, s1)), g1 = jax.value_and_grad(lambda p: run(one, p), has_aux=True)(params)
    (v2, (u2, s2)), g2 = jax.value_and_grad(lambda p: run(chunked, p), has_aux=True)(params)
    # float32 sums in another order. With whitening (96-wide keys, 40 tokens: C is singular
    # but for its ε·I term) the solve amplifies them; λ = e³ keeps it conditioned enough for
    # 2e-2, where a wrong or unmasked chunk is off by O(1)
    tol = 2e-2 if opts.get("whiten") else 2e-4
    for n in names:
        assert np.abs(np.asarray(u1[n])).max() > 0
        np.testing.assert_allclose(np.asarray(u2[n]), np.asarray(u1[n]), rtol=tol,
                                   atol=tol * np.abs(np.asarray(u1[n])).max())
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
        scale = max(np.abs(np.asarray(a)).max(), 1e-12)
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=tol * scale)
    for a, b in zip(jax.tree.leaves(s1), jax.tree.leaves(s2)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-6)
    with pytest.raises(ValueError, match="chunk_tokens"):
        MENDConfig(chunk_tokens=0)


@pytest.mark.parametrize("project,preserve", [(False, False), (True, False), (True, True)])
def test_request_lstsq_asks_each_requests_own_update_of_its_answer_keys(model, project,
                                                                        preserve):
    """`aggregate: request_lstsq`: the update of k requests together is the ridge solution
    (XᵀX + λC)⁻¹XᵀV over every request's answer-token keys X, each key's value being the shift
    that request's own update (the sum editor's, edited alone) makes on it; with preserved
    facts, C + C_p, C_p their keys' second moment at their answer positions."""
    from mend_jax.capture import capture
    from mend_jax.editors.mend import whitening_matrix

    name = "transformer.h.2.mlp.c_fc.weight"
    path = model.names.path(name)
    opts = dict(edit_lr=1e-2, capture_loss="per_request", project_keys=project)
    summed = MEND(model, [name], MENDConfig(**opts))
    solved = MEND(model, [name], MENDConfig(**opts, aggregate="request_lstsq",
                                            request_lambda=0.3))
    state = solved.init(jax.random.key(0))
    stats = state["stats"]
    for b in (decoder_batch(61, [7, 4, 9], seed=5), decoder_batch(61, [6, 8], seed=4)):
        _, cap, _ = capture(model, model.params, b, [name])   # statistics to standardise with
        _, stats = solved.pseudo_gradients(state["params"], stats, cap, train=True,
                                           n_requests=b["input_ids"].shape[0])
    state = {"params": state["params"], "stats": stats}
    reg = np.asarray(whitening_matrix(stats["second_moments"][name.replace(".", "_")]))
    if preserve:
        facts = decoder_batch(61, [9, 5, 8, 6], prompt_len=4, seed=7)
        state = solved.preserve_keys(state, model.params, [facts])
        _, cap, _ = capture(model, model.params, facts, [name])
        on = np.asarray(cap[name].token_mask * cap[name].answer_mask) > 0
        kp = np.asarray(cap[name].layer_inputs, np.float64)[on]
        c_p = np.asarray(state["stats"]["preserved_keys"][name.replace(".", "_")]["mean_uu"])
        np.testing.assert_allclose(c_p, kp.T @ kp / len(kp), rtol=1e-4, atol=1e-5)
        reg = reg + c_p
    batch = decoder_batch(61, [7, 4, 9])
    rows = [jax.tree.map(lambda x, i=i: x[i:i + 1], batch) for i in range(3)]
    w = np.asarray(get_path(model.params, path), np.float64)
    alone_edit = jax.jit(summed.edit)   # one compile for the three one-row batches
    alone = [w - np.asarray(get_path(alone_edit(state, model.params, r), path)) for r in rows]
    keys, values = [], []
    for r, update in zip(rows, alone):
        _, cap, _ = capture(model, model.params, r, [name])
        c = cap[name]
        on = np.asarray(c.token_mask * c.answer_mask) > 0
        x = np.asarray(c.layer_inputs, np.float64)[on]
        keys.append(x)
        values.append(x @ update)
    x, v = np.concatenate(keys), np.concatenate(values)
    want = np.linalg.solve(x.T @ x + 0.3 * reg, x.T @ v)
    got = w - np.asarray(get_path(solved.edit(state, model.params, batch), path))
    np.testing.assert_allclose(got, want, rtol=2e-3, atol=2e-3 * np.abs(want).max())
    # it is not the sum of the requests' own updates
    assert not np.allclose(got, sum(alone), rtol=0.05, atol=0.05 * np.abs(want).max())
    # a request alone has nothing to reconcile: its own update, exactly
    one = w - np.asarray(get_path(solved.edit(state, model.params, rows[1]), path))
    np.testing.assert_allclose(one, alone[1], rtol=1e-5, atol=1e-6 * np.abs(alone[1]).max())
    with pytest.raises(ValueError, match="chunk_tokens"):
        MENDConfig(aggregate="request_lstsq", chunk_tokens=8)
    with pytest.raises(ValueError, match="request_preserve"):
        MENDConfig(aggregate="request_lstsq", request_preserve=-1)


def test_preserve_weight_projects_the_update_off_the_preserved_facts_keys(model):
    """`preserve_weight` μ: the summed update is projected by P = s(M + εsI)⁻¹ with
    M = C + μ·C_p (C the keys' running second moment, C_p the second moment of the preserved
    facts' answer keys) and s = tr(M)/d, instead of by C alone."""
    from mend_jax.capture import capture

    name = "transformer.h.2.mlp.c_fc.weight"
    path, key = model.names.path(name), name.replace(".", "_")
    opts = dict(edit_lr=1e-2, capture_loss="per_request")
    raw = MEND(model, [name], MENDConfig(**opts))
    kept = MEND(model, [name], MENDConfig(**opts, project_keys=True, project_eps=0.05,
                                          request_preserve=4, preserve_weight=3.0))
    state = kept.init(jax.random.key(0))
    assert float(state["stats"]["preserved_keys"][key]["count"]) == 0.0   # filled later
    stats = state["stats"]
    for b in (decoder_batch(61, [7, 4, 9], seed=5), decoder_batch(61, [6, 8], seed=4)):
        _, cap, _ = capture(model, model.params, b, [name])
        _, stats = kept.pseudo_gradients(state["params"], stats, cap, train=True, n_requests=1)
    facts = decoder_batch(61, [9, 5, 8, 6], prompt_len=4, seed=7)
    state = kept.preserve_keys({"params": state["params"], "stats": stats}, model.params, [facts])
    c = np.asarray(state["stats"]["second_moments"][key]["mean_uu"], np.float64)
    c_p = np.asarray(state["stats"]["preserved_keys"][key]["mean_uu"], np.float64)
    assert np.abs(c_p).max() > 0
    batch = decoder_batch(61, [7, 4, 9])
    w = np.asarray(get_path(model.params, path), np.float64)
    summed = w - np.asarray(get_path(raw.edit(state, model.params, batch), path))
    got = w - np.asarray(get_path(kept.edit(state, model.params, batch), path))

    def projected(m):
        s = np.trace(m) / len(m)
        return s * np.linalg.solve(m + 0.05 * s * np.eye(len(m)), summed)

    want = projected(c + 3.0 * c_p)
    np.testing.assert_allclose(got, want, rtol=2e-3, atol=2e-3 * np.abs(want).max())
    assert not np.allclose(got, projected(c), rtol=0.05, atol=0.05 * np.abs(want).max())
    for bad, match in (({"preserve_weight": -1.0, "request_preserve": 4}, "preserve_weight"),
                       ({"preserve_weight": 1.0}, "request_preserve"),
                       ({"preserve_weight": 1.0, "request_preserve": 4, "project_keys": False},
                        "project_keys")):
        with pytest.raises(ValueError, match=match):
            MENDConfig(**{"project_keys": True, **bad})


def test_lifelong_request_lstsq_leaves_the_keys_of_earlier_edits_alone(model):
    """`lifelong`: an edit call adds its answer keys to the state (E = Σ x xᵀ), and a later
    call's update is (XᵀX + E + λ(C + ε·s·I))⁻¹XᵀV: the earlier keys enter as rows of value
    zero (ε `request_eps`, s = mean(diag C))."""
    from mend_jax.capture import capture
    from mend_jax.editing import jit_edit
    from mend_jax.editors.mend import whitening_matrix

    name = "transformer.h.2.mlp.c_fc.weight"
    path, key = model.names.path(name), name.replace(".", "_")
    opts = dict(edit_lr=1e-2, capture_loss="per_request", project_keys=True)
    summed = MEND(model, [name], MENDConfig(**opts))
    solved = MEND(model, [name], MENDConfig(**opts, aggregate="request_lstsq",
                                            request_lambda=0.3, request_eps=0.05,
                                            lifelong=True))
    assert solved.stateful and not summed.stateful
    state = solved.init(jax.random.key(0))
    stats = state["stats"]
    for b in (decoder_batch(61, [7, 4, 9], seed=5), decoder_batch(61, [6, 8], seed=4)):
        _, cap, _ = capture(model, model.params, b, [name])
        _, stats = solved.pseudo_gradients(state["params"], stats, cap, train=True,
                                           n_requests=b["input_ids"].shape[0])
    state = {"params": state["params"], "stats": stats}
    reg = 0.3 * np.asarray(whitening_matrix(stats["second_moments"][key], 0.05), np.float64)

    def answer_keys(params, batch):
        _, cap, _ = capture(model, params, batch, [name])
        on = np.asarray(cap[name].token_mask * cap[name].answer_mask) > 0
        return np.asarray(cap[name].layer_inputs, np.float64)[on]

    first, second = decoder_batch(61, [5, 8], seed=9), decoder_batch(61, [7, 4, 9])
    edit = jit_edit(solved, stateful=True)
    params, state1 = edit(state, model.params, first)
    k1 = answer_keys(model.params, first)
    e = np.asarray(state1["stats"]["edited_keys"][key]["count"]) * np.asarray(
        state1["stats"]["edited_keys"][key]["mean_uu"], np.float64)
    np.testing.assert_allclose(e, k1.T @ k1, rtol=1e-4, atol=1e-4 * np.abs(k1.T @ k1).max())
    rows = [jax.tree.map(lambda x, i=i: x[i:i + 1], second) for i in range(3)]
    w = np.asarray(get_path(params, path), np.float64)
    keys, values = [], []
    alone_edit = jax.jit(summed.edit)   # one compile for the three one-row batches
    for r in rows:
        x = answer_keys(params, r)
        keys.append(x)
        values.append(x @ (w - np.asarray(get_path(alone_edit(state, params, r), path))))
    x, v = np.concatenate(keys), np.concatenate(values)
    new, state2 = edit(state1, params, second)
    got = w - np.asarray(get_path(new, path))
    want = np.linalg.solve(x.T @ x + reg + e, x.T @ v)
    np.testing.assert_allclose(got, want, rtol=2e-3, atol=2e-3 * np.abs(want).max())
    assert not np.allclose(got, np.linalg.solve(x.T @ x + reg, x.T @ v), rtol=0.05,
                           atol=0.05 * np.abs(want).max())
    assert float(state2["stats"]["edited_keys"][key]["count"]) == len(k1) + len(x)
    with pytest.raises(ValueError, match="lifelong"):
        MENDConfig(lifelong=True)
    with pytest.raises(ValueError, match="request_eps"):
        MENDConfig(aggregate="request_lstsq", request_eps=0.0)


def _greedy_batch(model, prompt, n_new):
    """A one-request batch whose target is the model's own greedy continuation of `prompt`."""
    ids = list(prompt)
    for _ in range(n_new):
        logits = model.logits(model.params, jnp.asarray([ids]), jnp.ones((1, len(ids)), jnp.int32))
        ids.append(int(jnp.argmax(logits[0, -1])))
    labels = [-100] * len(prompt) + ids[len(prompt):]
    return {"input_ids": jnp.asarray([ids], jnp.int32),
            "attention_mask": jnp.ones((1, len(ids)), jnp.int32),
            "labels": jnp.asarray([labels], jnp.int32)}


def _took(model, params, batch):
    from mend_jax.capture import labelled_logits
    from mend_jax.metrics import sequence_correct

    logits, labels = labelled_logits(model, params, batch)
    return np.asarray(sequence_correct(logits, labels, True))


def test_edit_scales_strengthen_only_the_edits_that_did_not_take(model):
    """edit_scales: one request is edited with its update times the first scale under which its
    edit prompt gives the target (the oracle: plain edits with the step sizes times each
    scale), and with the trained step if none does; of two requests, one that takes at the
    trained step keeps it while the other is scaled; (1,) is the plain edit; the per-request
    scaling is linear in each request's share."""
    scales = (1.0, 4.0, 16.0, 64.0)
    plain = MEND(model, config=MENDConfig(norm=False, edit_lr=0.01))
    state = plain.init(jax.random.key(0))
    edit = jax.jit(plain.edit)

    def times(s):  # the state with every step size α_ℓ times s
        return {**state, "params": {**state["params"], "edit_lrs": jax.tree.map(
            lambda a: a * s, state["params"]["edit_lrs"])}}

    b = decoder_batch(61, [5])
    took_at = [bool(_took(model, edit(times(s), model.params, b), b)[0]) for s in scales]
    first = took_at.index(True)
    assert first > 0  # a real search: the trained step alone does not make this edit
    scaled = jax.jit(MEND(model, config=MENDConfig(norm=False, edit_lr=0.01,
                                                   edit_scales=scales)).edit)
    got, ref = scaled(state, model.params, b), edit(times(scales[first]), model.params, b)
    one = jax.jit(MEND(model, config=MENDConfig(norm=False, edit_lr=0.01, edit_scales=(1.0,))
                       ).edit)(state, model.params, b)
    base = edit(state, model.params, b)
    # meta-training and its validation edit at the trained step alone
    trained_step = MEND(model, config=MENDConfig(norm=False, edit_lr=0.01, edit_scales=scales)
                        ).edit_with_stats(state, model.params, b, train=False)[0]
    for n in plain.layout.inner_params:
        path = model.names.path(n)
        np.testing.assert_allclose(get_path(got, path), get_path(ref, path), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(get_path(one, path), get_path(base, path), rtol=1e-6)
        np.testing.assert_allclose(get_path(trained_step, path), get_path(base, path),
                                   rtol=1e-5, atol=1e-6)

    # an edit that takes at no scale keeps the trained step (the round in which most took)
    never = jax.jit(MEND(model, config=MENDConfig(norm=False, edit_lr=0.01,
                                                  edit_scales=(1.0, 1.5))).edit)(
        state, model.params, b)
    assert not _took(model, edit(times(1.5), model.params, b), b)[0]
    for n in plain.layout.inner_params:
        np.testing.assert_allclose(get_path(never, model.names.path(n)),
                                   get_path(base, model.names.path(n)), rtol=1e-5, atol=1e-6)

    # two requests: A already gives its target, B does not
    a = _greedy_batch(model, [5, 9, 13], 2)
    b2 = decoder_batch(61, [5], seed=2)
    pair = {k: jnp.concatenate([a[k], b2[k]]) for k in a}
    assert _took(model, model.params, pair).tolist() == [True, False]
    got = scaled(state, model.params, pair)
    assert _took(model, got, pair).tolist() == [True, True]
    from mend_jax.capture import capture

    _, captured, _ = capture(model, model.params, pair, plain.layout.weights)

    def update(request_scales=None):
        return plain.pseudo_gradients(
            state["params"], state["stats"], captured, n_requests=2,
            request_scales=None if request_scales is None else jnp.asarray(request_scales))[0]

    n = plain.layout.inner_params[-1]
    w0, w1 = (get_path(p, model.names.path(n)) for p in (model.params, got))
    matches = [s for s in scales if np.allclose(w1, w0 - update([1.0, s])[n], rtol=1e-5,
                                                atol=1e-7)]
    assert len(matches) == 1 and matches[0] > 1
    only_a, only_b = update([1.0, 0.0]), update([0.0, 1.0])
    np.testing.assert_allclose(update([2.0, 3.0])[n], 2 * only_a[n] + 3 * only_b[n], atol=1e-7)
    np.testing.assert_allclose(update([1.0, 1.0])[n], update()[n], atol=1e-7)


@pytest.mark.parametrize("bad", [dict(edit_scales=()), dict(edit_scales=(1.0, -2.0)),
                                 dict(edit_scales=(1.0, 2.0), chunk_tokens=8)])
def test_edit_scales_refused_when_malformed(bad):
    with pytest.raises(ValueError, match="edit_scales"):
        MENDConfig(**bad)
