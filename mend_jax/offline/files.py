"""Files of the geonames benchmark: splits in the zsRE-EasyEdit and CounterFact json formats."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mend_jax.data._io import get_str, read_records
from mend_jax.data.request import EditRequest

SPLITS = ("train", "val", "test")


def write_benchmark(bench: dict[str, Any], out_dir: str | Path) -> dict[str, Path]:
    """Write facts.json and each split as `{split}.zsre.json` and `{split}.counterfact.json`.

    Both split files load back, through `load_zsre_easyedit` / `load_counterfact`, to the same
    EditRequests (the zsRE file carries the full `rephrases` list and `neighborhood` pairs as
    extra fields). Returns the written paths by name.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"facts": out / "facts.json"}
    _dump([{"prompt": p, "answer": a} for p, a in bench["facts"]], paths["facts"])
    for split in SPLITS:
        requests = bench[split]
        paths[f"{split}.zsre"] = out / f"{split}.zsre.json"
        _dump([_zsre_record(i, r) for i, r in enumerate(requests)], paths[f"{split}.zsre"])
        paths[f"{split}.counterfact"] = out / f"{split}.counterfact.json"
        cf = [_counterfact_record(i, r) for i, r in enumerate(requests)]
        _dump(cf, paths[f"{split}.counterfact"])
    return paths


def load_facts(path: str | Path) -> list[tuple[str, str]]:
    """The (prompt, answer) true facts written by `write_benchmark`."""
    return [(get_str(r, "prompt", w), get_str(r, "answer", w)) for w, r in read_records(path)]


def benchmark_texts(bench: dict[str, Any]) -> list[str]:
    """Every prompt and answer of a benchmark, e.g. to build its word tokenizer."""
    texts = [t for pair in bench["facts"] for t in pair]
    for split in SPLITS:
        for r in bench[split]:
            texts += [r.prompt, r.target_new, r.loc_prompt, r.loc_target, *r.rephrases]
            texts += [r.target_true or ""]
            texts += [t for pair in (*r.neighborhood, *r.portability) for t in pair]
    return texts


def _dump(records: list[dict[str, Any]], path: Path) -> None:
    path.write_text(json.dumps(records, indent=1, ensure_ascii=True) + "\n", encoding="utf-8")


def _zsre_record(i: int, r: EditRequest) -> dict[str, Any]:
    rec: dict[str, Any] = {
        "case_id": i,
        "subject": r.subject,
        "src": r.prompt,
        "alt": r.target_new,
        "answers": [r.target_true] if r.target_true else [],
        "rephrase": r.rephrases[0] if r.rephrases else r.prompt,
        "rephrases": list(r.rephrases),
        "loc": r.loc_prompt,
        "loc_ans": r.loc_target,
        "neighborhood": [list(p) for p in r.neighborhood],
    }
    return _extras(rec, r)


def _extras(rec: dict[str, Any], r: EditRequest) -> dict[str, Any]:
    if r.relation:
        if "requested_rewrite" in rec:  # CounterFact's own field (a Wikidata id there)
            rec["requested_rewrite"]["relation_id"] = r.relation
        else:
            rec["relation"] = r.relation
    if r.rephrase_forms:
        rec["rephrase_forms"] = dict(zip(r.rephrases, r.rephrase_forms, strict=True))
    if r.portability:
        rec["portability"] = [{"New Question": q, "New Answer": a} for q, a in r.portability]
    return rec


def _counterfact_record(i: int, r: EditRequest) -> dict[str, Any]:
    if not r.subject or r.subject not in r.prompt or r.target_true is None:
        raise ValueError(f"request {i}: CounterFact needs a subject inside the prompt: {r}")
    template = r.prompt.replace(r.subject, "{}", 1)
    rec: dict[str, Any] = {
        "case_id": i,
        "requested_rewrite": {
            "prompt": template,
            "subject": r.subject,
            "target_new": {"str": r.target_new},
            "target_true": {"str": r.target_true},
        },
        "paraphrase_prompts": list(r.rephrases),
        "neighborhood_prompts": [p for p, _ in r.neighborhood],
        "loc": r.loc_prompt,
        "loc_ans": r.loc_target,
    }
    if any(a != r.target_true for _, a in r.neighborhood):
        rec["neighborhood"] = [list(p) for p in r.neighborhood]
    return _extras(rec, r)
