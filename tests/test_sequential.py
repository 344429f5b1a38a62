"""Lifelong editing: UltraEdit's carried statistics and closed form, and sequential evaluation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mend_jax.capture import capture
from mend_jax.editors import MEND, FineTune, FTConfig, MENDConfig, UltraEdit, make_editor
from mend_jax.evaluation import evaluate_editor, evaluate_sequential, plot_sequential
from mend_jax.models import get_path
from tests.test_capture import CONFIGS, decoder_batch
from tests.test_evaluation import MAX_LENGTH, REQUESTS, setup  # noqa: F401 (a fixture)


def test_ultraedit_update_is_the_closed_form_and_its_statistics_carry_over():
    from mend_jax.models import from_config

    model = from_config(CONFIGS["gpt2"](), seed=1)
    name = "transformer.h.1.mlp.c_fc.weight"
    editor = make_editor("ultraedit", model, [name], lr=0.5, lam=0.3)
    assert isinstance(editor, UltraEdit)
    state0 = editor.init()
    b1, b2 = decoder_batch(61, [7, 4, 9]), decoder_batch(61, [6, 8], seed=5)
    p1, state1 = jax.jit(editor.edit_and_update)(state0, model.params, b1)
    p2, state2 = jax.jit(editor.edit_and_update)(state1, p1, b2)

    def tokens(params, batch):
        _, cap, _ = capture(model, params, batch, [name])
        c = cap[name]
        d = np.asarray(c.output_grads)
        sel = (np.asarray(c.token_mask) > 0) & (np.asarray(c.answer_mask) > 0) & (
            np.abs(d).sum(-1) > 0)
        return np.asarray(c.layer_inputs)[sel].astype(np.float64), d[sel].astype(np.float64)

    u1, d1 = tokens(model.params, b1)
    u2, d2 = tokens(p1, b2)
    group = editor.layout.groups[0]
    # The second call's statistics hold both batches' answer tokens (lifelong normalisation).
    assert float(state1["stats"][group]["count"]) == len(u1)
    assert float(state2["stats"][group]["count"]) == len(u1) + len(u2)
    u_all, d_all = np.concatenate([u1, u2]), np.concatenate([d1, d2])
    np.testing.assert_allclose(np.asarray(state2["stats"][group]["u_mean"]), u_all.mean(0),
                               rtol=1e-4, atol=1e-5)

    def std(x):
        return (x - x.mean(0)) / (x.std(0, ddof=1) + 1e-7)

    uh, dh = std(u_all)[len(u1):], std(d_all)[len(u1):]
    values = (uh * uh).sum(-1, keepdims=True) * dh
    want = 0.5 * np.linalg.solve(u2.T @ u2 + 0.3 * np.eye(u2.shape[1]), u2.T @ values)
    path = model.names.path(name)
    got = np.asarray(get_path(p1, path) - get_path(p2, path))
    np.testing.assert_allclose(got, want, rtol=2e-3, atol=2e-3 * np.abs(want).max())
    # `edit` alone is one call from the given statistics
    np.testing.assert_allclose(np.asarray(get_path(editor.edit(state0, model.params, b1), path)),
                               np.asarray(get_path(p1, path)), rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="tokens"):
        make_editor("ultraedit", model, [name], tokens="some")


@pytest.mark.parametrize("method", ["mend", "ft"])
def test_one_sequential_batch_equals_a_batched_edit(setup, method):  # noqa: F811
    model, tokenizer = setup
    if method == "mend":
        editor = MEND(model, None, MENDConfig(edit_lr=1e-2))
        state = editor.init(jax.random.key(0))
    else:
        editor = FineTune(model, None, FTConfig(steps=3, lr=1e-2))
        state = editor.init(None)
    kw = dict(n_edits=3, max_length=MAX_LENGTH, seed=0)
    seq = evaluate_sequential(model, editor, state, model.params, REQUESTS, tokenizer,
                              n_batches=1, **kw)
    batched = evaluate_editor(model, editor, state, model.params, REQUESTS, tokenizer, **kw)
    # evaluate_editor edits every complete group of 3; the first group is the sequential batch
    one = evaluate_editor(model, editor, state, model.params,
                          [REQUESTS[i] for i in np.random.default_rng(0).permutation(7)[:3]],
                          tokenizer, n_edits=3, max_length=MAX_LENGTH, seed=None)
    assert batched["n_examples"] == 6
    for key in ("edit_success", "generality", "drawdown", "locality_kl", "neighborhood_acc",
                "locality"):
        assert seq[key] == pytest.approx(one[key], abs=1e-6), key
    assert seq["retained_curve"] == [pytest.approx(one["edit_success"])]
    assert seq["drawdown_curve"] == [pytest.approx(one["drawdown"], abs=1e-6)]


def test_sequential_batches_build_on_each_other(setup, tmp_path):  # noqa: F811
    """The retained curve has one point per batch, its first point is the one-batch run's edit
    success, and its last the final model's edit success over every edit."""
    model, tokenizer = setup
    editor = FineTune(model, None, FTConfig(steps=40, lr=3e-2))
    kw = dict(n_edits=3, max_length=MAX_LENGTH, seed=0)
    r = evaluate_sequential(model, editor, editor.init(None), model.params, REQUESTS, tokenizer,
                            n_batches=2, **kw)
    first = evaluate_sequential(model, editor, editor.init(None), model.params, REQUESTS,
                                tokenizer, n_batches=1, **kw)
    assert r["n_examples"] == 6 and r["n_batches"] == 2 and len(r["retained_curve"]) == 2
    assert r["retained_curve"][0] == pytest.approx(first["edit_success"])
    assert r["edit_success"] == pytest.approx(r["retained_curve"][-1])
    # drawdown after each batch on all six requests' unrelated facts; the last is the final one
    assert len(r["drawdown_curve"]) == 2 and r["drawdown"] == pytest.approx(
        r["drawdown_curve"][-1], abs=1e-6)
    assert r["edit_success"] > r["pre_edit_success"]
    assert r["locality_kl"] > first["locality_kl"] > 0
    with pytest.raises(ValueError, match="needs 9 requests"):
        evaluate_sequential(model, editor, editor.init(None), model.params, REQUESTS, tokenizer,
                            n_edits=3, n_batches=3, max_length=MAX_LENGTH)
    png = plot_sequential({3: {"ft": r}}, tmp_path / "seq.png")
    assert png.stat().st_size > 1000


