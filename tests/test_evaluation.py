"""Held-out evaluation: identity edits change nothing, FT memorises, groups, keys, table, plot."""

import jax
import pytest
import transformers

from mend_jax.data import EditRequest
from mend_jax.editors import MEND, FineTune, FTConfig, MENDConfig
from mend_jax.evaluation import (
    METRIC_KEYS,
    evaluate_editor,
    evaluate_methods,
    format_by_n_edits,
    format_table,
    plot_vs_n_edits,
)
from mend_jax.models import from_config
from mend_jax.offline import build_word_tokenizer

MAX_LENGTH = 12
FACTS = [  # (subject, true capital, new capital)
    ("France", "Paris", "Rome"),
    ("Italy", "Rome", "Madrid"),
    ("Spain", "Madrid", "Berlin"),
    ("Germany", "Berlin", "Vienna"),
    ("Austria", "Vienna", "Lisbon"),
    ("Portugal", "Lisbon", "Paris"),
    ("Peru", "Lima", "Quito"),
]


def make_requests(probes: bool = True) -> list[EditRequest]:
    out = []
    for i, (s, true, new) in enumerate(FACTS):
        ls, lo, _ = FACTS[(i + 1) % len(FACTS)]
        out.append(EditRequest(
            prompt=f"The capital of {s} is", target_new=new, target_true=true,
            rephrases=(f"{s} has its capital in", f"The seat of government of {s} is")[: 1 + i % 2],
            loc_prompt=f"The capital of {ls} is", loc_target=lo,
            neighborhood=((f"The capital city of {s} is", true),) if probes and i % 2 else (),
            portability=((f"The country whose capital is {new} is", s),) if probes and i < 3
            else (),
        ))
    return out


REQUESTS = make_requests()


@pytest.fixture(scope="module")
def setup():
    texts = [t for r in REQUESTS for t in (r.prompt, r.target_new, r.loc_prompt, r.loc_target,
                                           *r.rephrases, *sum(r.neighborhood + r.portability, ()))]
    tokenizer = build_word_tokenizer(texts)
    cfg = transformers.GPT2Config(vocab_size=len(tokenizer), n_positions=MAX_LENGTH,
                                  n_embd=32, n_layer=1, n_head=2, bos_token_id=3, eos_token_id=1)
    return from_config(cfg, seed=0), tokenizer


@pytest.fixture(scope="module")
def identity_results(setup):
    model, tokenizer = setup
    ft = FineTune(model, config=FTConfig(steps=0))
    return evaluate_methods(model, {"ft_steps0": (ft, ft.init())}, model.params, REQUESTS,
                            tokenizer, max_length=MAX_LENGTH, perplexity=True, timed_edits=1)


def assert_identity(m):
    assert m["drawdown"] == 0.0
    assert m["loc_acc_pre"] == m["loc_acc_post"]
    assert abs(m["locality_kl"]) < 1e-6
    assert m["locality"] == 1.0
    assert m["edit_success"] == m["pre_edit_success"] == m["reliability"]


def test_identity_edit_changes_nothing(identity_results):
    m = identity_results["ft_steps0"]
    assert_identity(m)
    assert abs(m["ppl_drawdown"]) < 1e-6
    assert m["n_examples"] == len(REQUESTS) and m["n_edits"] == 1
    assert set(m) == set(METRIC_KEYS) | {"ppl_drawdown"}
    assert m["neighborhood_acc"] is not None and m["portability"] is not None
    assert m["neighborhood_acc_pre"] == m["neighborhood_acc"]  # identity edit: unchanged
    assert m["generality"] == m["generalization"] is not None
    assert m["edit_time_s"] > 0


def test_fine_tuning_reaches_full_edit_success(setup):
    model, tokenizer = setup
    ft = FineTune(model, config=FTConfig(steps=40, lr=3e-2))
    plain = make_requests(probes=False)[:4]
    m = evaluate_editor(model, ft, ft.init(), model.params, plain, tokenizer,
                        max_length=MAX_LENGTH, timed_edits=0)
    assert m["edit_success"] == 1.0
    assert m["pre_edit_success"] < 1.0
    assert 0.0 <= m["generality"] <= 1.0 and 0.0 <= m["locality"] <= 1.0
    assert set(m) == set(METRIC_KEYS)  # exactly: no ppl_drawdown without perplexity=True
    assert m["neighborhood_acc"] is None and m["portability"] is None
    assert m["neighborhood_acc_pre"] is None
    assert m["edit_time_s"] is None


