"""Text in, edited parameters out: the user's side of an editor.

`edit` tokenises k (prompt, target) strings and applies them in ONE `editor.edit` call;
`evaluate_edit` measures an edit with EasyEdit's metric names (reliability, generalization,
locality, portability), computed as `mend_jax.evaluation` computes them for a benchmark.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mend_jax.data.batching import tokenize_pairs
from mend_jax.editing import compiled_on, jit_edit
from mend_jax.errors import EditError
from mend_jax.evaluation import _paired_stats, _post_stats
from mend_jax.models import Model
from mend_jax.models.generation import _max_positions

# One prompt's rephrasings: a string, a list of strings, or None (none for this prompt).
Rephrases = Sequence[str | Sequence[str] | None]

_MODEL_KEYS = ("input_ids", "attention_mask", "decoder_input_ids", "decoder_attention_mask",
               "labels")


class EditInputError(EditError):
    """Prompts and targets that cannot be edited or measured as given."""


def _shapes(tree) -> dict[str, tuple]:
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {jax.tree_util.keystr(path, simple=True, separator="/"):
            tuple(getattr(x, "shape", ())) for path, x in leaves}


def _check_tree(what: str, tree, like, expected: str) -> None:
    """`tree` has the leaves of `like` (same paths, same shapes), or an EditInputError."""
    got, want = _shapes(tree), _shapes(like)
    missing = [k for k in want if k not in got]
    wrong = [f"{k} has shape {got[k]}, expected {want[k]}" for k in want
             if k in got and got[k] != want[k]]
    if missing or wrong:
        detail = f"missing {missing[:2]}" if missing else wrong[0]
        raise EditInputError(f"{what}: not {expected} ({detail})")


def _tokenizer(model: Model, tokenizer):
    tokenizer = tokenizer if tokenizer is not None else model.tokenizer
    if tokenizer is None:
        raise EditInputError("the model has no tokenizer (none next to its checkpoint); "
                             "pass tokenizer=")
    return tokenizer


def _target_ids(tokenizer, target: str, seq2seq: bool) -> list[int]:
    # The same text tokenize_pairs encodes: decoder-only targets follow the prompt after a space.
    return tokenizer([target if seq2seq else " " + target], add_special_tokens=False)[
        "input_ids"][0]


def _check_pairs(tokenizer, prompts, targets, seq2seq: bool, what: str,
                 label2id: dict | None = None) -> None:
    if isinstance(prompts, str) or isinstance(targets, str):
        raise EditInputError(f"{what}: pass lists of strings, not a single string")
    if len(prompts) != len(targets):
        raise EditInputError(f"{what}: {len(prompts)} prompts but {len(targets)} targets")
    if not prompts:
        raise EditInputError(f"{what}: no prompts")
    unk = getattr(tokenizer, "unk_token_id", None)
    for i, (prompt, target) in enumerate(zip(prompts, targets)):
        if not isinstance(prompt, str) or not prompt.strip():
            raise EditInputError(f"{what}: prompt {i} is empty ({prompt!r})")
        if not isinstance(target, str) or not target.strip():
            raise EditInputError(f"{what}: target {i} is empty ({target!r})")
        if label2id is not None:
            if target not in label2id:
                raise EditInputError(f"{what}: target {i} ({target!r}) is not one of the "
                                     f"classifier's labels {sorted(label2id)}")
            continue
        ids = _target_ids(tokenizer, target, seq2seq)
        if not ids:
            raise EditInputError(f"{what}: target {i} ({target!r}) encodes to no tokens")
        if unk is not None and unk in ids:
            raise EditInputError(f"{what}: target {i} ({target!r}) encodes to the tokenizer's "
                                 f"unknown token {tokenizer.unk_token!r}; the model cannot "
                                 "learn a word outside its vocabulary")


def _rephrase_lists(rephrases: Rephrases | None, n: int) -> list[list[str]]:
    if rephrases is None:
        return [[] for _ in range(n)]
    if isinstance(rephrases, str) or len(rephrases) != n:
        got = "a string" if isinstance(rephrases, str) else f"{len(rephrases)} entries"
        raise EditInputError(f"rephrases: expected one entry per prompt ({n}), got {got}")
    out = []
    for i, r in enumerate(rephrases):
        r = [] if r is None else [r] if isinstance(r, str) else r
        if not isinstance(r, (list, tuple)) or not all(isinstance(x, str) for x in r):
            raise EditInputError(f"rephrases[{i}]: expected a string, a list of strings or "
                                 f"None, got {rephrases[i]!r}")
        if any(not x.strip() for x in r):
            raise EditInputError(f"rephrases[{i}]: an empty rephrase ({rephrases[i]!r})")
        out.append(list(r))
    return out


def _pair_lengths(tokenizer, prompts, targets, seq2seq: bool,
                  classify: bool = False) -> tuple[list[int], list[int] | None]:
    """Per pair: (row length, target length) as `tokenize_pairs` lays them out: a decoder-only
    row is prompt + target; a seq2seq row the prompt, its target + eos; a classifier's row
    the prompt (its target is a class, not tokens: None)."""
    p = [len(ids) for ids in tokenizer(list(prompts), add_special_tokens=True)["input_ids"]]
    if classify:
        return p, None
    t = [len(_target_ids(tokenizer, x, seq2seq)) for x in targets]
    if seq2seq:
        return p, [n + 1 for n in t]  # tokenize_pairs appends eos to seq2seq targets
    return [a + b for a, b in zip(p, t)], None


def _fit_lengths(tokenizer, prompts, targets, seq2seq: bool,
                 classify: bool = False) -> tuple[int, int | None]:
    """(max_length, max_target_length) that truncate none of the pairs."""
    rows, tgt = _pair_lengths(tokenizer, prompts, targets, seq2seq, classify)
    return max(rows), (max(tgt) if tgt is not None else None)


def _check_lengths(model: Model, tokenizer, prompts, targets, max_length: int | None,
                   what: str) -> None:
    """Every pair fits `max_length` (none loses tokens) and the model's positions."""
    fmt = model.pair_format
    if max_length is not None and (isinstance(max_length, bool)
                                   or not isinstance(max_length, int) or max_length < 2):
        raise EditInputError(f"max_length={max_length!r}: expected an integer >= 2")
    limit = _max_positions(model.hf_config)
    if max_length is not None and limit is not None and max_length > limit:
        raise EditInputError(f"max_length={max_length}: over the model's {limit} positions")
    rows, tgt = _pair_lengths(tokenizer, prompts, targets, model.seq2seq,
                              classify=fmt["label2id"] is not None)
    row = "" if model.seq2seq or fmt["label2id"] is not None else " with its target"
    for i, n in enumerate(rows):
        if limit is not None and n > limit:
            raise EditInputError(f"{what}: prompt {i} ({_short(prompts[i])}) is {n} tokens"
                                 f"{row}; the model has {limit} positions")
        if max_length is not None and n > max_length:
            raise EditInputError(f"{what}: prompt {i} ({_short(prompts[i])}) is {n} tokens"
                                 f"{row}, over max_length={max_length}")
        if tgt is not None and max_length is not None and tgt[i] > max_length:
            raise EditInputError(f"{what}: target {i} ({_short(targets[i])}) is {tgt[i]} "
                                 f"tokens with eos, over max_length={max_length}")


