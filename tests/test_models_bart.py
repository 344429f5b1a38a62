import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file, save_file

from mend_jax.models import generate, get_path, load_pretrained, save_pretrained, set_path
from mend_jax.models.bart import ARCH
from tests.parity_utils import masked_max_diff, right_padded_batch, torch_logits

V = 101
# bart-base's layout (gelu, unscaled embeddings), and scale_embedding=True (embeddings times
# sqrt(d_model)) with relu for a second activation.
VARIANTS = {
    "base": {"scale_embedding": False, "activation_function": "gelu"},
    "scaled": {"scale_embedding": True, "activation_function": "relu"},
}
# Weight noise per variant: the scaled variant's larger weights let the encoder sway greedy
# decoding (with small ones every prompt decodes to the same tokens).
NOISE = {"base": 0.1, "scaled": 0.3}


def _tiny_config(**kw):
    return transformers.BartConfig(
        vocab_size=V, d_model=24, encoder_attention_heads=3, decoder_attention_heads=3,
        encoder_ffn_dim=40, decoder_ffn_dim=40, encoder_layers=2, decoder_layers=3,
        max_position_embeddings=32, **kw)


def _tiny_bart(variant: str):
    torch.manual_seed(0)
    tm = transformers.BartForConditionalGeneration(_tiny_config(**VARIANTS[variant])).eval()
    with torch.no_grad():
        # transformers initialises norms to 1/0, the logits bias to 0 and the rest with std 0.02:
        # perturb everything so that every tensor, loaded to the wrong place, shows in the logits.
        for p in tm.parameters():
            p.add_(NOISE[variant] * torch.randn_like(p))
        tm.final_logits_bias.normal_(0.0, 0.2)
    return tm


def _saved(variant: str, tmp_path_factory):
    tm = _tiny_bart(variant)
    d = tmp_path_factory.mktemp(f"bart_{variant}")
    tm.save_pretrained(str(d))
    return d, tm


@pytest.fixture(scope="module")
def bart_dir(tmp_path_factory):
    return _saved("base", tmp_path_factory)


@pytest.fixture(scope="module")
def scaled_bart_dir(tmp_path_factory):
    return _saved("scaled", tmp_path_factory)


_COMPILED: dict = {}


def _logits(model, params, *batch) -> np.ndarray:
    # One compile per (config, dtype).
    key = (model.config, jnp.dtype(model.dtype).name)
    if key not in _COMPILED:
        _COMPILED[key] = jax.jit(lambda p, *b: model.module.apply({"params": p}, *b))
    return np.asarray(_COMPILED[key](params, *batch))


def _batch(seed=0):
    ids, mask = right_padded_batch(V, [7, 4, 11], seed=seed)
    dec_ids, dec_mask = right_padded_batch(V, [5, 9, 2], seed=seed + 10)
    return ids, mask, dec_ids, dec_mask


def test_bart_parity_with_padding(bart_dir):
    d, tm = bart_dir
    model = load_pretrained(d)
    assert model.seq2seq and not model.config.scale_embedding
    ids, mask, dec_ids, dec_mask = _batch()
    ours = _logits(model, model.params, ids, mask, dec_ids, dec_mask)
    ref = torch_logits(tm, ids, mask, dec_ids, dec_mask)
    assert ours.shape == (3, dec_ids.shape[1], V)
    assert np.abs(ref[dec_mask.astype(bool)]).std() > 0.1  # logits are not trivially small
    assert masked_max_diff(ours, ref, dec_mask) <= 1e-4


def test_bart_bfloat16_loads(bart_dir):
    d, tm = bart_dir
    model = load_pretrained(d, dtype=jnp.bfloat16)
    kernel = model.params["model"]["decoder"]["layers_2"]["fc1"]["kernel"]
    assert kernel.dtype == jnp.bfloat16
    ids, mask, dec_ids, dec_mask = _batch()
    ours = _logits(model, model.params, ids, mask, dec_ids, dec_mask)
    ref = torch_logits(tm, ids, mask, dec_ids, dec_mask)
    assert ours.dtype == np.float32
    scale = np.abs(ref[dec_mask.astype(bool)]).max()
    assert masked_max_diff(ours, ref, dec_mask) <= 0.05 * scale


