"""FEVER fact checking as edits of a claim classifier: the MEND jsonl release and a json variant.

A FEVER edit request is a claim whose label is to be flipped: `prompt` is the claim,
`target_new` the other label ("SUPPORTS" <-> "REFUTES"), `target_true` its true label;
`rephrases` are rephrased claims (generality), `loc_prompt` / `loc_target` another claim with
its true label (drawdown). Targets are label *names*; a classifier's batches map them to class
ids through its config's `label2id` (`tokenize_pairs`), so the same requests serve any
classifier whose labels carry these names.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from mend_jax.data._io import Where, dedupe, get, get_str, get_str_list, read_records
from mend_jax.data.request import DataError, EditRequest

log = logging.getLogger(__name__)

SUPPORTS, REFUTES = "SUPPORTS", "REFUTES"
LABELS = (REFUTES, SUPPORTS)  # class ids 0 and 1 of the classifiers built here
FLIP = {SUPPORTS: REFUTES, REFUTES: SUPPORTS}


def is_fever_record(record: dict[str, Any]) -> bool:
    """A record of either FEVER layout (the MEND release shares zsRE's field names, so its
    labels tell them apart)."""
    if "claim" in record and "label" in record:
        return True
    return "input" in record and "alternatives" in record and record.get("prediction") in FLIP


def _label(record: dict[str, Any], field: str, where: Where) -> str:
    value = get_str(record, field, where)
    if value not in FLIP:
        raise where.error(field, f"{value!r} is not a FEVER label; expected one of {list(LABELS)}")
    return value


def load_fever(path: str | Path) -> list[EditRequest]:
    """Load FEVER edit requests from either layout (decided per record by its fields).

    MEND jsonl (the reference's `BinaryAugmentedKILT`): `input` (claim), `prediction` (the base
    model's label), `alternatives` (the flipped label first), `filtered_rephrases`,
    `output[0].answer` (the true label). As the reference, records with no alternative or no
    rephrase are skipped (the count is logged); the edit target is `alternatives[0]`. The
    locality claim of record i is that of record (i + N//2) mod N with its true label (the
    reference's locality rows are other claims of the batch, with their true labels).

    json variant: `claim`, `label` (its true label), `rephrase` (a string or a list),
    `loc_claim`, `loc_label`; the edit target is the other label. An optional `subject` is kept.
    """
    rows: list[dict[str, Any]] = []
    skipped = 0
    for where, rec in read_records(path):
        if "claim" in rec:
            rows.append({**_json_row(rec, where), "source": str(where)})
        elif "input" in rec:
            row = _mend_row(rec, where)
            if row is None:
                skipped += 1
            else:
                rows.append({**row, "source": str(where)})
        else:
            raise DataError(f"{where}: neither a FEVER json record (claim, label, rephrase, "
                            f"loc_claim, loc_label) nor a MEND FEVER record (input, prediction, "
                            f"alternatives, filtered_rephrases, output); fields {sorted(rec)}")
    if skipped:
        log.info("%s: skipped %d records without an alternative or a rephrase", path, skipped)
    if not rows:
        raise DataError(f"{path}: no usable records")
    n = len(rows)
    out = []
    for i, r in enumerate(rows):
        loc = r.get("loc")
        if loc is None:
            if n < 2:
                raise DataError(f"{path}: one MEND FEVER record; its locality claim must be "
                                "another record's")
            other = rows[(i + max(1, n // 2)) % n]
            loc = (other["prompt"], other["target_true"])
        out.append(EditRequest(
            prompt=r["prompt"],
            target_new=r["target_new"],
            target_true=r["target_true"],
            rephrases=r["rephrases"],
            loc_prompt=loc[0],
            loc_target=loc[1],
            subject=r.get("subject"),
            source=r["source"],
        ))
    return out


def _json_row(rec: dict[str, Any], where: Where) -> dict[str, Any]:
    claim = get_str(rec, "claim", where)
    label = _label(rec, "label", where)
    subject = rec.get("subject")
    return {
        "prompt": claim,
        "target_new": FLIP[label],
        "target_true": label,
        "rephrases": dedupe(get_str_list(rec, "rephrase", where), exclude=claim),
        "loc": (get_str(rec, "loc_claim", where), _label(rec, "loc_label", where)),
        "subject": subject.strip() if isinstance(subject, str) and subject.strip() else None,
    }


def _mend_row(rec: dict[str, Any], where: Where) -> dict[str, Any] | None:
    claim = get_str(rec, "input", where)
    _label(rec, "prediction", where)
    alternatives = get_str_list(rec, "alternatives", where)
    rephrases = get_str_list(rec, "filtered_rephrases", where)
    output = get(rec, "output", where)
    if not isinstance(output, list) or not output or not isinstance(output[0], dict):
        raise where.error("output", "expected a list of {\"answer\": label} objects")
    label = _label(output[0], "answer", where.nested("output[0]"))
    if not alternatives or not rephrases:
        return None
    if alternatives[0] not in FLIP:
        raise where.error("alternatives[0]", f"{alternatives[0]!r} is not a FEVER label; "
                          f"expected one of {list(LABELS)}")
    return {
        "prompt": claim,
        "target_new": alternatives[0],
        "target_true": label,
        "rephrases": dedupe(rephrases, exclude=claim),
    }
