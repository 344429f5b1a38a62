"""CounterFact (ROME): counterfactual rewrites of (subject, relation, object) facts."""

from __future__ import annotations

from pathlib import Path

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
from mend_jax.data.zsre import _pairs, _portability, strip_nq_prefix


def load_counterfact(path: str | Path) -> list[EditRequest]:
    """Load the ROME CounterFact json list (`requested_rewrite`, `paraphrase_prompts`, ...).

    The prompt is `requested_rewrite.prompt` with its `{}` filled by the subject. Neighborhood
    prompts are paired with target_true (CounterFact's definition: other subjects that share the
    true object). Locality is the record's `loc`/`loc_ans` when present, else its first
    neighborhood prompt with target_true. A `portability` field is read leniently when present.
    """
    out = []
    for where, rec in read_records(path):
        rw = "requested_rewrite"
        template = get_str(rec, f"{rw}.prompt", where)
        subject = get_str(rec, f"{rw}.subject", where)
        if "{}" not in template:
            raise where.error(f"{rw}.prompt", f"no '{{}}' subject placeholder in {template!r}")
        prompt = template.replace("{}", subject, 1)
        target_new = get_str(rec, f"{rw}.target_new.str", where)
        target_true = get_str(rec, f"{rw}.target_true.str", where)
        paraphrases = get_str_list(rec, "paraphrase_prompts", where)
        if "neighborhood_prompts" in rec:
            neighbors = _neighborhood_prompts(get(rec, "neighborhood_prompts", where), where)
        else:
            neighbors = []
        if "loc" in rec:
            loc_prompt = strip_nq_prefix(get_str(rec, "loc", where))
            loc_target = get_str(rec, "loc_ans", where)
        elif neighbors:
            loc_prompt, loc_target = neighbors[0], target_true
        else:
            raise where.error("neighborhood_prompts", "missing or empty, and no 'loc' field")
        if "neighborhood" in rec:  # explicit pairs (our writer), CounterFact proper has prompts
            neighborhood = _pairs(rec["neighborhood"], where, "neighborhood")
        else:
            neighborhood = tuple((p, target_true) for p in neighbors)
        rephrases_t = dedupe(paraphrases, exclude=prompt)
        out.append(
            EditRequest(
                prompt=prompt,
                target_new=target_new,
                target_true=target_true,
                rephrases=rephrases_t,
                rephrase_forms=get_forms(rec, rephrases_t, where),
                loc_prompt=loc_prompt,
                loc_target=loc_target,
                neighborhood=neighborhood,
                portability=tuple(_portability(rec.get("portability"))),
                subject=subject,
                relation=get_optional_str(rec, f"{rw}.relation_id", where),
                source=str(where),
            )
        )
    if not out:
        raise DataError(f"{path}: no records")
    return out


def _neighborhood_prompts(value: object, where: Where) -> list[str]:
    """CounterFact stores plain strings; some derived dumps store {"prompt": ...} dicts."""
    if not isinstance(value, list):
        raise where.error("neighborhood_prompts", f"expected a list, got {type(value).__name__}")
    out = []
    for i, item in enumerate(value):
        if isinstance(item, dict):
            item = item.get("prompt")
        if not isinstance(item, str):
            raise where.error(f"neighborhood_prompts[{i}]", "expected a string")
        if item.strip():
            out.append(item.strip())
    return out
