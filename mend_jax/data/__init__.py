"""Edit datasets (zsRE, CounterFact, FEVER, Wikitext, the offline geonames benchmarks) and
batching.

Every loader returns `list[EditRequest]`; `make_edit_batch` / `batch_iterator` turn requests
into the fixed-shape numpy batches (`edit_inner`, `edit_outer`, `loc`, `neighborhood`) that the
training and evaluation steps consume.
"""

from mend_jax.data.batching import (
    IGNORE,
    batch_iterator,
    check_requests,
    make_edit_batch,
    tokenize_pairs,
)
from mend_jax.data.counterfact import load_counterfact
from mend_jax.data.fever import load_fever
from mend_jax.data.geonames import RELATIONS, build_geonames_benchmark
from mend_jax.data.geonames_claims import (
    build_claims_benchmark,
    claims_texts,
    write_claims_benchmark,
)
from mend_jax.data.geonames_files import SPLITS, benchmark_texts, load_facts, write_benchmark
from mend_jax.data.load import FORMATS, load_requests, sniff_format
from mend_jax.data.request import DataError, EditRequest
from mend_jax.data.tokenizer import (
    build_bpe_tokenizer,
    build_tokenizer,
    build_word_tokenizer,
    normalize_words,
)
from mend_jax.data.wikitext import load_wikitext, read_passages
from mend_jax.data.zsre import load_zsre_easyedit, load_zsre_mend

__all__ = [
    "FORMATS",
    "IGNORE",
    "RELATIONS",
    "SPLITS",
    "DataError",
    "EditRequest",
    "batch_iterator",
    "benchmark_texts",
    "build_bpe_tokenizer",
    "build_claims_benchmark",
    "build_geonames_benchmark",
    "build_tokenizer",
    "build_word_tokenizer",
    "check_requests",
    "claims_texts",
    "load_counterfact",
    "load_facts",
    "load_fever",
    "load_requests",
    "load_wikitext",
    "load_zsre_easyedit",
    "load_zsre_mend",
    "make_edit_batch",
    "normalize_words",
    "read_passages",
    "sniff_format",
    "tokenize_pairs",
    "write_benchmark",
    "write_claims_benchmark",
]
