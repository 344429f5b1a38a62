"""Metric specifications with quoted values: every counted token must be right, probes are
weighted per request, drawdown is accuracy lost (pre − post), not gained."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mend_jax.metrics import IGNORE, sequence_correct


def one_hot_logits(predicted: list[list[int]], vocab: int = 5) -> jax.Array:
    return jax.nn.one_hot(jnp.asarray(predicted), vocab) * 10.0


def test_a_target_is_correct_only_when_every_token_is():
    # seq2seq alignment (no shift): rows predict [1, 2, 3]
    logits = one_hot_logits([[1, 2, 3]] * 4)
    labels = jnp.asarray([[1, 2, 3],            # all right
                          [1, 4, 3],            # one of three wrong
                          [IGNORE, 2, 4],       # the one counted-wrong token decides
                          [IGNORE, IGNORE, IGNORE]])  # nothing counted: not a success
    assert sequence_correct(logits, labels, shift=False).tolist() == [True, False, False, False]
    # decoder-only: logits at t predict the label at t+1
    shifted = jnp.asarray([[IGNORE, 1, 2], [IGNORE, 1, 9]])
    assert sequence_correct(logits[:2], shifted, shift=True).tolist() == [True, False]


def test_probe_accuracy_is_weighted_per_request():
    from mend_jax.evaluation import _probe_accuracy

    # 1 group, 2 requests, 3 probe rows each; request 0 has one real probe (then 2 fillers),
    # request 1 has three; a request without the probe (weights 0) does not count.
    correct = np.array([[1, 0, 0, 1, 1, 0]])
    weights = np.array([[[1, 0, 0], [1, 1, 1]]], np.float32)
    assert _probe_accuracy(correct, weights) == pytest.approx((1.0 + 2 / 3) / 2)
    weights_none = np.array([[[0, 0, 0], [1, 1, 1]]], np.float32)
    assert _probe_accuracy(correct, weights_none) == pytest.approx(2 / 3)
    assert _probe_accuracy(correct, None) is None


class ReplaceParams:
    """An 'editor' whose edit returns fixed parameters, whatever the request."""

    def __init__(self, model):
        self.model = model

    def init(self, params):
        return {"params": params}

    def edit(self, state, model_params, batch):
        return state["params"]


def test_drawdown_is_accuracy_lost_on_unrelated_facts():
    """Base: a random model that knows no locality fact. 'Edited': the same model fine-tuned to
    know them all. The edit gained locality accuracy, so drawdown = pre − post = −1."""
    import transformers

    from mend_jax.data import tokenize_pairs
    from mend_jax.editors import FineTune, FTConfig
    from mend_jax.evaluation import evaluate_editor
    from mend_jax.models import from_config
    from mend_jax.offline import build_word_tokenizer
    from tests.test_evaluation import MAX_LENGTH, REQUESTS

    texts = [t for r in REQUESTS for t in (r.prompt, r.target_new, r.loc_prompt, r.loc_target,
                                           *r.rephrases)]
    tokenizer = build_word_tokenizer(texts)
    model = from_config(transformers.GPT2Config(
        vocab_size=len(tokenizer), n_positions=MAX_LENGTH, n_embd=32, n_layer=1, n_head=2,
        bos_token_id=3, eos_token_id=1), seed=0)
    requests = [r.__class__(**{**r.__dict__, "neighborhood": (), "portability": ()})
                for r in REQUESTS]
    loc = {k: jnp.asarray(v) for k, v in tokenize_pairs(
        tokenizer, [r.loc_prompt for r in requests], [r.loc_target for r in requests],
        seq2seq=False, max_length=MAX_LENGTH).items() if k != "truncated"}
    ft = FineTune(model, config=FTConfig(steps=200, lr=3e-2))
    knowing = jax.jit(ft.edit)({}, model.params, loc)
    logits = model.logits(knowing, loc["input_ids"], loc["attention_mask"])
    assert bool(sequence_correct(logits, loc["labels"], shift=True).all())  # the premise

    editor = ReplaceParams(model)
    m = evaluate_editor(model, editor, editor.init(knowing), model.params, requests, tokenizer,
                        max_length=MAX_LENGTH, timed_edits=0, seed=None)
    assert m["loc_acc_pre"] == 0.0 and m["loc_acc_post"] == 1.0
    assert m["drawdown"] == -1.0
    # and the other way round: an edit that forgets them all loses everything
    m = evaluate_editor(model, editor, editor.init(model.params), knowing, requests, tokenizer,
                        max_length=MAX_LENGTH, timed_edits=0, seed=None)
    assert m["loc_acc_pre"] == 1.0 and m["drawdown"] == 1.0 - m["loc_acc_post"] == 1.0


def test_class_logits_give_per_example_metrics():
    """A classifier's logits [B, C] with labels [B]: one counted position per example."""
    from mend_jax.metrics import labelled, loc_mask, locality_kl, masked_nll, sequence_nll

    logits = jnp.asarray([[2.0, 0.0, 0.0],
                          [0.0, 1.0, 3.0],
                          [1.0, 1.0, 0.0],
                          [0.0, 5.0, 0.0]])
    labels = jnp.asarray([0, 1, 1, IGNORE])
    # argmax == label: 0 == 0, 2 != 1, 0 != 1 (first of a tie), and an uncounted label fails
    assert sequence_correct(logits, labels, shift=False).tolist() == [True, False, False, False]
    # −log p(label): log(e^2 + 2) − 2, log(1 + e + e^3) − 1, log(2e + 1) − 1, and 0 (uncounted)
    e = np.e
    want = [np.log(e**2 + 2) - 2, np.log(1 + e + e**3) - 1, np.log(2 * e + 1) - 1, 0.0]
    np.testing.assert_allclose(sequence_nll(logits, labels, shift=False), want, rtol=1e-6)
    np.testing.assert_allclose(masked_nll(logits, labels, shift=False), np.mean(want[:3]),
                               rtol=1e-6)
    assert labelled(labels).tolist() == [True, True, True, False]
    # locality: one distribution per example, every example counted
    mask = loc_mask({"input_ids": jnp.zeros((4, 7), jnp.int32), "labels": labels}, False)
    assert mask.tolist() == [1, 1, 1, 1]
    edited = logits.at[1].set(jnp.asarray([0.0, 3.0, 1.0]))  # only example 1 changes
    p, q = jax.nn.softmax(logits[1]), jax.nn.softmax(edited[1])
    kl_1 = float((p * (jnp.log(p) - jnp.log(q))).sum())
    assert float(locality_kl(logits, edited, mask)) == pytest.approx(kl_1 / 4, rel=1e-5)
    with pytest.raises(ValueError, match=r"labels \(4,\), logits \(4, 3\), shift=True"):
        sequence_nll(logits, labels, shift=True)
