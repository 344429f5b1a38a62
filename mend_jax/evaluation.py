"""Held-out evaluation of an editor: edit success, generality, locality, drawdown, KL, timing.

Requests are edited in groups of `n_edits` (k requests in ONE `editor.edit` call); every group
is measured by one jitted function (the edit plus every forward pass), on fixed-shape batches
tokenised once up front, so the loop costs one dispatch per group. Metric names follow MEND
(`edit_success`, `generality`, `drawdown`, `locality_kl`) and EasyEdit (`reliability`,
`generalization`, `locality`, `portability`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from mend_jax.capture import labelled_logits
from mend_jax.data.batching import tokenize_pairs
from mend_jax.data.request import EditRequest
from mend_jax.editing import check_edit_batch, jit_edit
from mend_jax.editors.ft import FineTune
from mend_jax.errors import import_extra
from mend_jax.metrics import (
    IGNORE,
    POSITIONS,
    loc_mask,
    logit_positions,
    positions_width,
    sequence_correct,
    shift_labels,
    token_log_probs,
)
from mend_jax.models import model_inputs

METRIC_KEYS = (
    "edit_success", "generality", "drawdown", "locality_kl", "loc_acc_pre", "loc_acc_post",
    "neighborhood_acc", "neighborhood_acc_pre", "pre_edit_success", "n_edits", "n_examples",
    "edit_time_s",
    "reliability", "generalization", "locality", "portability",
    "efficacy_score", "paraphrase_score", "neighborhood_score",
)
MODEL_KEYS = ("input_ids", "attention_mask", "decoder_input_ids", "decoder_attention_mask",
              "labels", POSITIONS)
# Probe kinds, several (prompt, target) pairs per request (rows weighted per request): measured
# after the edit; neighbourhood also before it (`_group_fn`).
def _outer_prompts(r: EditRequest) -> tuple[str, ...]:
    return r.rephrases or (r.prompt,)


_PROBES: dict[str, Callable[[EditRequest], Sequence[tuple[str, str]]]] = {
    "edit_outer": lambda r: [(p, r.target_new) for p in _outer_prompts(r)],
    "neighborhood": lambda r: r.neighborhood,
    "portability": lambda r: r.portability,
    # The rows' counterparts for the CounterFact scores (ROME/MEMIT): the same prompts with the
    # other target, compared by mean token NLL. Row for row aligned with their partner kind.
    "edit_inner_true": lambda r: [(r.prompt, r.target_true)] if r.target_true else [],
    "edit_outer_true": lambda r: ([(p, r.target_true) for p in _outer_prompts(r)]
                                  if r.target_true else []),
    "neighborhood_new": lambda r: [(p, r.target_new) for p, _ in r.neighborhood],
}
# kind -> the kind whose rows it mirrors (same width: a request's rows are a prefix of them).
_PARTNERS = {"edit_inner_true": "edit_inner", "edit_outer_true": "edit_outer",
             "neighborhood_new": "neighborhood"}


# ----------------------------------------------------------------------------- batches
def _tokenize(tokenizer, pairs, **kw) -> dict[str, np.ndarray]:
    batch = tokenize_pairs(tokenizer, [p for p, _ in pairs], [t for _, t in pairs], **kw)
    return {k: v for k, v in batch.items() if k in MODEL_KEYS}


def _grouped(batch: dict[str, np.ndarray], n_groups: int) -> dict[str, np.ndarray]:
    return {k: v.reshape(n_groups, -1, *v.shape[1:]) for k, v in batch.items()}


def _prepare(requests: Sequence[EditRequest], tokenizer, k: int, **kw) -> tuple[dict, dict]:
    """(batches [G, rows, L] per kind, row weights [G, k, width] per probe kind)."""
    n_groups = len(requests) // k
    batches = {
        "edit_inner": _tokenize(tokenizer, [(r.prompt, r.target_new) for r in requests], **kw),
        "loc": _tokenize(tokenizer, [(r.loc_prompt, r.loc_target) for r in requests], **kw),
    }
    weights = {}
    widths = {"edit_inner": 1}
    for kind, pairs_of in _PROBES.items():
        per_request = [list(pairs_of(r)) for r in requests]
        width = max(len(p) for p in per_request)
        if width == 0:
            continue  # no request has this probe: the metric is None
        width = widths.get(_PARTNERS.get(kind), width)
        widths[kind] = width
        pairs, w = [], np.zeros((len(requests), width), np.float32)
        for i, (r, own) in enumerate(zip(requests, per_request)):
            w[i, : len(own)] = 1.0
            # Padding rows repeat a real pair (so they tokenise) and carry weight 0.
            filler = own[0] if own else (r.prompt, r.target_new)
            pairs += own + [filler] * (width - len(own))
        batches[kind] = _tokenize(tokenizer, pairs, **kw)
        weights[kind] = w.reshape(n_groups, k, width)
    if not kw.get("seq2seq") and kw.get("label2id") is None:
        # Decoder-only: the edit and the post-edit probes need logits at the labelled positions
        # alone (`capture.labelled_logits`); one width, as kinds are concatenated.
        width = positions_width(*(b["labels"] for b in batches.values()))
        for b in batches.values():
            b[POSITIONS] = logit_positions(b["labels"], width)
    # Generality per surface form of the rephrases, when the requests name them.
    for form in sorted({f for r in requests for f in r.rephrase_forms}):
        w = np.zeros((len(requests), widths["edit_outer"]), np.float32)
        for i, r in enumerate(requests):
            w[i, : len(r.rephrase_forms)] = [f == form for f in r.rephrase_forms]
        weights[f"edit_outer/{form}"] = w.reshape(n_groups, k, -1)
    return {kind: _grouped(b, n_groups) for kind, b in batches.items()}, weights


# ----------------------------------------------------------------------------- the jitted core
def _chunked(fn: Callable, rows: dict, batch_size: int | None) -> dict:
    """fn over the rows in chunks of `batch_size` (lax.map, so one compiled forward)."""
    n = rows["input_ids"].shape[0]
    if batch_size is None or batch_size >= n:
        return fn(rows)
    n_chunks = -(-n // batch_size)
    pad = n_chunks * batch_size - n
    # Pad by repeating real rows: an all-padding row could give NaNs in some attention kernels.
    chunks = jax.tree.map(
        lambda x: jnp.concatenate([x, x[:pad]] if pad else [x]).reshape(
            n_chunks, batch_size, *x.shape[1:]), rows)
    out = jax.lax.map(fn, chunks)
    return jax.tree.map(lambda x: x.reshape(n_chunks * batch_size, *x.shape[2:])[:n], out)


def _as_rows(logits, labels):
    """(logits, labels) per row; a classifier's [B, C] logits and [B] labels as rows of one
    counted position, so that every per-row statistic below reads the same for both."""
    return (logits[:, None], labels[:, None]) if labels.ndim == 1 else (logits, labels)


def _paired_stats(model, base_params, new_params, rows) -> dict:
    """Per-row statistics that compare the base and the edited model on the same rows."""
    shift = model.shift_labels
    inputs = model_inputs(rows)
    base, _ = _as_rows(model.logits(base_params, *inputs), rows["labels"])
    post, labels = _as_rows(model.logits(new_params, *inputs), rows["labels"])
    # EasyEdit's locality: teacher-forced target positions whose argmax the edit left unchanged.
    b, p, lab = (base, post, shift_labels(labels)) if shift else (base, post, labels)
    counted = lab != IGNORE
    same = (jnp.argmax(b, -1) == jnp.argmax(p, -1)) & counted
    # KL(p_base ‖ p_edited) summed per row over the same mask as `metrics.locality_kl`.
    lp_base = jax.nn.log_softmax(base.astype(jnp.float32), -1)
    lp_post = jax.nn.log_softmax(post.astype(jnp.float32), -1)
    kl = (jnp.exp(lp_base) * (lp_base - lp_post)).sum(-1)
    kl_mask = loc_mask(rows, model.seq2seq).reshape(kl.shape).astype(jnp.float32)
    logp_pre, mask = token_log_probs(base, labels, shift)
    logp_post, _ = token_log_probs(post, labels, shift)
    return {
        "correct_pre": sequence_correct(base, labels, shift),
        "correct_post": sequence_correct(post, labels, shift),
        "nll_mean_pre": -(logp_pre * mask).sum(-1) / jnp.maximum(mask.sum(-1), 1),
        "nll_mean_post": -(logp_post * mask).sum(-1) / jnp.maximum(mask.sum(-1), 1),
        "unchanged": same.sum(-1) / jnp.maximum(counted.sum(-1), 1),
        "kl_sum": (kl * kl_mask).sum(-1),
        "kl_count": kl_mask.sum(-1),
        "nll_pre": -(logp_pre * mask).sum(-1),
        "nll_post": -(logp_post * mask).sum(-1),
        "n_tokens": mask.sum(-1),
    }


def _post_stats(model, new_params, rows) -> dict:
    shift = model.shift_labels
    post, labels = _as_rows(*labelled_logits(model, new_params, rows))
    logp, mask = token_log_probs(post, labels, shift)
    return {"correct_post": sequence_correct(post, labels, shift),
            "nll_mean_post": -(logp * mask).sum(-1) / jnp.maximum(mask.sum(-1), 1)}


def _concat(batches: Sequence[dict]) -> dict:
    return {k: jnp.concatenate([b[k] for b in batches]) for k in batches[0]}


def _split(stats: dict, sizes: Sequence[int]) -> list[dict]:
    bounds = np.cumsum(sizes)[:-1].tolist()
    parts = {k: jnp.split(v, bounds) for k, v in stats.items()}
    return [{k: v[i] for k, v in parts.items()} for i in range(len(sizes))]


def _edit_batch(editor, group: dict) -> Any:
    # FT (and FT+KL) take the locality examples too; MEND edits from edit_inner alone.
    if isinstance(editor, FineTune):
        return {"edit_inner": group["edit_inner"], "loc": group["loc"]}
    return group["edit_inner"]


def _group_fn(model, editor, batch_size: int | None) -> Callable:
    """Jitted (editor_state, model_params, group) -> per-row statistics of one edit group."""

    def run(editor_state, model_params, group):
        new_params = editor.edit(editor_state, model_params, _edit_batch(editor, group))
        # Rows measured before and after the edit; neighbours too, so the report separates
        # what the edit broke from what the base model never got right.
        paired_kinds = ("edit_inner", "loc") + (("neighborhood",) if "neighborhood" in group
                                                else ())
        paired = _chunked(lambda r: _paired_stats(model, model_params, new_params, r),
                          _concat([group[k] for k in paired_kinds]), batch_size)
        out = dict(zip(paired_kinds, _split(
            paired, [group[k]["input_ids"].shape[0] for k in paired_kinds])))
        probe_kinds = [k for k in _PROBES if k in group and k not in paired_kinds]
        post = _chunked(lambda r: _post_stats(model, new_params, r),
                        _concat([group[k] for k in probe_kinds]), batch_size)
        out.update(zip(probe_kinds, _split(
            post, [group[k]["input_ids"].shape[0] for k in probe_kinds])))
        return out

    return jax.jit(run)


# ----------------------------------------------------------------------------- aggregation
def _probe_accuracy(correct: np.ndarray, weights: np.ndarray | None) -> float | None:
    """Mean over requests (that have the probe) of the fraction of their probes correct."""
    if weights is None:
        return None
    correct = correct.reshape(weights.shape).astype(np.float64)
    n = weights.sum(-1)
    has = n > 0
    return float(((correct * weights).sum(-1)[has] / n[has]).mean())


def _time_edits(editor, editor_state, model_params, groups: list[dict], n: int) -> float | None:
    """Mean wall time of one jitted `editor.edit` call, compile excluded."""
    if n <= 0:
        return None
    edit = jit_edit(editor)
    jax.block_until_ready(edit(editor_state, model_params, _edit_batch(editor, groups[0])))
    times = []
    for group in groups[:n]:
        batch = _edit_batch(editor, group)
        start = time.perf_counter()
        jax.block_until_ready(edit(editor_state, model_params, batch))
        times.append(time.perf_counter() - start)
    return float(np.mean(times))


def _summary(cat: dict, weights: dict, kl: float, **extra) -> dict[str, Any]:
    """The metrics of `METRIC_KEYS` from per-row statistics (`cat[kind][stat]`, any shape)."""
    inner, loc = cat["edit_inner"], cat["loc"]

    def probe(kind, key="correct_post", weights_key=None):
        weights_key = weights_key or kind
        if kind not in cat or weights_key not in weights:
            return None
        return _probe_accuracy(np.asarray(cat[kind][key]), weights[weights_key])

    def score(likelier, than, weights_key):
        """CounterFact score: the weighted fraction of rows whose `likelier` kind has a lower
        mean token NLL than the same prompt with the `than` kind's target (None if absent)."""
        if likelier not in cat or than not in cat or weights_key not in weights:
            return None
        wins = np.asarray(cat[likelier]["nll_mean_post"]).reshape(-1) < np.asarray(
            cat[than]["nll_mean_post"]).reshape(-1)
        return _probe_accuracy(wins, weights[weights_key])

    edit_success = float(np.mean(inner["correct_post"]))
    generality = probe("edit_outer")
    acc_pre, acc_post = float(np.mean(loc["correct_pre"])), float(np.mean(loc["correct_post"]))
    by_form = {f"generality_{kind.split('/', 1)[1]}": probe("edit_outer", weights_key=kind)
               for kind in weights if kind.startswith("edit_outer/")}
    return {
        "edit_success": edit_success,
        "generality": generality,
        **by_form,
        "drawdown": acc_pre - acc_post,
        "locality_kl": kl,
        "loc_acc_pre": acc_pre,
        "loc_acc_post": acc_post,
        "neighborhood_acc": probe("neighborhood"),
        "neighborhood_acc_pre": probe("neighborhood", "correct_pre"),
        "pre_edit_success": float(np.mean(inner["correct_pre"])),
        **extra,
        "reliability": edit_success,
        "generalization": generality,
        "locality": float(np.mean(loc["unchanged"])),
        "portability": probe("portability"),
        # ROME/MEMIT's CounterFact scores: p(new) > p(true) on the edit prompt (efficacy) and
        # its rephrases (paraphrase); p(true) > p(new) on the neighbours (neighbourhood).
        "efficacy_score": score("edit_inner", "edit_inner_true", "edit_inner_true"),
        "paraphrase_score": score("edit_outer", "edit_outer_true", "edit_outer_true"),
        "neighborhood_score": score("neighborhood", "neighborhood_new", "neighborhood_new"),
    }


