"""Tokenising (prompt, target) pairs into fixed-shape numpy batches for edits and locality."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from mend_jax.data.request import DataError, EditRequest

log = logging.getLogger(__name__)

IGNORE = -100  # label of positions that do not count (prompt tokens, padding)

Batch = dict[str, np.ndarray]


def tokenize_pairs(
    tokenizer: Any,
    prompts: Sequence[str],
    targets: Sequence[str],
    *,
    seq2seq: bool,
    max_length: int,
    max_target_length: int | None = None,
    append_eos: bool = False,
    decoder_start_token_id: int | None = None,
    label2id: Mapping[str, int] | None = None,
) -> Batch:
    """Tokenise prompt→target pairs into fixed-shape int32 arrays with -100 outside the target.

    `Model.pair_format` holds the keyword arguments a model needs (`seq2seq`,
    `decoder_start_token_id`, `label2id`).

    Decoder-only (`seq2seq=False`): input_ids = prompt + " " + target (+ eos if `append_eos`),
    [B, max_length], right-padded; labels are aligned with input_ids (the model shifts: logits
    at t predict labels at t+1). An over-long pair loses prompt tokens from the left (a leading
    BOS is kept); the whole target is kept.
    Seq2seq (`seq2seq=True`): input_ids = prompt with the tokenizer's own specials (T5 appends
    eos), left-truncated to max_length; labels = target + eos, [B, max_target_length];
    decoder_input_ids = [decoder_start] + labels[:-1], decoder_start defaulting to the pad id
    (T5's convention; pass the model's `decoder_start_token_id` for BART).
    Classifier (`label2id` given): input_ids = prompt with the tokenizer's own specials
    (e.g. [CLS] ... [SEP]), right-truncated to max_length (the last token, e.g. [SEP], kept);
    labels [B] = label2id[target], the class the prompt is to be given.
    All return a `truncated` bool array [B]; truncations are also logged.
    """
    if len(prompts) != len(targets):
        raise ValueError(f"{len(prompts)} prompts but {len(targets)} targets")
    if label2id is not None:
        return _classify(tokenizer, prompts, targets, max_length, label2id)
    if seq2seq:
        return _seq2seq(
            tokenizer,
            prompts,
            targets,
            max_length,
            max_target_length or max_length,
            decoder_start_token_id,
        )
    return _decoder_only(tokenizer, prompts, targets, max_length, append_eos)


def _ids(tokenizer: Any, texts: Sequence[str], special: bool) -> list[list[int]]:
    return tokenizer(list(texts), add_special_tokens=special)["input_ids"]


def _pad_id(tokenizer: Any) -> int:
    pad = tokenizer.pad_token_id
    pad = pad if pad is not None else tokenizer.eos_token_id  # GPT-2 has no pad token
    if pad is None:
        raise ValueError("the tokenizer has neither a pad nor an eos token to pad with")
    return pad


def _check_target(ids: list[int], i: int, target: str, unk: int | None = None) -> None:
    if not ids:
        raise ValueError(f"pair {i}: target {target!r} tokenises to nothing")
    if unk is not None and unk in ids:
        # An edit toward the unknown token would be reported as an edit toward the target.
        from mend_jax.errors import EditError

        raise EditError(f"pair {i}: target {target!r} contains a word the tokenizer does not "
                        f"know (it encodes to the unknown token)")


def target_lengths(tokenizer: Any, targets: Sequence[str], max_length: int,
                   append_eos: bool = False) -> list[int]:
    """How many labelled tokens a decoder-only `tokenize_pairs` gives each target."""
    ids = _ids(tokenizer, [" " + t for t in targets], False)
    return [min(len(t) + int(append_eos), max_length - 1) for t in ids]


def _decoder_only(
    tokenizer: Any, prompts: Sequence[str], targets: Sequence[str], max_length: int, eos: bool
) -> Batch:
    bsz = len(prompts)
    pad = _pad_id(tokenizer)
    bos = tokenizer.bos_token_id
    input_ids = np.full((bsz, max_length), pad, np.int32)
    attention_mask = np.zeros((bsz, max_length), np.int32)
    labels = np.full((bsz, max_length), IGNORE, np.int32)
    truncated = np.zeros(bsz, bool)
    prompt_ids = _ids(tokenizer, prompts, True)
    target_ids = _ids(tokenizer, [" " + t for t in targets], False)
    for i, (p, t) in enumerate(zip(prompt_ids, target_ids, strict=True)):
        _check_target(t, i, targets[i], getattr(tokenizer, "unk_token_id", None))
        if eos:
            t = t + [tokenizer.eos_token_id]
        t = t[: max_length - 1]  # keep at least one prompt token to condition on
        room = max_length - len(t)
        if len(p) > room:
            truncated[i] = True
            keep_bos = bos is not None and p[0] == bos and room > 1
            p = ([bos] if keep_bos else []) + p[len(p) - room + int(keep_bos) :]
        seq = p + t
        input_ids[i, : len(seq)] = seq
        attention_mask[i, : len(seq)] = 1
        labels[i, len(p) : len(seq)] = t
    _log_truncation(truncated, max_length)
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": labels,
        "truncated": truncated,
    }


def _seq2seq(
    tokenizer: Any,
    prompts: Sequence[str],
    targets: Sequence[str],
    max_length: int,
    max_target_length: int,
    decoder_start: int | None,
) -> Batch:
    bsz = len(prompts)
    pad = _pad_id(tokenizer)
    start = pad if decoder_start is None else decoder_start
    input_ids = np.full((bsz, max_length), pad, np.int32)
    attention_mask = np.zeros((bsz, max_length), np.int32)
    decoder_input_ids = np.full((bsz, max_target_length), pad, np.int32)
    decoder_attention_mask = np.zeros((bsz, max_target_length), np.int32)
    labels = np.full((bsz, max_target_length), IGNORE, np.int32)
    truncated = np.zeros(bsz, bool)
    eos = tokenizer.eos_token_id
    for i, (p, t) in enumerate(
        zip(_ids(tokenizer, prompts, True), _ids(tokenizer, targets, False), strict=True)
    ):
        _check_target(t, i, targets[i], getattr(tokenizer, "unk_token_id", None))
        if eos is not None:
            t = t + [eos]
        if len(p) > max_length:
            p = p[len(p) - max_length :]
            truncated[i] = True
        if len(t) > max_target_length:
            t = t[:max_target_length]
            truncated[i] = True
        input_ids[i, : len(p)] = p
        attention_mask[i, : len(p)] = 1
        labels[i, : len(t)] = t
        decoder_input_ids[i, : len(t)] = [start] + t[:-1]
        decoder_attention_mask[i, : len(t)] = 1
    _log_truncation(truncated, max_length)
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "decoder_input_ids": decoder_input_ids,
        "decoder_attention_mask": decoder_attention_mask,
        "labels": labels,
        "truncated": truncated,
    }


def _class_ids(targets: Sequence[str], label2id: Mapping[str, int]) -> list[int]:
    """The class id of each target label name; an EditError naming an unknown one."""
    from mend_jax.errors import EditError

    out = []
    for i, target in enumerate(targets):
        if target not in label2id:
            raise EditError(f"pair {i}: target {target!r} is not one of the classifier's "
                             f"labels {sorted(label2id)} (its config's label2id)")
        out.append(int(label2id[target]))
    return out


def _classify(
    tokenizer: Any,
    prompts: Sequence[str],
    targets: Sequence[str],
    max_length: int,
    label2id: Mapping[str, int],
) -> Batch:
    bsz = len(prompts)
    labels = np.asarray(_class_ids(targets, label2id), np.int32)
    input_ids = np.full((bsz, max_length), _pad_id(tokenizer), np.int32)
    attention_mask = np.zeros((bsz, max_length), np.int32)
    truncated = np.zeros(bsz, bool)
    for i, p in enumerate(_ids(tokenizer, prompts, True)):
        if len(p) > max_length:
            p = p[: max_length - 1] + p[-1:]
            truncated[i] = True
        input_ids[i, : len(p)] = p
        attention_mask[i, : len(p)] = 1
    _log_truncation(truncated, max_length)
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": labels,
        "truncated": truncated,
    }


def _log_truncation(truncated: np.ndarray, max_length: int) -> None:
    if truncated.any():
        log.warning(
            "truncated %d of %d pairs to fit max_length=%d",
            int(truncated.sum()),
            len(truncated),
            max_length,
        )


def _request_rows(r: EditRequest) -> list[tuple[str, str, str, str]]:
    """(prompt field, prompt, target field, target) of every row a request can be batched as."""
    rows = [("prompt", r.prompt, "target_new", r.target_new)]
    rows += [(f"rephrases[{j}]", p, "target_new", r.target_new)
             for j, p in enumerate(r.rephrases)]
    rows.append(("loc_prompt", r.loc_prompt, "loc_target", r.loc_target))
    rows += [(f"neighborhood[{j}]", p, f"neighborhood[{j}]", t)
             for j, (p, t) in enumerate(r.neighborhood)]
    return rows


def check_requests(
    requests: Sequence[EditRequest],
    tokenizer: Any,
    *,
    seq2seq: bool,
    max_length: int,
    max_target_length: int | None = None,
    append_eos: bool = False,
    decoder_start_token_id: int | None = None,
    label2id: Mapping[str, int] | None = None,
) -> None:
    """Refuse requests that `make_edit_batch` could only batch wrongly, before any training:
    an empty prompt or target, a target that encodes to no tokens or to the tokenizer's unknown
    token (an edit toward `<unk>`), a row longer than `max_length` (its prompt would lose its
    start, the subject of the fact). Every row is checked: prompt, rephrases, locality and
    neighbourhood pairs. Takes `make_edit_batch`'s arguments (`**model.pair_format` included).

    Raises:
      DataError naming the file and record (the request's `source`; its index when it was
      built in memory), the field and the problem of the first bad request, and how many
      requests are bad in all.
    """
    del decoder_start_token_id  # accepted so that `**model.pair_format` can be passed
    owner, rows = [], []
    for i, r in enumerate(requests):
        for row in _request_rows(r):
            owner.append(i)
            rows.append(row)
    if not rows:
        return
    unk = getattr(tokenizer, "unk_token_id", None)
    prompt_ids = _ids(tokenizer, [p for _, p, _, _ in rows], True)
    if label2id is None:
        target_ids = _ids(tokenizer, [t if seq2seq else " " + t for _, _, _, t in rows], False)
    limit_t = (max_target_length or max_length) if seq2seq else None
    extra = int(append_eos) if not seq2seq else int(tokenizer.eos_token_id is not None)
    bad: dict[int, str] = {}
    for k, (pf, prompt, tf, target) in enumerate(rows):
        i = owner[k]
        if i in bad:
            continue
        problem = None
        if not prompt.strip():
            problem = f"{pf} is empty"
        elif not target.strip():
            problem = f"{tf} is empty"
        elif label2id is not None:
            if target not in label2id:
                problem = (f"{tf} {target!r} is not one of the classifier's labels "
                           f"{sorted(label2id)}")
            elif len(prompt_ids[k]) > max_length:
                problem = (f"{pf} is {len(prompt_ids[k])} tokens, over max_length={max_length}")
        elif not target_ids[k]:
            problem = f"{tf} {target!r} encodes to no tokens"
        elif unk is not None and unk in target_ids[k]:
            problem = (f"{tf} {target!r} encodes to the tokenizer's unknown token "
                       f"{tokenizer.unk_token!r} (a word outside its vocabulary)")
        elif seq2seq and len(prompt_ids[k]) > max_length:
            problem = f"{pf} is {len(prompt_ids[k])} tokens, over max_length={max_length}"
        elif seq2seq and len(target_ids[k]) + extra > limit_t:
            problem = (f"{tf} {target!r} is {len(target_ids[k]) + extra} tokens with eos, over "
                       f"the target length {limit_t}")
        elif not seq2seq and len(prompt_ids[k]) + len(target_ids[k]) + extra > max_length:
            problem = (f"{pf} + {tf} are {len(prompt_ids[k]) + len(target_ids[k]) + extra} "
                       f"tokens, over max_length={max_length} (the prompt would lose its start)")
        if problem is not None:
            bad[i] = problem
    if bad:
        i = min(bad)
        where = requests[i].source or f"request {i} (0-based, built in memory)"
        more = f" ({len(bad) - 1} more bad requests)" if len(bad) > 1 else ""
        raise DataError(f"{where}: {bad[i]}{more}")


def make_edit_batch(
    tokenizer: Any,
    requests: Sequence[EditRequest],
    *,
    seq2seq: bool,
    max_length: int,
    rng: np.random.Generator,
    n_edits: int | None = None,
    max_target_length: int | None = None,
    neighborhood: bool = True,
    loc_neighbors: bool | float = False,
    decoder_start_token_id: int | None = None,
    label2id: Mapping[str, int] | None = None,
    check: bool = True,
) -> dict[str, Batch]:
    """Build the edit_inner / edit_outer / loc (/ neighborhood) batches of one training step.

    The first `n_edits` requests (all by default) are edited: edit_inner is prompt→target_new,
    edit_outer a random rephrase (chosen with `rng`; the prompt when there is none)→target_new,
    both [n_edits, L]. loc pairs every request's loc_prompt→loc_target, [B, L], as in the
    reference's batched editing. neighborhood pairs each edit's first neighborhood prompt with
    its true target (falling back to the loc pair), [n_edits, L]. With `loc_neighbors`, the
    loc rows of the edited requests are one of their neighbourhood pairs instead (chosen with
    `rng`; the loc pair when a request has none): locality is then also enforced on the
    hardest cases, other subjects that share the edited fact's true object. A float in (0, 1)
    replaces each such row with that probability (drawn with `rng`); True is 1.0.
    `decoder_start_token_id` and `label2id` go to `tokenize_pairs` (see `Model.pair_format`).
    Requests that would be batched wrongly (`check_requests`) raise a DataError naming them;
    `check=False` skips that for requests checked already (the training loop checks its splits
    once, before step 0).
    """
    frac = float(loc_neighbors)
    if not 0.0 <= frac <= 1.0:
        raise ValueError(f"loc_neighbors must be a bool or a fraction in [0, 1], got "
                         f"{loc_neighbors!r}")
    k = len(requests) if n_edits is None else n_edits
    if not 0 < k <= len(requests):
        raise ValueError(f"n_edits={n_edits} with {len(requests)} requests")
    edits = requests[:k]
    kw: dict[str, Any] = {
        "seq2seq": seq2seq,
        "max_length": max_length,
        "max_target_length": max_target_length,
        "decoder_start_token_id": decoder_start_token_id,
        "label2id": label2id,
    }
    if check:
        check_requests(requests, tokenizer, **kw)
    outer = [
        r.rephrases[rng.integers(len(r.rephrases))] if r.rephrases else r.prompt for r in edits
    ]
    new = [r.target_new for r in edits]
    batch = {
        "edit_inner": tokenize_pairs(tokenizer, [r.prompt for r in edits], new, **kw),
        "edit_outer": tokenize_pairs(tokenizer, outer, new, **kw),
    }
    loc = [(r.loc_prompt, r.loc_target) for r in requests]
    if frac > 0.0:
        for i, r in enumerate(edits):
            if r.neighborhood and (frac >= 1.0 or rng.random() < frac):
                loc[i] = r.neighborhood[rng.integers(len(r.neighborhood))]
    batch["loc"] = tokenize_pairs(tokenizer, [p for p, _ in loc], [t for _, t in loc], **kw)
    if neighborhood:
        pairs = [
            r.neighborhood[0] if r.neighborhood else (r.loc_prompt, r.loc_target) for r in edits
        ]
        batch["neighborhood"] = tokenize_pairs(
            tokenizer, [p for p, _ in pairs], [t for _, t in pairs], **kw
        )
    return batch


def batch_iterator(
    requests: Sequence[EditRequest],
    tokenizer: Any,
    *,
    batch_size: int,
    seq2seq: bool,
    max_length: int,
    seed: int,
    shuffle: bool = True,
    epochs: int | None = None,
    n_edits: int | None = None,
    max_target_length: int | None = None,
    drop_last: bool = True,
    decoder_start_token_id: int | None = None,
    label2id: Mapping[str, int] | None = None,
) -> Iterator[dict[str, Batch]]:
    """Yield `make_edit_batch` batches of `batch_size` requests, for `epochs` (None: forever).

    The incomplete last batch of an epoch is dropped (fixed shapes, no recompilation) unless
    `drop_last=False`. Order and rephrase choices are deterministic given `seed`.
    """
    if batch_size > len(requests):
        raise ValueError(f"batch_size={batch_size} exceeds the {len(requests)} requests")
    check_requests(requests, tokenizer, seq2seq=seq2seq, max_length=max_length,
                   max_target_length=max_target_length, label2id=label2id)
    rng = np.random.default_rng(seed)
    epoch = 0
    while epochs is None or epoch < epochs:
        order = rng.permutation(len(requests)) if shuffle else np.arange(len(requests))
        stop = len(order) - len(order) % batch_size if drop_last else len(order)
        for start in range(0, stop, batch_size):
            chunk = [requests[j] for j in order[start : start + batch_size]]
            yield make_edit_batch(
                tokenizer,
                chunk,
                seq2seq=seq2seq,
                max_length=max_length,
                rng=rng,
                n_edits=None if n_edits is None else min(n_edits, len(chunk)),
                max_target_length=max_target_length,
                decoder_start_token_id=decoder_start_token_id,
                label2id=label2id,
            )
        epoch += 1
