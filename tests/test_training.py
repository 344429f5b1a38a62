"""Meta-training learns: held-out edit success rises well above the untrained editor's."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers

from mend_jax.editors import MEND, MENDConfig
from mend_jax.models import from_config
from mend_jax.training import MetaTrainer, TrainConfig

V, P = 40, 5  # vocab, prompt length


def synthetic_batch(rng, model_logits, params, n, n_loc=None):
    """Edit: random prompt -> random token; equivalent: same prompt, first token changed;
    locality: another random prompt labelled with the base model's own prediction."""
    prompts = rng.integers(1, V, (n, P))
    targets = rng.integers(1, V, (n,))

    def lm_batch(p, t):
        ids = np.concatenate([p, t[:, None]], 1).astype(np.int32)
        labels = np.full_like(ids, -100)
        labels[:, -1] = ids[:, -1]
        return {"input_ids": jnp.asarray(ids), "attention_mask": jnp.ones_like(jnp.asarray(ids)),
                "labels": jnp.asarray(labels)}

    outer_p = prompts.copy()
    outer_p[:, 0] = rng.integers(1, V, (n,))
    n_loc = n_loc or n
    loc_p = rng.integers(1, V, (n_loc, P))
    loc_ids = jnp.asarray(np.concatenate([loc_p, np.zeros((n_loc, 1))], 1).astype(np.int32))
    pred = np.asarray(jnp.argmax(model_logits(params, loc_ids)[:, P - 1], -1))
    return {"edit_inner": lm_batch(prompts, targets), "edit_outer": lm_batch(outer_p, targets),
            "loc": lm_batch(loc_p, pred)}


@functools.cache
def tiny_model_and_batch(n: int):
    """A 1-layer GPT-2 (d=16) and a synthetic batch of n edits (built once per n: immutable)."""
    cfg = transformers.GPT2Config(vocab_size=V, n_positions=8, n_embd=16, n_layer=1, n_head=2)
    model = from_config(cfg, seed=0)
    logits = jax.jit(lambda p, ids: model.logits(p, ids))
    return model, synthetic_batch(np.random.default_rng(0), logits, model.params, n)


@functools.cache
def meta_trained():
    """A 2-layer GPT-2 and a MEND editor meta-trained on 200 single synthetic edits (built once
    per process, shared by the tests that need a trained editor): (model, trainer, state)."""
    cfg = transformers.GPT2Config(vocab_size=V, n_positions=8, n_embd=32, n_layer=2, n_head=2,
                                  initializer_range=0.2)
    model = from_config(cfg, seed=0)
    editor = MEND(model, config=MENDConfig(rank=32, edit_lr=1e-4))
    trainer = MetaTrainer(editor, TrainConfig(lr=1e-3, lr_lr=1e-2, c_edit=1.0, c_loc=1.0,
                                              accumulate=1))
    logits = jax.jit(lambda p, ids: model.logits(p, ids))
    rng = np.random.default_rng(0)
    state = trainer.init(jax.random.key(0))
    step = jax.jit(trainer.step, donate_argnums=0)
    for _ in range(200):
        batch = synthetic_batch(rng, logits, model.params, 1, n_loc=8)
        state, _ = step(state, model.params, batch)
    return model, trainer, state


def test_meta_training_raises_held_out_edit_success():
    model, trainer, state = meta_trained()
    logits = jax.jit(lambda p, ids: model.logits(p, ids))
    # 64 held-out single edits, each evaluated on its own (vmapped over the leading axis)
    held_out = synthetic_batch(np.random.default_rng(123), logits, model.params, 64)
    held_out = jax.tree.map(lambda x: x[:, None], held_out)
    evaluate = jax.jit(lambda s, p, b: jax.tree.map(
        jnp.mean, jax.vmap(trainer.eval_step, in_axes=(None, None, 0))(s, p, b)))
    before = evaluate(trainer.init(jax.random.key(0))["editor"], model.params, held_out)
    after = evaluate(state["editor"], model.params, held_out)
    assert float(before["edit_acc"]) < 0.2
    # measured: 0.016 -> 1.00, locality KL 0.0215 (README)
    assert float(after["edit_acc"]) >= 0.95
    assert float(after["locality_kl"]) < 0.04
    assert int(state["n_skipped"]) == 0