def _subset_summary(cat: dict, weights: dict, mask: np.ndarray) -> dict[str, Any]:
    """ES, generality (and per surface form), drawdown, locality KL and neighbourhood accuracy
    over the requests where `mask` ([groups, k]) is set, each edited within its group."""
    m = mask.astype(np.float64)
    inner, loc = cat["edit_inner"], cat["loc"]

    def mean(x):
        return float((np.asarray(x, np.float64).reshape(m.shape) * m).sum() / m.sum())

    def probe(kind, key="correct_post", weights_key=None):
        weights_key = weights_key or kind
        if kind not in cat or weights_key not in weights:
            return None
        w = weights[weights_key] * m[..., None]
        if not (w.sum(-1) > 0).any():
            return None
        return _probe_accuracy(np.asarray(cat[kind][key]), w)

    # as the whole result's: each group's token mean (over its rows in the subset), then groups
    kl_sum = (np.asarray(loc["kl_sum"], np.float64).reshape(m.shape) * m).sum(-1)
    kl_count = (np.asarray(loc["kl_count"], np.float64).reshape(m.shape) * m).sum(-1)
    in_group = m.sum(-1) > 0
    return {
        "edit_success": mean(inner["correct_post"]),
        "generality": probe("edit_outer"),
        **{f"generality_{kind.split('/', 1)[1]}": probe("edit_outer", weights_key=kind)
           for kind in weights if kind.startswith("edit_outer/")},
        "drawdown": mean(loc["correct_pre"]) - mean(loc["correct_post"]),
        "locality_kl": float(np.mean(kl_sum[in_group] / np.maximum(kl_count[in_group], 1.0))),
        "neighborhood_acc": probe("neighborhood"),
        "neighborhood_acc_pre": probe("neighborhood", "correct_pre"),
        "n_examples": int(mask.sum()),
    }