def _short(text: str, n: int = 40) -> str:
    return repr(text if len(text) <= n else text[: n - 3] + "...")


def _batch(model: Model, tokenizer, prompts, targets, max_length: int | None, what: str) -> dict:
    if model.targets == "token" and not model.seq2seq:
        raise EditInputError(f"a {model.arch.name} model with {model.targets!r} targets (a "
                             "masked LM) has no prompt -> target text form; call `editor.edit` "
                             "with a batch of its own (input_ids, attention_mask, labels)")
    fmt = model.pair_format
    _check_pairs(tokenizer, prompts, targets, model.seq2seq, what, fmt["label2id"])
    _check_lengths(model, tokenizer, prompts, targets, max_length, what)
    target_length = None
    if max_length is None:
        max_length, target_length = _fit_lengths(tokenizer, prompts, targets, model.seq2seq,
                                                  classify=fmt["label2id"] is not None)
    batch = tokenize_pairs(tokenizer, list(prompts), list(targets), **fmt,
                           max_length=max_length, max_target_length=target_length)
    return {k: jnp.asarray(v) for k, v in batch.items() if k in _MODEL_KEYS}


def edit(
    model: Model,
    params: dict,
    editor: Any,
    editor_state: dict,
    prompts: Sequence[str],
    targets: Sequence[str],
    *,
    rephrases: Rephrases | None = None,
    tokenizer: Any = None,
    max_length: int | None = None,
    return_state: bool = False,
) -> dict | tuple[dict, dict]:
    """Edit `params` so that each prompt continues with its target: k edits in one call.

    For a sequence classifier (`model.targets == "class"`) a prompt is the text to classify
    and its target one of the label names of the model's config (`label2id`).

    Args:
      editor: a MEND editor (`editor.edit(state, params, batch)`), e.g. from `load_editor`.
      prompts, targets: lists of strings, one target per prompt.
      rephrases: optional, one entry per prompt (a string, a list of strings or None); their
        (rephrase, target) rows join the edit, so the pseudo-gradient covers them too.
      tokenizer: defaults to `model.tokenizer`.
      max_length: token length of a (prompt, target) row; default: the longest pair.
        The compiled edit is kept on the editor and reused by later calls whose batch has the
        same shape (rows x max_length); a fixed max_length keeps a loop over facts of
        different lengths from compiling once per length.
      return_state: also return the editor state for the next call. A stateful editor
        (`editor.stateful`: MEND with `lifelong`, UltraEdit) records this edit in it, so that
        sequential calls keep earlier edits; others return `editor_state` as given.
    Returns:
      The edited parameters (a new pytree; only the edited weights are new arrays); with
      `return_state`, (edited parameters, editor state).
    Raises:
      EditInputError (a ValueError) for mismatched lengths, empty prompts or targets, a
      target that encodes to the tokenizer's unknown token, a pair longer than `max_length` or
      the model's positions, or `params` / `editor_state` that are not the model's / editor's.
    """
    tokenizer = _tokenizer(model, tokenizer)
    if isinstance(prompts, str) or isinstance(targets, str):
        raise EditInputError("edit: pass lists of strings, not a single string")
    _check_tree("params", params, model.params, "the model's parameters")
    if hasattr(editor, "layout") and hasattr(editor, "init"):  # MEND, KE, ENN
        like = compiled_on(editor, ("api_state_shape",),
                           lambda: jax.eval_shape(editor.init, jax.random.key(0)))
        _check_tree("editor_state", editor_state, like, "a state of this editor")
    extra = _rephrase_lists(rephrases, len(prompts))
    rows_p = list(prompts) + [r for rs in extra for r in rs]
    rows_t = list(targets) + [t for t, rs in zip(targets, extra) for _ in rs]
    batch = _batch(model, tokenizer, rows_p, rows_t, max_length, "edit")
    if getattr(editor, "stateful", False):
        new, state = jit_edit(editor, stateful=True)(editor_state, params, batch)
        return (new, state) if return_state else new
    new = jit_edit(editor)(editor_state, params, batch)
    return (new, editor_state) if return_state else new