def test_non_finite_step_is_skipped_and_counted():
    model, batch = tiny_model_and_batch(4)
    trainer = MetaTrainer(MEND(model, config=MENDConfig(rank=8)), TrainConfig(accumulate=1))
    state = trainer.init(jax.random.key(0))
    bad = jax.tree.map(lambda x: x, model.params)
    k = bad["transformer"]["h_0"]["mlp"]["c_fc"]["kernel"]
    bad["transformer"]["h_0"]["mlp"]["c_fc"] = dict(bad["transformer"]["h_0"]["mlp"]["c_fc"],
                                                    kernel=k.at[0, 0].set(jnp.nan))
    new, metrics = jax.jit(trainer.step)(state, bad, batch)
    assert int(new["n_skipped"]) == 1 and float(metrics["skipped"]) == 1.0
    for a, b in zip(jax.tree.leaves(new["editor"]), jax.tree.leaves(state["editor"])):
        np.testing.assert_array_equal(a, b)


@pytest.mark.slow  # about 30 s: run by .ci/run's slow pass
def test_bfloat16_base_model_and_remat_blocks():
    """Memory levers: bf16 base weights with an f32 editor; rematerialised blocks give the same
    step as plain ones."""
    model, batch = tiny_model_and_batch(2)
    runs = {}
    for name, m in (("plain", model), ("remat", model.with_remat(True))):
        trainer = MetaTrainer(MEND(m, config=MENDConfig(rank=8)), TrainConfig(accumulate=1))
        _, metrics = jax.jit(trainer.step)(trainer.init(jax.random.key(0)), m.params, batch)
        runs[name] = metrics
    for k in ("loss", "edit_loss", "locality_kl"):
        np.testing.assert_allclose(runs["plain"][k], runs["remat"][k], rtol=1e-5)

    bf16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), model.params)
    trainer = MetaTrainer(MEND(model, config=MENDConfig(rank=8)), TrainConfig(accumulate=1))
    state, metrics = jax.jit(trainer.step)(trainer.init(jax.random.key(0)), bf16, batch)
    assert np.isfinite(float(metrics["loss"]))
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state["editor"]))
    new = jax.jit(trainer.editor.edit)(state["editor"], bf16, batch["edit_inner"])
    assert new["transformer"]["h_0"]["mlp"]["c_fc"]["kernel"].dtype == jnp.bfloat16


def test_gradient_accumulation_applies_the_mean_every_k_steps():
    model, batch = tiny_model_and_batch(2)
    trainer = MetaTrainer(MEND(model, config=MENDConfig(rank=8)),
                          TrainConfig(lr=1e-2, lr_lr=1e-2, accumulate=2))
    step = jax.jit(trainer.step)      # no donation: state0 and state1 are read afterwards
    state0 = trainer.init(jax.random.key(0))
    state1, _ = step(state0, model.params, batch)
    state2, _ = step(state1, model.params, batch)
    p0, p1, p2 = (s["editor"]["params"]["edit_lrs"] for s in (state0, state1, state2))
    name = next(iter(p0))
    assert float(p1[name]) == float(p0[name])      # first micro-step: accumulated only
    assert float(p2[name]) != float(p0[name])      # second: the averaged update is applied

    # Without normalisation statistics both micro-steps see the same gradient g, so their mean
    # is g and the update is exactly one un-accumulated step's (a sum, 2g, is not: measured
    # 1.7e-3 apart against 1e-9 for the mean).
    editor = MEND(model, config=MENDConfig(rank=8, norm=False))
    params = {}
    for accumulate in (1, 2):
        trainer = MetaTrainer(editor, TrainConfig(lr=1e-2, lr_lr=1e-2, accumulate=accumulate))
        state, step = trainer.init(jax.random.key(0)), jax.jit(trainer.step)
        for _ in range(accumulate):
            state, _ = step(state, model.params, batch)
        params[accumulate] = state["editor"]["params"]
    for a, b in zip(jax.tree.leaves(params[1]), jax.tree.leaves(params[2])):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-7)