def _by_relation(requests: Sequence[EditRequest], cat: dict, weights: dict, n_edits: int,
                 held_out: Collection[str] | None) -> dict[str, Any]:
    """`by_relation` (and, with `held_out`, `seen_relations` / `held_out_relations`) when the
    requests name their relations; {} otherwise."""
    relations = np.array([r.relation or "" for r in requests]).reshape(-1, n_edits)
    if not (relations != "").any():
        return {}
    out: dict[str, Any] = {"by_relation": {
        str(rel): _subset_summary(cat, weights, relations == rel)
        for rel in sorted(set(relations.ravel()) - {""})}}
    if held_out is not None:
        held = np.isin(relations, sorted(held_out))
        for key, mask in (("seen_relations", (relations != "") & ~held),
                          ("held_out_relations", held)):
            if mask.any():
                out[key] = _subset_summary(cat, weights, mask)
    return out


def _shuffled(requests: Sequence[EditRequest], seed: int | None) -> list[EditRequest]:
    requests = list(requests)
    if seed is None:
        return requests
    return [requests[i] for i in np.random.default_rng(seed).permutation(len(requests))]


def edit_groups(model, requests: Sequence[EditRequest], tokenizer, n_edits: int, *,
                max_length: int, seed: int | None = 0, max_target_length: int | None = None
                ) -> tuple[list[EditRequest], dict, dict]:
    """The groups `evaluate_editor` edits: (the requests in evaluation order, `seed`-shuffled
    and cut to whole groups of `n_edits`; their batches [groups, rows, L] per probe kind
    ("edit_inner", "loc", "edit_outer", ...), group g's edit batch being `edit_inner`'s [g];
    the probe rows' weights [groups, k, width] per kind)."""
    if n_edits < 1:
        raise ValueError(f"n_edits must be >= 1, got {n_edits}")
    requests = _shuffled(requests, seed)
    n_groups = len(requests) // n_edits
    if n_groups == 0:
        raise ValueError(f"n_edits={n_edits} but only {len(requests)} requests to evaluate")
    requests = requests[: n_groups * n_edits]
    batches, weights = _prepare(requests, tokenizer, n_edits, **model.pair_format,
                                max_length=max_length, max_target_length=max_target_length)
    check_edit_batch(model, batches)
    return requests, batches, weights


