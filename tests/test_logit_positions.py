"""Logits at the labelled positions only: every loss, metric, capture and meta-gradient equals
the full-logits computation, on every decoder-only architecture's output head."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers

from mend_jax.capture import capture, labelled_logits, pseudo_gradient
from mend_jax.editors import MEND, MENDConfig
from mend_jax.metrics import (
    IGNORE,
    POSITIONS,
    logit_positions,
    masked_nll,
    positions_width,
    sequence_correct,
    sequence_nll,
)
from mend_jax.models import from_config
from mend_jax.training import MetaTrainer, TrainConfig

V, T = 61, 12

CONFIGS = {
    "gpt2": transformers.GPT2Config(vocab_size=V, n_positions=16, n_embd=16, n_layer=1,
                                    n_head=2),
    "gpt_neo": transformers.GPTNeoConfig(vocab_size=V, max_position_embeddings=16,
                                         hidden_size=16, num_layers=1, num_heads=2,
                                         attention_types=[[["local"], 1]],
                                         window_size=4),
    "gptj": transformers.GPTJConfig(vocab_size=V, n_positions=16, n_embd=16, n_layer=1,
                                    n_head=2, rotary_dim=4),
    "llama_untied": transformers.LlamaConfig(vocab_size=V, max_position_embeddings=16,
                                             hidden_size=16, intermediate_size=32,
                                             num_hidden_layers=1, num_attention_heads=2,
                                             tie_word_embeddings=False),
    "llama_tied": transformers.LlamaConfig(vocab_size=V, max_position_embeddings=16,
                                           hidden_size=16, intermediate_size=32,
                                           num_hidden_layers=1, num_attention_heads=2,
                                           tie_word_embeddings=True),
}


def _batch(model, seed=0):
    """Rows with answers of 3, 2 and 1 tokens at different places (one row right-padded); the
    first row's answer is the base model's own greedy prediction, so `sequence_correct` is
    True there and False elsewhere (not the same value for every row)."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, V, (3, T)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[2, 9:] = 0
    for t in range(5, 8):  # greedy continuation for row 0
        logits = model.logits(model.params, jnp.asarray(ids[:1, :t]))
        ids[0, t] = int(jnp.argmax(logits[0, -1]))
    labels = np.full_like(ids, IGNORE)
    labels[0, 5:8] = ids[0, 5:8]
    labels[1, 10:12] = ids[1, 10:12]
    labels[2, 3] = ids[2, 3]
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _with_positions(batch):
    return {**batch, POSITIONS: logit_positions(batch["labels"])}


def _dev(batch):
    return {k: jnp.asarray(v) for k, v in batch.items()}


