"""A word-level tokenizer for the small offline benchmark models."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = ("<pad>", "<eos>", "<unk>", "<bos>")  # ids 0, 1, 2, 3


def build_word_tokenizer(
    texts: Iterable[str], out_dir: str | Path | None = None
) -> PreTrainedTokenizerFast:
    """Build a WordLevel tokenizer over the words of `texts` (save it to `out_dir` if given).

    Words are runs of letters/digits or of punctuation (the `Whitespace` pre-tokenizer), kept
    case-sensitive; ids follow the special tokens, by decreasing frequency then alphabetically,
    so the vocabulary is deterministic. No special tokens are added on encode; decode joins words
    with single spaces, so decode(encode(s)) == normalize_words(s).
    """
    pre = pre_tokenizers.Whitespace()
    counts: Counter[str] = Counter()
    for text in texts:
        counts.update(word for word, _ in pre.pre_tokenize_str(text))
    for tok in SPECIAL_TOKENS:
        counts.pop(tok, None)
    words = sorted(counts, key=lambda w: (-counts[w], w))
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    vocab.update({w: len(SPECIAL_TOKENS) + i for i, w in enumerate(words)})
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre
    # No decoder: `tokenizers` then joins tokens with single spaces, which is what we want.
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        eos_token="<eos>",
        unk_token="<unk>",
        bos_token="<bos>",
        clean_up_tokenization_spaces=False,
    )
    if out_dir is not None:
        fast.save_pretrained(str(out_dir))
    return fast


def normalize_words(text: str) -> str:
    """The text as the word tokenizer sees it: its words joined by single spaces."""
    return " ".join(w for w, _ in pre_tokenizers.Whitespace().pre_tokenize_str(text))
