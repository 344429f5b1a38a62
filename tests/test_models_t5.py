import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file, save_file

from mend_jax.models import get_path, load_pretrained, save_pretrained, set_path
from mend_jax.models.t5 import relative_position_bucket
from tests.parity_utils import masked_max_diff, right_padded_batch, torch_logits

V = 101
# v1.0: ReLU feed-forward, LM head tied to `shared` (rescaled); v1.1: gated-GELU, own lm_head.
VARIANTS = {
    "v1_0": {"feed_forward_proj": "relu", "tie_word_embeddings": True, "num_decoder_layers": 2},
    "v1_1": {"feed_forward_proj": "gated-gelu", "tie_word_embeddings": False,
             "num_decoder_layers": 3},
}


def _tiny_t5(variant: str):
    torch.manual_seed(0)
    cfg = transformers.T5Config(
        vocab_size=V, d_model=24, d_kv=8, d_ff=40, num_layers=2, num_heads=3,
        # Few buckets / short max distance so the logarithmic buckets and the clamp are exercised.
        relative_attention_num_buckets=8, relative_attention_max_distance=12,
        decoder_start_token_id=0, **VARIANTS[variant],
    )
    tm = transformers.T5ForConditionalGeneration(cfg).eval()
    if variant == "v1_1":
        # transformers 5 ties lm_head to `shared` even for v1.1 configs; real v1.1 checkpoints
        # carry a distinct lm_head.weight, which transformers then loads untied. Mimic that.
        tm.lm_head.weight = torch.nn.Parameter(torch.randn(V, 24))
    return tm


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def t5_dir(request, tmp_path_factory):
    tm = _tiny_t5(request.param)
    d = tmp_path_factory.mktemp(f"t5_{request.param}")
    tm.save_pretrained(str(d))
    return request.param, d, tm


_COMPILED: dict = {}


def _logits(model, params, *batch) -> np.ndarray:
    # One compile per (config, dtype): a T5 forward pass run op by op is slower than compiled.
    key = (model.config, jnp.dtype(model.dtype).name)
    if key not in _COMPILED:
        _COMPILED[key] = jax.jit(lambda p, *b: model.module.apply({"params": p}, *b))
    return np.asarray(_COMPILED[key](params, *batch))


def _batch(seed=0):
    ids, mask = right_padded_batch(V, [7, 4, 11], seed=seed)
    dec_ids, dec_mask = right_padded_batch(V, [5, 9, 2], seed=seed + 10)
    return ids, mask, dec_ids, dec_mask


def test_relative_position_bucket_matches_reference():
    from transformers.models.t5.modeling_t5 import T5Attention

    rel = np.arange(-200, 201)[None, :] - np.arange(0, 40)[:, None]
    for bidirectional in (True, False):
        for nb, md in ((32, 128), (8, 12)):
            ours = np.asarray(jax.jit(relative_position_bucket, static_argnums=(1, 2, 3))(
                jnp.asarray(rel), bidirectional, nb, md))
            ref = T5Attention._relative_position_bucket(torch.tensor(rel), bidirectional, nb, md)
            np.testing.assert_array_equal(ours, ref.numpy())


def test_t5_parity_with_padding(t5_dir):
    variant, d, tm = t5_dir
    model = load_pretrained(d)
    assert model.seq2seq and model.config.tie_word_embeddings == (variant == "v1_0")
    assert ("lm_head" in model.params) == (variant == "v1_1")
    ids, mask, dec_ids, dec_mask = _batch()
    ours = _logits(model, model.params, ids, mask, dec_ids, dec_mask)
    ref = torch_logits(tm, ids, mask, dec_ids, dec_mask)
    assert ours.shape == (3, dec_ids.shape[1], V)
    assert np.abs(ref[dec_mask.astype(bool)]).std() > 0.1  # logits are not trivially small
    assert masked_max_diff(ours, ref, dec_mask) <= 1e-4


def test_t5_bfloat16_loads(t5_dir):
    variant, d, tm = t5_dir
    model = load_pretrained(d, dtype=jnp.bfloat16)
    wi = "wi_0" if variant == "v1_1" else "wi"
    kernel = model.params["decoder"]["block_1"]["layer_2"]["DenseReluDense"][wi]["kernel"]
    assert kernel.dtype == jnp.bfloat16
    ids, mask, dec_ids, dec_mask = _batch()
    ours = _logits(model, model.params, ids, mask, dec_ids, dec_mask)
    ref = torch_logits(tm, ids, mask, dec_ids, dec_mask)
    assert ours.dtype == np.float32
    scale = np.abs(ref[dec_mask.astype(bool)]).max()
    assert masked_max_diff(ours, ref, dec_mask) <= 0.05 * scale