def evaluate_editor(
    model,
    editor,
    editor_state,
    model_params,
    requests: Sequence[EditRequest],
    tokenizer,
    *,
    n_edits: int = 1,
    max_length: int,
    batch_size: int | None = None,
    seed: int | None = 0,
    progress: bool = False,
    perplexity: bool = False,
    max_target_length: int | None = None,
    timed_edits: int = 3,
    held_out_relations: Collection[str] | None = None,
) -> dict[str, Any]:
    """Edit `requests` k = `n_edits` at a time and measure every group; returns flat metrics.

    Args:
      model: the `Model` that `editor` edits (its `pair_format` says how requests become
        batches, its `shift_labels` how labels align with logits; a classifier's requests
        name label strings as targets).
      requests: shuffled with `seed` (None keeps their order), then cut into groups of
        `n_edits`; the incomplete last group is dropped. A group's locality examples are its
        requests' loc pairs; generality averages over all of a request's rephrases.
      batch_size: most rows per forward pass inside the jitted group function (None: all).
      progress: a progress bar over the groups on stderr.
      perplexity: also report `ppl_drawdown` = ppl_post / ppl_pre − 1 on the locality targets
        (Wikitext-style generation edits).
      timed_edits: how many groups' edits are timed (separately jitted, compile excluded) for
        `edit_time_s`; 0 skips timing (`edit_time_s` is None).
      held_out_relations: relations the editor never trained on (`data.train_relations`'s
        complement): the metrics are also reported over them and over the rest.
    Returns:
      The keys of `METRIC_KEYS` (+ `ppl_drawdown`); `neighborhood_acc` (after the edit),
      `neighborhood_acc_pre` (the base model) and `portability` are
      None when no request has such probes. When the requests name their relations,
      `by_relation` ({relation: ES, generality, drawdown, KL, neighbourhood, n_examples}), and
      with `held_out_relations` the same over `seen_relations` and `held_out_relations`.
    """
    requests, batches, weights = edit_groups(model, requests, tokenizer, n_edits, seed=seed,
                                             max_length=max_length,
                                             max_target_length=max_target_length)
    n_groups = len(requests) // n_edits
    groups = [jax.tree.map(lambda x, g=g: x[g], batches) for g in range(n_groups)]

    run = _group_fn(model, editor, batch_size)
    stats = [run(editor_state, model_params, group)
             for group in tqdm(groups, desc=f"evaluate (groups of {n_edits})", unit="group",
                               disable=not progress, mininterval=2)]
    stats = jax.device_get(stats)
    cat = {kind: {k: np.stack([s[kind][k] for s in stats]) for k in stats[0][kind]}
           for kind in stats[0]}  # each [G, rows]
    loc = cat["loc"]
    # KL averaged over the counted tokens of each group (as the reference's batches), then groups.
    kl = float(np.mean(loc["kl_sum"].sum(-1) / np.maximum(loc["kl_count"].sum(-1), 1.0)))
    result = _summary(cat, weights, kl, n_edits=n_edits, n_examples=n_groups * n_edits,
                      edit_time_s=_time_edits(editor, editor_state, model_params, groups,
                                              timed_edits))
    if perplexity:
        tokens = max(float(loc["n_tokens"].sum()), 1.0)
        ppl_pre = math.exp(float(loc["nll_pre"].sum()) / tokens)
        ppl_post = math.exp(float(loc["nll_post"].sum()) / tokens)
        result["ppl_drawdown"] = ppl_post / ppl_pre - 1.0
    result.update(_by_relation(requests, cat, weights, n_edits, held_out_relations))
    return result


