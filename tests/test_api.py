"""The user's side: strings in, edited params out; editors saved and loaded as folders."""

import dataclasses
import gc
import json
import weakref

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers

import mend_jax
from mend_jax.metrics import sequence_correct
from mend_jax.models import from_config, get_path, load_pretrained, save_pretrained
from mend_jax.offline import build_word_tokenizer
from mend_jax.offline.tokenizer import normalize_words

TEXTS = ["The capital of France is Paris", "The capital of Spain is Madrid",
         "France's capital city is Paris", "Spain's capital city is Madrid",
         "The river of Paris is the Seine", "Lyon Rome Berlin"]
INNER = ["transformer.h.1.mlp.c_fc.weight", "transformer.h.1.mlp.c_proj.weight"]
PROMPTS, TARGETS = ["The capital of France is", "The capital of Spain is"], ["Lyon", "Rome"]


def _tiny(tmp_path, name="base", seed=0, **cfg) -> mend_jax.Model:
    tok = build_word_tokenizer(TEXTS)
    hf = transformers.GPT2Config(**{**dict(
        vocab_size=len(tok), n_positions=32, n_embd=32, n_layer=2, n_head=2,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id), **cfg})
    save_pretrained(from_config(hf, seed=seed, tokenizer=tok), None, tmp_path / name)
    return load_pretrained(tmp_path / name)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return _tiny(tmp_path_factory.mktemp("api"))


def _trained_like_state(editor, seed=1):
    """A fresh state with every leaf perturbed, so a round trip cannot pass by re-initialising."""
    state = editor.init(jax.random.key(0))
    leaves, treedef = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    leaves = [x + jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)]
    return jax.tree.unflatten(treedef, leaves)


def _hand_batch(tok, rows):
    """Decoder-only batch built from the vocabulary by hand: prompt words, then target words."""
    words = [(normalize_words(p).split(), normalize_words(t).split()) for p, t in rows]
    ids = [tok.convert_tokens_to_ids(p + t) for p, t in words]
    width = max(len(x) for x in ids)
    input_ids = np.full((len(rows), width), tok.pad_token_id, np.int32)
    mask = np.zeros_like(input_ids)
    labels = np.full_like(input_ids, -100)
    for i, ((p, _), row) in enumerate(zip(words, ids)):
        input_ids[i, : len(row)], mask[i, : len(row)] = row, 1
        labels[i, len(p): len(row)] = row[len(p):]
    return {"input_ids": jnp.asarray(input_ids), "attention_mask": jnp.asarray(mask),
            "labels": jnp.asarray(labels)}


# ----------------------------------------------------------------------------- artifacts
def test_saved_editor_loads_to_an_identical_state(tiny, tmp_path):
    editor = mend_jax.MEND(tiny, INNER, mend_jax.MENDConfig(rank=8, edit_lr=0.5,
                                                           edit_scales=(1.0, 2.0)))
    state = _trained_like_state(editor)
    out = mend_jax.save_editor(tmp_path / "editor", editor, state)
    assert sorted(p.name for p in out.iterdir()) == ["editor.json", "editor.safetensors"]
    meta = json.loads((out / "editor.json").read_text())
    assert meta["config"]["rank"] == 8 and meta["config"]["edit_lr"] == 0.5
    assert meta["inner_params"][0] == {"name": INNER[0], "shape": [32, 128]}
    assert set(meta["base_model"]["weights_sha256"]) == set(INNER)

    loaded, loaded_state = mend_jax.load_editor(out, tiny)
    assert loaded.config == editor.config and loaded.layout == editor.layout
    hash(loaded.config)  # a config is hashable (the json list came back as a tuple)
    assert jax.tree.structure(loaded_state) == jax.tree.structure(state)
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(loaded_state)):
        assert a.dtype == b.dtype and np.array_equal(np.asarray(a), np.asarray(b))
    # saving again replaces the folder whole
    mend_jax.save_editor(out, editor, editor.init(jax.random.key(3)))
    _, again = mend_jax.load_editor(out, tiny)
    assert float(again["params"]["edit_lrs"][INNER[0]]) == 0.5


