"""KE and ENN as specifications: KE's update is the reference's gated, masked gradient plus a
rank-1 offset per edit; ENN's edit is SGD with its learned step sizes from its learned weights;
a meta-training step lowers each one's meta-loss; both run through make_editor, the evaluation,
the pipeline's naming, the configs and the artifacts."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers

from mend_jax.artifacts import load_editor, save_editor
from mend_jax.capture import capture
from mend_jax.config import load_config
from mend_jax.data import EditRequest
from mend_jax.editors import ENN, KE, ENNConfig, KEConfig, make_editor
from mend_jax.editors.ke import apply_linear
from mend_jax.errors import ConfigError
from mend_jax.evaluation import evaluate_editor
from mend_jax.metrics import IGNORE, masked_nll
from mend_jax.models import from_config, get_path, set_path
from mend_jax.offline import build_word_tokenizer
from mend_jax.training import MetaTrainer, TrainConfig

INNER = ["transformer.h.0.mlp.c_fc.weight", "transformer.h.0.mlp.c_proj.weight"]
FACTS = [("France", "Paris", "Rome"), ("Italy", "Rome", "Madrid"), ("Spain", "Madrid", "Paris")]
REQUESTS = [EditRequest(prompt=f"The capital of {s} is", target_new=new, target_true=true,
                        rephrases=(f"{s} has its capital in",),
                        loc_prompt=f"The capital of {FACTS[(i + 1) % 3][0]} is",
                        loc_target=FACTS[(i + 1) % 3][1])
            for i, (s, true, new) in enumerate(FACTS)]
TOKENIZER = build_word_tokenizer([t for r in REQUESTS for t in (
    r.prompt, r.target_new, r.loc_prompt, r.loc_target, *r.rephrases)])
V = len(TOKENIZER)


@pytest.fixture(scope="module", autouse=True)
def _fast_compiles():
    # Compiling dominates these tiny programs; XLA's optimisation passes change no value
    # compared here beyond float rounding. Restored for the tests that follow.
    old = jax.config.values["jax_disable_most_optimizations"]
    jax.config.update("jax_disable_most_optimizations", True)
    yield
    jax.config.update("jax_disable_most_optimizations", old)


@pytest.fixture(scope="module")
def model():
    cfg = transformers.GPT2Config(vocab_size=V, n_positions=12, n_embd=16, n_layer=1, n_head=2,
                                  bos_token_id=3, eos_token_id=1)
    return from_config(cfg, seed=0)


def lm_batch(rng, n, prompt_len=4, unlabelled=()):
    """n rows of prompt + one target token, right-padded by one token on odd rows."""
    ids = rng.integers(2, V, (n, prompt_len + 2)).astype(np.int32)
    mask = np.ones_like(ids)
    labels = np.full_like(ids, IGNORE)
    for i in range(n):
        end = prompt_len + 1 if i % 2 else prompt_len + 2
        mask[i, end:] = 0
        ids[i, end:] = 0
        if i not in unlabelled:
            labels[i, end - 1] = ids[i, end - 1]
    return {"input_ids": jnp.asarray(ids), "attention_mask": jnp.asarray(mask),
            "labels": jnp.asarray(labels)}


def meta_batch(seed=0):
    rng = np.random.default_rng(seed)
    return {"edit_inner": lm_batch(rng, 2), "edit_outer": lm_batch(rng, 2),
            "loc": lm_batch(rng, 4)}


def weight(model, params, name):
    return get_path(params, model.names.path(name))


# ----------------------------------------------------------------------------- KE
def test_ke_update_is_gated_masked_gradient_plus_rank1_offset_per_edit(model):
    """ΔW = Σ_i s_i (G_i ⊙ softmax(a_row_i)ᵀa_col_i + softmax(b_row_i)ᵀb_col_i), the network's
    output split [a_col (d_out), a_row (d_in), b_col (d_out), b_row (d_in), gate] as the
    reference's ConditionedParameter; G_i is edit i's share of the batch-loss gradient; an
    unlabelled row adds nothing. (G_i from the captured u, δ, themselves checked against
    jax.grad in test_capture.py.)"""
    editor = make_editor("ke", model, INNER, hidden_dim=8, condition_dim=8)
    assert isinstance(editor, KE)
    state = editor.init(jax.random.key(0))
    batch = lm_batch(np.random.default_rng(0), 3, unlabelled=(2,))

    mask = batch["attention_mask"].astype(jnp.float32)
    other_padding = jnp.where(mask > 0, batch["input_ids"], 7)

    def net_outputs(state):  # [B, 2 (d_in + d_out) + 1] per weight
        cond = editor.condition(state["params"], batch["input_ids"], mask)
        nets = state["params"]["nets"]["weights"]
        return cond, {n: apply_linear(nets[n.replace(".", "_")]["out"], jnp.tanh(apply_linear(
            nets[n.replace(".", "_")]["hidden"], cond))) for n in INNER}

    def per_row_grads(params):  # {name: [B, d_in, d_out]}: G_i = Σ_{t in row i} u_t δ_tᵀ
        _, captured, _ = capture(model, params, batch, INNER)
        rows = lambda x: x.reshape(3, -1, x.shape[-1])  # noqa: E731  (B*T d -> B T d)
        return {n: jnp.einsum("bti,bto->bio", rows(c.layer_inputs), rows(c.output_grads))
                for n, c in captured.items()}

    weights = {n: weight(model, model.params, n) for n in INNER}
    # One compiled program: the edit, each row's gradient, the nets, and the condition with
    # other tokens at the padded positions, with and without the mask.
    new, grads, (cond, outs), cond_repadded, cond_unmasked = jax.jit(lambda s, p: (
        editor.edit(s, p, batch), per_row_grads(p), net_outputs(s),
        editor.condition(s["params"], other_padding, mask),
        editor.condition(s["params"], other_padding, jnp.ones_like(mask))))(state, model.params)
    # The bidirectional LSTM reads the real tokens only (as torch's packed sequences).
    np.testing.assert_allclose(cond_repadded, cond, atol=1e-6)
    assert np.abs(np.asarray(cond_unmasked - cond)[1]).max() > 1e-4  # row 1 is padded
    for name in INNER:
        d_in, d_out = weights[name].shape
        out = np.asarray(outs[name])
        expected = np.zeros((d_in, d_out))
        for i in range(2):  # row 2 has no label
            a_col, a_row, b_col, b_row, gate = np.split(
                out[i], np.cumsum([d_out, d_in, d_out, d_in]))
            soft = lambda z: np.exp(z - z.max()) / np.exp(z - z.max()).sum()  # noqa: E731
            s = 1.0 / (1.0 + np.exp(-gate[0]))
            mask_a = np.outer(soft(a_row), a_col)          # rank 1
            offset = np.outer(soft(b_row), b_col)          # rank 1
            expected += s * (np.asarray(grads[name][i]) * mask_a + offset)
        delta = np.asarray(weights[name] - weight(model, new, name))
        np.testing.assert_allclose(delta, expected, rtol=2e-4, atol=1e-8)
        assert np.abs(delta).max() > 1e-4


# ----------------------------------------------------------------------------- ENN
def test_enn_inner_steps_are_sgd_with_learned_step_sizes_from_learned_weights(model):
    editor = make_editor("enn", model, INNER, n_edit_steps=2)
    assert isinstance(editor, ENN)
    state = editor.init()
    # A meta-learned state: weights moved away from the base model, one step size per weight.
    noise = jax.random.split(jax.random.key(0), len(INNER))
    state["params"]["inner_params"] = {
        n: w + 0.05 * jax.random.normal(k, w.shape)
        for (n, w), k in zip(state["params"]["inner_params"].items(), noise)}
    state["params"]["edit_lrs"] = {INNER[0]: jnp.float32(0.3), INNER[1]: jnp.float32(0.7)}
    batch = lm_batch(np.random.default_rng(1), 3)

    def nll(weights):
        params = model.params
        for n, w in weights.items():
            params = set_path(params, model.names.path(n), w)
        logits = model.logits(params, batch["input_ids"], batch["attention_mask"])
        return masked_nll(logits, batch["labels"], shift=True)

    def by_hand(w):  # two SGD steps, 0.3 and 0.7, from the learned weights
        for _ in range(2):
            g = jax.grad(nll)(w)
            w = {INNER[0]: w[INNER[0]] - 0.3 * g[INNER[0]],
                 INNER[1]: w[INNER[1]] - 0.7 * g[INNER[1]]}
        return w

    new, w = jax.jit(lambda s, p: (editor.edit(s, p, batch), by_hand(
        s["params"]["inner_params"])))(state, model.params)
    for n in INNER:
        np.testing.assert_allclose(weight(model, new, n), w[n], atol=1e-6)
        # the edit moved the learned weights (not the base model's)
        assert np.abs(np.asarray(w[n] - state["params"]["inner_params"][n])).max() > 1e-3
    for path in (("transformer", "wte", "embedding"), ("transformer", "h_0", "attn")):
        for a, b in zip(jax.tree.leaves(get_path(new, path)),
                        jax.tree.leaves(get_path(model.params, path))):
            assert np.array_equal(np.asarray(a), np.asarray(b))


# ----------------------------------------------------------------------------- meta-training
def _two_steps(trainer, model):
    state = trainer.init(jax.random.key(0))
    before = jax.tree.map(np.asarray, state["editor"]["params"])
    step = jax.jit(trainer.step)
    batch = meta_batch()
    state, first = step(state, model.params, batch)
    state, second = step(state, model.params, batch)  # its loss is the one after one update
    return before, state, first, second


def test_one_ke_meta_training_step_lowers_the_meta_loss(model):
    editor = KE(model, INNER, KEConfig(hidden_dim=8, condition_dim=8))
    trainer = MetaTrainer(editor, TrainConfig(lr=1e-2, c_edit=1.0, c_loc=1.0, accumulate=1))
    before, state, first, second = _two_steps(trainer, model)
    assert int(state["n_skipped"]) == 0 and "edit_lr_mean" not in first
    # measured: 2.8472 -> 2.8444
    assert float(first["loss"]) == pytest.approx(2.8472, abs=1e-3)
    assert float(second["loss"]) == pytest.approx(2.8444, abs=1e-3)
    assert float(second["loss"]) < float(first["loss"]) - 1e-3
    moved = jax.tree.map(lambda a, b: np.abs(a - np.asarray(b)).max(), before,
                         state["editor"]["params"])
    # every part of the hyper-network is trained (the conditioner's embeddings included)
    assert min(jax.tree.leaves(moved)) > 0


def test_one_enn_meta_training_step_lowers_the_meta_loss(model):
    editor = ENN(model, INNER, ENNConfig(edit_lr=0.5))
    trainer = MetaTrainer(editor, TrainConfig(lr=1e-2, lr_lr=1e-2, c_edit=1.0, c_loc=1.0,
                                              c_base=1.0, accumulate=1))
    before, state, first, second = _two_steps(trainer, model)
    assert int(state["n_skipped"]) == 0
    # the learned weights start as the base model's: no base KL yet, then some
    assert float(first["base_kl"]) == 0.0 and float(second["base_kl"]) > 0.0
    # measured: 2.8553 -> 2.7107
    assert float(first["loss"]) == pytest.approx(2.8553, abs=1e-3)
    assert float(second["loss"]) == pytest.approx(2.7107, abs=1e-3)
    assert float(second["loss"]) < float(first["loss"]) - 0.1
    # the meta-loss adds c_base · KL(original ‖ meta-learned) to the edit and locality terms
    terms = float(second["edit_loss"]) + float(second["locality_kl"]) + float(second["base_kl"])
    assert float(second["loss"]) == pytest.approx(terms, rel=1e-6)
    params = state["editor"]["params"]
    for n in INNER:
        assert np.abs(np.asarray(params["inner_params"][n]) - before["inner_params"][n]).max() > 0
        assert float(params["edit_lrs"][n]) > 0.5  # a larger step helps this edit


# ----------------------------------------------------------------------------- evaluation
def test_ke_and_enn_evaluate_through_make_editor(model):
    results = {}
    for name, opts in (("ke", dict(hidden_dim=8, condition_dim=8)), ("enn", dict(edit_lr=0.0))):
        editor = make_editor(name, model, INNER, **opts)
        results[name] = evaluate_editor(model, editor, editor.init(jax.random.key(0)),
                                        model.params, REQUESTS, TOKENIZER, max_length=12,
                                        timed_edits=0)
    for r in results.values():
        assert r["n_examples"] == 3 and r["generality"] is not None
    # ENN with step size 0 and its initial (the base model's) weights edits nothing
    enn = results["enn"]
    assert enn["locality_kl"] == 0.0 and enn["drawdown"] == 0.0
    assert enn["edit_success"] == enn["pre_edit_success"]
    assert results["ke"]["locality_kl"] > 0.0  # a fresh KE does write into the weights


# ----------------------------------------------------------------------------- pipeline
def test_configs_build_their_editors_and_bad_keys_are_named(model):
    from mend_jax.pipeline import build_editor

    for alg, cls in (("ke", KE), ("enn", ENN)):
        cfg = load_config([f"alg={alg}"])
        assert cfg.alg.method == alg
        cfg = cfg.replace(**{"model.inner_params": INNER})
        assert type(build_editor(cfg, model)) is cls
    assert build_editor(load_config(["alg=ke"]).replace(**{"model.inner_params": INNER}),
                        model).config == KEConfig(hidden_dim=512, condition_dim=768)
    with pytest.raises(ConfigError, match=r"alg\.editor\.rank: unknown key; closest"):
        load_config(["alg=ke", "alg.editor.rank=4"])
    with pytest.raises(ConfigError, match=r"alg\.editor\.n_edit_steps=0: must be >= 1"):
        load_config(["alg=enn", "alg.editor.n_edit_steps=0"])
    with pytest.raises(ConfigError, match=r"alg\.train\.c_base=1\.0: only ENN"):
        load_config(["alg=ke", "+alg.train.c_base=1.0"])
    with pytest.raises(ConfigError, match=r"this run trains ke \(alg\.method\), so it has no enn"):
        load_config(["alg=ke", "eval.methods=[enn,ft]"])
    with pytest.raises(ConfigError, match=r"alg\.method='kee': expected one of"):
        load_config(["alg=ke", "alg.method=kee"])


def test_evaluate_all_reports_the_trained_editor_under_its_own_name(model, monkeypatch):
    from mend_jax import pipeline

    def fake_evaluate_editor(model_, editor, state, params, requests, tokenizer, **kw):
        return {"editor": editor, "state": state}

    monkeypatch.setattr(pipeline, "evaluate_editor", fake_evaluate_editor)
    cfg = load_config(["alg=ke", "alg.editor.hidden_dim=8", "alg.editor.condition_dim=8"])
    cfg = cfg.replace(**{"model.inner_params": INNER})
    editor = pipeline.build_editor(cfg, model)
    trained = {"params": "trained", "stats": {}}
    prep = pipeline.Prepared(model, None, {"test": REQUESTS}, {})
    calls = pipeline.evaluate_all(cfg, prep, editor, trained, methods=["mend", "untrained"])
    assert set(calls) == {"ke", "untrained"}
    assert calls["ke"]["editor"] is editor and calls["ke"]["state"] is trained
    assert calls["untrained"]["editor"] is editor and calls["untrained"]["state"] != trained
    with pytest.raises(ValueError, match="eval method 'enn': this run trained ke"):
        pipeline.evaluate_all(cfg, prep, editor, trained, methods=["enn"])


@pytest.mark.parametrize("name, opts", [("ke", dict(hidden_dim=8, condition_dim=8)),
                                        ("enn", dict(n_edit_steps=2, edit_lr=0.2))])
def test_ke_and_enn_artifacts_load_to_an_identical_state(model, tmp_path, name, opts):
    editor = make_editor(name, model, INNER, **opts)
    state = jax.tree.map(lambda x: x + 0.5, editor.init(jax.random.key(1)))  # not a fresh one
    out = save_editor(tmp_path / "editor", editor, state)
    loaded, loaded_state = load_editor(out, model)
    assert type(loaded) is type(editor) and loaded.config == editor.config
    assert loaded.layout == editor.layout
    assert jax.tree.structure(loaded_state) == jax.tree.structure(state)
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(loaded_state)):
        assert np.array_equal(np.asarray(a), np.asarray(b))


def test_eval_cli_reports_an_artifacts_editor_under_its_kind(model, monkeypatch):
    """`eval.py --editor DIR` on a KE artifact: "mend" in --methods stands for the folder's
    editor and the result is keyed "ke"; naming another trained kind is an error."""
    from mend_jax.cli import eval as eval_cli
    from mend_jax.cli.common import Loaded

    monkeypatch.setattr(eval_cli, "evaluate_editor",
                        lambda model_, editor, state, *a, **kw: {"editor": editor,
                                                                 "state": state})
    editor = make_editor("ke", model, INNER, hidden_dim=8, condition_dim=8)
    trained = {"params": "trained"}
    src = Loaded(model, TOKENIZER, editor, trained, 12, None, "some/editor")
    got = eval_cli._evaluate_editor_folder(src, REQUESTS, ["mend", "ft"], 1, 12)
    assert set(got) == {"ke", "ft"}
    assert got["ke"]["editor"] is editor and got["ke"]["state"] is trained
    assert got["ke"]["state"] is not got["ft"]["state"]
    with pytest.raises(ValueError, match="some/editor holds a ke editor"):
        eval_cli._evaluate_editor_folder(src, REQUESTS, ["enn"], 1, 12)


def test_preserved_keys_are_measured_once_per_base_model_and_fact_count(model):
    """`evaluation_state` measures the preserved facts' answer keys once per prepared base model
    and count (training's hook and the evaluation after it share the measurement); another count
    or another base model is measured anew."""
    from mend_jax import pipeline

    def setup(n):
        cfg = load_config([f"alg.editor.request_preserve={n}", "alg.editor.preserve_weight=1.0",
                           "model.max_length=12"])
        cfg = cfg.replace(**{"model.inner_params": INNER})
        editor = pipeline.build_editor(cfg, model)
        calls = []
        measure = editor.preserve_keys
        editor.preserve_keys = lambda *a: calls.append(1) or measure(*a)
        return cfg, editor, calls

    prep = pipeline.Prepared(model, TOKENIZER, {"train": REQUESTS}, {})
    cfg, editor, calls = setup(3)
    first = pipeline.evaluation_state(cfg, prep, editor, editor.init(jax.random.key(0)))
    want = jax.device_get(first["stats"]["preserved_keys"])
    for leaf in jax.tree.leaves(first["stats"]["preserved_keys"]):
        leaf.delete()   # as a training step that donates its state does
    fresh = editor.init(jax.random.key(1))
    again = pipeline.evaluation_state(cfg, prep, editor, fresh)
    assert len(calls) == 1
    for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(again["stats"]["preserved_keys"])):
        assert np.array_equal(np.asarray(a), np.asarray(b))
    assert float(jax.tree.leaves(want)[0]) > 0   # a count
    assert again["params"] is fresh["params"]   # the state's own, the keys added
    cfg2, editor2, calls2 = setup(2)
    pipeline.evaluation_state(cfg2, prep, editor2, editor2.init(jax.random.key(0)))
    other = pipeline.Prepared(model, TOKENIZER, {"train": REQUESTS}, {})
    pipeline.evaluation_state(cfg, other, editor, editor.init(jax.random.key(0)))
    assert (len(calls2), len(calls)) == (1, 2)