def _edit_fn(editor) -> Callable:
    """Jitted (state, params, batch) -> (new params, new state): stateful editors (UltraEdit's
    lifelong statistics) carry their state from one edit call to the next, others keep it."""
    if getattr(editor, "stateful", False):
        return jit_edit(editor, stateful=True)
    edit = jit_edit(editor)
    return lambda state, params, batch: (edit(state, params, batch), state)


def evaluate_sequential(
    model,
    editor,
    editor_state,
    model_params,
    requests: Sequence[EditRequest],
    tokenizer,
    *,
    n_edits: int,
    n_batches: int,
    max_length: int,
    batch_size: int | None = None,
    seed: int | None = 0,
    max_target_length: int | None = None,
) -> dict[str, Any]:
    """Lifelong editing: T = `n_batches` batches of k = `n_edits` requests, each edited into the
    model the previous batch produced; then every edit so far is measured again.

    Returns `evaluate_editor`'s keys measured on the final model over all T·k edits (edit
    success and generality retained; drawdown, KL and neighbourhood accuracy against the base
    model), plus `n_batches`, `retained_curve`: the edit success over the edits made so far,
    after each batch, and `drawdown_curve`: the drawdown on all T·k unrelated facts after each
    batch.
    """
    if n_edits < 1 or n_batches < 1:
        raise ValueError(f"n_edits and n_batches must be >= 1, got {n_edits}, {n_batches}")
    requests = _shuffled(requests, seed)
    total = n_edits * n_batches
    if len(requests) < total:
        raise ValueError(f"--sequential {n_batches} x {n_edits} edits needs {total} requests, "
                         f"only {len(requests)} to evaluate")
    requests = requests[:total]
    batches, weights = _prepare(requests, tokenizer, n_edits, **model.pair_format,
                                max_length=max_length, max_target_length=max_target_length)
    check_edit_batch(model, batches)
    groups = [jax.tree.map(lambda x, g=g: x[g], batches) for g in range(n_batches)]
    edit = _edit_fn(editor)
    correct = jax.jit(lambda p, rows: _chunked(lambda r: _post_stats(model, p, r), rows,
                                               batch_size)["correct_post"])
    flat = {kind: _flat(b) for kind, b in batches.items()}
    loc_pre = float(np.mean(np.asarray(correct(model_params, flat["loc"]))))
    params, state, curve, drawdowns, edit_time = model_params, editor_state, [], [], 0.0
    for t, group in enumerate(groups):
        start = time.perf_counter()
        params, state = jax.block_until_ready(edit(state, params, _edit_batch(editor, group)))
        edit_time += time.perf_counter() - start  # the first call includes compilation
        # Retained edit success over every edit made so far (one fixed-shape pass: rows of
        # later batches are measured too and dropped here, so there is a single compile).
        ok = np.asarray(correct(params, flat["edit_inner"]))
        curve.append(float(ok[: (t + 1) * n_edits].mean()))
        # drawdown on every request's unrelated fact, as the final one is measured
        drawdowns.append(loc_pre - float(np.mean(np.asarray(correct(params, flat["loc"])))))
    edit_time /= n_batches
    paired_kinds = ("edit_inner", "loc") + (("neighborhood",) if "neighborhood" in flat else ())
    measure = jax.jit(lambda p, rows: _chunked(
        lambda r: _paired_stats(model, model_params, p, r), rows, batch_size))
    cat = {kind: jax.device_get(measure(params, flat[kind])) for kind in paired_kinds}
    post = jax.jit(lambda p, rows: _chunked(lambda r: _post_stats(model, p, r), rows,
                                            batch_size))
    for kind in _PROBES:
        if kind in flat and kind not in cat:
            cat[kind] = jax.device_get(post(params, flat[kind]))

    loc = cat["loc"]
    kl = float(np.sum(loc["kl_sum"]) / max(float(np.sum(loc["kl_count"])), 1.0))
    return _summary(cat, weights, kl, n_edits=n_edits, n_batches=n_batches, n_examples=total,
                    edit_time_s=edit_time, retained_curve=curve, drawdown_curve=drawdowns)