@pytest.mark.parametrize("other, field", [
    (dict(seed=7), r"base_model\.weights_sha256\['transformer\.h\.1\.mlp\.c_fc\.weight'\]"),
    (dict(layer_norm_epsilon=1e-3), r"base_model\.config_sha256"),
    (dict(n_embd=16), r"inner_params\[0\]: transformer\.h\.1\.mlp\.c_fc\.weight has shape "
                      r"\[32, 128\] in the editor, \[16, 64\]"),
    (dict(n_layer=1), r"inner_params\[0\]: the model has no weight "
                      r"'transformer\.h\.1\.mlp\.c_fc\.weight'"),
])
def test_a_different_base_model_is_refused_naming_the_difference(tiny, tmp_path, other, field):
    editor = mend_jax.MEND(tiny, INNER, mend_jax.MENDConfig(rank=8))
    out = mend_jax.save_editor(tmp_path / "editor", editor, editor.init(jax.random.key(0)))
    wrong = _tiny(tmp_path, "other", **other)
    with pytest.raises(mend_jax.ArtifactError, match=rf"editor\.json: field {field}") as err:
        mend_jax.load_editor(out, wrong)
    assert "\n" not in str(err.value)


# ----------------------------------------------------------------------------- edit
def test_edit_with_strings_equals_the_editor_on_a_hand_built_batch(tiny):
    editor = mend_jax.MEND(tiny, INNER, mend_jax.MENDConfig(rank=8, edit_lr=0.3, norm=False))
    state = _trained_like_state(editor)
    tok = tiny.tokenizer
    for rephrases, rows in [
        (None, list(zip(PROMPTS, TARGETS))),
        (["France's capital city is", None],
         [*zip(PROMPTS, TARGETS), ("France's capital city is", "Lyon")]),
    ]:
        got = mend_jax.edit(tiny, tiny.params, editor, state, PROMPTS, TARGETS,
                            rephrases=rephrases)
        want = jax.jit(editor.edit)(state, tiny.params, _hand_batch(tok, rows))
        for name in INNER:
            path = tiny.names.path(name)
            g, w = np.asarray(get_path(got, path)), np.asarray(get_path(want, path))
            base = np.asarray(get_path(tiny.params, path))
            assert np.abs(w - base).max() > 1e-3  # the edit moved the weight
            np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)


def test_sequential_edits_through_the_api_carry_a_lifelong_editors_state(tiny):
    """`edit(..., return_state=True)`: a lifelong editor's state records each call's answer
    keys, and the next call, given it, is solved against them; a stateless editor's state comes
    back as given."""
    opts = dict(rank=8, edit_lr=0.3, aggregate="request_lstsq", request_lambda=1.0)
    lifelong = mend_jax.MEND(tiny, INNER, mend_jax.MENDConfig(**opts, lifelong=True))
    state = lifelong.init(jax.random.key(0))
    key = INNER[0].replace(".", "_")
    p1, s1 = mend_jax.edit(tiny, tiny.params, lifelong, state, PROMPTS[:1], TARGETS[:1],
                           return_state=True)
    n1 = float(s1["stats"]["edited_keys"][key]["count"])
    assert n1 > 0 and float(state["stats"]["edited_keys"][key]["count"]) == 0
    p2, s2 = mend_jax.edit(tiny, p1, lifelong, s1, PROMPTS[1:], TARGETS[1:], return_state=True)
    assert float(s2["stats"]["edited_keys"][key]["count"]) > n1
    # the second call with the fresh state (no earlier keys) is another update
    p2_fresh = mend_jax.edit(tiny, p1, lifelong, state, PROMPTS[1:], TARGETS[1:])
    path = tiny.names.path(INNER[1])
    assert not np.allclose(np.asarray(get_path(p2, path)), np.asarray(get_path(p2_fresh, path)))
    plain = mend_jax.MEND(tiny, INNER, mend_jax.MENDConfig(rank=8))
    plain_state = plain.init(jax.random.key(0))
    _, same = mend_jax.edit(tiny, tiny.params, plain, plain_state, PROMPTS, TARGETS,
                            return_state=True)
    assert same is plain_state


