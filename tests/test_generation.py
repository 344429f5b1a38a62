"""Greedy generation against transformers' `generate(do_sample=False)`, token for token."""

import numpy as np
import pytest
import torch
import transformers

from mend_jax.models import generate, load_pretrained
from tests.parity_utils import right_padded_batch

VOCAB = 101
NEW = 6
LENGTHS = [5, 2, 8]


def _hf_greedy(tm, prompt: np.ndarray, new: int, **kw) -> np.ndarray:
    """One unpadded prompt through HF greedy decoding, eos disabled so exactly `new` tokens."""
    ids = torch.tensor(prompt[None], dtype=torch.long)
    with torch.no_grad():
        out = tm.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            do_sample=False,
            max_new_tokens=new,
            min_new_tokens=new,
            eos_token_id=None,
            pad_token_id=0,
            num_beams=1,
            **kw,
        )
    return out[0].numpy()


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    torch.manual_seed(0)
    # initializer_range 0.5 gives peaked logits, so argmax is not decided by rounding noise.
    cfg = transformers.GPT2Config(
        vocab_size=VOCAB,
        n_positions=32,
        n_embd=30,
        n_layer=2,
        n_head=3,
        initializer_range=0.5,
        bos_token_id=1,
        eos_token_id=2,
    )
    tm = transformers.GPT2LMHeadModel(cfg).eval()
    d = tmp_path_factory.mktemp("gpt2")
    tm.save_pretrained(str(d))
    return load_pretrained(d), tm


def test_gpt2_greedy_matches_hf_with_right_padding(gpt2):
    model, tm = gpt2
    lengths = LENGTHS
    ids, mask = right_padded_batch(VOCAB, lengths, seed=3)
    ours = np.asarray(generate(model, model.params, ids, NEW, attention_mask=mask))
    assert ours.shape == (3, NEW) and ours.dtype == np.int32
    for row, n in enumerate(lengths):
        ref = _hf_greedy(tm, ids[row, :n], NEW)[n:]
        np.testing.assert_array_equal(ours[row], ref, err_msg=f"row {row} (prompt length {n})")
    # The continuations differ across rows: the test would notice a row reading another's state.
    assert len({tuple(r) for r in ours}) == 3


def test_gpt2_stops_at_eos_and_pads(gpt2):
    model, _ = gpt2
    ids, mask = right_padded_batch(VOCAB, LENGTHS, seed=5)  # same shapes: one compile less
    free = np.asarray(generate(model, model.params, ids, NEW, attention_mask=mask))
    eos = int(free[0, 2])  # pretend the third token of row 0 is eos
    out = np.asarray(generate(model, model.params, ids, NEW, attention_mask=mask, eos_token_id=eos))
    for row in range(len(LENGTHS)):
        hit = np.nonzero(free[row] == eos)[0]
        stop = hit[0] + 1 if hit.size else NEW  # the eos itself is emitted
        np.testing.assert_array_equal(out[row, :stop], free[row, :stop])
        np.testing.assert_array_equal(out[row, stop:], eos)  # GPT-2 has no pad id: eos repeats
    assert (out != free).any()  # eos really cut something short


def test_generate_validates_inputs(gpt2):
    model, _ = gpt2
    ids, mask = right_padded_batch(VOCAB, [4, 2])
    with pytest.raises(ValueError, match="exceeds the model's 32 positions"):
        generate(model, model.params, ids, 40, attention_mask=mask)
    mask[1] = 0
    with pytest.raises(ValueError, match=r"rows \[1\]"):
        generate(model, model.params, ids, 3, attention_mask=mask)


def test_t5_greedy_matches_hf(tmp_path):
    torch.manual_seed(0)
    cfg = transformers.T5Config(
        vocab_size=VOCAB,
        d_model=32,
        d_kv=8,
        d_ff=48,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=3,
        relative_attention_num_buckets=8,
        decoder_start_token_id=0,
        pad_token_id=0,
        eos_token_id=1,
        initializer_factor=5.0,
    )
    tm = transformers.T5ForConditionalGeneration(cfg).eval()
    tm.save_pretrained(str(tmp_path))
    model = load_pretrained(tmp_path)
    lengths = [7, 3, 5]
    ids, mask = right_padded_batch(VOCAB, lengths, seed=4)
    ours = np.asarray(generate(model, model.params, ids, NEW, attention_mask=mask))
    for row, n in enumerate(lengths):
        ref = _hf_greedy(tm, ids[row, :n], NEW)[1:]  # drop the decoder start token
        np.testing.assert_array_equal(ours[row], ref, err_msg=f"row {row} (prompt length {n})")
    assert len({tuple(r) for r in ours}) > 1
