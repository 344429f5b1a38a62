"""FEVER as edits of a BERT claim classifier: the loader's two layouts, class batches, edits
measured by `evaluate_editor` against numbers recomputed claim by claim, the offline pipeline,
and the decoder start of seq2seq edit batches."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers

from mend_jax.data import DataError, EditRequest, load_fever, load_requests, tokenize_pairs
from mend_jax.data.fever import LABELS
from mend_jax.editors import MEND, FineTune, FTConfig, MENDConfig, make_editor
from mend_jax.errors import EditError
from mend_jax.evaluation import evaluate_editor
from mend_jax.models import from_config
from mend_jax.offline.pretrain_classifier import build_classifier_tokenizer

FLIP = {"SUPPORTS": "REFUTES", "REFUTES": "SUPPORTS"}  # spelled here, not imported
MAX_LENGTH = 12
WIDTH = 16  # the claim-by-claim recomputation pads to another width than the evaluation
CLAIMS = [  # (claim, its true label, rephrases, locality claim, its label)
    ("The capital of France is Paris.", "SUPPORTS", ["France has its capital in Paris."],
     "The capital of Peru is Lima.", "SUPPORTS"),
    ("The capital of Italy is Madrid.", "REFUTES",
     ["Italy has its capital in Madrid.", "The seat of government of Italy is Madrid."],
     "The capital of Spain is Rome.", "REFUTES"),
    ("The capital of Spain is Madrid.", "SUPPORTS", ["Spain has its capital in Madrid."],
     "The capital of Austria is Lisbon.", "REFUTES"),
    ("The capital of Germany is Vienna.", "REFUTES", ["Germany has its capital in Vienna."],
     "The capital of Italy is Rome.", "SUPPORTS"),
    ("The capital of Austria is Vienna.", "SUPPORTS",
     ["Austria has its capital in Vienna.", "The seat of government of Austria is Vienna."],
     "The capital of France is Lima.", "REFUTES"),
    ("The capital of Portugal is Paris.", "REFUTES", ["Portugal has its capital in Paris."],
     "The capital of Germany is Berlin.", "SUPPORTS"),
]


def json_records():
    return [{"claim": c, "label": label, "rephrase": reph, "loc_claim": lc, "loc_label": ll}
            for c, label, reph, lc, ll in CLAIMS]


def mend_records():
    """The MEND release's layout: the base model's prediction, the flipped label first."""
    return [{"input": c, "prediction": label, "alternatives": [FLIP[label]],
             "filtered_rephrases": reph, "output": [{"answer": label}], "logit": 0.5}
            for c, label, reph, _, _ in CLAIMS]


def write(tmp_path, records, name, jsonl=False):
    path = tmp_path / name
    text = "\n".join(map(json.dumps, records)) if jsonl else json.dumps(records)
    path.write_text(text)
    return path


# ----------------------------------------------------------------------------- loader
def test_json_layout_flips_the_label_and_keeps_its_locality_claim(tmp_path):
    path = write(tmp_path, json_records(), "fever.json")
    reqs = load_requests(path)  # sniffed
    assert reqs == load_fever(path) and len(reqs) == len(CLAIMS)
    assert [r.target_new for r in reqs] == ["REFUTES", "SUPPORTS"] * 3
    r = reqs[1]
    assert (r.prompt, r.target_new, r.target_true) == (
        "The capital of Italy is Madrid.", "SUPPORTS", "REFUTES")
    assert r.rephrases == ("Italy has its capital in Madrid.",
                           "The seat of government of Italy is Madrid.")
    assert (r.loc_prompt, r.loc_target) == ("The capital of Spain is Rome.", "REFUTES")


def test_mend_layout_skips_as_the_reference_and_pairs_locality_at_half_length(tmp_path):
    records = mend_records()
    records.insert(2, {**records[0], "filtered_rephrases": []})  # skipped: no rephrase
    records.insert(4, {**records[0], "alternatives": []})  # skipped: no alternative
    path = write(tmp_path, records, "fever_mend.jsonl", jsonl=True)
    assert load_requests(path, None)[0] == load_requests(path, "fever")[0]  # sniffed
    reqs = load_fever(path)
    assert len(reqs) == len(CLAIMS)
    for i, r in enumerate(reqs):
        claim, label, reph, _, _ = CLAIMS[i]
        other = CLAIMS[(i + 3) % 6]
        assert (r.prompt, r.target_new, r.target_true, r.rephrases) == (
            claim, FLIP[label], label, tuple(reph))
        assert (r.loc_prompt, r.loc_target) == (other[0], other[1])


@pytest.mark.parametrize("fix, name, field, problem", [
    (lambda r: r.pop("loc_label"), "fever.json", "loc_label", "missing"),
    (lambda r: r.update(label="NOT ENOUGH INFO"), "fever.json", "label", "not a FEVER label"),
    (lambda r: r.update(output=[{"answer": "TRUE"}]), "fever_mend.jsonl", "output[0].answer",
     "not a FEVER label"),
])
def test_a_bad_record_names_file_record_and_field(tmp_path, fix, name, field, problem):
    records = json_records() if name.endswith(".json") else mend_records()
    fix(records[3])
    path = write(tmp_path, records, name, jsonl=name.endswith(".jsonl"))
    with pytest.raises(DataError) as e:
        load_fever(path)
    msg = str(e.value)
    assert f"{name}: record 3 (0-based)" in msg and f"field {field!r}" in msg and problem in msg


# ----------------------------------------------------------------------------- the classifier
@pytest.fixture(scope="module")
def classifier():
    """A tiny random BERT classifier with FEVER's label names, its weights perturbed so that
    claims get different predictions, and its word tokenizer ("<bos> claim <eos>")."""
    texts = [t for c, _, reph, lc, _ in CLAIMS for t in (c, lc, *reph)]
    tok = build_classifier_tokenizer("word", texts)
    hf = transformers.BertConfig(
        vocab_size=len(tok), hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=WIDTH, type_vocab_size=1,
        pad_token_id=tok.pad_token_id, architectures=["BertForSequenceClassification"],
        id2label=dict(enumerate(LABELS)), label2id={n: i for i, n in enumerate(LABELS)})
    model = from_config(hf, seed=0, tokenizer=tok)
    rng = np.random.default_rng(1)
    model.params = jax.tree.map(lambda x: x + 0.5 * rng.standard_normal(x.shape, np.float32),
                                model.params)
    return model, tok


def requests() -> list[EditRequest]:
    return [EditRequest(prompt=c, target_new=FLIP[label], target_true=label,
                        rephrases=tuple(reph), loc_prompt=lc, loc_target=ll)
            for c, label, reph, lc, ll in CLAIMS]


def test_claims_batch_as_specials_and_class_ids(classifier):
    model, tok = classifier
    b = tokenize_pairs(tok, ["The capital of France is Paris.", "The capital of Peru is Lima."],
                       ["REFUTES", "SUPPORTS"], **model.pair_format, max_length=MAX_LENGTH)
    assert b["labels"].tolist() == [0, 1]
    ids = tok(["The capital of France is Paris."], add_special_tokens=False)["input_ids"][0]
    assert b["input_ids"][0, : len(ids) + 2].tolist() == [tok.bos_token_id, *ids,
                                                          tok.eos_token_id]
    assert b["attention_mask"][0].sum() == len(ids) + 2
    short = tokenize_pairs(tok, ["The capital of France is Paris."], ["REFUTES"],
                           **model.pair_format, max_length=4)
    assert short["truncated"].tolist() == [True]
    assert short["input_ids"][0].tolist() == [tok.bos_token_id, *ids[:2], tok.eos_token_id]
    with pytest.raises(EditError, match=r"'TRUE' is not one of the classifier's labels "
                                        r"\['REFUTES', 'SUPPORTS'\]"):
        tokenize_pairs(tok, ["x"], ["TRUE"], **model.pair_format, max_length=MAX_LENGTH)


def _by_hand(model, tok, params_of, reqs):
    """The evaluate_editor metrics recomputed claim by claim (other padding, no batching code):
    `params_of(request)` is the edited model of that request's edit."""
    texts = sorted({t for r in reqs for t in (r.prompt, r.loc_prompt, *r.rephrases)})
    row = {t: i for i, t in enumerate(texts)}
    ids = np.full((len(texts), WIDTH), tok.pad_token_id, np.int32)
    for i, t in enumerate(tok(texts)["input_ids"]):
        ids[i, : len(t)] = t
    mask = (ids != tok.pad_token_id).astype(np.int32)
    logits = jax.jit(lambda p: jax.nn.softmax(model.logits(p, ids, mask)))
    label2id = model.pair_format["label2id"]
    base = np.asarray(logits(model.params))
    es, gen, pre, post, kl = [], [], [], [], []
    for r in reqs:
        probs = np.asarray(logits(params_of(r)))
        target = label2id[r.target_new]
        es.append(probs[row[r.prompt]].argmax() == target)
        gen.append(np.mean([probs[row[p]].argmax() == target for p in r.rephrases]))
        p_base, p_new = base[row[r.loc_prompt]], probs[row[r.loc_prompt]]
        pre.append(p_base.argmax() == label2id[r.loc_target])
        post.append(p_new.argmax() == label2id[r.loc_target])
        kl.append(float((p_base * (np.log(p_base) - np.log(p_new))).sum()))
    return {"edit_success": np.mean(es), "generality": np.mean(gen),
            "loc_acc_pre": np.mean(pre), "loc_acc_post": np.mean(post),
            "drawdown": np.mean(pre) - np.mean(post), "locality_kl": np.mean(kl)}


