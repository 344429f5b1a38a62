"""Broken checkpoints fail with errors that name the file, tensor or name at fault."""

import json
import re
import shutil

import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file, save_file

from mend_jax.models import CheckpointError, load_pretrained, supported_model_types


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=101, n_positions=32, n_embd=30, n_layer=2, n_head=3)
    d = tmp_path_factory.mktemp("gpt2")
    transformers.GPT2LMHeadModel(cfg).save_pretrained(str(d))
    return d


@pytest.fixture
def broken(gpt2_dir, tmp_path):
    """A fresh copy of the good checkpoint to damage."""
    d = tmp_path / "ckpt"
    shutil.copytree(gpt2_dir, d)
    return d


def _edit_tensors(folder, edit):
    f = folder / "model.safetensors"
    tensors = load_file(str(f))
    edit(tensors)
    save_file(tensors, str(f), metadata={"format": "pt"})


def _edit_config(folder, edit):
    f = folder / "config.json"
    raw = json.loads(f.read_text())
    edit(raw)
    f.write_text(json.dumps(raw))


def test_good_checkpoint_loads(gpt2_dir):
    assert load_pretrained(gpt2_dir).config.n_layer == 2


def test_unsupported_model_type_names_supported_ones(broken):
    _edit_config(broken, lambda c: c.update(model_type="bloom"))
    with pytest.raises(CheckpointError) as e:
        load_pretrained(broken)
    msg = str(e.value)
    assert "config.json" in msg and "'bloom'" in msg
    for t in supported_model_types():
        assert t in msg


def test_config_without_model_type(broken):
    _edit_config(broken, lambda c: c.pop("model_type"))
    with pytest.raises(CheckpointError, match=r"config\.json: no model_type; supported"):
        load_pretrained(broken)


def test_missing_tensor_named(broken):
    _edit_tensors(broken, lambda t: t.pop("transformer.h.1.mlp.c_fc.weight"))
    with pytest.raises(
        CheckpointError, match=re.escape("missing tensors: ['transformer.h.1.mlp.c_fc.weight']")
    ) as e:
        load_pretrained(broken)
    assert str(broken) in str(e.value)


def test_unexpected_tensor_named(broken):
    _edit_tensors(
        broken,
        lambda t: t.update({"transformer.h.2.mlp.c_fc.weight": np.zeros((30, 120), np.float32)}),
    )
    with pytest.raises(
        CheckpointError, match=re.escape("unexpected tensors: ['transformer.h.2.mlp.c_fc.weight']")
    ):
        load_pretrained(broken)


def test_misshaped_tensor_named_with_both_shapes(broken):
    _edit_tensors(
        broken,
        lambda t: t.update({"transformer.h.0.mlp.c_proj.weight": np.zeros((120, 31), np.float32)}),
    )
    with pytest.raises(
        CheckpointError,
        match=re.escape(
            "mis-shaped tensors: ['transformer.h.0.mlp.c_proj.weight: got (120, 31), "
            "expected (120, 30)']"
        ),
    ):
        load_pretrained(broken)


def test_all_problems_reported_together(broken):
    def edit(t):
        t.pop("transformer.ln_f.bias")
        t["transformer.h.1.attn.c_attn.weight"] = np.zeros((30, 91), np.float32)
        t["transformer.extra.weight"] = np.zeros((2,), np.float32)

    _edit_tensors(broken, edit)
    with pytest.raises(CheckpointError) as e:
        load_pretrained(broken)
    msg = str(e.value)
    for name in (
        "transformer.ln_f.bias",
        "transformer.h.1.attn.c_attn.weight",
        "transformer.extra.weight",
    ):
        assert name in msg


def test_truncated_safetensors_named(broken):
    f = broken / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt or truncated") as e:
        load_pretrained(broken)
    assert str(f) in str(e.value)


@pytest.mark.parametrize("content", [b"this is not a safetensors file" * 20, b"\x00\x01"])
def test_garbage_safetensors_named(broken, content):
    f = broken / "model.safetensors"
    f.write_bytes(content)
    with pytest.raises(CheckpointError, match="corrupt or truncated") as e:
        load_pretrained(broken)
    assert str(f) in str(e.value)


def test_missing_weights_file(broken):
    (broken / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        load_pretrained(broken)


def test_missing_shard_of_index(broken):
    (broken / "model.safetensors").rename(broken / "model-00001-of-00002.safetensors")
    index = {
        "weight_map": {
            "transformer.wte.weight": "model-00001-of-00002.safetensors",
            "transformer.wpe.weight": "model-00002-of-00002.safetensors",
        }
    }
    (broken / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(
        CheckpointError,
        match="model-00002-of-00002.safetensors: missing "
        r"\(listed in model.safetensors.index.json\)",
    ):
        load_pretrained(broken)


def test_missing_config(broken):
    (broken / "config.json").unlink()
    with pytest.raises(CheckpointError, match=re.escape(f"{broken}: missing config.json")):
        load_pretrained(broken)


def test_invalid_config_json(broken):
    (broken / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"config\.json: invalid JSON"):
        load_pretrained(broken)


def test_nonexistent_local_folder(tmp_path):
    with pytest.raises(CheckpointError, match="no such folder"):
        load_pretrained(tmp_path / "does-not-exist")


def test_file_instead_of_folder(gpt2_dir):
    with pytest.raises(CheckpointError, match="is a file; expected a folder"):
        load_pretrained(gpt2_dir / "config.json")


def test_hub_name_while_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError) as e:
        load_pretrained("mend-jax-tests/surely-not-cached-gpt2")
    msg = str(e.value)
    assert "'mend-jax-tests/surely-not-cached-gpt2'" in msg
    assert "could not be fetched from the Hugging Face hub" in msg
    assert "HF_HUB_OFFLINE is set" in msg
    assert "Traceback" not in msg and len(msg.splitlines()) == 1
    assert e.value.__cause__ is None and e.value.__suppress_context__


def test_unknown_inner_param_lists_close_names(gpt2_dir):
    model = load_pretrained(gpt2_dir)
    with pytest.raises(KeyError) as e:
        model.names.lookup("transformer.h.1.mlp.c_fcc.weight")
    msg = str(e.value)
    assert "transformer.h.1.mlp.c_fcc.weight" in msg
    assert "'transformer.h.1.mlp.c_fc.weight'" in msg.split("closest valid names:")[1]
