"""Wikitext generation edits (MEND §5): passage prefix → the base model's own continuation."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mend_jax.data.request import DataError, EditRequest

GenerateFn = Callable[[list[list[int]]], list[list[int]]]


def read_passages(path: str | Path) -> list[str]:
    """Passages of a text file: blank-line separated if it has blank lines, else one a line.

    Wikitext heading lines (" = Title = ") are dropped.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    text = path.read_text(encoding="utf-8")
    lines = text.splitlines()
    if any(not line.strip() for line in lines):
        chunks, cur = [], []
        for line in lines + [""]:
            if line.strip() and not _heading(line):
                cur.append(line.strip())
            elif cur:
                chunks.append(" ".join(cur))
                cur = []
        return chunks
    return [line.strip() for line in lines if line.strip() and not _heading(line)]


def _heading(line: str) -> bool:
    s = line.strip()
    return s.startswith("=") and s.endswith("=")


def load_wikitext(
    path_or_texts: str | Path | Sequence[str],
    generate_fn: GenerateFn,
    tokenizer: Any,
    prefix_tokens: int = 64,
    target_tokens: int = 10,
    seed: int = 0,
    n: int | None = None,
    generate_batch_size: int = 64,
) -> list[EditRequest]:
    """Wikitext edits: x_e = a passage's first `prefix_tokens` tokens, y_e = the base model's.

    `generate_fn(prompt_token_ids_list)` returns the base model's continuation token ids (greedy
    or seeded sampling, the caller's choice) for each prompt; the first `target_tokens` become
    target_new. target_true is the passage's actual continuation. Locality of passage i is the
    prefix and actual continuation of the next passage in the (seeded) order. Passages shorter
    than prefix_tokens + target_tokens are skipped; `n` caps the number of edits.
    """
    if isinstance(path_or_texts, (str, Path)):
        passages = read_passages(path_or_texts)
    else:
        passages = [t.strip() for t in path_or_texts if t.strip()]
    need = prefix_tokens + target_tokens
    ids = [x for x in tokenizer(passages, add_special_tokens=False)["input_ids"] if len(x) >= need]
    if len(ids) < 2:
        raise DataError(f"{_name(path_or_texts)}: fewer than 2 passages of >= {need} tokens")
    order = np.random.default_rng(seed).permutation(len(ids))
    ids = [ids[i] for i in order]
    if n is not None:
        ids = ids[: n + 1]  # one extra passage so that the last edit has a locality partner
    prefixes = [x[:prefix_tokens] for x in ids]
    n_edits = len(ids) if n is None else min(n, len(ids))
    generated: list[list[int]] = []
    for start in range(0, n_edits, generate_batch_size):
        batch = prefixes[start : min(start + generate_batch_size, n_edits)]
        out = generate_fn([list(p) for p in batch])
        if len(out) != len(batch):
            raise ValueError(f"generate_fn returned {len(out)} sequences for {len(batch)} prompts")
        generated += [list(g)[:target_tokens] for g in out]

    def text(tokens: Sequence[int]) -> str:
        return tokenizer.decode(list(tokens), skip_special_tokens=True).strip()

    requests = []
    for i in range(n_edits):
        target_new = text(generated[i])
        if not target_new:
            continue  # the model generated only specials (e.g. eos): nothing to edit towards
        j = (i + 1) % len(ids)
        requests.append(
            EditRequest(
                prompt=text(prefixes[i]),
                target_new=target_new,
                target_true=text(ids[i][prefix_tokens:need]),
                rephrases=(),
                loc_prompt=text(prefixes[j]),
                loc_target=text(ids[j][prefix_tokens:need]),
            )
        )
    return requests


def _name(path_or_texts: Any) -> str:
    return str(path_or_texts) if isinstance(path_or_texts, (str, Path)) else "<texts>"