def test_identity_edit_of_a_classifier_measures_the_base_model(classifier):
    model, tok = classifier
    reqs = requests()
    ft = FineTune(model, config=FTConfig(steps=0))
    m = evaluate_editor(model, ft, ft.init(), model.params, reqs, tok, max_length=MAX_LENGTH,
                        seed=None, timed_edits=0)
    want = _by_hand(model, tok, lambda r: model.params, reqs)
    for key, value in want.items():
        assert m[key] == pytest.approx(value, abs=1e-6), key
    assert m["drawdown"] == 0.0 and m["locality"] == 1.0
    assert m["edit_success"] == m["pre_edit_success"]
    assert 0 < m["edit_success"] < 1 and 0 < m["generality"] < 1  # a real mix of predictions


def _measured_as_by_hand(model, tok, editor, state, reqs) -> dict:
    """evaluate_editor's metrics, checked against those recomputed from `editor.edit` claim by
    claim (one edit per call)."""
    m = evaluate_editor(model, editor, state, model.params, reqs, tok, max_length=MAX_LENGTH,
                        seed=None, timed_edits=0)
    edit = jax.jit(editor.edit)

    def edited(r):
        batch = tokenize_pairs(tok, [r.prompt], [r.target_new], **model.pair_format,
                               max_length=MAX_LENGTH)
        return edit(state, model.params, {k: jnp.asarray(v) for k, v in batch.items()
                                          if k != "truncated"})

    want = _by_hand(model, tok, edited, reqs)
    for key, value in want.items():
        assert m[key] == pytest.approx(value, abs=1e-5), key
    return m