def test_edit_on_both_averages_the_outer_and_inner_edit_loss():
    model, batch = tiny_model_and_batch(2)
    editor = MEND(model, config=MENDConfig(rank=8))
    state = editor.init(jax.random.key(0))
    losses = {}
    for edit_on in ("outer", "both"):
        trainer = MetaTrainer(editor, TrainConfig(accumulate=1, edit_on=edit_on))
        _, (m, _) = jax.jit(trainer.loss)(state["params"], state["stats"], model.params, batch)
        losses[edit_on] = float(m["edit_loss"])
    # "inner" alone: the outer batch replaced by the edit batch itself
    inner_only = dict(batch, edit_outer=batch["edit_inner"])
    trainer = MetaTrainer(editor, TrainConfig(accumulate=1))
    _, (m, _) = jax.jit(trainer.loss)(state["params"], state["stats"], model.params,
                                      inner_only)
    # every row has one target token, so the mean over both is the mean of the two means
    np.testing.assert_allclose(losses["both"], (losses["outer"] + float(m["edit_loss"])) / 2,
                               rtol=1e-5)
    assert losses["both"] != losses["outer"]
    with pytest.raises(ValueError, match="edit_on"):
        TrainConfig(edit_on="rephrase")


def test_cosine_schedule_decays_the_editor_learning_rates_to_zero():
    model, batch = tiny_model_and_batch(2)
    trainer = MetaTrainer(MEND(model, config=MENDConfig(rank=8)),
                          TrainConfig(lr=1e-2, lr_lr=1e-2, accumulate=1, lr_schedule="cosine",
                                      decay_steps=2))
    step = jax.jit(trainer.step)      # no donation: every state is read afterwards
    states = [trainer.init(jax.random.key(0))]
    for _ in range(3):
        states.append(step(states[-1], model.params, batch)[0])
    moved = [any(float(jnp.abs(a - b).max()) > 0 for a, b in zip(
        jax.tree.leaves(s0["editor"]["params"]), jax.tree.leaves(s1["editor"]["params"])))
        for s0, s1 in zip(states, states[1:])]
    # steps 0 and 1 use lr > 0; after decay_steps updates the rate is 0 and nothing moves
    assert moved == [True, True, False]
    with pytest.raises(ValueError, match="decay_steps"):
        TrainConfig(lr_schedule="cosine")


def test_padded_edit_rows_change_nothing():
    """Batched meta-training pads the k edit rows to a bucket with label-free rows: the loss,
    its gradient and the statistics equal those of the unpadded k-row batch."""
    model, batch = tiny_model_and_batch(4)
    k = 3
    unpadded = {part: ({key: v[:k] for key, v in b.items()} if part != "loc" else b)
                for part, b in batch.items()}
    padded = {part: dict(b) for part, b in batch.items()}
    for part in ("edit_inner", "edit_outer"):
        padded[part]["labels"] = padded[part]["labels"].at[k:].set(-100)
    editor = MEND(model, config=MENDConfig(rank=8))
    state = editor.init(jax.random.key(0))
    trainer = MetaTrainer(editor, TrainConfig(accumulate=1, edit_on="both"))
    fn = jax.jit(jax.value_and_grad(trainer.loss, has_aux=True))
    (l_pad, (m_pad, s_pad)), g_pad = fn(state["params"], state["stats"], model.params, padded)
    (l_ref, (m_ref, s_ref)), g_ref = fn(state["params"], state["stats"], model.params, unpadded)
    np.testing.assert_allclose(float(l_pad), float(l_ref), rtol=1e-5)
    assert float(m_pad["n_edits"]) == k and float(m_pad["edit_acc"]) == float(m_ref["edit_acc"])
    for a, b in zip(jax.tree.leaves((g_pad, s_pad)), jax.tree.leaves((g_ref, s_ref))):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-7)