def test_bart_export_roundtrip(bart_dir, tmp_path):
    d, _ = bart_dir
    model = load_pretrained(d)
    edited = model.params
    for name in model.default_inner_params():
        path = model.names.path(name)
        edited = set_path(edited, path, get_path(edited, path) + 0.05)
    out = save_pretrained(model, edited, tmp_path / "out")
    written = load_file(str(out / "model.safetensors"))
    for copy in ("lm_head.weight", "model.encoder.embed_tokens.weight",
                 "model.decoder.embed_tokens.weight"):  # tied copies are the embedding itself
        np.testing.assert_array_equal(written[copy], written["model.shared.weight"])
    tm2 = transformers.BartForConditionalGeneration.from_pretrained(str(out)).eval()
    ids, mask, dec_ids, dec_mask = _batch(seed=1)
    ours = _logits(model, edited, ids, mask, dec_ids, dec_mask)
    before = _logits(model, model.params, ids, mask, dec_ids, dec_mask)
    assert masked_max_diff(ours, before, dec_mask) > 1e-2  # the edit changed the model
    assert masked_max_diff(ours, torch_logits(tm2, ids, mask, dec_ids, dec_mask), dec_mask) <= 1e-4


def test_bart_loads_tied_copies(bart_dir, tmp_path):
    """Checkpoints holding the stacks' embed_tokens and lm_head copies of `model.shared` (as
    facebook/bart-* do) load to the same model."""
    d, tm = bart_dir
    tensors = load_file(str(d / "model.safetensors"))
    assert "lm_head.weight" not in tensors  # transformers 5 writes `shared` only
    for copy in ("lm_head.weight", "model.encoder.embed_tokens.weight",
                 "model.decoder.embed_tokens.weight"):
        tensors[copy] = tensors["model.shared.weight"]
    (tmp_path / "ck").mkdir()
    save_file(tensors, str(tmp_path / "ck" / "model.safetensors"), metadata={"format": "pt"})
    (tmp_path / "ck" / "config.json").write_text((d / "config.json").read_text())
    model = load_pretrained(tmp_path / "ck")
    ids, mask, dec_ids, dec_mask = _batch()
    ours = _logits(model, model.params, ids, mask, dec_ids, dec_mask)
    assert masked_max_diff(ours, torch_logits(tm, ids, mask, dec_ids, dec_mask), dec_mask) <= 1e-4


def test_bart_default_inner_params(bart_dir):
    d, _ = bart_dir
    model = load_pretrained(d)
    inner = model.default_inner_params()
    assert inner == [
        "model.encoder.layers.0.fc1.weight", "model.encoder.layers.0.fc2.weight",
        "model.encoder.layers.1.fc1.weight", "model.encoder.layers.1.fc2.weight",
        "model.decoder.layers.1.fc1.weight", "model.decoder.layers.1.fc2.weight",
        "model.decoder.layers.2.fc1.weight", "model.decoder.layers.2.fc2.weight",
    ]
    for name in inner:  # every default is an editable Linear kernel of the model
        assert model.names.path(name)[-1] == "kernel"
        get_path(model.params, model.names.path(name))
    tokens = {lin: model.names.lookup(f"model.decoder.layers.0.encoder_attn.{lin}.weight").tokens
              for lin in ("q_proj", "k_proj", "v_proj", "out_proj")}
    assert tokens == {"q_proj": "decoder", "k_proj": "input", "v_proj": "input",
                      "out_proj": "decoder"}


def test_bart_greedy_generation_matches_torch_argmax(scaled_bart_dir):
    """Greedy decoding from decoder_start_token_id (2 for BART, not the pad id 1) equals a
    step-by-step argmax of the PyTorch model's logits; on the scaled-embedding relu variant, so
    that its exact token choices also check that variant against the reference."""
    d, tm = scaled_bart_dir
    model = load_pretrained(d)
    assert model.hf_config.decoder_start_token_id == 2 != model.hf_config.pad_token_id
    lengths, new = [7, 3, 5], 4
    ids, mask = right_padded_batch(V, lengths, seed=4)
    ours = np.asarray(generate(model, model.params, ids, new, attention_mask=mask))
    for row, n in enumerate(lengths):
        dec = [2]
        for _ in range(new):
            logits = torch_logits(tm, ids[row:row + 1, :n], mask[row:row + 1, :n],
                                  np.asarray([dec]), np.ones((1, len(dec)), np.int32))
            dec.append(int(logits[0, -1].argmax()))
        np.testing.assert_array_equal(ours[row], dec[1:], err_msg=f"row {row}")
    assert len({tuple(r) for r in ours}) > 1


def test_bart_rejects_untied_embeddings_and_over_long_inputs():
    with pytest.raises(ValueError, match="tie_word_embeddings=False"):
        ARCH.config_from_hf(_tiny_config(tie_word_embeddings=False))
    module = ARCH.module(ARCH.config_from_hf(_tiny_config()))
    ids = jnp.ones((1, 33), jnp.int32)
    with pytest.raises(ValueError, match="encoder input of 33 tokens exceeds the model's 32"):
        jax.eval_shape(module.init, jax.random.key(0), ids, None, ids[:, :4], None)