# What the compiled statistics read of a model (not its params, which are arguments).
_MODEL_WATCH = ("arch", "config", "module")


def _stats_fn(model: Model, which: str):
    """`evaluation`'s per-row statistics of `model`, jitted once per model (kept on it)."""
    stats = {"post": _post_stats, "paired": _paired_stats}[which]
    return compiled_on(model, ("api_stats", which),
                       lambda: jax.jit(lambda *args: stats(model, *args)), watch=_MODEL_WATCH)


def _post_accuracy(model: Model, params, batch: dict) -> np.ndarray:
    stats = _stats_fn(model, "post")(params, batch)
    return np.asarray(stats["correct_post"], np.float64)


def evaluate_edit(
    model: Model,
    params: dict,
    new_params: dict,
    prompts: Sequence[str],
    targets: Sequence[str],
    *,
    rephrases: Rephrases | None = None,
    locality_prompts: Sequence[str] | None = None,
    locality_targets: Sequence[str] | None = None,
    portability: Sequence[tuple[str, str]] | None = None,
    tokenizer: Any = None,
    max_length: int | None = None,
) -> dict[str, float | None]:
    """EasyEdit's four metrics of an edit (`params` before, `new_params` after), each in [0, 1].

    - reliability: fraction of prompts whose whole target is the edited model's greedy
      prediction (teacher forcing), as `edit_success` in `evaluate_editor`.
    - generalization: the same on the rephrases (averaged per prompt over its rephrases).
    - locality: fraction of the locality targets' tokens whose greedy prediction the edit left
      unchanged (the base model's prediction, whether or not the target is right).
    - portability: the whole-target accuracy on (prompt, target) pairs that the edit implies.
    A metric without its inputs is None.
    """
    tokenizer = _tokenizer(model, tokenizer)
    kw = {"max_length": max_length}
    out: dict[str, float | None] = {}
    correct = _post_accuracy(model, new_params,
                             _batch(model, tokenizer, prompts, targets, **kw, what="prompts"))
    out["reliability"] = float(correct.mean())

    extra = _rephrase_lists(rephrases, len(prompts))
    if any(extra):
        rows_p = [r for rs in extra for r in rs]
        rows_t = [t for t, rs in zip(targets, extra) for _ in rs]
        hit = _post_accuracy(model, new_params,
                             _batch(model, tokenizer, rows_p, rows_t, **kw, what="rephrases"))
        owner = np.repeat(np.arange(len(extra)), [len(rs) for rs in extra])
        per_prompt = [hit[owner == i].mean() for i, rs in enumerate(extra) if rs]
        out["generalization"] = float(np.mean(per_prompt))
    else:
        out["generalization"] = None

    if (locality_prompts is None) != (locality_targets is None):
        raise EditInputError("locality: pass both locality_prompts and locality_targets")
    if locality_prompts is not None and len(locality_prompts):
        batch = _batch(model, tokenizer, locality_prompts, locality_targets, **kw,
                       what="locality")
        stats = _stats_fn(model, "paired")(params, new_params, batch)
        out["locality"] = float(np.asarray(stats["unchanged"], np.float64).mean())
    else:
        out["locality"] = None

    if portability:
        pairs = list(portability)
        for i, pair in enumerate(pairs):
            if isinstance(pair, str) or not isinstance(pair, Sequence) or len(pair) != 2:
                raise EditInputError(f"portability[{i}]: expected a (prompt, target) pair, got "
                                     f"{pair!r}")
        batch = _batch(model, tokenizer, [p for p, _ in pairs], [t for _, t in pairs], **kw,
                       what="portability")
        out["portability"] = float(_post_accuracy(model, new_params, batch).mean())
    else:
        out["portability"] = None
    return out
