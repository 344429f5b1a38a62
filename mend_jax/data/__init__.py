"""Edit datasets (zsRE, CounterFact, FEVER, Wikitext) and batching. The offline geonames
benchmarks that the default builds, its tokenizers and its base-model training are
`mend_jax.offline`.

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
from mend_jax.data.load import FORMATS, load_requests, sniff_format
from mend_jax.data.request import DataError, EditRequest
from mend_jax.data.wikitext import load_wikitext, read_passages
from mend_jax.data.zsre import load_zsre_easyedit, load_zsre_mend

__all__ = [
    "FORMATS",
    "IGNORE",
    "DataError",
    "EditRequest",
    "batch_iterator",
    "check_requests",
    "load_counterfact",
    "load_fever",
    "load_requests",
    "load_wikitext",
    "load_zsre_easyedit",
    "load_zsre_mend",
    "make_edit_batch",
    "read_passages",
    "sniff_format",
    "tokenize_pairs",
]