@pytest.mark.parametrize("kwargs, message", [
    (dict(prompts=PROMPTS, targets=["Lyon"]), "edit: 2 prompts but 1 targets"),
    (dict(prompts=PROMPTS, targets=["Lyon", " "]), "edit: target 1 is empty"),
    (dict(prompts=PROMPTS, targets=["Lyon", "Zyzzyva"]),
     "edit: target 1 \\('Zyzzyva'\\) encodes to the tokenizer's unknown token '<unk>'"),
    (dict(prompts=["", "x"], targets=TARGETS), "edit: prompt 0 is empty"),
    (dict(prompts=PROMPTS, targets=TARGETS, rephrases=["a"]),
     "rephrases: expected one entry per prompt \\(2\\)"),
])
def test_edit_rejects_bad_inputs_with_one_line(tiny, kwargs, message):
    editor = mend_jax.MEND(tiny, INNER, mend_jax.MENDConfig(rank=8))
    with pytest.raises(ValueError, match=message) as err:
        mend_jax.edit(tiny, tiny.params, editor, editor.init(jax.random.key(0)), **kwargs)
    assert isinstance(err.value, mend_jax.EditInputError) and "\n" not in str(err.value)


def _count_traces(editor) -> list:
    """Replace `editor.edit` by itself plus a counter: its Python body runs only while jax
    traces it, so the list grows by one per trace (the edit batch's shapes)."""
    traces, edit = [], editor.edit

    def counted(state, params, batch):
        traces.append(jax.tree.map(jnp.shape, batch))
        return edit(state, params, batch)

    editor.edit = counted
    return traces


def test_repeated_edits_with_one_editor_trace_it_once(tiny):
    editor = mend_jax.MEND(tiny, INNER, mend_jax.MENDConfig(rank=8, edit_lr=0.3, norm=False))
    state, edit = _trained_like_state(editor), editor.edit
    traces = _count_traces(editor)
    first = mend_jax.edit(tiny, tiny.params, editor, state, PROMPTS, TARGETS)
    # other facts whose token rows have the same shapes: the compiled edit is reused
    other = ["Berlin", "Paris"]
    second = mend_jax.edit(tiny, tiny.params, editor, state, PROMPTS, other)
    assert len(traces) == 1
    want = jax.jit(edit)(state, tiny.params, _hand_batch(tiny.tokenizer, [*zip(PROMPTS, other)]))
    for path in map(tiny.names.path, INNER):
        g, w = np.asarray(get_path(second, path)), np.asarray(get_path(want, path))
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)
        assert not np.allclose(g, np.asarray(get_path(first, path)))  # not the first edit
    # a new batch shape is a new trace (jit's own cache), once
    for _ in range(2):
        mend_jax.edit(tiny, tiny.params, editor, state, PROMPTS[:1], TARGETS[:1])
    assert [t["input_ids"][0] for t in traces] == [2, 1]


def test_an_editor_given_a_new_config_is_compiled_anew(tiny):
    editor = mend_jax.make_editor("ft", tiny, INNER, steps=2, lr=1e-2)
    state = editor.init(None)
    path = tiny.names.path(INNER[0])
    small = get_path(mend_jax.edit(tiny, tiny.params, editor, state, PROMPTS, TARGETS), path)
    editor.config = dataclasses.replace(editor.config, lr=1e-1)
    large = get_path(mend_jax.edit(tiny, tiny.params, editor, state, PROMPTS, TARGETS), path)
    base = np.asarray(get_path(tiny.params, path))
    assert np.abs(np.asarray(large) - base).max() > 5 * np.abs(np.asarray(small) - base).max()


