import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from mend_jax.models import load_pretrained, save_pretrained
from tests.parity_utils import masked_max_diff, right_padded_batch, torch_logits


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=101, n_positions=32, n_embd=30, n_layer=3, n_head=3)
    tm = transformers.GPT2LMHeadModel(cfg).eval()
    d = tmp_path_factory.mktemp("gpt2")
    tm.save_pretrained(str(d))
    return d, tm


def test_gpt2_parity_with_padding(gpt2_dir):
    d, tm = gpt2_dir
    model = load_pretrained(d)
    ids, mask = right_padded_batch(101, [7, 4, 9])
    ours = np.asarray(model.logits(model.params, ids, mask))
    ref = torch_logits(tm, ids, mask)
    assert masked_max_diff(ours, ref, mask) <= 1e-4


def test_gpt2_bfloat16_loads(gpt2_dir):
    d, tm = gpt2_dir
    model = load_pretrained(d, dtype=jnp.bfloat16)
    ids, mask = right_padded_batch(101, [7, 4, 9])
    ours = np.asarray(model.logits(model.params, ids, mask))
    ref = torch_logits(tm, ids, mask)
    assert model.params["transformer"]["h_0"]["mlp"]["c_fc"]["kernel"].dtype == jnp.bfloat16
    assert masked_max_diff(ours, ref, mask) <= 0.1


def test_gpt2_export_roundtrip(gpt2_dir, tmp_path):
    d, _ = gpt2_dir
    model = load_pretrained(d)
    k = model.params["transformer"]["h_2"]["mlp"]["c_fc"]["kernel"]
    from mend_jax.models import set_path
    noise = 0.05 * jax.random.normal(jax.random.key(3), k.shape)
    edited = set_path(model.params, ("transformer", "h_2", "mlp", "c_fc", "kernel"), k + noise)
    save_pretrained(model, edited, tmp_path / "out")
    tm2 = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "out")).eval()
    ids, mask = right_padded_batch(101, [5, 8], seed=1)
    ours = np.asarray(model.logits(edited, ids, mask))
    assert masked_max_diff(ours, torch_logits(tm2, ids, mask), mask) <= 1e-4
