"""The offline FEVER-style benchmark: true and corrupted claims about the geonames facts.

Every (relation, subject, true object) fact of `build_geonames_benchmark` makes two claims
under each of its relation's statement templates: "The capital of France is Paris." (SUPPORTS)
and the same with the counterfactual object the geonames request drew for it, "The capital of
France is Lyon." (REFUTES). The base classifier is trained on both claims of every fact under
the *training* templates; an edit request flips one claim's label (which of the two is a coin
flip per request), its rephrases are the same claim under the held-out templates (never seen
by the base model) and its locality claim is a claim about another subject, with its label.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from mend_jax.data.fever import FLIP, REFUTES, SUPPORTS
from mend_jax.data.request import EditRequest
from mend_jax.offline.files import SPLITS
from mend_jax.offline.geonames import RELATIONS, build_geonames_benchmark


def claim(template: str, subject: str, obj: str) -> str:
    """A statement template filled with its subject and object: "The capital of France is Paris."
    """
    return f"{template.replace('{}', subject, 1)} {obj}."


def build_claims_benchmark(
    seed: int = 0, *, n_val: int = 100, n_test: int = 200, n_train: int | None = None
) -> dict[str, Any]:
    """{"claims": [(text, label)] to train the base classifier on, "train"/"val"/"test":
    FEVER edit requests}. Splits are the geonames benchmark's (disjoint in subject and
    relation); deterministic given `seed`."""
    geo = build_geonames_benchmark(seed=seed, n_val=n_val, n_test=n_test, n_train=None,
                                   edit_forms=("statement",))
    # (relation, subject, {label: object}) of every fact, per split.
    facts = {split: [(rel, r.subject, {SUPPORTS: r.target_true, REFUTES: r.target_new})
                     for rel, r in zip(geo["relations"][split], geo[split], strict=True)]
             for split in SPLITS}
    claims = [(claim(t, s, objects[label]), label)
              for split in SPLITS for rel, s, objects in facts[split]
              for t in RELATIONS[rel].templates("statement") for label in (SUPPORTS, REFUTES)]
    out: dict[str, Any] = {"claims": claims}
    for i, split in enumerate(SPLITS):
        rng = np.random.default_rng([seed, 100 + i])
        rows = facts[split] if split != "train" or n_train is None else facts[split][:n_train]
        if n_train is not None and split == "train" and len(rows) < n_train:
            raise ValueError(f"only {len(rows)} training facts for n_train={n_train}")
        out[split] = [_request(fact, rows, rng) for fact in rows]
    return out


def _request(fact, rows, rng: np.random.Generator) -> EditRequest:
    rel, subject, objects = fact
    label = (SUPPORTS, REFUTES)[rng.integers(2)]
    templates = RELATIONS[rel].templates("statement")
    while True:
        l_rel, l_subject, l_objects = rows[rng.integers(len(rows))]
        if l_subject != subject or len(rows) == 1:
            break
    l_label = (SUPPORTS, REFUTES)[rng.integers(2)]
    l_templates = RELATIONS[l_rel].templates("statement")
    return EditRequest(
        prompt=claim(templates[rng.integers(len(templates))], subject, objects[label]),
        target_new=FLIP[label],
        target_true=label,
        rephrases=tuple(claim(t, subject, objects[label])
                        for t in RELATIONS[rel].templates("statement", heldout=True)),
        loc_prompt=claim(l_templates[rng.integers(len(l_templates))], l_subject,
                         l_objects[l_label]),
        loc_target=l_label,
        subject=subject,
    )


def claims_texts(bench: dict[str, Any]) -> list[str]:
    """Every claim of a benchmark (to train its tokenizer on)."""
    texts = [t for t, _ in bench["claims"]]
    for split in SPLITS:
        texts += [t for r in bench[split] for t in (r.prompt, r.loc_prompt, *r.rephrases)]
    return texts


def write_claims_benchmark(bench: dict[str, Any], out_dir: str | Path) -> dict[str, Path]:
    """Write claims.json and each split as `{split}.fever.json` (the FEVER json layout:
    claim, label, rephrase, loc_claim, loc_label), which `load_fever` reads back to the same
    requests. Returns the written paths by name."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"claims": out / "claims.json"}
    _dump([{"claim": c, "label": label} for c, label in bench["claims"]], paths["claims"])
    for split in SPLITS:
        paths[f"{split}.fever"] = out / f"{split}.fever.json"
        _dump([{"claim": r.prompt, "label": r.target_true, "rephrase": list(r.rephrases),
                "loc_claim": r.loc_prompt, "loc_label": r.loc_target, "subject": r.subject}
               for r in bench[split]], paths[f"{split}.fever"])
    return paths


def _dump(records: list[dict[str, Any]], path: Path) -> None:
    path.write_text(json.dumps(records, indent=1, ensure_ascii=True) + "\n", encoding="utf-8")