def _flat(batch: dict) -> dict:
    """[G, rows, L] -> [G*rows, L]."""
    return {k: v.reshape(-1, *v.shape[2:]) for k, v in batch.items()}


def evaluate_methods(
    model, editors: Mapping[str, tuple[Any, Any]], model_params, requests, tokenizer, **kw
) -> dict[str, dict[str, Any]]:
    """`evaluate_editor` for every {name: (editor, editor_state)}, on the same requests."""
    return {name: evaluate_editor(model, editor, state, model_params, requests, tokenizer, **kw)
            for name, (editor, state) in editors.items()}


# ----------------------------------------------------------------------------- reporting
_COLUMNS = (("ES", "edit_success"), ("generality", "generality"), ("drawdown", "drawdown"),
            ("KL", "locality_kl"), ("locality", "locality"), ("neighbours", "neighborhood_acc"),
            ("n", "n_examples"))


def format_table(results: Mapping[str, Mapping[str, Any]]) -> str:
    """A fixed-width text table, one row per method."""
    width = max([len("method")] + [len(name) for name in results])
    head = f"{'method':<{width}}" + "".join(f" {title:>10}" for title, _ in _COLUMNS)
    lines = [head, "-" * len(head)]
    for name, metrics in results.items():
        cells = []
        for _, key in _COLUMNS:
            v = metrics.get(key)
            cells.append("-" if v is None else f"{v:d}" if isinstance(v, int) else f"{v:.4f}")
        lines.append(f"{name:<{width}}" + "".join(f" {c:>10}" for c in cells))
    return "\n".join(lines)


