import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from mend_jax.models import get_path, load_pretrained, save_pretrained, set_path
from mend_jax.models.llama import LlamaConfig
from tests.parity_utils import masked_max_diff, right_padded_batch, torch_logits

V = 101
LENGTHS = [7, 4, 9]

# Odd head counts with grouped-query attention; each case exercises one family-specific feature.
CONFIGS = {
    # GQA 3:1, non-default rope_theta, untied lm_head.
    "llama_gqa": lambda: transformers.LlamaConfig(
        vocab_size=V,
        hidden_size=24,
        intermediate_size=40,
        num_hidden_layers=3,
        num_attention_heads=3,
        num_key_value_heads=1,
        rope_theta=500.0,
        tie_word_embeddings=False,
    ),
    # attention_bias + mlp_bias on every projection, tied embeddings.
    "llama_bias_tied": lambda: transformers.LlamaConfig(
        vocab_size=V,
        hidden_size=30,
        intermediate_size=36,
        num_hidden_layers=2,
        num_attention_heads=5,
        num_key_value_heads=5,
        attention_bias=True,
        mlp_bias=True,
        tie_word_embeddings=True,
    ),
    # head_dim decoupled from hidden_size, sliding window shorter than the longest sequence.
    "mistral_window": lambda: transformers.MistralConfig(
        vocab_size=V,
        hidden_size=24,
        intermediate_size=40,
        num_hidden_layers=3,
        num_attention_heads=3,
        num_key_value_heads=1,
        head_dim=10,
        sliding_window=3,
        tie_word_embeddings=False,
    ),
    # q/k/v bias, no o bias; sliding window on layers >= max_window_layers only.
    "qwen2": lambda: transformers.Qwen2Config(
        vocab_size=V,
        hidden_size=36,
        intermediate_size=40,
        num_hidden_layers=3,
        num_attention_heads=6,
        num_key_value_heads=2,
        rope_theta=20000.0,
        use_sliding_window=True,
        sliding_window=4,
        max_window_layers=1,
        tie_word_embeddings=True,
    ),
}


def _build(name, tmp_path_factory):
    torch.manual_seed(0)
    cfg = CONFIGS[name]()
    cfg.initializer_range = 0.2
    cfg._attn_implementation = "eager"
    tm = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    # HF zero/one-initialises biases and norms; perturb every tensor so they are all tested.
    with torch.no_grad():
        for p in tm.parameters():
            p.add_(0.1 * torch.randn_like(p))
    d = tmp_path_factory.mktemp(name)
    tm.save_pretrained(str(d))
    return d, tm


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    built = {}

    def get(name):
        if name not in built:
            built[name] = _build(name, tmp_path_factory)
        return built[name]

    return get


def _logits(model, params, ids, mask):
    # One compiled graph is much cheaper than op-by-op dispatch for a fresh shape.
    return np.asarray(jax.jit(model.logits)(params, ids, mask))


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_parity_with_padding(checkpoints, name):
    d, tm = checkpoints(name)
    model = load_pretrained(d)
    ids, mask = right_padded_batch(V, LENGTHS)
    ours = _logits(model, model.params, ids, mask)
    ref = torch_logits(tm, ids, mask)
    assert np.abs(ref).max() > 1.0, "logits too small for parity to be meaningful"
    assert masked_max_diff(ours, ref, mask) <= 1e-4


@pytest.mark.parametrize("name", ["llama_gqa", "qwen2"])
def test_bfloat16_loads(checkpoints, name):
    d, tm = checkpoints(name)
    model = load_pretrained(d, dtype=jnp.bfloat16)
    assert model.params["model"]["layers_0"]["mlp"]["up_proj"]["kernel"].dtype == jnp.bfloat16
    ids, mask = right_padded_batch(V, LENGTHS)
    ours = _logits(model, model.params, ids, mask)
    ref = torch_logits(tm, ids, mask)
    assert ours.dtype == np.float32
    assert masked_max_diff(ours, ref, mask) <= 0.05 * np.abs(ref).max()


@pytest.mark.parametrize("name", ["llama_gqa", "qwen2"])  # untied and tied lm_head
def test_export_roundtrip(checkpoints, tmp_path, name):
    d, _ = checkpoints(name)
    model = load_pretrained(d)
    edited = model.params
    for hf in model.default_inner_params():
        path = model.names.path(hf)
        edited = set_path(edited, path, get_path(edited, path) + 0.05)
    save_pretrained(model, edited, tmp_path / "out")
    tm2 = transformers.AutoModelForCausalLM.from_pretrained(
        str(tmp_path / "out"), attn_implementation="eager"
    ).eval()
    ids, mask = right_padded_batch(V, [5, 8], seed=1)
    ours = _logits(model, edited, ids, mask)
    before = _logits(model, model.params, ids, mask)
    assert masked_max_diff(ours, before, mask) > 1e-2  # the edit changed something
    assert masked_max_diff(ours, torch_logits(tm2, ids, mask), mask) <= 1e-4


def test_config_reading():
    c = LlamaConfig.from_hf(CONFIGS["llama_gqa"]())
    assert (c.rope_theta, c.head_dim, c.layer_windows) == (500.0, 8, (None, None, None))
    c = LlamaConfig.from_hf(CONFIGS["qwen2"]())
    assert (c.qkv_bias, c.o_bias, c.layer_windows) == (True, False, (None, 4, 4))
    assert LlamaConfig.from_hf(CONFIGS["mistral_window"]()).head_dim == 10


def test_default_inner_params_are_up_down_of_last_three():
    c = LlamaConfig.from_hf(CONFIGS["llama_gqa"]())
    from mend_jax.models.llama import default_inner_params

    assert default_inner_params(c) == [
        f"model.layers.{i}.mlp.{m}.weight" for i in range(3) for m in ("up_proj", "down_proj")
    ]


def test_scaled_rope_is_refused():
    cfg = transformers.LlamaConfig(
        vocab_size=V,
        hidden_size=24,
        intermediate_size=40,
        num_hidden_layers=1,
        num_attention_heads=3,
        rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0},
    )
    with pytest.raises(ValueError, match="rope_type 'linear'"):
        LlamaConfig.from_hf(cfg)