def test_mend_edit_of_a_classifier_is_measured_claim_by_claim(classifier):
    """A fresh MEND editor (norm off: one SGD step of size edit_lr on the class loss) flips
    claims; evaluate_editor's numbers equal those recomputed from `editor.edit` by hand."""
    model, tok = classifier
    reqs = requests()
    mend = MEND(model, config=MENDConfig(rank=8, norm=False, edit_lr=3.0))
    state = mend.init(jax.random.key(0))
    m = _measured_as_by_hand(model, tok, mend, state, reqs)
    assert m["edit_success"] > m["pre_edit_success"]  # the edit did something
    assert m["locality_kl"] > 1e-4


@pytest.mark.slow  # a meta-training step and an evaluation compiled per method: about a minute
@pytest.mark.parametrize("method, opts", [("ke", dict(hidden_dim=8, condition_dim=8)),
                                          ("enn", dict(edit_lr=3.0))])
def test_ke_and_enn_edit_and_train_on_a_classifier(classifier, method, opts):
    """KE and ENN behind the same interface on a BERT classifier: one meta-training step runs
    to a finite loss that moves the editor, and evaluate_editor's numbers equal those
    recomputed from `editor.edit` claim by claim."""
    from mend_jax.data import make_edit_batch
    from mend_jax.training import MetaTrainer, TrainConfig

    model, tok = classifier
    reqs = requests()
    editor = make_editor(method, model, None, **opts)
    trainer = MetaTrainer(editor, TrainConfig(accumulate=1, lr=1e-2, c_edit=1.0))
    tstate = trainer.init(jax.random.key(0))
    batch = make_edit_batch(tok, reqs, **model.pair_format, max_length=MAX_LENGTH,
                            rng=np.random.default_rng(0), n_edits=1)
    batch = {part: {k: jnp.asarray(v) for k, v in rows.items() if k != "truncated"}
             for part, rows in batch.items()}
    new_tstate, metrics = jax.jit(trainer.step)(tstate, model.params, batch)
    assert np.isfinite(float(metrics["loss"])) and float(metrics["skipped"]) == 0.0
    moved = [not np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(
        jax.tree.leaves(tstate["editor"]["params"]),
        jax.tree.leaves(new_tstate["editor"]["params"]))]
    assert any(moved)

    _measured_as_by_hand(model, tok, editor, new_tstate["editor"], reqs)