def format_by_relation(results: Mapping[str, Mapping[str, Any]]) -> str | None:
    """The per-relation rows of every method that has them (`by_relation`, and the seen /
    held-out relations of `data.train_relations`); None when no method has any."""
    rows = {}
    for method, metrics in results.items():
        if not isinstance(metrics, Mapping):
            continue
        for rel, m in (metrics.get("by_relation") or {}).items():
            rows[f"{method} {rel}"] = m
        for key, label in (("seen_relations", "[seen relations]"),
                           ("held_out_relations", "[held-out relations]")):
            if metrics.get(key):
                rows[f"{method} {label}"] = metrics[key]
    return format_table(rows) if rows else None


def format_by_n_edits(results_by_n: Mapping[int, Mapping[str, Mapping[str, Any]]]) -> str:
    """One table of every method at every number of simultaneous edits k, side by side."""
    return format_table({f"k={k:<4d} {method}": metrics
                         for k in sorted(results_by_n)
                         for method, metrics in results_by_n[k].items()})


def _matplotlib() -> tuple[type, type]:
    """(FigureCanvasAgg, Figure); matplotlib is the `plot` extra."""
    agg = import_extra("matplotlib.backends.backend_agg", "plot", "plotting (--plot)")
    return agg.FigureCanvasAgg, import_extra("matplotlib.figure", "plot", "plotting").Figure


