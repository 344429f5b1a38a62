"""A new user's bad inputs, one per case: each gives one line naming the file, record, field or
argument at fault (the CLIs: `error: ...`, exit code 2, no traceback), and loses nothing.

The cases are a survey of edit.py, eval.py (`--editor DIR --model M --data F`) and the Python
API (edit, evaluate_edit, load/save_editor, load_pretrained, load_requests, check_requests) on
one tiny GPT-2 with a word-level tokenizer, so that a word outside its vocabulary exists."""

import json
import re
import shutil
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
import transformers
from safetensors.numpy import load_file, save_file

import mend_jax
from mend_jax.data import DataError, EditRequest, check_requests, load_requests, make_edit_batch
from mend_jax.errors import EditError
from mend_jax.offline import build_word_tokenizer

TEXTS = ["The capital of France is Paris", "The capital of Spain is Madrid",
         "France's capital city is Paris", "Spain's capital city is Madrid",
         "who wrote Hamlet Shakespeare", "Lyon Rome Berlin"]
INNER = ["transformer.h.1.mlp.c_fc.weight", "transformer.h.1.mlp.c_proj.weight"]
P, T = ["The capital of France is"], ["Lyon"]
POSITIONS = 32


@pytest.fixture(scope="module")
def art(tmp_path_factory):
    """A tiny base model folder, an editor folder for it, and both loaded."""
    root = tmp_path_factory.mktemp("bad_inputs")
    tok = build_word_tokenizer(TEXTS)
    hf = transformers.GPT2Config(vocab_size=len(tok), n_positions=POSITIONS, n_embd=32,
                                 n_layer=2, n_head=2, bos_token_id=tok.bos_token_id,
                                 eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    base = mend_jax.save_pretrained(mend_jax.from_config(hf, seed=0, tokenizer=tok), None,
                                    root / "base")
    model = mend_jax.load_pretrained(base)
    editor = mend_jax.MEND(model, INNER, mend_jax.MENDConfig(rank=8))
    state = editor.init(jax.random.key(0))
    ed = mend_jax.save_editor(root / "editor", editor, state, base_model=str(base),
                              max_length=16)
    return {"root": root, "base": base, "editor_dir": ed, "model": model, "editor": editor,
            "state": state}


def _one_line(message: str) -> str:
    assert "\n" not in message and message.strip(), message
    return message


# ----------------------------------------------------------------------------- data files
ZSRE = {"src": "The capital of France is", "alt": "Lyon", "answers": ["Paris"],
        "rephrase": "France's capital city is", "loc": "nq question: who wrote Hamlet",
        "loc_ans": "Shakespeare"}
CF = {"requested_rewrite": {"prompt": "The capital of {} is", "subject": "France",
                            "target_new": {"str": "Lyon"}, "target_true": {"str": "Paris"}},
      "paraphrase_prompts": ["France's capital city is"],
      "neighborhood_prompts": ["The capital of Spain is"]}
FEVER = {"claim": "Paris is in France.", "label": "SUPPORTS", "rephrase": "France has Paris.",
         "loc_claim": "Rome is in Spain.", "loc_label": "REFUTES"}


def _zsre(**changes):
    rec = {**ZSRE, **changes}
    return [{k: v for k, v in rec.items() if v is not ...}]


def _cf(path: str, value):
    rec = json.loads(json.dumps(CF))
    *parents, last = path.split(".")
    node = rec
    for key in parents:
        node = node[key]
    if value is ...:
        del node[last]
    else:
        node[last] = value
    return [rec]


# (case, file name, content (json-dumped unless str/bytes), fmt, message); the file's path and
# the message must both appear in the error.
DATA_CASES = [
    ("missing file", "absent.json", None, None, r"no such file"),
    ("empty json file", "empty.json", "", None, r"malformed json at line 1"),
    ("empty jsonl file", "empty.jsonl", "", None, r"no records"),
    ("truncated json", "cut.json", '[{"src": "a", ', None, r"malformed json at line 1"),
    ("malformed jsonl line", "bad.jsonl", json.dumps(ZSRE) + "\n{nope\n", None,
     r"record 1 \(0-based\), line 2 \(1-based\): malformed json"),
    ("list of strings", "strs.json", ["a", "b"], None, r"record 0 .*expected a json object"),
    ("not UTF-8", "latin.json", '[{"src": "caf\xe9"}]'.encode("latin-1"), None,
     r"not UTF-8 text \(byte 13 is 0xe9\)"),
    ("unknown record layout", "what.json", [{"question": "q", "x": 1}], None,
     r"cannot tell the format from fields \['question', 'x'\]"),
    ("unknown format name", "ok.json", _zsre(), "zsre2", r"unknown format 'zsre2'"),
    ("zsre: no records", "none.json", [], "zsre", r"no records"),
    ("zsre: alt missing", "z.json", _zsre(alt=...), "zsre", r"record 0 .*field 'alt': missing"),
    ("zsre: src not a string", "z.json", _zsre(src=3), "zsre",
     r"field 'src': expected a string, got int"),
    ("zsre: empty target", "z.json", _zsre(alt="  "), "zsre", r"field 'alt': empty"),
    ("zsre: loc_ans null", "z.json", _zsre(loc_ans=None), "zsre",
     r"field 'loc_ans': expected a string, got NoneType"),
    ("zsre: rephrase list with a number", "z.json", _zsre(rephrase=["a", 1]), "zsre",
     r"field 'rephrase\[1\]': expected a string, got int"),
    ("zsre: rephrase an object", "z.json", _zsre(rephrase={"a": "b"}), "zsre",
     r"field 'rephrase': expected a list of strings, got dict"),
    ("zsre: neighbourhood triple", "z.json", _zsre(neighborhood=[["a", "b", "c"]]), "zsre",
     r"field 'neighborhood\[0\]': expected a \[prompt, answer\] pair"),
    ("zsre: rephrase_forms for another rephrase", "z.json",
     _zsre(rephrase_forms={"x": "question"}), "zsre",
     r"field 'rephrase_forms': no form for rephrase"),
    ("zsre: relation a number", "z.json", _zsre(relation=7), "zsre",
     r"record 0 .*field 'relation': expected a string, got int"),
    ("zsre format forced on counterfact", "cf.json", [CF], "zsre", r"field 'src': missing"),
    ("counterfact: subject missing", "cf.json", _cf("requested_rewrite.subject", ...),
     "counterfact", r"field 'requested_rewrite.subject': missing"),
    ("counterfact: no {} in prompt", "cf.json",
     _cf("requested_rewrite.prompt", "The capital of France is"), "counterfact",
     r"field 'requested_rewrite.prompt': no '\{\}' subject placeholder"),
    ("counterfact: target_new a plain string", "cf.json",
     _cf("requested_rewrite.target_new", "Lyon"), "counterfact",
     r"field 'requested_rewrite.target_new.str': missing"),
    ("counterfact: target number", "cf.json", _cf("requested_rewrite.target_new.str", 5),
     "counterfact", r"field 'requested_rewrite.target_new.str': expected a string, got int"),
    ("counterfact: empty relation_id", "cf.json", _cf("requested_rewrite.relation_id", " "),
     "counterfact", r"field 'requested_rewrite.relation_id': empty"),
    ("counterfact: paraphrases an object", "cf.json", _cf("paraphrase_prompts", {"a": 1}),
     "counterfact", r"field 'paraphrase_prompts': expected a list of strings, got dict"),
    ("fever: unknown label", "f.json", [{**FEVER, "label": "TRUE"}], "fever",
     r"field 'label': 'TRUE' is not a FEVER label"),
    ("fever: loc_claim missing", "f.json",
     [{k: v for k, v in FEVER.items() if k != "loc_claim"}], "fever",
     r"field 'loc_claim': missing"),
    ("fever format forced on zsre", "z.json", _zsre(), "fever", r"record 0 .*neither a FEVER"),
    ("parquet that is not parquet", "x.parquet", "hello", None, r"cannot read as parquet"),
]


@pytest.mark.parametrize("case, name, content, fmt, message", DATA_CASES,
                         ids=[c[0] for c in DATA_CASES])
def test_a_bad_data_file_names_the_file_record_and_field(tmp_path, case, name, content, fmt,
                                                         message):
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif isinstance(content, str):
        path.write_text(content)
    elif content is not None:
        path.write_text(json.dumps(content))
    with pytest.raises(DataError, match=message) as e:
        load_requests(path, fmt)
    assert _one_line(str(e.value)).startswith(f"{path}: ")


def test_a_folder_that_is_not_a_benchmark_says_what_it_lacks(tmp_path):
    with pytest.raises(DataError, match=rf"^{tmp_path}: a folder without test\.counterfact\.json"):
        load_requests(tmp_path)
    with pytest.raises(DataError, match=rf"^{tmp_path}: a folder; expected a data file"):
        load_requests(tmp_path, "zsre")


def test_a_missing_locality_file_is_named(tmp_path):
    rows = [{"input": f"q{i}?", "prediction": "a", "alternatives": ["b"],
             "filtered_rephrases": []} for i in range(2)]
    path = tmp_path / "zsre.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataError, match=rf"^{tmp_path / 'nq.jsonl'}: no such file$"):
        load_requests(path, "zsre_mend", loc_path=tmp_path / "nq.jsonl")


# ----------------------------------------------------------------------------- training data
def _requests(tmp_path, *records):
    path = tmp_path / "train.json"
    path.write_text(json.dumps([{**ZSRE, **r} for r in records]))
    return path, load_requests(path, "zsre")


@pytest.mark.parametrize("record, message", [
    ({"alt": "Lyonnais"},
     r"record 1 \(0-based\): target_new 'Lyonnais' encodes to the tokenizer's unknown token"),
    ({"loc_ans": "Hamlet Lyonnais"}, r"record 1 \(0-based\): loc_target 'Hamlet Lyonnais' "
                                     r"encodes to the tokenizer's unknown token"),
    ({"src": " ".join(["The capital of France is"] * 4)},
     r"record 1 \(0-based\): prompt \+ target_new are 21 tokens, over max_length=16"),
    ({"rephrase": ["France's capital city is", " ".join(["capital"] * 20)]},
     r"record 1 \(0-based\): rephrases\[1\] \+ target_new are 21 tokens, over max_length=16"),
], ids=["unknown target", "unknown locality target", "long prompt", "long rephrase"])
def test_bad_training_requests_are_refused_before_batching(art, tmp_path, record, message):
    path, requests = _requests(tmp_path, {}, record, record)
    tok, fmt = art["model"].tokenizer, art["model"].pair_format
    with pytest.raises(DataError, match=rf"^{path}: {message}.* \(1 more bad requests\)$"):
        check_requests(requests, tok, **fmt, max_length=16)
    # make_edit_batch (every training step) refuses them too, rather than truncating
    with pytest.raises(DataError, match=rf"^{path}: {message}(?!.*more bad)"):
        make_edit_batch(tok, requests[:2], **fmt, max_length=16, rng=np.random.default_rng(0))
    check_requests(requests[:1], tok, **fmt, max_length=16)  # the good record passes


def test_training_refuses_a_bad_record_before_step_0(art, tmp_path):
    """A bad record anywhere in the splits stops `train_editor` before its first step, even one
    that no batch would sample for a long time; nothing is written to the run."""
    from mend_jax.loop import LoopConfig, train_editor
    from mend_jax.training import MetaTrainer, TrainConfig

    path, requests = _requests(tmp_path, *([{}] * 30), {"alt": "Lyonnais"})
    trainer = MetaTrainer(art["editor"], TrainConfig(accumulate=1))
    run = tmp_path / "run"
    with pytest.raises(DataError, match=rf"^{path}: record 30 \(0-based\): target_new "):
        train_editor(trainer, art["model"].params, requests[:20], requests[20:],
                     art["model"].tokenizer, run_dir=run, max_length=16, seed=0,
                     cfg=LoopConfig(max_steps=1, batch_size=2, val_batches=1), progress=False)
    assert not run.exists() or not any(run.rglob("*"))


def test_a_request_built_in_memory_is_named_by_its_index(art):
    good = EditRequest(P[0], "Lyon", "Paris", (), "who wrote Hamlet", "Shakespeare")
    empty = EditRequest(P[0], " ", "Paris", (), "who wrote Hamlet", "Shakespeare")
    with pytest.raises(DataError, match=r"^request 1 \(0-based, built in memory\): target_new "
                                        r"is empty$"):
        check_requests([good, empty], art["model"].tokenizer, **art["model"].pair_format,
                       max_length=16)


# ----------------------------------------------------------------------------- base models
def _tensors(folder):
    return load_file(str(folder / "model.safetensors"))


def _mutated_model(art, tmp_path, mutate) -> Path:
    folder = tmp_path / "model"
    shutil.copytree(art["base"], folder)
    mutate(folder)
    return folder


def _set_tensors(folder, change):
    tensors = _tensors(folder)
    change(tensors)
    save_file(tensors, str(folder / "model.safetensors"))


W = "transformer.h.1.mlp.c_fc.weight"
MODEL_CASES = [
    ("no config.json", lambda f: (f / "config.json").unlink(), r"{f}: missing config\.json"),
    ("config.json not JSON", lambda f: (f / "config.json").write_text("{bad"),
     r"{f}/config\.json: invalid JSON"),
    ("config.json a list", lambda f: (f / "config.json").write_text("[1]"),
     r"{f}/config\.json: expected a JSON object, got list"),
    ("unsupported model_type", lambda f: (f / "config.json").write_text(
        json.dumps({**json.loads((f / "config.json").read_text()), "model_type": "mamba"})),
     r"{f}/config\.json: unsupported model_type 'mamba'"),
    ("no weights", lambda f: (f / "model.safetensors").unlink(),
     r"{f}: no model\.safetensors or model\.safetensors\.index\.json"),
    ("truncated safetensors", lambda f: (f / "model.safetensors").write_bytes(
        (f / "model.safetensors").read_bytes()[:1000]),
     r"{f}/model\.safetensors: corrupt or truncated safetensors file"),
    ("a tensor of the wrong shape", lambda f: _set_tensors(
        f, lambda t: t.update({W: t[W][:, :-1].copy()})),
     r"{f}: mis-shaped tensors: \['transformer\.h\.1\.mlp\.c_fc\.weight: got \(32, 127\), "
     r"expected \(32, 128\)'\]"),
    ("a tensor missing", lambda f: _set_tensors(f, lambda t: t.pop(W)),
     r"{f}: missing tensors: \['transformer\.h\.1\.mlp\.c_fc\.weight'\]"),
    ("an unexpected tensor", lambda f: _set_tensors(
        f, lambda t: t.update({"foo.bar": np.zeros(3, np.float32)})),
     r"{f}: unexpected tensors: \['foo\.bar'\]"),
    ("a NaN weight", lambda f: _set_tensors(f, lambda t: t[W].__setitem__((0, 0), np.nan)),
     r"{f}: tensors holding NaN or inf: \['transformer\.h\.1\.mlp\.c_fc\.weight \(1 of 4096"),
]


@pytest.mark.parametrize("case, mutate, message", MODEL_CASES, ids=[c[0] for c in MODEL_CASES])
def test_a_bad_model_folder_names_the_file_and_tensor(art, tmp_path, case, mutate, message):
    folder = _mutated_model(art, tmp_path, mutate)
    with pytest.raises(mend_jax.CheckpointError, match="^" + message.format(f=folder)) as e:
        mend_jax.load_pretrained(folder)
    _one_line(str(e.value))


@pytest.mark.parametrize("where, message", [
    ("absent", r"{p}: no such folder"),
    ("file", r"{p} is a file; expected a folder holding config\.json"),
])
def test_a_model_path_that_is_no_folder_is_named(tmp_path, where, message):
    path = tmp_path / "m"
    if where == "file":
        path.write_text("x")
    with pytest.raises(mend_jax.CheckpointError, match="^" + message.format(p=path)):
        mend_jax.load_pretrained(path)


# ----------------------------------------------------------------------------- editor folders
def _edit_json(change):
    def mutate(folder):
        meta = json.loads((folder / "editor.json").read_text())
        change(meta)
        (folder / "editor.json").write_text(json.dumps(meta))
    return mutate


def _edit_tensors(change):
    def mutate(folder):
        tensors = load_file(str(folder / "editor.safetensors"))
        change(tensors)
        save_file(tensors, str(folder / "editor.safetensors"))
    return mutate


U = "params/nets/128x32/uv/layers/0/U"
EDITOR_CASES = [
    ("editor.json not JSON", lambda f: (f / "editor.json").write_text('{"format": '),
     r"{f}/editor\.json: invalid JSON"),
    ("editor.json a list", lambda f: (f / "editor.json").write_text("[]"),
     r"{f}/editor\.json: expected a JSON object, got list"),
    ("editor.json of another format", _edit_json(lambda m: m.update(format="peft")),
     r"{f}/editor\.json: field format is 'peft', expected 'mend-jax-editor'"),
    ("editor.json without config", _edit_json(lambda m: m.pop("config")),
     r"{f}/editor\.json: no field 'config'"),
    ("base_model a string", _edit_json(lambda m: m.update(base_model="gpt2")),
     r"{f}/editor\.json: field base_model is str, expected an object"),
    ("inner_params entry without a name", _edit_json(lambda m: m["inner_params"][0].pop("name")),
     r"{f}/editor\.json: field inner_params\[0\] is \{{'shape': \[32, 128\]\}}"),
    ("config key unknown", _edit_json(lambda m: m["config"].update(rnak=3)),
     r"{f}/editor\.json: field config: .*unexpected keyword argument 'rnak'"),
    ("config value of the wrong type", _edit_json(lambda m: m["config"].update(rank="big")),
     r"{f}/editor\.json: field config\.rank is 'big', expected int"),
    ("editor kind unknown", _edit_json(lambda m: m.update(editor="rome")),
     r"{f}/editor\.json: field editor is 'rome'"),
    ("editor.safetensors missing", lambda f: (f / "editor.safetensors").unlink(),
     r"{f}/editor\.safetensors: missing"),
    ("editor.safetensors truncated", lambda f: (f / "editor.safetensors").write_bytes(
        (f / "editor.safetensors").read_bytes()[:500]),
     r"{f}/editor\.safetensors: corrupt or truncated safetensors file"),
    ("editor tensor missing", _edit_tensors(lambda t: t.pop(U)),
     r"{f}/editor\.safetensors: editor tensors do not match the config \(missing "
     r"\['params/nets/128x32/uv/layers/0/U'\]"),
    ("editor tensor of the wrong shape", _edit_tensors(
        lambda t: t.update({U: np.zeros((t[U].shape[0] + 1, t[U].shape[1]), np.float32)})),
     r"{f}/editor\.safetensors: tensor params/nets/128x32/uv/layers/0/U has shape \(161, 8\)"),
    ("editor tensor with NaN", _edit_tensors(lambda t: t[U].__setitem__((0, 0), np.nan)),
     r"{f}/editor\.safetensors: tensor params/nets/128x32/uv/layers/0/U holds NaN or inf "
     r"\(1 of 1280 values\)"),
]


@pytest.mark.parametrize("case, mutate, message", EDITOR_CASES,
                         ids=[c[0] for c in EDITOR_CASES])
def test_a_bad_editor_folder_names_the_file_and_field(art, tmp_path, case, mutate, message):
    folder = tmp_path / "editor"
    shutil.copytree(art["editor_dir"], folder)
    mutate(folder)
    with pytest.raises(mend_jax.ArtifactError, match="^" + message.format(f=folder)) as e:
        mend_jax.load_editor(folder, art["model"])
    _one_line(str(e.value))


def test_an_editor_for_another_model_is_refused(art):
    other = mend_jax.from_config(transformers.GPT2Config(
        vocab_size=art["model"].config.vocab_size, n_positions=POSITIONS, n_embd=16, n_layer=2,
        n_head=2), seed=3)
    with pytest.raises(mend_jax.ArtifactError, match=r"editor\.json: field inner_params\[0\]: "
                                                     r"transformer\.h\.1\.mlp\.c_fc\.weight has "
                                                     r"shape \[32, 128\] in the editor"):
        mend_jax.load_editor(art["editor_dir"], other)


def test_save_editor_never_replaces_a_file_or_a_folder_of_other_things(art, tmp_path):
    file = tmp_path / "notes.txt"
    file.write_text("keep me")
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("seed: 0\n")
    for path, message in [(file, r"notes\.txt is a file"),
                          (run, r"run holds other files \(\['config\.yaml'\]\)")]:
        with pytest.raises(mend_jax.ArtifactError, match=message):
            mend_jax.save_editor(path, art["editor"], art["state"])
    assert file.read_text() == "keep me" and (run / "config.yaml").read_text() == "seed: 0\n"
    # a state that would not load back is refused before anything is written
    with pytest.raises(mend_jax.ArtifactError, match=r"editor_state: editor tensors do not "
                                                     r"match the config \(missing"):
        mend_jax.save_editor(tmp_path / "new", art["editor"], {"params": {}})
    assert not (tmp_path / "new").exists()
    # an editor folder is replaced whole, as documented
    again = mend_jax.save_editor(tmp_path / "ed", art["editor"], art["state"])
    assert mend_jax.save_editor(again, art["editor"], art["state"]) == again


# ----------------------------------------------------------------------------- edit API
def _edit(art, *args, **kw):
    return mend_jax.edit(art["model"], art["model"].params, art["editor"], art["state"],
                         *args, **kw)


API_CASES = [
    ("length mismatch", (P, ["Lyon", "Rome"]), {}, r"^edit: 1 prompts but 2 targets$"),
    ("no prompts", ([], []), {}, r"^edit: no prompts$"),
    ("prompts a string", (P[0], T), {}, r"^edit: pass lists of strings, not a single string$"),
    ("empty prompt", ([" "], T), {}, r"^edit: prompt 0 is empty \(' '\)$"),
    ("prompt None", ([None], T), {}, r"^edit: prompt 0 is empty \(None\)$"),
    ("empty target", (P, [""]), {}, r"^edit: target 0 is empty \(''\)$"),
    ("unknown target word", (P, ["Lyonnais"]), {},
     r"^edit: target 0 \('Lyonnais'\) encodes to the tokenizer's unknown token '<unk>'"),
    ("rephrases of the wrong length", (P, T), {"rephrases": ["a", "b"]},
     r"^rephrases: expected one entry per prompt \(1\), got 2 entries$"),
    ("rephrases a string", (P, T), {"rephrases": "France's capital city is"},
     r"^rephrases: expected one entry per prompt \(1\), got a string$"),
    ("rephrase a number", (P, T), {"rephrases": [5]},
     r"^rephrases\[0\]: expected a string, a list of strings or None, got 5$"),
    ("rephrase empty", (P, T), {"rephrases": [["a", ""]]},
     r"^rephrases\[0\]: an empty rephrase \(\['a', ''\]\)$"),
    ("prompt longer than the positions", ([" ".join(["capital"] * 40)], T), {},
     r"^edit: prompt 0 \('capital capital .*'\) is 41 tokens with its target; the model has "
     r"32 positions$"),
    ("max_length shorter than the pair", (P, T), {"max_length": 4},
     r"^edit: prompt 0 \('The capital of France is'\) is 6 tokens with its target, over "
     r"max_length=4$"),
    ("max_length zero", (P, T), {"max_length": 0}, r"^max_length=0: expected an integer >= 2$"),
    ("max_length over the positions", (P, T), {"max_length": 1000},
     r"^max_length=1000: over the model's 32 positions$"),
]


@pytest.mark.parametrize("case, args, kw, message", API_CASES, ids=[c[0] for c in API_CASES])
def test_edit_refuses_bad_requests_by_name(art, case, args, kw, message):
    with pytest.raises(EditError, match=message):
        _edit(art, *args, **kw)


def test_edit_refuses_a_state_or_params_of_something_else(art):
    with pytest.raises(mend_jax.EditInputError, match=r"^editor_state: not a state of this "
                                                      r"editor \(missing \['params/edit_lrs/"):
        mend_jax.edit(art["model"], art["model"].params, art["editor"], {}, P, T)
    other = mend_jax.from_config(transformers.GPT2Config(
        vocab_size=art["model"].config.vocab_size, n_positions=POSITIONS, n_embd=16, n_layer=2,
        n_head=2), seed=3)
    with pytest.raises(mend_jax.EditInputError, match=r"^params: not the model's parameters "
                                                      r"\(transformer/h_0/attn/c_attn/bias has "
                                                      r"shape \(48,\), expected \(96,\)\)$"):
        mend_jax.edit(art["model"], other.params, art["editor"], art["state"], P, T)


@pytest.mark.parametrize("kw, message", [
    ({"locality_prompts": ["who wrote Hamlet"]},
     r"^locality: pass both locality_prompts and locality_targets$"),
    ({"locality_prompts": ["who wrote Hamlet", "Paris"], "locality_targets": ["Shakespeare"]},
     r"^locality: 2 prompts but 1 targets$"),
    ({"locality_prompts": "who wrote Hamlet", "locality_targets": "Shakespeare"},
     r"^locality: pass lists of strings, not a single string$"),
    ({"portability": ["The capital of France is"]},
     r"^portability\[0\]: expected a \(prompt, target\) pair, got 'The capital"),
    ({"portability": [("Paris is the capital of", "Lyonnais")]},
     r"^portability: target 0 \('Lyonnais'\) encodes to the tokenizer's unknown token"),
], ids=["locality prompts alone", "locality lengths", "locality strings", "portability single",
        "portability unknown word"])
def test_evaluate_edit_refuses_bad_probes_by_name(art, kw, message):
    params = art["model"].params
    with pytest.raises(mend_jax.EditInputError, match=message):
        mend_jax.evaluate_edit(art["model"], params, params, P, T, **kw)


# ----------------------------------------------------------------------------- CLIs
def _cli(main, argv, capsys) -> tuple[int, str]:
    try:
        rc = main([str(a) for a in argv])
    except SystemExit as e:  # argparse's own errors
        rc = e.code
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    errors = [line for line in err.splitlines() if "error: " in line]
    assert len(errors) == 1, err
    return rc, errors[0]


OK = ["--prompt", "The capital of France is", "--target", "Lyon"]
EDIT_CASES = [  # argv, with {ed}, {base}, {root} filled in; the error line's expected text
    ("unknown flag", ["{ed}", *OK, "--frobnicate"], r"unrecognized arguments: --frobnicate"),
    ("no run folder", ["{root}/nothing", *OK], r"{root}/nothing: no config\.yaml"),
    ("run folder and --editor", ["{root}", "--editor", "{ed}", *OK],
     r"give a run folder or --editor DIR \(not both\)"),
    ("--editor missing", ["--editor", "{root}/nothing", *OK],
     r"{root}/nothing/editor\.json: missing"),
    ("--model missing", ["--editor", "{ed}", "--model", "{root}/nothing", *OK],
     r"{root}/nothing: no such folder"),
    ("--model without config.json", ["--editor", "{ed}", "--model", "{ed}", *OK],
     r"{ed}: missing config\.json"),
    ("empty --prompt", ["--editor", "{ed}", "--prompt", "", "--target", "Lyon"],
     r"--prompt must not be empty"),
    ("empty --target", ["--editor", "{ed}", "--prompt", "x", "--target", " "],
     r"--target must not be empty"),
    ("empty --rephrase", ["--editor", "{ed}", *OK, "--rephrase", ""],
     r"--rephrase must not be empty"),
    ("empty --neighbor", ["--editor", "{ed}", *OK, "--neighbor", " "],
     r"--neighbor must not be empty"),
    ("--max-length 0", ["--editor", "{ed}", *OK, "--max-length", "0"],
     r"argument --max-length: expected an integer >= 1, got 0"),
    ("--max-length -3", ["--editor", "{ed}", *OK, "--max-length", "-3"],
     r"argument --max-length: expected an integer >= 1, got -3"),
    ("--max-length not a number", ["--editor", "{ed}", *OK, "--max-length", "ten"],
     r"argument --max-length: expected an integer >= 1, got 'ten'"),
    ("--max-length shorter than the prompt", ["--editor", "{ed}", *OK, "--max-length", "3"],
     r"prompt is longer than max_length=3 tokens with the target"),
    ("--max-length over the positions", ["--editor", "{ed}", *OK, "--max-length", "100"],
     r"input_ids: sequences of 100 tokens, but the model has 32 positions"),
    ("--max-new-tokens -1", ["--editor", "{ed}", *OK, "--max-new-tokens", "-1"],
     r"argument --max-new-tokens: expected an integer >= 1, got -1"),
    ("over-long --prompt", ["--editor", "{ed}", "--prompt", " ".join(["capital"] * 40),
                            "--target", "Lyon"],
     r"prompt is longer than max_length=16 tokens with the target"),
    ("unknown word in --target", ["--editor", "{ed}", "--prompt", "x", "--target", "Lyonnais"],
     r"pair 0: target 'Lyonnais' contains a word the tokenizer does not know"),
    ("--save onto a file", ["--editor", "{ed}", *OK, "--save", "{ed}/editor.json"],
     r"{ed}/editor\.json is a file; expected a folder to write the model into"),
]


@pytest.mark.parametrize("case, argv, message", EDIT_CASES, ids=[c[0] for c in EDIT_CASES])
def test_edit_cli_gives_one_named_error_line(art, capsys, case, argv, message):
    import edit as edit_cli

    fill = {"ed": art["editor_dir"], "base": art["base"], "root": art["root"]}
    rc, line = _cli(edit_cli.main, [a.format(**fill) for a in argv], capsys)
    assert rc == 2
    assert re.search(message.format(**fill), line), line


def _data_file(art) -> Path:
    path = art["root"] / "good.json"
    path.write_text(json.dumps([ZSRE, {**ZSRE, "src": "The capital of Spain is",
                                       "alt": "Rome"}]))
    return path


EVAL_CASES = [
    ("unknown flag", ["{ed}", "--nedits", "3"], r"unrecognized arguments: --nedits 3"),
    ("no run folder", ["{root}/nothing"], r"{root}/nothing: no config\.yaml"),
    ("--editor without --data", ["--editor", "{ed}"], r"--editor needs --data"),
    ("--data missing", ["--editor", "{ed}", "--data", "{root}/absent.json"],
     r"{root}/absent\.json: no such file"),
    ("--data a folder", ["--editor", "{ed}", "--data", "{root}"],
     r"{root}: a folder without test\.counterfact\.json"),
    ("--data with a bad record", ["--editor", "{ed}", "--data", "{root}/bad.json",
                                  "--format", "zsre"],
     r"{root}/bad\.json: record 0 \(0-based\): field 'alt': missing"),
    ("--format unknown", ["--editor", "{ed}", "--data", "{data}", "--format", "csv"],
     r"{data}: unknown format 'csv'"),
    ("--n-edits 0", ["--editor", "{ed}", "--data", "{data}", "--n-edits", "0"],
     r"argument --n-edits: expected an integer >= 1, got 0"),
    ("--n-edits over the requests", ["--editor", "{ed}", "--data", "{data}", "--n-edits", "5",
                                     "--out", "{root}/o.json"],
     r"n_edits=5 but only 2 requests to evaluate"),
    ("--max-examples 0", ["--editor", "{ed}", "--data", "{data}", "--max-examples", "0"],
     r"argument --max-examples: expected an integer >= 1, got 0"),
    ("--max-examples -1", ["--editor", "{ed}", "--data", "{data}", "--max-examples", "-1"],
     r"argument --max-examples: expected an integer >= 1, got -1"),
    ("--sequential 0", ["--editor", "{ed}", "--data", "{data}", "--sequential", "0"],
     r"argument --sequential: expected an integer >= 1, got 0"),
    ("--sequential too many", ["--editor", "{ed}", "--data", "{data}", "--sequential", "5",
                               "--out", "{root}/o.json"],
     r"--sequential 5 x 1 edits needs 5 requests, only 2 to evaluate"),
    ("--split unknown", ["{ed}", "--split", "dev"], r"argument --split: invalid choice: 'dev'"),
    ("--set the trained editor", ["{ed}", "--set", "alg.editor.rank=3"],
     r"--set alg\.editor\.rank: only the baselines' options"),
    ("--set without a value", ["{ed}", "--set", "alg.baselines.ft.lr"],
     r"--set 'alg\.baselines\.ft\.lr': expected KEY=VALUE"),
    ("--set with an editor folder", ["--editor", "{ed}", "--data", "{data}", "--set",
                                     "alg.baselines.ft.lr=1"],
     r"--set needs a run folder"),
    ("--set an unknown option", ["{ed}", "--set", "alg.baselines.ft.speed=2"],
     r"alg\.baselines\.ft\.speed"),
    ("--methods unknown", ["--editor", "{ed}", "--data", "{data}", "--methods", "rome"],
     r"argument --methods: invalid choice: 'rome'"),
    ("--methods another trained kind", ["--editor", "{ed}", "--data", "{data}", "--methods",
                                        "ke", "--out", "{root}/o.json"],
     r"--methods ke: {ed} holds a mend editor"),
    ("--out a folder", ["--editor", "{ed}", "--data", "{data}", "--out", "{root}"],
     r"--out {root} is a folder; expected a \.json file"),
    ("--model with NaN weights", ["--editor", "{ed}", "--model", "{root}/nan", "--data",
                                  "{data}"],
     r"{root}/nan: tensors holding NaN or inf"),
]


@pytest.mark.parametrize("case, argv, message", EVAL_CASES, ids=[c[0] for c in EVAL_CASES])
def test_eval_cli_gives_one_named_error_line(art, capsys, case, argv, message):
    import eval as eval_cli

    root = art["root"]
    (root / "bad.json").write_text(json.dumps(_zsre(alt=...)))
    if not (root / "nan").exists():
        shutil.copytree(art["base"], root / "nan")
        _set_tensors(root / "nan", lambda t: t[W].__setitem__((1, 2), np.inf))
    fill = {"ed": art["editor_dir"], "root": root, "data": _data_file(art)}
    rc, line = _cli(eval_cli.main, [a.format(**fill) for a in argv], capsys)
    assert rc == 2
    assert re.search(message.format(**fill), line), line


def test_eval_cli_writes_out_into_a_new_folder(art, capsys):
    import eval as eval_cli

    out = art["root"] / "new" / "folder" / "results.json"
    assert eval_cli.main(["--editor", str(art["editor_dir"]), "--data", str(_data_file(art)),
                          "--out", str(out)]) == 0
    assert json.loads(out.read_text())["mend"]["n_examples"] == 2


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