def test_the_compiled_edit_does_not_keep_the_editor_alive(tiny):
    from mend_jax.editing import jit_edit

    editor = mend_jax.MEND(tiny, INNER, mend_jax.MENDConfig(rank=8))
    mend_jax.edit(tiny, tiny.params, editor, editor.init(jax.random.key(0)), PROMPTS, TARGETS)
    assert jit_edit(editor) is jit_edit(editor)  # kept on the editor ...
    ref = weakref.ref(editor)
    del editor
    gc.collect()
    assert ref() is None  # ... and gone with it: no table outside the editor holds it


# ----------------------------------------------------------------------------- evaluate_edit
def _correct(model, params, tok, rows):
    batch = _hand_batch(tok, rows)
    logits = model.logits(params, batch["input_ids"], batch["attention_mask"])
    return np.asarray(sequence_correct(logits, batch["labels"], shift=True), float)


def _unchanged(model, params, new_params, tok, rows):
    """Per row: share of target positions whose argmax prediction the edit left unchanged."""
    batch = _hand_batch(tok, rows)
    pred = [np.asarray(model.logits(p, batch["input_ids"], batch["attention_mask"]).argmax(-1))
            for p in (params, new_params)]
    counted = np.asarray(batch["labels"])[:, 1:] != -100
    same = (pred[0][:, :-1] == pred[1][:, :-1]) & counted
    return same.sum(-1) / counted.sum(-1)


def test_evaluate_edit_reports_easyedit_metrics(tiny):
    tok = tiny.tokenizer
    # Fine-tuning steps make the edit land, so every metric has something to measure.
    editor = mend_jax.make_editor("ft", tiny, INNER, steps=100, lr=3e-2)
    new = mend_jax.edit(tiny, tiny.params, editor, editor.init(None), PROMPTS, TARGETS)
    rephrases = [["France's capital city is", "The river of Paris is"], None]
    loc_p, loc_t = ["The river of Paris is the", "Spain's capital city is"], ["Seine", "Madrid"]
    portability = [("France's capital city is", "Lyon")]
    got = mend_jax.evaluate_edit(tiny, tiny.params, new, PROMPTS, TARGETS, rephrases=rephrases,
                                 locality_prompts=loc_p, locality_targets=loc_t,
                                 portability=portability)
    assert set(got) == {"reliability", "generalization", "locality", "portability"}
    assert all(0.0 <= v <= 1.0 for v in got.values())
    assert got["reliability"] == 1.0
    reph = _correct(tiny, new, tok, [(p, "Lyon") for p in rephrases[0]])
    assert got["generalization"] == pytest.approx(reph.mean()) == 0.5
    loc = _unchanged(tiny, tiny.params, new, tok, list(zip(loc_p, loc_t)))
    assert got["locality"] == pytest.approx(loc.mean())
    assert got["portability"] == pytest.approx(reph[0])
    # the model before the edit is unchanged from itself and has not learned the new targets
    same = mend_jax.evaluate_edit(tiny, tiny.params, tiny.params, PROMPTS, TARGETS,
                                  locality_prompts=loc_p, locality_targets=loc_t)
    assert same == {"reliability": 0.0, "generalization": None, "locality": 1.0,
                    "portability": None}


def test_evaluate_edit_compiles_its_statistics_once_per_model(tmp_path, monkeypatch):
    import mend_jax.api as api

    model = _tiny(tmp_path)  # a model of its own: the statistics are compiled once per model
    traces = []

    def counting(name):
        stats = getattr(api, name)

        def counted(*args):
            traces.append(name)
            return stats(*args)
        return counted

    for name in ("_post_stats", "_paired_stats"):
        monkeypatch.setattr(api, name, counting(name))
    kw = dict(locality_prompts=["The river of Paris is the"], locality_targets=["Seine"])
    first = mend_jax.evaluate_edit(model, model.params, model.params, PROMPTS, TARGETS, **kw)
    assert sorted(set(traces)) == ["_paired_stats", "_post_stats"]
    n = len(traces)
    assert mend_jax.evaluate_edit(model, model.params, model.params, PROMPTS[::-1],
                                  TARGETS[::-1], **kw) == first
    assert len(traces) == n