def plot_vs_n_edits(results_by_n: Mapping[int, Mapping[str, Mapping[str, Any]]],
                    path: str | Path) -> Path:
    """PNG of edit success / generality / drawdown against the number of simultaneous edits."""
    # The object-oriented API with an Agg canvas: no pyplot global state, no display needed.
    FigureCanvasAgg, Figure = _matplotlib()

    ns = sorted(results_by_n)
    methods = list(dict.fromkeys(m for n in ns for m in results_by_n[n]))
    fig = Figure(figsize=(20, 3.6))
    FigureCanvasAgg(fig)
    panels = (("edit_success", "edit success"), ("generality", "generality"),
              ("drawdown", "drawdown"), ("locality_kl", "locality KL"),
              ("neighborhood_acc", "neighbourhood accuracy"))
    for i, (key, title) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), i + 1)
        for method in methods:
            pts = [(n, results_by_n[n][method].get(key)) for n in ns
                   if method in results_by_n[n]]
            pts = [(n, v) for n, v in pts if v is not None]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=method)
        ax.set_xscale("log" if len(ns) > 1 and ns[-1] / max(ns[0], 1) >= 8 else "linear")
        ax.set_xticks(ns, [str(n) for n in ns])
        ax.set_xlabel("simultaneous edits")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    fig.axes[0].legend()
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path


def plot_sequential(results_by_n: Mapping[int, Mapping[str, Mapping[str, Any]]],
                    path: str | Path) -> Path:
    """PNG of the retained edit success (top) and the drawdown (below) after each sequential
    batch, one line per method."""
    FigureCanvasAgg, Figure = _matplotlib()

    fig = Figure(figsize=(6 * len(results_by_n), 7.2))
    FigureCanvasAgg(fig)
    n = len(results_by_n)
    for i, (k, results) in enumerate(sorted(results_by_n.items())):
        for row, (key, label) in enumerate((("retained_curve", "retained edit success"),
                                            ("drawdown_curve", "drawdown"))):
            ax = fig.add_subplot(2, n, row * n + i + 1)
            for method, r in results.items():
                curve = r.get(key) or []
                ax.plot([(t + 1) * k for t in range(len(curve))], curve, marker="o",
                        label=method)
            ax.set_xlabel(f"edits made (batches of {k})")
            ax.set_ylabel(label)
            ax.set_ylim(-0.02, 1.02)
            ax.grid(alpha=0.3)
            ax.legend()
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path