def test_t5_export_roundtrip(t5_dir, tmp_path):
    variant, d, _ = t5_dir
    model = load_pretrained(d)
    edited = model.params
    for name in model.default_inner_params():
        path = model.names.path(name)
        edited = set_path(edited, path, get_path(edited, path) + 0.05)
    out = save_pretrained(model, edited, tmp_path / "out")
    written = load_file(str(out / "model.safetensors"))
    if variant == "v1_1":  # the untied head is written in its own right
        assert not np.array_equal(written["lm_head.weight"], written["shared.weight"])
    elif "lm_head.weight" in written:  # a tied copy, if written, must be the embedding itself
        np.testing.assert_array_equal(written["lm_head.weight"], written["shared.weight"])
    tm2 = transformers.T5ForConditionalGeneration.from_pretrained(str(out)).eval()
    ids, mask, dec_ids, dec_mask = _batch(seed=1)
    ours = _logits(model, edited, ids, mask, dec_ids, dec_mask)
    before = _logits(model, model.params, ids, mask, dec_ids, dec_mask)
    assert masked_max_diff(ours, before, dec_mask) > 1e-3  # the edit changed the model
    assert masked_max_diff(ours, torch_logits(tm2, ids, mask, dec_ids, dec_mask), dec_mask) <= 1e-4


def test_t5_loads_tied_copies_and_legacy_tensors(t5_dir, tmp_path):
    """Checkpoints holding the stacks' embed_tokens copies and the unused cross-attention bias
    (as original T5 checkpoints do) load to the same model."""
    _, d, tm = t5_dir
    tensors = load_file(str(d / "model.safetensors"))
    tensors["encoder.embed_tokens.weight"] = tensors["shared.weight"]
    tensors["decoder.embed_tokens.weight"] = tensors["shared.weight"]
    tensors["decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight"] = (
        np.zeros_like(tensors["decoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"]))
    (tmp_path / "ck").mkdir()
    save_file(tensors, str(tmp_path / "ck" / "model.safetensors"), metadata={"format": "pt"})
    (tmp_path / "ck" / "config.json").write_text((d / "config.json").read_text())
    model = load_pretrained(tmp_path / "ck")
    ids, mask, dec_ids, dec_mask = _batch()
    ours = _logits(model, model.params, ids, mask, dec_ids, dec_mask)
    assert masked_max_diff(ours, torch_logits(tm, ids, mask, dec_ids, dec_mask), dec_mask) <= 1e-4


def test_t5_default_inner_params(t5_dir):
    variant, d, _ = t5_dir
    model = load_pretrained(d)
    inner = model.default_inner_params()
    wi = "wi_0" if variant == "v1_1" else "wi"
    n_dec = VARIANTS[variant]["num_decoder_layers"]
    assert inner == [
        f"encoder.block.0.layer.1.DenseReluDense.{wi}.weight",
        "encoder.block.0.layer.1.DenseReluDense.wo.weight",
        f"encoder.block.1.layer.1.DenseReluDense.{wi}.weight",
        "encoder.block.1.layer.1.DenseReluDense.wo.weight",
    ] + [
        f"decoder.block.{i}.layer.2.DenseReluDense.{lin}.weight"
        for i in range(n_dec - 2, n_dec) for lin in (wi, "wo")
    ]
    for name in inner:  # every default is an editable Linear kernel of the model
        assert model.names.path(name)[-1] == "kernel"
        get_path(model.params, model.names.path(name))


def test_t5_v1_1_saved_with_tied_head_loads(tmp_path):
    """transformers 5 saves a fresh gated-GELU T5 without lm_head.weight (head kept tied to
    `shared`); it must load, reading the head from `shared.weight`."""
    torch.manual_seed(1)
    cfg = transformers.T5Config(vocab_size=V, d_model=24, d_kv=8, d_ff=40, num_layers=2,
                                num_heads=3, feed_forward_proj="gated-gelu",
                                tie_word_embeddings=False, decoder_start_token_id=0)
    tm = transformers.T5ForConditionalGeneration(cfg).eval()
    tm.save_pretrained(str(tmp_path))
    model = load_pretrained(tmp_path)
    batch = _batch(seed=3)
    ours = _logits(model, model.params, *map(jnp.asarray, batch))
    ref = torch_logits(tm, *batch)
    assert masked_max_diff(ours, ref, batch[3]) <= 1e-4