class RecordingEditor:
    """The identity MEND editor, recording the edit batch shapes it is traced with."""

    def __init__(self, model):
        self.inner = MEND(model, config=MENDConfig(rank=8, edit_lr=0.0))
        self.model = model
        self.shapes = []

    def edit(self, state, params, batch):
        self.shapes.append(batch["input_ids"].shape)
        return self.inner.edit(state, params, batch)


def test_batched_edits_use_whole_groups(setup, identity_results, tmp_path):
    model, tokenizer = setup
    editor = RecordingEditor(model)
    state = editor.inner.init(jax.random.key(0))
    m = evaluate_editor(model, editor, state, model.params, REQUESTS, tokenizer, n_edits=3,
                        max_length=MAX_LENGTH, batch_size=4, timed_edits=0)
    assert m["n_edits"] == 3 and m["n_examples"] == 6  # floor(7 / 3) groups of 3
    assert editor.shapes == [(3, MAX_LENGTH)]  # traced once: one edit call per group of 3
    assert_identity(m)

    results = {**identity_results, "mend_lr0": m}
    table = format_table(results)
    lines = table.splitlines()
    assert len(lines) == 2 + len(results)
    assert "ES" in lines[0] and "drawdown" in lines[0] and "mend_lr0" in table
    results_by_n = {1: identity_results, 3: results}
    assert len({len(line) for line in lines}) == 1  # fixed width
    by_n = format_by_n_edits(results_by_n).splitlines()
    assert len(by_n) == 2 + len(identity_results) + len(results)
    assert by_n[2].startswith("k=1 ") and by_n[-1].startswith("k=3    mend_lr0")
    assert "neighbours" in by_n[0]
    path = plot_vs_n_edits(results_by_n, tmp_path / "plots" / "vs_n.png")
    assert path.is_file() and path.stat().st_size > 0
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_too_few_requests_is_an_error(setup):
    model, tokenizer = setup
    ft = FineTune(model, config=FTConfig(steps=0))
    with pytest.raises(ValueError, match="n_edits=8"):
        evaluate_editor(model, ft, ft.init(), model.params, REQUESTS, tokenizer, n_edits=8,
                        max_length=MAX_LENGTH)


def _row_stats(model, tokenizer, pairs):
    """(mean token NLL, whole-target correct) of each (prompt, target) under the base model."""
    import numpy as np

    from mend_jax.data import tokenize_pairs
    from mend_jax.metrics import sequence_correct, token_log_probs

    b = tokenize_pairs(tokenizer, [p for p, _ in pairs], [t for _, t in pairs], seq2seq=False,
                       max_length=MAX_LENGTH)
    logits = model.logits(model.params, b["input_ids"], b["attention_mask"])
    logp, mask = token_log_probs(logits, b["labels"], True)
    nll = -(np.asarray(logp) * np.asarray(mask)).sum(-1) / np.asarray(mask).sum(-1)
    return nll, np.asarray(sequence_correct(logits, b["labels"], True))