def test_meta_training_metrics_count_a_classifier_s_examples(classifier):
    """The meta-training step's edit accuracy and edit count are per example (labels [B])."""
    from mend_jax.data import make_edit_batch
    from mend_jax.training import MetaTrainer, TrainConfig

    model, tok = classifier
    mend = MEND(model, config=MENDConfig(rank=8, norm=False, edit_lr=3.0))
    state = mend.init(jax.random.key(0))
    batch = make_edit_batch(tok, requests(), **model.pair_format, max_length=MAX_LENGTH,
                            rng=np.random.default_rng(0), n_edits=2)
    batch = {part: {k: jnp.asarray(v) for k, v in rows.items() if k != "truncated"}
             for part, rows in batch.items()}
    m = jax.jit(MetaTrainer(mend, TrainConfig(accumulate=1)).eval_step)(
        state, model.params, batch)
    outer, loc = batch["edit_outer"], batch["loc"]
    new = jax.jit(mend.edit)(state, model.params, batch["edit_inner"])
    logits = jax.jit(model.logits)
    hits = logits(new, outer["input_ids"], outer["attention_mask"]).argmax(-1) == outer["labels"]
    loc_hits = logits(model.params, loc["input_ids"], loc["attention_mask"]).argmax(-1) == \
        loc["labels"]
    assert float(m["n_edits"]) == 2.0
    assert float(m["edit_acc"]) == pytest.approx(float(hits.mean()))
    assert float(m["loc_acc_pre"]) == pytest.approx(float(loc_hits.mean()))


def test_text_api_edits_a_classifier_with_label_names(classifier):
    from mend_jax import EditInputError, edit
    from mend_jax.editing import edit_report
    from mend_jax.models.names import flatten

    model, tok = classifier
    mend = MEND(model, config=MENDConfig(rank=8, norm=False, edit_lr=3.0))
    state = mend.init(jax.random.key(0))
    claims, targets = [c for c, *_ in CLAIMS[:3]], [FLIP[label] for _, label, *_ in CLAIMS[:3]]
    new = edit(model, model.params, mend, state, claims, targets)
    flat, flat_new = flatten(model.params), flatten(new)
    changed = {model.names.by_path[p].hf for p in flat
               if not np.array_equal(flat[p], flat_new[p])}
    assert changed == set(mend.layout.inner_params)  # the editor's weights, and only they
    with pytest.raises(EditInputError, match="'TRUE'.*not one of the classifier's labels"):
        edit(model, model.params, mend, state, claims[:1], ["TRUE"])
    # the edit CLI's report: the label predicted before and after, and p(target label)
    report, _ = edit_report(model, tok, mend, state, claims[0], targets[0],
                            rephrases=CLAIMS[0][2], max_length=MAX_LENGTH)
    for row in report["rows"]:
        assert {row["before"], row["after"]} <= set(LABELS)
        for when in ("before", "after"):  # two classes: the predicted one has p > 0.5
            assert (row[when] == targets[0]) == (row[f"p_target_{when}"] > 0.5)


# ----------------------------------------------------------------------------- seq2seq batches
@pytest.fixture(scope="module")
def tiny_bart():
    from mend_jax.offline import build_word_tokenizer

    tok = build_word_tokenizer([c for c, *_ in CLAIMS] + list(LABELS))
    hf = transformers.BartConfig(
        vocab_size=len(tok), d_model=16, encoder_layers=1, decoder_layers=1,
        encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32,
        decoder_ffn_dim=32, max_position_embeddings=32, pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id,
        decoder_start_token_id=tok.bos_token_id)  # 3: neither the pad (0) nor the eos (1)
    return from_config(hf, seed=0, tokenizer=tok), tok


