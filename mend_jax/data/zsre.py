"""zsRE question answering: the MEND jsonl release and the ROME/EasyEdit json variant."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from mend_jax.data._io import (
    Where,
    dedupe,
    get,
    get_forms,
    get_optional_str,
    get_str,
    get_str_list,
    read_records,
)
from mend_jax.data.request import DataError, EditRequest

log = logging.getLogger(__name__)

_NQ_PREFIX = "nq question:"


def strip_nq_prefix(question: str) -> str:
    """Drop the "nq question: " prefix that the EasyEdit / MEND NQ dumps put on questions."""
    q = question.strip()
    if q.lower().startswith(_NQ_PREFIX):
        q = q[len(_NQ_PREFIX) :].strip()
    return q


def load_zsre_mend(path: str | Path, loc_path: str | Path | None = None) -> list[EditRequest]:
    """Load the MEND zsRE jsonl (`input`, `prediction`, `alternatives`, `filtered_rephrases`).

    target_new is the first non-empty alternative that differs from the base model's
    `prediction`; records with no such alternative are skipped, as the reference does (the count
    is logged). target_true is `output[0].answer` when present.

    Locality: with `loc_path`, record i takes NQ pair i mod len(loc) from that jsonl
    (`{"question", "answer"}` or `{"loc", "loc_ans"}`). Without it, record i takes the question
    of record (i + N//2) mod N and that record's base `prediction` as answer (its true answer
    when the prediction is empty): round-robin pairing at half the file's length, so that
    neighbouring records, which often share a subject, are not paired.
    """
    rows: list[dict[str, Any]] = []
    skipped = 0
    for where, rec in read_records(path):
        prompt = get_str(rec, "input", where)
        prediction = get_str(rec, "prediction", where, empty_ok=True)
        alternatives = get_str_list(rec, "alternatives", where)
        raw_alts = get(rec, "alternatives", where)
        if raw_alts and not alternatives:
            raise where.error("alternatives", "empty target: every alternative is empty")
        usable = [a for a in alternatives if a != prediction]
        if not usable:
            skipped += 1
            continue
        rephrases = get_str_list(rec, "filtered_rephrases", where)
        target_true = None
        if "output" in rec:
            output = get(rec, "output", where)
            if isinstance(output, list) and output:
                first = output[0]
                if isinstance(first, dict) and "answer" in first:
                    target_true = get_str(first, "answer", where.nested("output[0]"))
                elif isinstance(first, str) and first.strip():
                    target_true = first.strip()
        rows.append(
            {
                "prompt": prompt,
                "target_new": usable[0],
                "target_true": target_true,
                "rephrases": dedupe(rephrases, exclude=prompt),
                "base_answer": prediction or target_true,
                "subject": rec.get("subject") if isinstance(rec.get("subject"), str) else None,
                "where": where,
            }
        )
    if skipped:
        log.info("%s: skipped %d records without a usable alternative", path, skipped)
    if not rows:
        raise DataError(f"{path}: no usable records")

    if loc_path is not None:
        locs = _read_nq(loc_path)
    else:
        if len(rows) < 2:
            raise DataError(f"{path}: one record and no loc_path; locality needs another record")
        n = len(rows)
        locs = []
        for i in range(n):
            other = rows[(i + max(1, n // 2)) % n]
            if not other["base_answer"]:
                raise other["where"].error(
                    "prediction",
                    "empty, and no 'output' answer to serve as locality target "
                    "for another record; pass loc_path",
                )
            locs.append((other["prompt"], other["base_answer"]))
    return [
        EditRequest(
            prompt=r["prompt"],
            target_new=r["target_new"],
            target_true=r["target_true"],
            rephrases=r["rephrases"],
            loc_prompt=locs[i % len(locs)][0],
            loc_target=locs[i % len(locs)][1],
            subject=r["subject"],
            source=str(r["where"]),
        )
        for i, r in enumerate(rows)
    ]


def _read_nq(path: str | Path) -> list[tuple[str, str]]:
    """NQ locality pairs from a jsonl of {"question","answer"} or {"loc","loc_ans"} records."""
    pairs = []
    for where, rec in read_records(path):
        q_field, a_field = ("question", "answer") if "question" in rec else ("loc", "loc_ans")
        question = strip_nq_prefix(get_str(rec, q_field, where))
        pairs.append((question, get_str(rec, a_field, where)))
    if not pairs:
        raise DataError(f"{path}: no locality records")
    return pairs


def load_zsre_easyedit(path: str | Path) -> list[EditRequest]:
    """Load the ROME/EasyEdit zsRE json (`src`, `alt`, `answers`, `rephrase`, `loc`, `loc_ans`).

    Lenient extras: `rephrase` may be a list; a `rephrases` list and a `neighborhood` list of
    [prompt, answer] pairs (written by `write_benchmark`) are read when present; `portability`
    may be {"New Question", "New Answer"}, a list of those, or EasyEdit's nested
    {"prompt", "ground_truth"} dicts.
    """
    out = []
    for where, rec in read_records(path):
        prompt = get_str(rec, "src", where)
        target_new = get_str(rec, "alt", where)
        answers = get_str_list(rec, "answers", where) if "answers" in rec else []
        rephrases = get_str_list(rec, "rephrase", where) if "rephrase" in rec else []
        if "rephrases" in rec:
            rephrases += get_str_list(rec, "rephrases", where)
        loc_prompt = strip_nq_prefix(get_str(rec, "loc", where))
        if not loc_prompt:
            raise where.error("loc", "empty")
        neighborhood = (
            _pairs(rec["neighborhood"], where, "neighborhood") if "neighborhood" in rec else ()
        )
        subject = rec.get("subject")
        rephrases_t = dedupe(rephrases, exclude=prompt)
        out.append(
            EditRequest(
                prompt=prompt,
                target_new=target_new,
                target_true=answers[0] if answers else None,
                rephrases=rephrases_t,
                rephrase_forms=get_forms(rec, rephrases_t, where),
                loc_prompt=loc_prompt,
                loc_target=get_str(rec, "loc_ans", where),
                neighborhood=neighborhood,
                portability=tuple(_portability(rec.get("portability"))),
                subject=subject.strip() if isinstance(subject, str) and subject.strip() else None,
                relation=get_optional_str(rec, "relation", where),
                source=str(where),
            )
        )
    if not out:
        raise DataError(f"{path}: no records")
    return out


def _pairs(value: Any, where: Where, field: str) -> tuple[tuple[str, str], ...]:
    if not isinstance(value, list):
        raise where.error(field, "expected a list of [prompt, answer] pairs")
    out = []
    for i, pair in enumerate(value):
        ok = isinstance(pair, (list, tuple)) and len(pair) == 2
        if not ok or not all(isinstance(s, str) and s.strip() for s in pair):
            raise where.error(
                f"{field}[{i}]", "expected a [prompt, answer] pair of non-empty strings"
            )
        out.append((pair[0].strip(), pair[1].strip()))
    return tuple(out)


def _portability(value: Any) -> list[tuple[str, str]]:
    """Collect (question, answer) pairs from EasyEdit's several portability layouts."""
    if isinstance(value, list):
        return [pair for item in value for pair in _portability(item)]
    if not isinstance(value, dict):
        return []
    for q_key, a_key in (("New Question", "New Answer"), ("prompt", "ground_truth")):
        if q_key in value and a_key in value:
            q, a = value[q_key], value[a_key]
            while isinstance(a, list) and a:
                a = a[0]
            if isinstance(q, str) and isinstance(a, str) and q.strip() and a.strip():
                return [(q.strip(), a.strip())]
            return []
    return [pair for v in value.values() for pair in _portability(v)]
