"""One edit, reported the way a person checks it: generations and target probabilities."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mend_jax.data import tokenize_pairs
from mend_jax.errors import EditError
from mend_jax.metrics import sequence_nll
from mend_jax.models import generate, model_inputs
from mend_jax.models.generation import _max_positions
from mend_jax.models.names import get_path, set_path

TOKEN_KEYS = ("input_ids", "decoder_input_ids")


def edited_names(editor) -> tuple[str, ...] | None:
    """The HF names of the weights an editor changes (MEND, KE, ENN, UltraEdit, FT); None for
    an editor that does not say (any object with `edit(state, params, batch)`)."""
    layout = getattr(editor, "layout", None)
    names = layout.inner_params if layout is not None else getattr(editor, "inner_params", None)
    return None if names is None or not hasattr(editor, "model") else tuple(names)


_COMPILED = "_mend_jax_compiled"  # the attribute that keeps an object's compiled functions


class _Compiled:
    """The compiled functions kept on one object (see `compiled_on`). A copy of the object
    (copy.copy shares this store, deepcopy and pickle drop it) compiles its own."""

    __slots__ = ("owner", "entries")

    def __init__(self, owner=None):
        self.owner, self.entries = owner, {}

    def __reduce__(self):
        return _Compiled, ()

    def __deepcopy__(self, memo):
        return _Compiled()


def compiled_on(owner, key, build: Callable[[], Callable],
                watch: Sequence[str] | None = None) -> Callable:
    """`build()`, kept on `owner` so that later calls for the same owner and `key` return the
    same function, and with it `jax.jit`'s cache of traces: a new `jax.jit` of a new closure
    (or of a bound method, a new object on every access) traces and compiles anew every call.

    The function lives in a private attribute of `owner`, not in a global table, so it goes when
    the owner goes (the cycle owner -> function -> owner is the garbage collector's to break).
    It is rebuilt when one of the owner's attributes named in `watch` (default: all of them) is
    no longer the object it was at build time, e.g. an editor given a new `config`. An owner
    that takes no attributes (`__slots__`) gets a new function every call."""
    try:
        state = vars(owner)
    except TypeError:
        return build()
    store = state.get(_COMPILED)
    if not isinstance(store, _Compiled) or store.owner is not owner:
        store = _Compiled(owner)
        try:
            object.__setattr__(owner, _COMPILED, store)
        except (AttributeError, TypeError):
            return build()
    names = sorted(n for n in state if n != _COMPILED) if watch is None else watch
    seen = tuple((n, getattr(owner, n, None)) for n in names)
    hit = store.entries.get(key)
    if hit is not None and len(hit[0]) == len(seen) and all(
            n == m and a is b for (n, a), (m, b) in zip(hit[0], seen)):
        return hit[1]
    fn = build()
    store.entries[key] = (seen, fn)
    return fn


def jit_edit(editor, stateful: bool = False) -> Callable:
    """`editor.edit` compiled so that the program returns the edited weights alone, which are
    then put into the parameter tree outside it: a jitted function that returned the whole tree
    would write a copy of every unchanged leaf (for GPT-2 small, 500 MB per edit).

    Returns `edit(state, params, batch) -> new params` (sharing every unchanged leaf with
    `params`); with `stateful` (UltraEdit's lifelong statistics), `editor.edit_and_update`'s
    `(state, params, batch) -> (new params, new state)`. Token ids are checked on the concrete
    batch first, as an eager call would. An editor that does not name its weights
    (`edited_names` is None) is jitted whole.

    The function is kept on the editor (`compiled_on`): calling `jit_edit` again with the same
    editor returns it, so a batch of shapes already seen is not traced or compiled again."""
    return compiled_on(editor, ("jit_edit", stateful), lambda: _jit_edit(editor, stateful))


def _jit_edit(editor, stateful: bool) -> Callable:
    names = edited_names(editor)
    if names is None:
        return jax.jit(editor.edit_and_update if stateful else editor.edit)
    model = editor.model
    paths = [model.names.path(n) for n in names]

    def weights(new):
        return [get_path(new, path) for path in paths]

    if stateful:
        core = jax.jit(lambda s, p, b: (lambda out: (weights(out[0]), out[1]))(
            editor.edit_and_update(s, p, b)))
    else:
        # (the state is not returned through the program either: that too would be a copy)
        core = jax.jit(lambda s, p, b: weights(editor.edit(s, p, b)))

    def merge(params, new_weights):
        for path, w in zip(paths, new_weights):
            params = set_path(params, path, w)
        return params

    def edit(state, params, batch):
        check_edit_batch(model, batch)
        if stateful:
            new_weights, new_state = core(state, params, batch)
            return merge(params, new_weights), new_state
        return merge(params, core(state, params, batch))

    return edit


def check_edit_batch(model, batch: Mapping, where: str = "") -> None:
    """Refuse token ids outside the model's vocabulary and sequences longer than its positions.

    A batch may nest its parts ({"edit_inner": {...}, "loc": {...}}). Lengths are checked always
    (shapes are known while tracing); token ids only when the arrays are concrete, i.e. outside
    `jax.jit` (an embedding lookup clamps a bad id silently, so this is the only place to catch it).
    """
    vocab, limit = model.config.vocab_size, _max_positions(model.hf_config)
    for key, part in batch.items():
        if isinstance(part, Mapping):
            check_edit_batch(model, part, f"{where}{key}.")
            continue
        if key not in TOKEN_KEYS or part is None:
            continue
        if limit is not None and part.shape[-1] > limit:
            raise EditError(f"{where}{key}: sequences of {part.shape[-1]} tokens, but the model "
                            f"has {limit} positions (shorten the prompt or lower max_length)")
        if isinstance(part, jax.core.Tracer):
            continue
        ids = np.asarray(part)
        bad = (ids < 0) | (ids >= vocab)
        if bad.any():
            at = tuple(int(i) for i in np.argwhere(bad)[0])
            raise EditError(f"{where}{key}{list(at)} = {int(ids[at])}: token id outside the "
                            f"model's vocabulary of {vocab} (does the tokenizer match the model?)")


def _target_prob(model, params, batch) -> np.ndarray:
    logits = model.logits(params, *model_inputs(batch))
    nll = sequence_nll(logits, batch["labels"], shift=model.shift_labels)
    return np.exp(-np.asarray(nll))


def _generate(model, params, tokenizer, prompts: Sequence[str], max_new_tokens: int) -> list[str]:
    if model.targets == "class":  # a classifier's "continuation": the label it predicts
        enc = tokenizer(list(prompts), padding=True, return_tensors="np")
        logits = model.logits(params, jnp.asarray(enc["input_ids"], jnp.int32),
                              jnp.asarray(enc["attention_mask"], jnp.int32))
        return [model.hf_config.id2label[int(i)] for i in np.asarray(logits).argmax(-1)]
    enc = tokenizer(list(prompts), padding=True, return_tensors="np")
    out = generate(model, params, jnp.asarray(enc["input_ids"], jnp.int32), max_new_tokens,
                   attention_mask=jnp.asarray(enc["attention_mask"], jnp.int32),
                   eos_token_id=tokenizer.eos_token_id)
    return [tokenizer.decode(row, skip_special_tokens=True).strip() for row in np.asarray(out)]


def _untruncated(batch: dict, rows: Sequence[str], max_length: int) -> dict:
    """The batch on the device, or an EditError naming the first row that did not fit: an edit
    of a prompt cut to its last tokens is an edit of another prompt."""
    cut = np.flatnonzero(batch["truncated"])
    if cut.size:
        raise EditError(f"{rows[cut[0]]} is longer than max_length={max_length} tokens with the "
                        "target (raise max_length, at most the model's positions)")
    return {k: jnp.asarray(v) for k, v in batch.items() if k != "truncated"}


def edit_report(model, tokenizer, editor, editor_state, prompt: str, target: str, *,
                rephrases: Sequence[str] = (), neighbors: Sequence[str] = (), max_length: int,
                max_new_tokens: int = 6) -> tuple[dict, dict]:
    """Edit prompt -> target; return (report rows, edited params). For a classifier, `target`
    is a label name and a row's before/after is the label it predicts."""
    texts = [("prompt", prompt), ("target", target),
             *((f"rephrase {i}", r) for i, r in enumerate(rephrases)),
             *((f"neighbor {i}", n) for i, n in enumerate(neighbors))]
    for what, text in texts:
        if not isinstance(text, str) or not text.strip():
            raise EditError(f"{what} is empty ({text!r})")
    batch = _untruncated(tokenize_pairs(tokenizer, [prompt], [target], **model.pair_format,
                                        max_length=max_length), ["prompt"], max_length)
    check_edit_batch(model, batch)
    new_params = jit_edit(editor)(editor_state, model.params, batch)
    prompts = [prompt, *rephrases, *neighbors]
    kinds = ["edit"] + ["rephrase"] * len(rephrases) + ["neighbor"] * len(neighbors)
    probe = _untruncated(tokenize_pairs(tokenizer, prompts, [target] * len(prompts),
                                        **model.pair_format, max_length=max_length),
                         [w for w, _ in texts if w != "target"], max_length)
    check_edit_batch(model, probe)
    p_before = _target_prob(model, model.params, probe)
    p_after = _target_prob(model, new_params, probe)
    gen_before = _generate(model, model.params, tokenizer, prompts, max_new_tokens)
    gen_after = _generate(model, new_params, tokenizer, prompts, max_new_tokens)
    rows = [{"kind": k, "prompt": p, "p_target_before": float(b), "p_target_after": float(a),
             "before": gb, "after": ga}
            for k, p, b, a, gb, ga in zip(kinds, prompts, p_before, p_after, gen_before, gen_after)]
    return {"target": target, "rows": rows}, new_params


def format_report(report: dict) -> str:
    lines = [f"target: {report['target']!r}"]
    for r in report["rows"]:
        lines.append(f"[{r['kind']}] {r['prompt']}")
        lines.append(f"    before: {r['before']!r}  p(target)={r['p_target_before']:.3f}")
        lines.append(f"    after:  {r['after']!r}  p(target)={r['p_target_after']:.3f}")
    return "\n".join(lines)