def test_sampled_n_edits_batches():
    from mend_jax.data import EditRequest
    from mend_jax.loop import batch_at, sample_n_edits
    from mend_jax.offline import build_word_tokenizer

    ks = [sample_n_edits(np.random.default_rng([0, s]), 100, "log_uniform") for s in range(400)]
    assert {rows for _, rows in ks} == {1, 4, 16, 64, 100}
    assert all(k <= rows and (rows == 1 or k > rows // 4) for k, rows in ks)
    assert min(k for k, _ in ks) == 1 and max(k for k, _ in ks) == 100
    assert sample_n_edits(np.random.default_rng(0), 25, "fixed") == (25, 25)

    reqs = [EditRequest(prompt=f"fact {i} is", target_new=f"new{i}", target_true=f"old{i}",
                        rephrases=[f"f {i} is"],
                        loc_prompt=f"other {i} is", loc_target=f"old{i}") for i in range(120)]
    tok = build_word_tokenizer([f"{r.prompt} {r.target_new} {r.rephrases[0]} {r.loc_prompt} "
                                f"{r.loc_target}" for r in reqs])
    for step in range(40):
        b = batch_at(reqs, tok, seed=0, step=step, batch_size=10, n_edits=100, seq2seq=False,
                     max_length=8, n_edits_dist="log_uniform")
        k, rows = sample_n_edits(np.random.default_rng([0, step]), 100, "log_uniform")
        for part in ("edit_inner", "edit_outer"):
            labelled = np.asarray((b[part]["labels"] != -100).any(-1))
            assert labelled.shape == (rows,) and labelled.sum() == k and labelled[:k].all()
        assert b["loc"]["input_ids"].shape[0] == 10


def _word_tokenizer():
    """A word tokenizer whose ids are the model's: "w04" .. "w39" are ids 4 .. 39 (after the
    four special tokens), so text requests reach the token rows the editor was trained on."""
    from mend_jax.offline import build_word_tokenizer

    tok = build_word_tokenizer([" ".join(f"w{i:02d}" for i in range(4, V))])
    assert tok.convert_tokens_to_ids(["w04", "w39"]) == [4, 39]
    return tok


def test_a_trained_edit_continues_each_prompt_with_its_target_as_evaluation_scores_it():
    """`mend_jax.edit` on text, then greedy generation: a prompt continues with its target
    exactly when the evaluation (its own edit, teacher-forced argmax of every target token)
    counts the request as edited."""
    import mend_jax
    from mend_jax.data import EditRequest
    from mend_jax.evaluation import evaluate_editor

    model, trainer, state = meta_trained()
    editor, editor_state, tok = trainer.editor, state["editor"], _word_tokenizer()
    rng = np.random.default_rng(7)

    def words(n):
        return " ".join(f"w{i:02d}" for i in rng.integers(4, V, n))

    # held-out edits: one-token targets as in training, and two-token ones it never saw
    requests = [EditRequest(prompt=words(P), target_new=words(1 + i % 2), target_true=None,
                            rephrases=(), loc_prompt=words(P), loc_target=words(1))
                for i in range(16)]
    greedy = []
    for r in requests:
        new = mend_jax.edit(model, model.params, editor, editor_state, [r.prompt],
                            [r.target_new], tokenizer=tok)
        target = tok([r.target_new])["input_ids"][0]
        prompt = jnp.asarray(tok([r.prompt])["input_ids"])
        out = mend_jax.generate(model, new, prompt, max_new_tokens=len(target))
        greedy.append(np.asarray(out)[0].tolist() == target)

    def edit_success(rows):
        return evaluate_editor(model, editor, editor_state, model.params, rows, tok,
                               max_length=P + 2, seed=None, timed_edits=0)["edit_success"]

    # measured: every one-token target lands, no two-token one (training never asked for it)
    assert greedy == [True, False] * 8
    hits = [r for r, ok in zip(requests, greedy) if ok]
    misses = [r for r, ok in zip(requests, greedy) if not ok]
    assert edit_success(hits) == 1.0
    assert edit_success(misses) == 0.0


def test_adafactor_keeps_a_factored_state_and_trains_the_editor():
    cfg = transformers.GPT2Config(vocab_size=V, n_positions=8, n_embd=32, n_layer=1, n_head=2)
    model = from_config(cfg, seed=0)
    batch = synthetic_batch(np.random.default_rng(1), jax.jit(model.logits), model.params, 2)
    editor = MEND(model, config=MENDConfig(rank=160))     # [u; δ] rows 32 + 128 wide
    sizes, losses = {}, {}
    for name in ("adam", "adafactor"):
        trainer = MetaTrainer(editor, TrainConfig(lr=1e-3, accumulate=1, optimizer=name))
        state = trainer.init(jax.random.key(0))
        sizes[name] = sum(x.size for x in jax.tree.leaves(state["opt_state"]))
        step = jax.jit(trainer.step)
        losses[name] = []
        for _ in range(15):
            state, metrics = step(state, model.params, batch)
            losses[name].append(float(metrics["loss"]))
    n_params = sum(x.size for x in jax.tree.leaves(editor.init(jax.random.key(0))["params"]))
    assert sizes["adam"] >= 2 * n_params        # two moments of every parameter
    assert sizes["adafactor"] < 0.1 * n_params  # rows + columns of the 160x160 matrices
    drop = {k: v[0] - v[-1] for k, v in losses.items()}
    assert drop["adafactor"] > 0.01 and drop["adafactor"] > 0.4 * drop["adam"]
    with pytest.raises(ValueError, match="optimizer"):
        TrainConfig(optimizer="sgd")


def test_ema_averages_the_editor_parameters_and_is_what_selected_returns():
    model, batch = tiny_model_and_batch(2)
    d = 0.7
    trainer = MetaTrainer(MEND(model, config=MENDConfig(rank=8)),
                          TrainConfig(lr=1e-2, accumulate=1, ema=d))
    step = jax.jit(trainer.step)
    state = trainer.init(jax.random.key(0))
    expected = state["editor"]["params"]
    for _ in range(3):
        state, _ = step(state, model.params, batch)
        expected = jax.tree.map(lambda e, p: d * e + (1 - d) * p, expected,
                                state["editor"]["params"])
    chosen = trainer.selected(state)
    assert chosen["stats"] is state["editor"]["stats"]
    for e, got in zip(jax.tree.leaves(expected), jax.tree.leaves(chosen["params"])):
        np.testing.assert_allclose(got, e, rtol=1e-6, atol=1e-7)
    moved = max(float(jnp.abs(a - b).max()) for a, b in zip(
        jax.tree.leaves(chosen["params"]), jax.tree.leaves(state["editor"]["params"])))
    assert moved > 1e-4                     # the average lags the trained parameters
    plain = MetaTrainer(trainer.editor, TrainConfig(lr=1e-2, accumulate=1))
    assert "ema" not in plain.init(jax.random.key(0))
    with pytest.raises(ValueError, match="ema"):
        TrainConfig(ema=1.0)


def _loop_setup(tmp_path):
    """(tokenizer, a 2-layer GPT-2, six zsRE requests) for a few steps of the training loop."""
    import json

    from mend_jax.data import load_requests
    from mend_jax.offline import build_word_tokenizer

    tok = build_word_tokenizer(["The capital of France is Paris", "France's capital city is",
                                "who wrote Hamlet Shakespeare", "Lyon Rome Berlin"])
    cfg = transformers.GPT2Config(vocab_size=len(tok), n_positions=16, n_embd=16, n_layer=2,
                                  n_head=2, bos_token_id=tok.bos_token_id,
                                  eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    model = from_config(cfg, seed=0, tokenizer=tok)
    record = {"src": "The capital of France is", "answers": ["Paris"],
              "rephrase": "France's capital city is", "loc": "who wrote Hamlet",
              "loc_ans": "Shakespeare"}
    path = tmp_path / "train.json"
    path.write_text(json.dumps([{**record, "alt": alt} for alt in ["Lyon", "Rome", "Berlin"] * 2]))
    requests = load_requests(path, "zsre")
    return tok, model, requests


def test_the_loop_validates_and_saves_the_averaged_editor(tmp_path):
    from mend_jax.checkpoint import Checkpoints, load_best_editor
    from mend_jax.loop import LoopConfig, train_editor

    tok, model, requests = _loop_setup(tmp_path)
    trainer = MetaTrainer(MEND(model, config=MENDConfig(rank=8)),
                          TrainConfig(lr=1e-2, accumulate=1, ema=0.7))
    run = tmp_path / "run"
    train_editor(trainer, model.params, requests[:4], requests[4:], tok, run_dir=run,
                 max_length=16, seed=0, progress=False,
                 cfg=LoopConfig(max_steps=3, batch_size=2, val_every=3, val_batches=1,
                                save_every=3))
    ckpt = Checkpoints(run)
    state, _ = ckpt.restore_latest(trainer.init(jax.random.key(1)))
    ckpt.close()
    best, _ = load_best_editor(run, trainer.editor.init(jax.random.key(1)))
    for saved, ema in zip(jax.tree.leaves(best["params"]), jax.tree.leaves(state["ema"])):
        np.testing.assert_array_equal(saved, ema)
    assert any(not np.array_equal(e, r) for e, r in zip(
        jax.tree.leaves(state["ema"]), jax.tree.leaves(state["editor"]["params"])))


@pytest.mark.slow  # about 30 s: run by .ci/run's slow pass
def test_the_loop_trains_with_the_preserved_keys_it_was_given_and_resumes_with_them(tmp_path):
    """`train_editor(prepare_editor=...)` maps the fresh editor state before step 0 (the
    pipeline fills the preserved keys with it): the preserved keys reach the checkpoints
    unchanged by training, and a resumed run restores them instead of preparing again."""
    from mend_jax.checkpoint import Checkpoints
    from mend_jax.loop import LoopConfig, train_editor

    tok, model, requests = _loop_setup(tmp_path)
    editor = MEND(model, config=MENDConfig(rank=8, project_keys=True, request_preserve=3,
                                           preserve_weight=2.0))
    trainer = MetaTrainer(editor, TrainConfig(lr=1e-2))
    calls = []

    def prepare(state):
        calls.append(1)
        kept = jax.tree.map(lambda x: x + 0.5, state["stats"]["preserved_keys"])
        return {**state, "stats": {**state["stats"], "preserved_keys": kept}}

    def run(steps, resume):
        train_editor(trainer, model.params, requests[:4], requests[4:], tok, run_dir=tmp_path / "r",
                     max_length=16, seed=0, progress=False, resume=resume, prepare_editor=prepare,
                     cfg=LoopConfig(max_steps=steps, batch_size=2, val_every=100, val_batches=1,
                                    save_every=1))
        ckpt = Checkpoints(tmp_path / "r")
        state, _ = ckpt.restore_latest(trainer.init(jax.random.key(1)))
        ckpt.close()
        return state

    state = run(1, False)
    assert len(calls) == 1
    for leaf in jax.tree.leaves(state["editor"]["stats"]["preserved_keys"]):
        np.testing.assert_array_equal(np.asarray(leaf), 0.5)
    # the running second moments did train (the preserved keys are not among them)
    assert any(float(v["count"]) > 0 for v in state["editor"]["stats"]["second_moments"].values())
    state = run(2, True)
    assert len(calls) == 1 and int(state["step"]) == 2
    for leaf in jax.tree.leaves(state["editor"]["stats"]["preserved_keys"]):
        np.testing.assert_array_equal(np.asarray(leaf), 0.5)
