"""Σ_t u_t δ_tᵀ from one captured pass equals jax.grad of each edited weight."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers

from mend_jax.capture import capture, pseudo_gradient
from mend_jax.metrics import masked_nll
from mend_jax.models import from_config, get_path, supported_model_types


def decoder_batch(vocab, lengths, prompt_len=3, seed=0):
    rng = np.random.default_rng(seed)
    T = max(lengths)
    ids = rng.integers(1, vocab, (len(lengths), T)).astype(np.int32)
    mask = np.zeros_like(ids)
    labels = np.full_like(ids, -100)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
        ids[i, n:] = 0
        labels[i, prompt_len:n] = ids[i, prompt_len:n]
    return {"input_ids": jnp.asarray(ids), "attention_mask": jnp.asarray(mask),
            "labels": jnp.asarray(labels)}


def seq2seq_batch(vocab, enc_lengths, dec_lengths, seed=0):
    b = decoder_batch(vocab, enc_lengths, seed=seed)
    d = decoder_batch(vocab, dec_lengths, prompt_len=0, seed=seed + 1)
    return {"input_ids": b["input_ids"], "attention_mask": b["attention_mask"],
            "decoder_input_ids": d["input_ids"], "decoder_attention_mask": d["attention_mask"],
            "labels": d["labels"]}


CONFIGS = {
    "bart": lambda: transformers.BartConfig(
        vocab_size=61, d_model=24, encoder_attention_heads=3, decoder_attention_heads=3,
        encoder_ffn_dim=40, decoder_ffn_dim=40, encoder_layers=2, decoder_layers=2,
        max_position_embeddings=16),
    "gpt2": lambda: transformers.GPT2Config(vocab_size=61, n_positions=16, n_embd=24, n_layer=3,
                                            n_head=3),
    "gpt_neo": lambda: transformers.GPTNeoConfig(
        vocab_size=61, max_position_embeddings=16, hidden_size=24, num_layers=2, num_heads=3,
        attention_types=[[["global", "local"], 1]], window_size=4),
    "gptj": lambda: transformers.GPTJConfig(vocab_size=61, n_positions=16, n_embd=24, n_layer=3,
                                            n_head=3, rotary_dim=4),
    "llama": lambda: transformers.LlamaConfig(
        vocab_size=61, hidden_size=24, intermediate_size=40, num_hidden_layers=3,
        num_attention_heads=3, num_key_value_heads=1, max_position_embeddings=16),
    "t5": lambda: transformers.T5Config(vocab_size=61, d_model=24, d_kv=8, d_ff=40, num_layers=3,
                                        num_heads=3, decoder_start_token_id=0),
    # the masked-LM head (labels at their own positions); the classifier has its own test below
    "bert": lambda: transformers.BertConfig(
        vocab_size=61, hidden_size=24, num_hidden_layers=2, num_attention_heads=3,
        intermediate_size=40, max_position_embeddings=16),
}


@pytest.mark.parametrize("arch", sorted(CONFIGS))
def test_captured_outer_products_equal_weight_gradients(arch):
    if arch not in supported_model_types():
        pytest.fail(f"architecture {arch} is not registered")
    model = from_config(CONFIGS[arch](), seed=1)
    if model.seq2seq:
        batch = seq2seq_batch(61, [7, 4, 9], [5, 3, 6])
    else:
        batch = decoder_batch(61, [7, 4, 9])
    inner = model.default_inner_params()
    if model.seq2seq:
        assert any(re.match(r"(model\.)?encoder\.", n) for n in inner)
        assert any(re.match(r"(model\.)?decoder\.", n) for n in inner)
    loss, captured, _ = jax.jit(lambda p, b: capture(model, p, b, inner))(model.params, batch)

    def loss_of(p):
        logits = model.logits(p, batch["input_ids"], batch["attention_mask"],
                              batch.get("decoder_input_ids"), batch.get("decoder_attention_mask"))
        return masked_nll(logits, batch["labels"], shift=model.shift_labels)

    ref_loss, grads = jax.value_and_grad(loss_of)(model.params)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
    for name in inner:
        c = captured[name]
        pg = pseudo_gradient(c.layer_inputs, c.output_grads, c.token_mask)
        ref = get_path(grads, model.names.path(name))
        rel = float(jnp.linalg.norm(pg - ref) / jnp.linalg.norm(ref))
        assert rel <= 1e-5, (name, rel)
        # padding tokens carry no gradient
        pad = c.token_mask == 0
        assert float(jnp.abs(c.output_grads[pad]).max(initial=0.0)) == 0.0


def every_weight_kind(model) -> list[str]:
    """Every dense weight of block 1 (of both T5 stacks): attention q/k/v/o (fused for GPT-2),
    T5 cross-attention q/k/v/o, MLP in/out."""
    return [n.hf for n in model.names.names
            if n.layout in ("linear", "conv1d") and n.tied_to is None
            and re.search(r"\.(h|layers|block)\.1\.|^bert\.encoder\.layer\.1\.", n.hf)]


@pytest.mark.parametrize("arch", sorted(CONFIGS))
def test_every_weight_kind_with_unequal_encoder_decoder_lengths(arch):
    """Σ_t u_t δ_tᵀ is the gradient of every kind of dense weight, the encoder padded to 9 tokens
    and the decoder to 5: T5 cross-attention k/v act on encoder tokens, q/o on decoder tokens."""
    model = from_config(CONFIGS[arch](), seed=2)
    if model.seq2seq:
        batch = seq2seq_batch(61, [9, 4, 6], [5, 2, 4], seed=3)
        assert batch["input_ids"].shape[1] != batch["decoder_input_ids"].shape[1]
    else:
        batch = decoder_batch(61, [9, 4, 6], seed=3)
    inner = every_weight_kind(model)
    kinds = {n.split(".")[-2] for n in inner}
    expected = {
        "bart": {"q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"},
        "gpt2": {"c_attn", "c_proj", "c_fc"},
        "gpt_neo": {"q_proj", "k_proj", "v_proj", "out_proj", "c_fc", "c_proj"},
        "gptj": {"q_proj", "k_proj", "v_proj", "out_proj", "fc_in", "fc_out"},
        "llama": {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"},
        "t5": {"q", "k", "v", "o", "wi", "wo"},
        "bert": {"query", "key", "value", "dense"},  # attention.output, intermediate, output
    }[arch]
    assert kinds == expected, kinds
    if model.seq2seq:
        assert sum(bool(re.search(r"\.(EncDecAttention|encoder_attn)\.", n)) for n in inner) == 4
    loss, captured, _ = jax.jit(lambda p, b: capture(model, p, b, inner))(model.params, batch)

    def loss_of(p):
        logits = model.logits(p, batch["input_ids"], batch["attention_mask"],
                              batch.get("decoder_input_ids"), batch.get("decoder_attention_mask"))
        return masked_nll(logits, batch["labels"], shift=model.shift_labels)

    grads = jax.grad(loss_of)(model.params)
    for name in inner:
        c = captured[name]
        encoder_tokens = model.names.lookup(name).tokens == "input"
        mask = batch["attention_mask"] if encoder_tokens else batch["decoder_attention_mask"]
        np.testing.assert_array_equal(c.token_mask, mask.reshape(-1), err_msg=name)
        pg = pseudo_gradient(c.layer_inputs, c.output_grads, c.token_mask)
        ref = get_path(grads, model.names.path(name))
        rel = float(jnp.linalg.norm(pg - ref) / jnp.linalg.norm(ref))
        assert rel <= 1e-5, (name, rel)


def test_t5_cross_attention_keys_and_values_act_on_encoder_tokens():
    names = from_config(CONFIGS["t5"](), seed=0).names
    tokens = {lin: names.lookup(f"decoder.block.0.layer.1.EncDecAttention.{lin}.weight").tokens
              for lin in "qkvo"}
    assert tokens == {"q": "decoder", "k": "input", "v": "input", "o": "decoder"}
    assert names.lookup("encoder.block.0.layer.0.SelfAttention.q.weight").tokens == "input"
    assert names.lookup("decoder.block.0.layer.2.DenseReluDense.wo.weight").tokens == "decoder"


@pytest.mark.parametrize("arch", ["gpt2", "t5"])
def test_answer_mask_marks_the_positions_that_predict_targets(arch):
    """MALMEN's `token: ans`: a decoder-only model's answer tokens are those right before each
    labelled position; a seq2seq decoder's are the labelled ones, its encoder's every token."""
    model = from_config(CONFIGS[arch](), seed=1)
    if model.seq2seq:
        batch = seq2seq_batch(61, [7, 4, 9], [5, 3, 6])
        enc = next(n for n in model.default_inner_params() if n.startswith("encoder"))
        dec = next(n for n in model.default_inner_params() if n.startswith("decoder"))
        _, cap, _ = capture(model, model.params, batch, [enc, dec])
        np.testing.assert_array_equal(np.asarray(cap[dec].answer_mask),
                                      (np.asarray(batch["labels"]) != -100).reshape(-1))
        np.testing.assert_array_equal(np.asarray(cap[enc].answer_mask),
                                      np.asarray(batch["attention_mask"]).reshape(-1))
        return
    batch = decoder_batch(61, [7, 4, 9])
    name = model.default_inner_params()[0]
    _, cap, _ = capture(model, model.params, batch, [name])
    want = np.zeros((3, 9), bool)
    for i, n in enumerate([7, 4, 9]):
        want[i, 2:n - 1] = True           # labels at 3..n-1 are predicted from 2..n-2
    np.testing.assert_array_equal(np.asarray(cap[name].answer_mask).astype(bool), want.reshape(-1))


def test_answer_token_editor_sums_over_answer_tokens_only():
    from mend_jax.editors.mend import MEND, MENDConfig

    model = from_config(CONFIGS["gpt2"](), seed=1)
    name = "transformer.h.0.mlp.c_fc.weight"  # an early layer: δ is non-zero on prompt tokens
    batch = decoder_batch(61, [7, 4, 9])
    _, cap, _ = capture(model, model.params, batch, [name])
    u, d = np.asarray(cap[name].layer_inputs), np.asarray(cap[name].output_grads)
    ans = np.asarray(cap[name].answer_mask) > 0
    real = np.asarray(cap[name].token_mask) > 0
    assert (real & ~ans & (np.abs(d).sum(-1) > 0)).any()  # prompt tokens the option drops
    for tokens, sel in (("all", real), ("answer", ans)):
        editor = MEND(model, [name], MENDConfig(norm=False, edit_lr=1.0, tokens=tokens))
        new = editor.edit(editor.init(jax.random.key(0)), model.params, batch)
        path = model.names.path(name)
        got = np.asarray(get_path(model.params, path) - get_path(new, path))
        np.testing.assert_allclose(got, u[sel].T @ d[sel], rtol=1e-4, atol=1e-6)


def test_bert_classifier_captures_every_weight_kind_with_a_class_loss():
    """A classifier's loss is the cross-entropy of [B, num_labels] logits against [B] labels:
    Σ_t u_t δ_tᵀ over the real tokens is the gradient of every dense weight of an encoder layer,
    and over the one [CLS] token per example that of the pooler and the classifier."""
    from mend_jax.models import Model, get_architecture, set_path

    cfg = CONFIGS["bert"]()
    cfg.architectures, cfg.num_labels = ["BertForSequenceClassification"], 3
    arch = get_architecture("bert")
    config = arch.config_from_hf(cfg)
    module = arch.module(config)
    # N(0, 0.5) weights drawn by numpy from the parameter shapes (no compiled init): far from the
    # 0.02-scale init, so attention is not uniform and every gradient is far from zero.
    ids = jnp.zeros((1, 4), jnp.int32)
    shapes = jax.eval_shape(module.init, jax.random.key(0), ids, None, None, None)["params"]
    rng = np.random.default_rng(6)
    params = jax.tree.map(lambda s: jnp.asarray(rng.normal(0, 0.5, s.shape), jnp.float32), shapes)
    model = Model(arch, config, cfg, module, params)
    batch = decoder_batch(61, [9, 1, 6], seed=5)  # a one-token row: only [CLS] is real
    batch["labels"] = jnp.array([2, 0, 1])
    layer = "bert.encoder.layer.0"
    inner = [f"{layer}.attention.self.{q}.weight" for q in ("query", "key", "value")] + [
        f"{layer}.{m}.dense.weight" for m in ("attention.output", "intermediate", "output")] + [
        "bert.pooler.dense.weight", "classifier.weight"]
    loss, captured, logits = jax.jit(lambda p, b: capture(model, p, b, inner))(params, batch)
    assert logits.shape == (3, 3)

    def loss_of(weights):  # the gradient of the edited weights only: embeddings' is slow to build
        p = params
        for name, w in weights.items():
            p = set_path(p, model.names.path(name), w)
        out = model.logits(p, batch["input_ids"], batch["attention_mask"])
        return -jnp.take_along_axis(jax.nn.log_softmax(out), batch["labels"][:, None], 1).mean()

    weights = {name: get_path(params, model.names.path(name)) for name in inner}
    ref_loss, grads = jax.jit(jax.value_and_grad(loss_of))(weights)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
    # One compiled call for all the sums, numpy for the checks (eager ops compile per shape).
    pgs = jax.device_get(jax.jit(lambda cap: {
        n: pseudo_gradient(c.layer_inputs, c.output_grads, c.token_mask)
        for n, c in cap.items()})(captured))
    captured, grads = jax.device_get((captured, grads))
    for name in inner:
        c = captured[name]
        one_token = name in ("bert.pooler.dense.weight", "classifier.weight")
        mask = np.ones(3) if one_token else np.asarray(batch["attention_mask"]).reshape(-1)
        np.testing.assert_array_equal(c.token_mask, mask, err_msg=name)
        np.testing.assert_array_equal(c.answer_mask, mask, err_msg=name)
        ref = grads[name]
        assert np.abs(ref).max() > 1e-2, name
        rel = np.linalg.norm(pgs[name] - ref) / np.linalg.norm(ref)
        assert rel <= 1e-5, (name, rel)
