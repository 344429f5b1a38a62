"""One entry point that loads any supported edit dataset by name or by sniffing the file."""

from __future__ import annotations

from pathlib import Path

from mend_jax.data._io import is_dataset, read_records
from mend_jax.data.counterfact import load_counterfact
from mend_jax.data.fever import is_fever_record, load_fever
from mend_jax.data.request import DataError, EditRequest
from mend_jax.data.zsre import load_zsre_easyedit, load_zsre_mend

FORMATS = ("zsre_mend", "zsre", "counterfact", "fever", "geonames")


def load_requests(
    path: str | Path,
    fmt: str | None = None,
    *,
    split: str = "test",
    loc_path: str | Path | None = None,
) -> list[EditRequest]:
    """Load edit requests from `path` in format `fmt` (one of FORMATS; None: sniff it).

    `path` is a .json / .jsonl / .parquet / .arrow file, a benchmark directory, or a
    `datasets.Dataset` whose rows are records of one of the formats.

    "geonames" takes the directory written by `write_benchmark` and reads its
    `{split}.counterfact.json`; a directory path implies "geonames". Otherwise the format is
    sniffed from the first record's fields (`input`+`alternatives`: zsre_mend, or fever when
    `prediction` is a FEVER label; `claim`+`label`: fever; `src`+`alt`: zsre;
    `requested_rewrite`: counterfact). `loc_path` is the NQ locality file of zsre_mend.
    """
    if is_dataset(path):
        if fmt in (None, "geonames"):
            fmt = sniff_format(path)
    else:
        path = Path(path)
        if fmt is None:
            fmt = "geonames" if path.is_dir() else sniff_format(path)
    if fmt == "zsre_mend":
        return load_zsre_mend(path, loc_path)
    if fmt == "zsre":
        return load_zsre_easyedit(path)
    if fmt == "counterfact":
        return load_counterfact(path)
    if fmt == "fever":
        return load_fever(path)
    if fmt == "geonames":
        file = path / f"{split}.counterfact.json" if path.is_dir() else path
        if path.is_dir() and not file.is_file():
            raise DataError(f"{path}: a folder without {file.name}; expected a data file "
                            "(.json, .jsonl, .parquet, .arrow) or a benchmark folder written "
                            "by write_benchmark")
        return load_counterfact(file) if path.is_dir() else load_requests(file)
    raise DataError(f"{path}: unknown format {fmt!r}; expected one of {FORMATS}")


def sniff_format(path) -> str:
    """The format of a data file, from its first record's fields."""
    for where, record in read_records(path):
        if "requested_rewrite" in record:
            return "counterfact"
        if is_fever_record(record):
            return "fever"
        if "src" in record and "alt" in record:
            return "zsre"
        if "input" in record and "alternatives" in record:
            return "zsre_mend"
        raise DataError(
            f"{where}: cannot tell the format from fields {sorted(record)}; pass fmt= one of "
            f"{FORMATS}"
        )
    raise DataError(f"{path}: no records")