def test_seq2seq_edit_batches_start_the_decoder_at_decoder_start_token_id(tiny_bart,
                                                                          monkeypatch):
    """BART starts its decoder at the config's decoder_start_token_id; the evaluation, the
    training loop's batches and the text API all pass it to the tokeniser."""
    import mend_jax.api
    import mend_jax.data.batching
    import mend_jax.evaluation
    from mend_jax.loop import LoopConfig, validate

    model, tok = tiny_bart
    start = tok.bos_token_id
    assert model.pair_format["decoder_start_token_id"] == start
    firsts = []

    def spy(original):
        def tokenize(*args, **kw):
            batch = original(*args, **kw)
            firsts.extend(batch["decoder_input_ids"][:, 0].tolist())
            return batch
        return tokenize

    for module in (mend_jax.api, mend_jax.data.batching, mend_jax.evaluation):
        monkeypatch.setattr(module, "tokenize_pairs", spy(module.tokenize_pairs))
    reqs = [EditRequest(prompt=c, target_new=c.split()[-1][:-1], target_true=None,
                        rephrases=(), loc_prompt=c, loc_target=c.split()[3])
            for c, *_ in CLAIMS]

    ft = FineTune(model, config=FTConfig(steps=0))
    evaluate_editor(model, ft, ft.init(), model.params, reqs[:2], tok, max_length=MAX_LENGTH,
                    timed_edits=0)
    n_eval = len(firsts)
    validate(type("Trainer", (), {"model": model}), lambda s, p, b: {"loss": 0.0}, None,
             model.params, reqs, tok, cfg=LoopConfig(val_batches=1, batch_size=2), seed=0,
             max_length=MAX_LENGTH)
    n_loop = len(firsts) - n_eval
    mend_jax.api._batch(model, tok, ["The capital of France is"], ["Paris"], None, "edit")
    assert n_eval > 0 and n_loop > 0 and len(firsts) > n_eval + n_loop
    assert set(firsts) == {start}


# ----------------------------------------------------------------------------- the pipeline
@pytest.mark.slow  # builds the benchmark, a classifier, an editor: about a minute
def test_offline_fever_pipeline_trains_a_classifier_editor_and_writes_results(tmp_path):
    """`train.py data=fever model=bert_tiny`, at tiny sizes: claims written as FEVER json and
    read back, a BERT claim classifier built and cached, MEND meta-trained and evaluated."""
    import train
    from mend_jax.models import load_pretrained

    run_dir = tmp_path / "run"
    assert train.main([
        "data=fever", "model=bert_tiny", "model.build.hidden_size=16",
        "model.build.num_hidden_layers=2", "model.build.num_attention_heads=2",
        "model.build.intermediate_size=32", "model.pretrain.steps=20",
        # a 300-token BPE is nearly bytes: claims run past the default 32 tokens
        "model.tokenizer.vocab_size=300", "model.max_length=64",
        "model.inner_params=[bert.encoder.layer.1.intermediate.dense.weight,"
        "bert.encoder.layer.1.output.dense.weight]",
        "data.n_val=10", "data.n_test=12", "data.n_train=40",
        "alg.loop.max_steps=4", "alg.loop.val_every=2", "alg.loop.val_batches=1",
        "alg.loop.save_every=2", "alg.loop.log_every=2", "alg.editor.rank=8",
        "eval.max_examples=4", "eval.methods=[mend]",
        f"out_dir={run_dir}", f"cache_dir={tmp_path / 'cache'}", "progress=false"]) == 0
    results = json.loads((run_dir / "results.json").read_text())
    m = results["mend"]
    assert m["n_examples"] == 4
    assert 0.0 <= m["edit_success"] <= 1.0 and 0.0 <= m["generality"] <= 1.0
    assert -1.0 <= m["drawdown"] <= 1.0 and m["locality_kl"] >= 0.0
    info = results["_run"]["info"]
    assert (info["train"], info["val"], info["test"]) == (40, 10, 12)
    assert 0.0 <= info["base_claim_accuracy"] <= 1.0
    test_file = run_dir / "data" / "test.fever.json"
    reqs = load_fever(test_file)
    assert all(r.target_new == FLIP[r.target_true] and r.prompt.endswith(".") for r in reqs)
    assert (run_dir / "editor").is_dir() and len(list((tmp_path / "cache").glob("*"))) == 1
    base = load_pretrained(run_dir / "base_model")
    assert base.targets == "class" and base.pair_format["label2id"] == {"REFUTES": 0,
                                                                         "SUPPORTS": 1}


def test_a_gpt2_build_for_the_fever_classifier_is_refused(tmp_path):
    """transformers.BertConfig takes unknown keywords silently; the pipeline names them."""
    from mend_jax.config import load_config
    from mend_jax.errors import ConfigError
    from mend_jax.pipeline import prepare

    cfg = load_config(["data=fever", "model=geo_tiny", "data.n_val=2", "data.n_test=2",
                       "data.n_train=4", f"out_dir={tmp_path}", f"cache_dir={tmp_path}"])
    with pytest.raises(ConfigError, match=r"\['n_embd', 'n_head', 'n_layer'\] are not "
                                          r"BertConfig fields; data=fever builds a BERT"):
        prepare(cfg, progress=False)
