"""Tokenizers built here for the small offline benchmark models.

`build_bpe_tokenizer` (the default's): byte-level BPE, so every string in every script
round-trips and nothing maps to an unknown token. `build_word_tokenizer`: a word-level
vocabulary of exactly the benchmark's words (kept for tests and small experiments; a word it
never saw is the unknown token, which `tokenize_pairs` refuses as a target).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = ("<pad>", "<eos>", "<unk>", "<bos>")  # ids 0, 1, 2, 3
BPE_SPECIAL_TOKENS = ("<pad>", "<eos>", "<bos>")  # byte-level BPE needs no unknown token


def build_bpe_tokenizer(
    texts: Iterable[str], vocab_size: int = 2048, out_dir: str | Path | None = None
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer (GPT-2's scheme) on `texts`; save it to `out_dir`.

    The 256 byte symbols are always in the vocabulary, so any string, any script, encodes and
    decodes back exactly; words are merged into tokens as the texts' statistics say (a word
    carries its leading space, "Ġ", as in GPT-2). The texts are deduplicated and sorted before
    training, so the vocabulary depends only on the set of texts. No special tokens are added on
    encode.
    """
    n_min = len(BPE_SPECIAL_TOKENS) + len(pre_tokenizers.ByteLevel.alphabet())
    if vocab_size < n_min:
        raise ValueError(f"vocab_size must be at least {n_min} (the special tokens and the "
                         f"256 bytes), got {vocab_size}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(BPE_SPECIAL_TOKENS), show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(sorted(set(texts)), trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>",
        clean_up_tokenization_spaces=False,
    )
    if out_dir is not None:
        fast.save_pretrained(str(out_dir))
    return fast


def build_tokenizer(kind: str, texts: Iterable[str], **options) -> PreTrainedTokenizerFast:
    """The tokenizer a config names: "bpe" (`vocab_size`) or "word"."""
    if kind == "bpe":
        return build_bpe_tokenizer(texts, **options)
    if kind == "word":
        if options:
            raise ValueError(f"the word tokenizer takes no options, got {sorted(options)}")
        return build_word_tokenizer(texts)
    raise ValueError(f"tokenizer kind must be 'bpe' or 'word', got {kind!r}")


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
