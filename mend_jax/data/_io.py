"""Reading json / jsonl records with errors that point at the file, record and field."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from mend_jax.data.request import DataError
from mend_jax.errors import import_extra


@dataclass(frozen=True)
class Where:
    """Location of one record: file, 0-based record index and, for jsonl, 1-based line."""

    path: str
    index: int
    line: int | None = None
    prefix: str = ""  # field path of a nested object, e.g. "output[0]."

    def __str__(self) -> str:
        s = f"{self.path}: record {self.index} (0-based)"
        return s + (f", line {self.line} (1-based)" if self.line is not None else "")

    def error(self, field: str, problem: str) -> DataError:
        """A DataError naming this record and `field`."""
        return DataError(f"{self}: field {self.prefix + field!r}: {problem}")

    def nested(self, field: str) -> Where:
        """The same record, with field names reported under `field` (a nested object)."""
        return replace(self, prefix=f"{self.prefix}{field}.")


def is_dataset(source: Any) -> bool:
    """A `datasets.Dataset` (or any table of rows with `features` and `column_names`)."""
    return hasattr(source, "features") and hasattr(source, "column_names")


def read_records(source: Any) -> Iterator[tuple[Where, dict[str, Any]]]:
    """Yield (where, record) from a data file or a `datasets.Dataset`.

    Files: .jsonl (one object a line), .json (a list of objects), .parquet and .arrow (read with
    the `datasets` library). A `datasets.Dataset` (e.g. `load_dataset(...)["train"]`) is read
    row by row. JSON goes through plain `json` rather than `datasets.load_dataset("json")`: the
    latter loses line numbers and silently unifies schemas, and our errors must point at the
    line at fault; for the columnar formats errors name the file and the record index.
    """
    if is_dataset(source):
        name = getattr(getattr(source, "info", None), "dataset_name", None) or "in memory"
        yield from _rows(source, f"datasets.Dataset ({name})")
        return
    path = Path(source)
    if path.suffix in (".parquet", ".arrow"):
        yield from _rows(_load_columnar(path), str(path))
        return
    if not path.is_file():
        raise DataError(f"{path}: " + ("a folder; expected a data file" if path.is_dir()
                                       else "no such file"))
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (byte {e.start} is {e.object[e.start]:#04x}); "
                        "json and jsonl data files must be UTF-8") from None
    if _is_jsonl(path, text):
        index = 0
        for lineno, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            where = Where(str(path), index, lineno)
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: malformed json: {e.msg} at column {e.colno}") from e
            if not isinstance(record, dict):
                raise DataError(f"{where}: expected a json object, got {type(record).__name__}")
            yield where, record
            index += 1
        return
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(
            f"{path}: malformed json at line {e.lineno} (1-based), column {e.colno}: {e.msg}"
        ) from e
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a json list of records, got {type(data).__name__}")
    for index, record in enumerate(data):
        where = Where(str(path), index)
        if not isinstance(record, dict):
            raise DataError(f"{where}: expected a json object, got {type(record).__name__}")
        yield where, record


def _load_columnar(path: Path) -> Any:
    """A parquet or arrow file as a `datasets.Dataset`, or a DataError naming the file."""
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    datasets = import_extra("datasets", "data", f"{path}: reading {path.suffix} files")

    try:
        if path.suffix == ".parquet":
            return datasets.Dataset.from_parquet(str(path), keep_in_memory=True)
        return datasets.Dataset.from_file(str(path), in_memory=True)
    except Exception as e:  # pyarrow and datasets raise many types for a bad file
        raise DataError(f"{path}: cannot read as {path.suffix[1:]}: {e}") from e


def _rows(table: Any, name: str) -> Iterator[tuple[Where, dict[str, Any]]]:
    for index, record in enumerate(table):
        yield Where(name, index), _drop_nulls(record)


def _drop_nulls(value: Any) -> Any:
    """A columnar table fills the fields that some rows (or nested objects) lack with null:
    drop them, so such a row reads like the json record it came from."""
    if isinstance(value, dict):
        return {k: _drop_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_drop_nulls(v) for v in value]
    return value


def _is_jsonl(path: Path, text: str) -> bool:
    """jsonl by extension, or by content: a file whose first line is a whole json object."""
    if path.suffix == ".jsonl":
        return True
    stripped = text.lstrip()
    if not stripped.startswith("{"):
        return False
    first = stripped.splitlines()[0]
    try:
        return isinstance(json.loads(first), dict)
    except json.JSONDecodeError:
        return False


_ABSENT = object()


def _lookup(record: dict[str, Any], field: str) -> Any:
    """record[field] for a dotted path, or `_ABSENT`."""
    value: Any = record
    for part in field.split("."):
        if not isinstance(value, dict) or part not in value:
            return _ABSENT
        value = value[part]
    return value


def get(record: dict[str, Any], field: str, where: Where) -> Any:
    """record[field] for a dotted path ("requested_rewrite.target_new.str"), or a DataError."""
    value = _lookup(record, field)
    if value is _ABSENT:
        raise where.error(field, "missing")
    return value


def get_str(record: dict[str, Any], field: str, where: Where, *, empty_ok: bool = False) -> str:
    """A string field, stripped; a DataError when it is missing, not a string or empty."""
    value = get(record, field, where)
    if isinstance(value, list) and len(value) > 0:  # lenient: some dumps wrap answers in lists
        value = value[0]
    if not isinstance(value, str):
        raise where.error(field, f"expected a string, got {type(value).__name__}")
    value = value.strip()
    if not value and not empty_ok:
        raise where.error(field, "empty")
    return value


def get_optional_str(record: dict[str, Any], field: str, where: Where) -> str | None:
    """`get_str` for an optional field: None when the (dotted) path is absent."""
    return None if _lookup(record, field) is _ABSENT else get_str(record, field, where)


def get_str_list(record: dict[str, Any], field: str, where: Where) -> list[str]:
    """A list of strings (a single string is accepted as a list of one), empties dropped."""
    value = get(record, field, where)
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list):
        raise where.error(field, f"expected a list of strings, got {type(value).__name__}")
    out = []
    for i, item in enumerate(value):
        if not isinstance(item, str):
            raise where.error(f"{field}[{i}]", f"expected a string, got {type(item).__name__}")
        if item.strip():
            out.append(item.strip())
    return out


def get_forms(record: dict[str, Any], rephrases: tuple[str, ...], where: Where) -> tuple[str, ...]:
    """The optional `rephrase_forms` field, {rephrase: surface form}, in `rephrases`' order;
    () when absent. Every rephrase must have a form."""
    if "rephrase_forms" not in record:
        return ()
    value = record["rephrase_forms"]
    if not isinstance(value, dict) or not all(
            isinstance(k, str) and isinstance(v, str) and v for k, v in value.items()):
        raise where.error("rephrase_forms", "expected an object {rephrase: form name}")
    missing = [p for p in rephrases if p not in value]
    if missing:
        raise where.error("rephrase_forms", f"no form for rephrase {missing[0]!r}")
    return tuple(value[p] for p in rephrases)


def dedupe(items: list[str], exclude: str | None = None) -> tuple[str, ...]:
    """Unique items in first-seen order, without `exclude`."""
    seen: dict[str, None] = {}
    for item in items:
        if item != exclude:
            seen.setdefault(item, None)
    return tuple(seen)