@pytest.mark.parametrize("arch", sorted(CONFIGS))
def test_labelled_positions_give_the_full_logits_metrics_and_capture(arch):
    model = from_config(CONFIGS[arch], seed=0)
    full, gathered = _dev(_batch(model)), _dev(_with_positions(_batch(model)))
    logits, labels = labelled_logits(model, model.params, full)
    logits_p, labels_p = labelled_logits(model, model.params, gathered)
    assert logits.shape == (3, T, V)
    assert logits_p.shape == (3, 4 + 1, V)  # widths round up to a power of two, plus one
    # the gathered logits are the full ones at the chosen positions
    pos = np.asarray(gathered[POSITIONS])
    for i in range(3):
        for j, p in enumerate(pos[i][pos[i] >= 0]):
            np.testing.assert_allclose(logits_p[i, j], logits[i, p], rtol=1e-5, atol=1e-6)
    correct = sequence_correct(logits, labels, True)
    assert list(np.asarray(correct)) == [True, False, False]
    np.testing.assert_array_equal(sequence_correct(logits_p, labels_p, True), correct)
    np.testing.assert_allclose(masked_nll(logits_p, labels_p, True),
                               masked_nll(logits, labels, True), rtol=1e-6)
    np.testing.assert_allclose(sequence_nll(logits_p, labels_p, True),
                               sequence_nll(logits, labels, True), rtol=1e-6)
    # a view no narrower than the sequence is not taken: the full logits
    wide = {**gathered, POSITIONS: jnp.asarray(logit_positions(_batch(model)["labels"], T - 1))}
    assert labelled_logits(model, model.params, wide)[0].shape == (3, T, V)
    # every dense weight of the (only, hence last) block: the position-local ones (MLP, the
    # attention's query and output projections) are captured at the positions alone, the rest
    # (GPT-2's fused c_attn, the separate k and v) at every token
    names = [n.hf for n in model.names.names if n.layout in ("linear", "conv1d")
             and n.tied_to is None and not n.hf.startswith("lm_head")]
    local = {n for n in names if model.names.lookup(n).local}
    assert local and local != set(names), (local, names)
    loss, cap, _ = capture(model, model.params, full, names)
    loss_p, cap_p, _ = capture(model, model.params, gathered, names)
    np.testing.assert_allclose(loss_p, loss, rtol=1e-6)
    rows = (pos + np.arange(3)[:, None] * T)[pos >= 0]    # the positions' rows of the B*T
    off = np.setdiff1d(np.arange(3 * T), rows)
    for n in names:
        if n not in local:
            np.testing.assert_allclose(cap_p[n].output_grads, cap[n].output_grads, rtol=1e-5,
                                       atol=1e-9)
            np.testing.assert_array_equal(cap_p[n].layer_inputs, cap[n].layer_inputs)
            # δ reaches the other tokens through the attention: they must be kept
            assert float(jnp.abs(cap[n].output_grads[off]).max()) > 0, n
            continue
        # position-local: δ is exactly zero off the positions, which the gathered capture drops
        assert float(jnp.abs(cap[n].output_grads[off]).max()) == 0.0, n
        valid = (pos >= 0).reshape(-1)
        assert cap_p[n].output_grads.shape[0] == pos.size < 3 * T
        np.testing.assert_allclose(cap_p[n].output_grads[valid], cap[n].output_grads[rows],
                                   rtol=1e-5, atol=1e-9)
        np.testing.assert_array_equal(cap_p[n].layer_inputs[valid], cap[n].layer_inputs[rows])
        assert float(jnp.abs(cap_p[n].layer_inputs[~valid]).max()) == 0.0
        for mask in ("token_mask", "answer_mask"):
            np.testing.assert_array_equal(getattr(cap_p[n], mask)[valid],
                                          getattr(cap[n], mask)[rows], err_msg=mask)
            assert float(getattr(cap_p[n], mask)[~valid].max()) == 0.0
        np.testing.assert_allclose(
            pseudo_gradient(cap_p[n].layer_inputs, cap_p[n].output_grads, cap_p[n].token_mask),
            pseudo_gradient(cap[n].layer_inputs, cap[n].output_grads, cap[n].token_mask),
            rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("edit_on", ["outer", "both"])
def test_meta_loss_and_editor_gradient_are_unchanged_by_labelled_positions(edit_on):
    model = from_config(CONFIGS["gpt2"], seed=0)
    inner, outer, loc = _batch(model, 0), _batch(model, 1), _batch(model, 2)
    outer["labels"] = np.where(inner["labels"] != IGNORE, outer["input_ids"], IGNORE)
    width = positions_width(inner["labels"], outer["labels"])
    gathered = {"edit_inner": {**inner, POSITIONS: logit_positions(inner["labels"], width)},
                "edit_outer": {**outer, POSITIONS: logit_positions(outer["labels"], width)},
                "loc": loc}
    full = {"edit_inner": inner, "edit_outer": outer, "loc": loc}
    editor = MEND(model, config=MENDConfig(rank=8))
    state = editor.init(jax.random.key(0))
    # move the editor off the identity so the gradient flows through a real edit
    state["params"] = jax.tree.map(lambda x: x + 0.05 * jnp.sin(jnp.arange(x.size).reshape(
        x.shape)), state["params"])
    trainer = MetaTrainer(editor, TrainConfig(accumulate=1, edit_on=edit_on, lr=1e-3))
    grad = jax.jit(jax.value_and_grad(trainer.loss, has_aux=True))
    results = [grad(state["params"], state["stats"], model.params,
                    jax.tree.map(jnp.asarray, b)) for b in (full, gathered)]
    (loss, (m, _)), g = results[0]
    (loss_p, (m_p, _)), g_p = results[1]
    assert float(m["edit_loss"]) > 0 and float(m["locality_kl"]) > 0
    for key in ("loss", "edit_loss", "edit_acc", "locality_kl", "pre_edit_loss", "n_edits"):
        np.testing.assert_allclose(m_p[key], m[key], rtol=2e-5, atol=1e-8, err_msg=key)
    leaves, leaves_p = jax.tree.leaves(g), jax.tree.leaves(g_p)
    assert any(float(jnp.abs(x).max()) > 0 for x in leaves)
    for a, b in zip(leaves, leaves_p, strict=True):
        np.testing.assert_allclose(b, a, rtol=2e-4, atol=1e-7)


def test_logit_positions_on_the_host():
    labels = np.full((2, 6), IGNORE)
    labels[0, 2:5] = 7
    labels[1, 5] = 3
    np.testing.assert_array_equal(logit_positions(labels), [[1, 2, 3, -1], [4, -1, -1, -1]])
    np.testing.assert_array_equal(logit_positions(labels, 3), [[1, 2, 3], [4, -1, -1]])
    assert positions_width(labels, labels[1:]) == 4
    with pytest.raises(ValueError, match="3 counted labels, more than the width 2"):
        logit_positions(labels, 2)


def test_a_model_without_an_output_head_refuses_positions():
    cfg = transformers.BertConfig(vocab_size=V, hidden_size=16, num_hidden_layers=1,
                                  num_attention_heads=2, intermediate_size=32, num_labels=2,
                                  architectures=["BertForSequenceClassification"])
    model = from_config(cfg, seed=0)
    ids = jnp.ones((1, 4), jnp.int32)
    with pytest.raises(ValueError, match="one output head"):
        model.logits(model.params, ids, jnp.ones_like(ids), positions=jnp.zeros((1, 2),
                                                                                jnp.int32))


def test_a_run_uses_one_positions_width_that_fits_every_target():
    from mend_jax.data import EditRequest, tokenize_pairs
    from mend_jax.data.batching import target_lengths
    from mend_jax.loop import batch_at, label_width
    from mend_jax.offline import build_tokenizer

    words = ["Paris", "Lyon", "Ouagadougou", "Saint-Pierre-et-Miquelon", "Zürich", "東京",
             "Bern", "Oslo"]
    texts = [f"The capital of {w} is {w}" for w in words]
    tok = build_tokenizer("bpe", texts, vocab_size=300)
    reqs = [EditRequest(f"The capital of {w} is", words[(i + 1) % len(words)], w,
                        (f"What is the capital of {w}?",), "The capital of Oslo is", "Oslo")
            for i, w in enumerate(words)]
    labels = tokenize_pairs(tok, [r.prompt for r in reqs], [r.target_new for r in reqs],
                            seq2seq=False, max_length=40)["labels"]
    lengths = target_lengths(tok, [r.target_new for r in reqs], 40)
    assert lengths == list((labels != IGNORE).sum(1))
    assert max(lengths) > 4  # the long names span several tokens
    width = label_width(reqs, tok, max_length=40, seq2seq=False)
    assert width == max(lengths)
    assert label_width(reqs, tok, max_length=40, seq2seq=True) is None
    shapes = set()
    for step in range(6):  # one short target per batch: the batch's own width would be smaller
        b = batch_at(reqs, tok, seed=0, step=step, batch_size=2, n_edits=1, seq2seq=False,
                     max_length=40, positions_width=width)
        for part in ("edit_inner", "edit_outer"):
            pos = np.asarray(b[part][POSITIONS])
            lab = np.asarray(b[part]["labels"])
            shapes.add(pos.shape)
            # exactly the positions that predict a counted label
            for i in range(len(pos)):
                np.testing.assert_array_equal(pos[i][pos[i] >= 0],
                                              np.flatnonzero(lab[i, 1:] != IGNORE))
    assert shapes == {(1, width)}


def test_training_with_the_keys_second_moment_counts_every_real_token():
    """`project_keys` keeps E[u uᵀ] over every real token, δ = 0 or not: a training edit keeps
    the rows the position-local capture drops, so positions change nothing there."""
    model = from_config(CONFIGS["gpt2"], seed=0)
    name = model.default_inner_params()[-1]            # the last block's MLP: position-local
    assert model.names.lookup(name).local
    batch = _dev(_batch(model))
    gathered = _dev(_with_positions(_batch(model)))
    editor = MEND(model, [name], MENDConfig(rank=8, project_keys=True))
    state = editor.init(jax.random.key(0))
    key = name.replace(".", "_")
    counts = []
    for b in (batch, gathered):
        _, stats, _ = editor.edit_with_stats(state, model.params, b, train=True)
        counts.append(float(stats["second_moments"][key]["count"]))
    assert counts == [float(batch["attention_mask"].sum())] * 2