def test_counterfact_scores_and_generality_by_form(setup):
    """With an edit that changes nothing, efficacy / paraphrase / neighbourhood scores and the
    per-form generality equal the base model's own comparisons, request by request; requests
    without target_true do not count in the scores."""
    import dataclasses

    import numpy as np

    model, tokenizer = setup
    forms = ("statement", "question")
    reqs = []
    for i, r in enumerate(REQUESTS):
        r = dataclasses.replace(r, rephrase_forms=tuple(forms[(i + j) % 2]
                                                        for j in range(len(r.rephrases))))
        reqs.append(dataclasses.replace(r, target_true=None) if i == 2 else r)
    ft = FineTune(model, config=FTConfig(steps=0))
    m = evaluate_editor(model, ft, ft.init(), model.params, reqs, tokenizer,
                        max_length=MAX_LENGTH, seed=None, timed_edits=0)

    def fraction(rows):  # rows: per request, a list of booleans (empty: not counted)
        return float(np.mean([np.mean(x) for x in rows if x]))

    eff, par, nbh, by_form = [], [], [], {f: [] for f in forms}
    for r in reqs:
        outer = r.rephrases or (r.prompt,)
        nll_new, ok_new = _row_stats(model, tokenizer, [(p, r.target_new)
                                                        for p in (r.prompt, *outer)])
        if r.target_true:
            nll_true, _ = _row_stats(model, tokenizer, [(p, r.target_true)
                                                        for p in (r.prompt, *outer)])
            eff.append([nll_new[0] < nll_true[0]])
            par.append(list(nll_new[1:] < nll_true[1:]))
        if r.neighborhood:
            a, _ = _row_stats(model, tokenizer, list(r.neighborhood))
            b, _ = _row_stats(model, tokenizer, [(p, r.target_new) for p, _ in r.neighborhood])
            nbh.append(list(a < b))
        for f in forms:
            by_form[f].append([bool(c) for c, g in zip(ok_new[1:], r.rephrase_forms) if g == f])
    assert m["efficacy_score"] == pytest.approx(fraction(eff))
    assert m["paraphrase_score"] == pytest.approx(fraction(par))
    assert m["neighborhood_score"] == pytest.approx(fraction(nbh))
    for f in forms:
        assert m[f"generality_{f}"] == pytest.approx(fraction(by_form[f]))
    assert 0 < m["paraphrase_score"] < 1  # a random model: a real mix, not a constant


def test_metrics_by_relation_are_those_of_each_relation_alone(setup):
    """by_relation: with one edit per call, a relation's row is what evaluating its requests
    alone gives; with `held_out_relations` the seen / held-out rows are the same on their
    requests; groups of k mix relations and the rows still count each request once."""
    import dataclasses

    model, tokenizer = setup
    rels = ["capital", "seat", "capital", "border", "seat", "capital", "border"]
    reqs = [dataclasses.replace(r, relation=rel) for r, rel in zip(REQUESTS, rels, strict=True)]
    ft = FineTune(model, config=FTConfig(steps=1, lr=0.01))
    kw = dict(max_length=MAX_LENGTH, seed=None, timed_edits=0)
    m = evaluate_editor(model, ft, ft.init(), model.params, reqs, tokenizer,
                        held_out_relations=["border", "seat"], **kw)
    assert sorted(m["by_relation"]) == ["border", "capital", "seat"]
    keys = ("edit_success", "generality", "drawdown", "locality_kl", "neighborhood_acc",
            "neighborhood_acc_pre")
    subsets = {rel: [r for r in reqs if r.relation == rel] for rel in set(rels)}
    subsets["held_out_relations"] = [r for r in reqs if r.relation != "capital"]
    subsets["seen_relations"] = subsets["capital"]
    for name, subset in subsets.items():
        alone = evaluate_editor(model, ft, ft.init(), model.params, subset, tokenizer, **kw)
        got = m[name] if name.endswith("_relations") else m["by_relation"][name]
        assert got["n_examples"] == len(subset)
        for key in keys:
            assert got[key] == pytest.approx(alone[key]), (name, key)
    # a real mix: the relations' rows differ
    assert len({v["generality"] for v in m["by_relation"].values()}) == 3
    # k = 2: each request counted once; ES per relation weighs back to the whole
    m2 = evaluate_editor(model, ft, ft.init(), model.params, reqs[:6], tokenizer, n_edits=2, **kw)
    rows = m2["by_relation"]
    assert sum(v["n_examples"] for v in rows.values()) == 6
    assert sum(v["edit_success"] * v["n_examples"] for v in rows.values()) / 6 == pytest.approx(
        m2["edit_success"])
    assert "seen_relations" not in m2
    # no relation named: no breakdown
    assert "by_relation" not in evaluate_editor(model, ft, ft.init(), model.params, REQUESTS,
                                                tokenizer, **kw)


def test_progress_is_a_bar_over_the_groups_on_stderr(setup, capsys):
    model, tokenizer = setup
    ft = FineTune(model, config=FTConfig(steps=0))
    for progress in (False, True):
        evaluate_editor(model, ft, ft.init(), model.params, REQUESTS[:6], tokenizer, n_edits=2,
                        max_length=MAX_LENGTH, timed_edits=0, progress=progress)
        err = capsys.readouterr().err
        assert ("evaluate (groups of 2)" in err and "3/3" in err) == progress, err
