import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from mend_jax.models import load_pretrained, save_pretrained, set_path
from tests.parity_utils import masked_max_diff, right_padded_batch, torch_logits

VOCAB = 101
LENGTHS = [7, 4, 9]


@pytest.fixture(scope="module")
def gptj_dir(tmp_path_factory):
    torch.manual_seed(0)
    # head_dim 10 with rotary_dim 6: both the rotated and the pass-through features are used.
    cfg = transformers.GPTJConfig(
        vocab_size=VOCAB,
        n_positions=32,
        n_embd=30,
        n_layer=3,
        n_head=3,
        rotary_dim=6,
        initializer_range=0.2,
    )
    tm = transformers.GPTJForCausalLM(cfg).eval()
    d = tmp_path_factory.mktemp("gptj")
    tm.save_pretrained(str(d))
    return d, tm


def test_gptj_parity_with_padding(gptj_dir):
    d, tm = gptj_dir
    model = load_pretrained(d)
    ids, mask = right_padded_batch(VOCAB, LENGTHS)
    ours = np.asarray(model.logits(model.params, ids, mask))
    ref = torch_logits(tm, ids, mask)
    assert np.abs(ref).max() > 1.0  # logits large enough for the comparison to mean something
    assert masked_max_diff(ours, ref, mask) <= 1e-4


def test_gptj_bfloat16_loads(gptj_dir):
    d, tm = gptj_dir
    model = load_pretrained(d, dtype=jnp.bfloat16)
    ids, mask = right_padded_batch(VOCAB, LENGTHS)
    ours = np.asarray(model.logits(model.params, ids, mask))
    ref = torch_logits(tm, ids, mask)
    assert model.params["transformer"]["h_0"]["mlp"]["fc_in"]["kernel"].dtype == jnp.bfloat16
    assert masked_max_diff(ours, ref, mask) <= 0.05 * np.abs(ref).max()


def test_gptj_names_and_inner_params(gptj_dir):
    d, _ = gptj_dir
    model = load_pretrained(d)
    assert model.default_inner_params() == [
        f"transformer.h.{i}.mlp.{lin}.weight" for i in range(3) for lin in ("fc_in", "fc_out")
    ]
    assert model.names.path("lm_head.weight") == ("lm_head", "kernel")
    assert "bias" not in model.params["transformer"]["h_0"]["attn"]["out_proj"]


def test_gptj_export_roundtrip(gptj_dir, tmp_path):
    d, _ = gptj_dir
    model = load_pretrained(d)
    path = ("transformer", "h_2", "mlp", "fc_in", "kernel")
    k = model.params["transformer"]["h_2"]["mlp"]["fc_in"]["kernel"]
    # A random (not constant) change: a constant shift of fc_in is invisible after LayerNorm.
    noise = np.random.default_rng(0).normal(0.0, 0.05, k.shape).astype(np.float32)
    edited = set_path(model.params, path, k + noise)
    save_pretrained(model, edited, tmp_path / "out")
    tm2 = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "out")).eval()
    ids, mask = right_padded_batch(VOCAB, [5, 8], seed=1)
    ours = np.asarray(model.logits(edited, ids, mask))
    assert masked_max_diff(ours, np.asarray(model.logits(model.params, ids, mask)), mask) > 1e-3
    assert masked_max_diff(ours, torch_logits(tm2, ids, mask), mask) <= 1e-4
