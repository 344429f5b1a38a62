"""BERT against PyTorch transformers: both heads, bf16, export, original checkpoint names."""

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
import yaml
from safetensors.numpy import load_file, save_file

from mend_jax.metrics import masked_nll, sequence_correct
from mend_jax.models import (
    generate,
    get_path,
    load_pretrained,
    save_pretrained,
    set_path,
)
from mend_jax.models.bert import BertConfig
from tests.parity_utils import masked_max_diff, right_padded_batch, torch_logits

V = 101
LENGTHS = [7, 4, 9]
HEADS = {"masked_lm": transformers.BertForMaskedLM,
         "classifier": transformers.BertForSequenceClassification}


def tiny_config(**kw) -> transformers.BertConfig:
    return transformers.BertConfig(vocab_size=V, hidden_size=24, num_hidden_layers=2,
                                   num_attention_heads=3, intermediate_size=40,
                                   max_position_embeddings=32, type_vocab_size=2, **kw)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Per head: (folder, torch model, our model, jitted logits). Every torch parameter is
    perturbed (LayerNorm scales, biases and the MLM output bias start at 1 or 0), so a swapped
    or dropped tensor shows in the logits."""
    out = {}
    for head, cls in HEADS.items():
        torch.manual_seed(0)
        tm = cls(tiny_config(num_labels=3)).eval()
        with torch.no_grad():
            for p in tm.parameters():
                p.add_(0.3 * torch.randn_like(p))
        d = tmp_path_factory.mktemp(head)
        tm.save_pretrained(str(d))
        model = load_pretrained(d)
        out[head] = (d, tm, model, jax.jit(model.logits))
    return out


def test_masked_lm_parity_with_padding(checkpoints):
    _, tm, model, logits = checkpoints["masked_lm"]
    ids, mask = right_padded_batch(V, LENGTHS)
    ours = np.asarray(logits(model.params, ids, mask))
    ref = torch_logits(tm, ids, mask)
    assert model.targets == "token" and ours.shape == (3, 9, V)
    assert ref[mask.astype(bool)].std() > 0.5       # logits large enough for 1e-4 to mean much
    assert masked_max_diff(ours, ref, mask) <= 1e-4


def test_classifier_parity_with_padding(checkpoints):
    _, tm, model, logits = checkpoints["classifier"]
    ids, mask = right_padded_batch(V, LENGTHS)
    ours = np.asarray(logits(model.params, ids, mask))
    ref = torch_logits(tm, ids, mask)
    assert model.targets == "class" and ours.shape == (3, 3)
    assert ref.std() > 0.5
    np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)


@pytest.mark.parametrize("head", sorted(HEADS))
def test_padding_tokens_are_never_attended(checkpoints, head):
    """Other token ids at the padded positions leave the real positions' logits unchanged."""
    _, _, model, logits = checkpoints[head]
    ids, mask = right_padded_batch(V, LENGTHS)
    other = np.where(mask > 0, ids, 1 + np.arange(ids.size).reshape(ids.shape) % (V - 1))
    assert (other != ids).sum() == 7
    a, b = (np.asarray(logits(model.params, x, mask)) for x in (ids, other))
    m = mask if a.ndim == 3 else np.ones(3, bool)
    assert masked_max_diff(a, b, m) <= 1e-5


def test_bfloat16_loads(checkpoints):
    d, tm, _, _ = checkpoints["masked_lm"]
    model = load_pretrained(d, dtype=jnp.bfloat16)
    kernel = model.params["bert"]["encoder"]["layer_1"]["intermediate"]["dense"]["kernel"]
    assert kernel.dtype == jnp.bfloat16
    ids, mask = right_padded_batch(V, LENGTHS)
    ours = np.asarray(jax.jit(model.logits)(model.params, ids, mask))
    assert ours.dtype == np.float32
    assert masked_max_diff(ours, torch_logits(tm, ids, mask), mask) <= 0.15