def test_ultraedit_in_sequential_evaluation_threads_its_state(setup):  # noqa: F811
    model, tokenizer = setup
    editor = make_editor("ultraedit", model, None)
    r = evaluate_sequential(model, editor, editor.init(), model.params, REQUESTS, tokenizer,
                            n_edits=3, n_batches=2, max_length=MAX_LENGTH, seed=0)
    assert np.isfinite(r["edit_success"]) and len(r["retained_curve"]) == 2
    assert jnp.isfinite(r["locality_kl"])


def test_lifelong_mend_in_sequential_evaluation_threads_its_edited_keys(setup):  # noqa: F811
    """With `lifelong` the second batch's solve keeps the first batch's keys (E ≠ 0), so the
    runs part after the first batch; without it each batch is solved alone."""
    model, tokenizer = setup
    opts = dict(rank=8, aggregate="request_lstsq", request_lambda=1.0, edit_lr=1e-2)
    runs = {}
    for lifelong in (False, True):
        editor = MEND(model, config=MENDConfig(**opts, lifelong=lifelong))
        runs[lifelong] = evaluate_sequential(
            model, editor, editor.init(jax.random.key(0)), model.params, REQUESTS, tokenizer,
            n_edits=3, n_batches=2, max_length=MAX_LENGTH, seed=0)
    plain, kept = runs[False], runs[True]
    assert len(kept["retained_curve"]) == 2
    assert kept["retained_curve"][0] == plain["retained_curve"][0]
    assert abs(kept["locality_kl"] - plain["locality_kl"]) > 1e-6 * plain["locality_kl"]


class _Scale:
    """A stand-in editor that multiplies every parameter by a factor: two batches of ×0.5 must
    compound to ×0.25 if each batch is edited into the previous batch's model."""

    def __init__(self, factor):
        self.factor = factor

    def init(self, key=None):
        return {}

    def edit(self, state, params, batch):
        return jax.tree.map(lambda x: x * self.factor, params)


def test_each_sequential_batch_edits_the_previous_batchs_model(setup):  # noqa: F811
    model, tokenizer = setup
    kw = dict(max_length=MAX_LENGTH, seed=0)
    two = evaluate_sequential(model, _Scale(0.5), {}, model.params, REQUESTS, tokenizer,
                              n_edits=3, n_batches=2, **kw)
    once = evaluate_sequential(model, _Scale(0.25), {}, model.params, REQUESTS, tokenizer,
                               n_edits=6, n_batches=1, **kw)
    half = evaluate_sequential(model, _Scale(0.5), {}, model.params, REQUESTS, tokenizer,
                               n_edits=6, n_batches=1, **kw)
    assert two["locality_kl"] == pytest.approx(once["locality_kl"], rel=1e-5)
    assert abs(two["locality_kl"] - half["locality_kl"]) > 1e-3
