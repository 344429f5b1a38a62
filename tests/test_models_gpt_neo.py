import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from mend_jax.models import load_pretrained, save_pretrained, set_path
from tests.parity_utils import masked_max_diff, right_padded_batch, torch_logits

VOCAB = 101
# Sequences longer than the local window (4), so local layers really drop distant keys.
LENGTHS = [7, 4, 9]


@pytest.fixture(scope="module")
def gpt_neo_dir(tmp_path_factory):
    torch.manual_seed(0)
    cfg = transformers.GPTNeoConfig(
        vocab_size=VOCAB,
        max_position_embeddings=32,
        hidden_size=30,
        num_layers=3,
        num_heads=3,
        attention_types=[[["global", "local"], 1], [["local"], 1]],
        window_size=4,
        initializer_range=0.2,
    )
    tm = transformers.GPTNeoForCausalLM(cfg).eval()
    d = tmp_path_factory.mktemp("gpt_neo")
    tm.save_pretrained(str(d))
    return d, tm


def test_gpt_neo_parity_with_padding(gpt_neo_dir):
    d, tm = gpt_neo_dir
    model = load_pretrained(d)
    assert model.config.attention_layers == ("global", "local", "local")
    ids, mask = right_padded_batch(VOCAB, LENGTHS)
    ours = np.asarray(model.logits(model.params, ids, mask))
    ref = torch_logits(tm, ids, mask)
    assert np.abs(ref).max() > 1.0  # logits large enough for the comparison to mean something
    assert masked_max_diff(ours, ref, mask) <= 1e-4


def test_gpt_neo_local_window_matters(gpt_neo_dir):
    # The same weights with every layer global must differ past the window: the parity test
    # above therefore checks the sliding-window mask, not just causal attention.
    d, _ = gpt_neo_dir
    model = load_pretrained(d)
    all_global = dataclasses.replace(model.config, attention_layers=("global",) * 3)
    module = model.arch.module(all_global)
    ids, mask = right_padded_batch(VOCAB, LENGTHS)
    local = np.asarray(model.logits(model.params, ids, mask))
    glob = np.asarray(module.apply({"params": model.params}, ids, mask))
    window = model.config.window_size
    np.testing.assert_allclose(local[:, :window], glob[:, :window], atol=1e-5)
    assert masked_max_diff(local[:, window:], glob[:, window:], mask[:, window:]) > 1e-2


def test_gpt_neo_bfloat16_loads(gpt_neo_dir):
    d, tm = gpt_neo_dir
    model = load_pretrained(d, dtype=jnp.bfloat16)
    ids, mask = right_padded_batch(VOCAB, LENGTHS)
    ours = np.asarray(model.logits(model.params, ids, mask))
    ref = torch_logits(tm, ids, mask)
    kernel = model.params["transformer"]["h_0"]["attn"]["attention"]["q_proj"]["kernel"]
    assert kernel.dtype == jnp.bfloat16
    assert masked_max_diff(ours, ref, mask) <= 0.05 * np.abs(ref).max()


def test_gpt_neo_names_and_inner_params(gpt_neo_dir):
    d, _ = gpt_neo_dir
    model = load_pretrained(d)
    assert model.default_inner_params() == [
        f"transformer.h.{i}.mlp.{lin}.weight" for i in range(3) for lin in ("c_fc", "c_proj")
    ]
    assert model.names.path("transformer.h.1.attn.attention.q_proj.weight") == (
        "transformer",
        "h_1",
        "attn",
        "attention",
        "q_proj",
        "kernel",
    )


def test_gpt_neo_export_roundtrip(gpt_neo_dir, tmp_path):
    d, _ = gpt_neo_dir
    model = load_pretrained(d)
    path = ("transformer", "h_2", "mlp", "c_fc", "kernel")
    k = model.params["transformer"]["h_2"]["mlp"]["c_fc"]["kernel"]
    # A random (not constant) change: a constant shift of c_fc is invisible after LayerNorm.
    noise = np.random.default_rng(0).normal(0.0, 0.05, k.shape).astype(np.float32)
    edited = set_path(model.params, path, k + noise)
    save_pretrained(model, edited, tmp_path / "out")
    tm2 = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "out")).eval()
    ids, mask = right_padded_batch(VOCAB, [5, 8], seed=1)
    ours = np.asarray(model.logits(edited, ids, mask))
    assert masked_max_diff(ours, np.asarray(model.logits(model.params, ids, mask)), mask) > 1e-3
    assert masked_max_diff(ours, torch_logits(tm2, ids, mask), mask) <= 1e-4