@pytest.mark.parametrize("head", sorted(HEADS))
def test_export_roundtrip_of_an_edit(checkpoints, tmp_path, head):
    """Edit the default inner params, export, reload in PyTorch: the reloaded model computes
    the edited logits, and they differ from the unedited ones."""
    d, tm, model, logits = checkpoints[head]
    edited = model.params
    for i, name in enumerate(model.default_inner_params()):
        path = model.names.path(name)
        w = get_path(edited, path)
        edited = set_path(edited, path, w + 0.3 * jax.random.normal(jax.random.key(i), w.shape))
    save_pretrained(model, edited, tmp_path / "out")
    reloaded = HEADS[head].from_pretrained(str(tmp_path / "out")).eval()
    ids, mask = right_padded_batch(V, LENGTHS, seed=1)  # the shapes jitted for parity
    m = mask if head == "masked_lm" else np.ones(3, bool)
    ours = np.asarray(logits(edited, ids, mask))
    assert masked_max_diff(ours, torch_logits(reloaded, ids, mask), m) <= 1e-4
    assert masked_max_diff(ours, torch_logits(tm, ids, mask), m) > 0.1


def test_default_inner_params_are_the_reference_fever_choice(checkpoints):
    _, _, model, _ = checkpoints["classifier"]
    assert model.default_inner_params() == [
        f"bert.encoder.layer.{i}.{m}.dense.weight"
        for i in (0, 1) for m in ("intermediate", "output")]
    for name in model.default_inner_params():
        assert model.names.lookup(name).layout == "linear"
    # bert-base (12 layers): layers 10 and 11, as configs/model/bert-base.yaml names them.
    from mend_jax.models.bert import default_inner_params

    base = BertConfig.from_hf(transformers.BertConfig())
    yaml_file = Path(__file__).parent.parent / "mend_jax/configs/model/bert-base.yaml"
    assert default_inner_params(base) == yaml.safe_load(yaml_file.read_text())["inner_params"]
    assert default_inner_params(base)[0] == "bert.encoder.layer.10.intermediate.dense.weight"


def test_original_checkpoint_names_load(checkpoints, tmp_path):
    """bert-base-uncased's format: LayerNorm gamma/beta, a position_ids buffer, the NSP head and
    a pooler beside the masked-LM head. The MLM loads it, the names mapped as transformers does."""
    d, _, model, _ = checkpoints["masked_lm"]
    tensors = load_file(str(d / "model.safetensors"))
    old = {k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias",
                                                                    "LayerNorm.beta"): v
           for k, v in tensors.items()}
    assert "bert.embeddings.LayerNorm.gamma" in old
    old["bert.embeddings.position_ids"] = np.arange(32)[None]
    old["bert.pooler.dense.weight"] = np.zeros((24, 24), np.float32)
    old["bert.pooler.dense.bias"] = np.zeros(24, np.float32)
    old["cls.seq_relationship.weight"] = np.zeros((2, 24), np.float32)
    old["cls.seq_relationship.bias"] = np.zeros(2, np.float32)
    old["cls.predictions.decoder.weight"] = tensors["bert.embeddings.word_embeddings.weight"]
    folder = tmp_path / "original"
    folder.mkdir()
    save_file(old, str(folder / "model.safetensors"))
    cfg = transformers.AutoConfig.from_pretrained(str(d))
    cfg.architectures = ["BertForPreTraining"]
    cfg.save_pretrained(str(folder))
    loaded = load_pretrained(folder)
    assert loaded.config.head == "masked_lm"
    jax.tree.map(np.testing.assert_array_equal, loaded.params, model.params)


def test_unsupported_heads_are_named():
    with pytest.raises(ValueError, match="BertForTokenClassification.*BertForMaskedLM"):
        BertConfig.from_hf(tiny_config(architectures=["BertForTokenClassification"]))
    with pytest.raises(ValueError, match="is_decoder"):
        BertConfig.from_hf(tiny_config(is_decoder=True))


def test_class_logits_fail_clearly_where_token_logits_are_needed(checkpoints):
    """A classifier's [B, num_labels] logits with [B] labels: the mean cross-entropy and the
    per-example metrics work unshifted (tests/test_metrics.py); shifting and generation name
    the shapes instead."""
    _, _, model, logits = checkpoints["classifier"]
    ids, mask = right_padded_batch(V, LENGTHS)
    out = logits(model.params, ids, mask)
    labels = jnp.array([0, 2, 1])
    want = -jax.nn.log_softmax(out)[jnp.arange(3), labels].mean()
    np.testing.assert_allclose(masked_nll(out, labels, shift=model.shift_labels), want, rtol=1e-6)
    with pytest.raises(ValueError, match=r"\(3, 3\).*no next token"):
        masked_nll(out, labels, shift=True)
    with pytest.raises(ValueError, match=r"labels \(3,\), logits \(3, 3\), shift=True"):
        sequence_correct(out, labels, shift=True)
    with pytest.raises(ValueError, match="does not generate text"):
        generate(model, model.params, ids, max_new_tokens=1)
