"""Specifications of mend_jax.data: loaders, validation errors, batching and the geonames bench."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from tokenizers import processors
from transformers import PreTrainedTokenizerFast

from mend_jax.data import (
    IGNORE,
    DataError,
    EditRequest,
    batch_iterator,
    load_counterfact,
    load_requests,
    load_wikitext,
    load_zsre_easyedit,
    load_zsre_mend,
    make_edit_batch,
    sniff_format,
    tokenize_pairs,
)
from mend_jax.offline import (
    RELATIONS,
    benchmark_texts,
    build_geonames_benchmark,
    build_word_tokenizer,
    load_facts,
    normalize_words,
    write_benchmark,
)

FIXTURES = Path(__file__).parent / "fixtures" / "data"


# ---------------------------------------------------------------- loaders on real formats


def test_zsre_mend_loader():
    reqs = load_zsre_mend(FIXTURES / "zsre_mend.jsonl")
    # q2 has only the prediction itself as alternative: skipped, as in the reference.
    assert [r.prompt for r in reqs] == [
        "What country is Dresden located in?",
        "What is the native language of Claude Monet?",
        "Which river does Vienna lie on?",
    ]
    dresden, monet, vienna = reqs
    assert dresden.target_new == "Austria" and dresden.target_true == "Germany"
    assert dresden.rephrases == ("In which country is Dresden?", "Dresden is in which country?")
    assert monet.target_new == "Italian" and monet.rephrases == ()
    assert vienna.target_true is None
    # Locality without loc_path: another record's question with its base prediction.
    for r in reqs:
        assert r.loc_prompt != r.prompt
        other = next(o for o in reqs if o.prompt == r.loc_prompt)
        assert (
            r.loc_target
            == {"Dresden": "Germany", "Claude": "French", "Vienna": "Danube"}[
                next(w for w in ("Dresden", "Claude", "Vienna") if w in other.prompt)
            ]
        )


def test_zsre_mend_loc_path():
    reqs = load_zsre_mend(FIXTURES / "zsre_mend.jsonl", loc_path=FIXTURES / "nq.jsonl")
    assert [(r.loc_prompt, r.loc_target) for r in reqs] == [
        ("who wrote the song yesterday", "Paul McCartney"),
        ("when did the titanic sink", "1912"),
        ("who wrote the song yesterday", "Paul McCartney"),
    ]


def test_zsre_easyedit_loader():
    a, b = load_zsre_easyedit(FIXTURES / "zsre_easyedit.json")
    assert a == EditRequest(
        prompt="What university did Watts Humphrey attend?",
        target_new="University of Michigan",
        target_true="Illinois Institute of Technology",
        rephrases=("What university did Watts Humphrey take part in?",),
        loc_prompt="who played desmond doss father in hacksaw ridge",
        loc_target="Hugo Weaving",
        portability=(("In which state is the university Watts Humphrey attended?", "Michigan"),),
        subject="Watts Humphrey",
    )
    assert b.rephrases == ("What family are Ramalinaceae?", "Ramalinaceae is part of which family?")
    assert b.portability == (("Ramalinaceae order?", "Lecanorales"),)


def test_counterfact_loader():
    a, b = load_counterfact(FIXTURES / "counterfact.json")
    assert a.prompt == "The mother tongue of Danielle Darrieux is"
    assert (a.target_new, a.target_true, a.subject) == ("English", "French", "Danielle Darrieux")
    assert len(a.rephrases) == 2
    assert a.neighborhood == (
        ("The mother tongue of L\u00e9on Blum is", "French"),
        ("The native language of Montesquieu is", "French"),
    )
    assert (a.loc_prompt, a.loc_target) == a.neighborhood[0]
    assert b.prompt == "Daniel Sedin plays in the position of"
    assert (b.loc_prompt, b.loc_target) == ("where is the eiffel tower", "Paris")
    assert b.neighborhood == ()


def test_load_requests_dispatch():
    for name, fmt in [
        ("zsre_mend.jsonl", "zsre_mend"),
        ("zsre_easyedit.json", "zsre"),
        ("counterfact.json", "counterfact"),
    ]:
        assert sniff_format(FIXTURES / name) == fmt
        assert load_requests(FIXTURES / name) == load_requests(FIXTURES / name, fmt=fmt)
    with pytest.raises(DataError, match="unknown format"):
        load_requests(FIXTURES / "counterfact.json", fmt="squad")


def test_wikitext_loader():
    tok = build_word_tokenizer([(FIXTURES / "wikitext.txt").read_text()])
    calls = []

    def generate_fn(prompts: list[list[int]]) -> list[list[int]]:
        calls.append(len(prompts))
        return [p[:3] * 5 for p in prompts]  # a "model" that repeats its first 3 tokens

    reqs = load_wikitext(
        FIXTURES / "wikitext.txt", generate_fn, tok, prefix_tokens=8, target_tokens=4, seed=0
    )
    assert len(reqs) == 3 and calls == [3]  # heading dropped, blank-line separated passages
    for r in reqs:
        assert len(tok(r.prompt)["input_ids"]) == 8
        first3 = tok(r.prompt)["input_ids"][:3]
        assert tok(r.target_new)["input_ids"] == (first3 * 2)[:4]
        assert len(tok(r.target_true)["input_ids"]) == 4
        assert r.loc_prompt != r.prompt and r.rephrases == ()
    assert load_wikitext(
        FIXTURES / "wikitext.txt", generate_fn, tok, prefix_tokens=8, target_tokens=4, n=2
    ) == load_wikitext(
        FIXTURES / "wikitext.txt", generate_fn, tok, prefix_tokens=8, target_tokens=4, n=2
    )


# ---------------------------------------------------------------- validation errors


def _write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def _mend_line(**override: object) -> str:
    rec = {
        "input": "Who is the father of Zeus?",
        "prediction": "Cronus",
        "alternatives": ["Uranus"],
        "filtered_rephrases": ["Who fathered Zeus?"],
        "output": [{"answer": "Cronus"}],
    }
    rec.update(override)
    return json.dumps({k: v for k, v in rec.items() if v is not None})


def test_error_malformed_jsonl_line(tmp_path):
    path = _write(tmp_path, "bad.jsonl", _mend_line() + "\n" + '{"input": "x",\n' + _mend_line())
    with pytest.raises(DataError) as e:
        load_zsre_mend(path)
    msg = str(e.value)
    assert str(path) in msg and "record 1 (0-based)" in msg and "line 2 (1-based)" in msg
    assert "malformed json" in msg


def test_error_malformed_json_file(tmp_path):
    path = _write(tmp_path, "bad.json", '[\n {"src": "a",\n  "alt": }\n]')
    with pytest.raises(DataError) as e:
        load_zsre_easyedit(path)
    assert str(path) in str(e.value) and "line 3 (1-based)" in str(e.value)


@pytest.mark.parametrize(
    "override, field",
    [({"input": None}, "'input'"), ({"alternatives": None}, "'alternatives'")],
)
def test_error_missing_field_mend(tmp_path, override, field):
    path = _write(tmp_path, "d.jsonl", "\n".join([_mend_line(), "", _mend_line(**override)]))
    with pytest.raises(DataError) as e:
        load_zsre_mend(path)
    msg = str(e.value)
    assert str(path) in msg and "record 1 (0-based), line 3 (1-based)" in msg
    assert field in msg and "missing" in msg


def test_error_empty_target_mend(tmp_path):
    path = _write(tmp_path, "d.jsonl", _mend_line() + "\n" + _mend_line(alternatives=["  "]))
    with pytest.raises(DataError) as e:
        load_zsre_mend(path)
    msg = str(e.value)
    assert str(path) in msg and "record 1" in msg and "line 2" in msg
    assert "'alternatives'" in msg and "empty" in msg


def _zsre_rec(**override: object) -> dict:
    rec = {"src": "Q?", "alt": "A", "answers": ["B"], "rephrase": "Q2?", "loc": "L", "loc_ans": "M"}
    rec.update(override)
    return {k: v for k, v in rec.items() if v is not None}


@pytest.mark.parametrize(
    "override, field, problem",
    [
        ({"alt": None}, "'alt'", "missing"),
        ({"alt": "  "}, "'alt'", "empty"),
        ({"loc_ans": None}, "'loc_ans'", "missing"),
        ({"src": 3}, "'src'", "expected a string"),
    ],
)
def test_errors_zsre_easyedit(tmp_path, override, field, problem):
    path = tmp_path / "z.json"
    path.write_text(json.dumps([_zsre_rec(), _zsre_rec(), _zsre_rec(**override)]))
    with pytest.raises(DataError) as e:
        load_zsre_easyedit(path)
    msg = str(e.value)
    assert str(path) in msg and "record 2 (0-based)" in msg and field in msg and problem in msg


def _cf_rec(**rewrite: object) -> dict:
    rw = {
        "prompt": "{} is a citizen of",
        "subject": "X",
        "target_new": {"str": "France"},
        "target_true": {"str": "Spain"},
    }
    rw.update(rewrite)
    rw = {k: v for k, v in rw.items() if v is not None}
    return {"requested_rewrite": rw, "paraphrase_prompts": ["p"], "neighborhood_prompts": ["n"]}


@pytest.mark.parametrize(
    "rewrite, field, problem",
    [
        ({"target_new": {"id": "Q1"}}, "'requested_rewrite.target_new.str'", "missing"),
        ({"target_new": {"str": ""}}, "'requested_rewrite.target_new.str'", "empty"),
        ({"subject": None}, "'requested_rewrite.subject'", "missing"),
        ({"prompt": "no placeholder"}, "'requested_rewrite.prompt'", "placeholder"),
    ],
)
def test_errors_counterfact(tmp_path, rewrite, field, problem):
    path = tmp_path / "cf.json"
    path.write_text(json.dumps([_cf_rec(), _cf_rec(**rewrite)]))
    with pytest.raises(DataError) as e:
        load_counterfact(path)
    msg = str(e.value)
    assert str(path) in msg and "record 1 (0-based)" in msg and field in msg and problem in msg


def _table(rows: list[dict]):
    """A `datasets.Dataset` with every field of any row (from_list takes the first row's keys)."""
    import datasets

    keys = list(dict.fromkeys(k for r in rows for k in r))
    return datasets.Dataset.from_list([{k: r.get(k) for k in keys} for r in rows])


def test_datasets_parquet_arrow_and_in_memory(tmp_path):
    """Columnar files and `datasets.Dataset` objects go through the same loaders."""

    for name in ("zsre_easyedit.json", "counterfact.json", "zsre_mend.jsonl"):
        expected = load_requests(FIXTURES / name)
        if name.endswith(".jsonl"):
            rows = [json.loads(x) for x in (FIXTURES / name).read_text().splitlines() if x.strip()]
        else:
            rows = json.loads((FIXTURES / name).read_text())
        if name == "zsre_easyedit.json":  # arrow needs one type per column: a string -> [string]
            rows = [dict(r, rephrase=[r["rephrase"]] if isinstance(r["rephrase"], str)
                         else r["rephrase"]) for r in rows]
        table = _table(rows)
        assert load_requests(table) == expected, name
        parquet = tmp_path / (Path(name).stem + ".parquet")
        table.to_parquet(str(parquet))
        assert load_requests(parquet) == expected, name
        arrow = tmp_path / (Path(name).stem + ".arrow")  # the arrow stream format of datasets
        with pa.OSFile(str(arrow), "wb") as sink, pa.ipc.new_stream(sink,
                                                                     table.data.schema) as w:
            w.write_table(table.data.table)
        assert load_requests(arrow) == expected, name
    # rows that lack a field another row has (filled with null by the table) still read alike
    rows = [_zsre_rec(), {k: v for k, v in _zsre_rec().items() if k != "rephrase"}]
    table = _table(rows)
    assert load_requests(table) == load_requests(_write(tmp_path, "z.json", json.dumps(rows)))


def test_errors_parquet_name_the_file_record_and_field(tmp_path):
    path = tmp_path / "z.parquet"
    _table([_zsre_rec(), _zsre_rec(alt="  ")]).to_parquet(str(path))
    with pytest.raises(DataError) as e:
        load_requests(path)
    msg = str(e.value)
    assert str(path) in msg and "record 1 (0-based)" in msg and "'alt'" in msg and "empty" in msg
    bad = _write(tmp_path, "bad.parquet", "not parquet")
    with pytest.raises(DataError, match="bad.parquet: cannot read as parquet"):
        load_requests(bad)
    in_memory = _table([_zsre_rec(), _zsre_rec(loc="")])
    with pytest.raises(DataError, match=r"datasets.Dataset .*record 1 \(0-based\).*'loc'"):
        load_requests(in_memory)


def test_error_missing_file(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        load_counterfact(tmp_path / "nope.json")


# ---------------------------------------------------------------- tokenisation and batching

TEXTS = ["The capital of France is Paris", "What is the capital of Cote d'Ivoire? It is", "Lyon"]


def _tok(post_processor: str | None = None):
    tok = build_word_tokenizer(TEXTS + ["a b c d e f g h i j k l"])
    if post_processor == "eos":  # T5-like: the encoder input ends with eos
        tok._tokenizer.post_processor = processors.TemplateProcessing(
            single="$A <eos>", special_tokens=[("<eos>", tok.eos_token_id)]
        )
    elif post_processor == "bos":  # Llama-like: a leading bos
        tok._tokenizer.post_processor = processors.TemplateProcessing(
            single="<bos> $A", special_tokens=[("<bos>", tok.bos_token_id)]
        )
    return tok


def test_word_tokenizer_roundtrip_and_specials(tmp_path):
    tok = build_word_tokenizer(TEXTS, out_dir=tmp_path / "tok")
    assert [tok.pad_token_id, tok.eos_token_id, tok.unk_token_id, tok.bos_token_id] == [0, 1, 2, 3]
    for s in TEXTS:
        assert tok.decode(tok(s)["input_ids"]) == normalize_words(s)
    assert tok("Mars")["input_ids"] == [tok.unk_token_id]
    again = PreTrainedTokenizerFast.from_pretrained(tmp_path / "tok")
    assert again(TEXTS[1])["input_ids"] == tok(TEXTS[1])["input_ids"]


def test_tokenize_pairs_decoder_only_masks_exactly_the_target():
    tok = _tok()
    prompts, targets = ["The capital of France is", "What is the capital of"], ["Paris", "Cote d"]
    b = tokenize_pairs(tok, prompts, targets, seq2seq=False, max_length=12)
    assert {k: v.shape for k, v in b.items()} == {
        "input_ids": (2, 12),
        "attention_mask": (2, 12),
        "labels": (2, 12),
        "truncated": (2,),
    }
    assert b["input_ids"].dtype == np.int32 and b["labels"].dtype == np.int32
    for i, (p, t) in enumerate(zip(prompts, targets, strict=True)):
        p_ids, t_ids = tok(p)["input_ids"], tok(" " + t)["input_ids"]
        n = len(p_ids) + len(t_ids)
        assert b["input_ids"][i, :n].tolist() == p_ids + t_ids
        assert (b["input_ids"][i, n:] == tok.pad_token_id).all()
        assert b["attention_mask"][i].tolist() == [1] * n + [0] * (12 - n)
        counted = np.flatnonzero(b["labels"][i] != IGNORE).tolist()
        assert counted == list(range(len(p_ids), n))
        assert b["labels"][i, counted].tolist() == t_ids == b["input_ids"][i, counted].tolist()
    assert not b["truncated"].any()


def test_tokenize_pairs_decoder_only_truncates_prompt_from_left():
    tok = _tok("bos")
    prompt, target = "a b c d e f g h", "i j k"
    b = tokenize_pairs(tok, [prompt, "a"], [target, "b"], seq2seq=False, max_length=6)
    assert b["truncated"].tolist() == [True, False]
    ids = b["input_ids"][0].tolist()
    vocab = tok.get_vocab()
    # The leading bos is kept, then the prompt's tail, then the whole target.
    assert ids == [tok.bos_token_id, vocab["g"], vocab["h"], vocab["i"], vocab["j"], vocab["k"]]
    assert b["labels"][0].tolist() == [IGNORE] * 3 + ids[3:]
    b = tokenize_pairs(tok, ["a"], ["b"], seq2seq=False, max_length=6, append_eos=True)
    assert b["labels"][0].tolist()[:4] == [IGNORE, IGNORE, vocab["b"], tok.eos_token_id]


def test_tokenize_pairs_seq2seq():
    tok = _tok("eos")
    prompts, targets = ["a b c d e f g h", "The capital of France is"], ["i j k l", "Paris"]
    b = tokenize_pairs(tok, prompts, targets, seq2seq=True, max_length=5, max_target_length=4)
    assert b["input_ids"].shape == (2, 5) and b["labels"].shape == (2, 4)
    assert b["decoder_input_ids"].shape == b["decoder_attention_mask"].shape == (2, 4)
    vocab, eos, pad = tok.get_vocab(), tok.eos_token_id, tok.pad_token_id
    # Left truncation keeps the encoder's trailing eos; the target loses its tail.
    assert b["input_ids"][0].tolist() == [vocab[w] for w in ["e", "f", "g", "h"]] + [eos]
    assert b["labels"][0].tolist() == [vocab[w] for w in ["i", "j", "k", "l"]]
    assert b["truncated"].tolist() == [True, True]  # second: 6 encoder tokens > 5
    assert b["labels"][1].tolist() == [vocab["Paris"], eos, IGNORE, IGNORE]
    assert b["decoder_input_ids"][1].tolist() == [pad, vocab["Paris"], pad, pad]
    assert b["decoder_attention_mask"][1].tolist() == [1, 1, 0, 0]
    assert b["input_ids"][1].tolist()[-1] == eos
    short = tokenize_pairs(tok, ["France"], ["Paris"], seq2seq=True, max_length=5)
    assert short["input_ids"][0].tolist() == [vocab["France"], eos, pad, pad, pad]
    assert short["labels"].shape == (1, 5)


def test_tokenize_pairs_rejects_empty_target():
    with pytest.raises(ValueError, match="tokenises to nothing"):
        tokenize_pairs(_tok(), ["a"], [" "], seq2seq=False, max_length=4)


# ---------------------------------------------------------------- geonames benchmark


@pytest.fixture(scope="module")
def bench():
    return build_geonames_benchmark(seed=0)


def _keys(reqs: list[EditRequest]) -> set[tuple[str, str]]:
    # (subject, relation): the relation is identified by the prompt's training template.
    out = set()
    for r in reqs:
        rel = next(
            name
            for name, rel in RELATIONS.items()
            if any(t.replace("{}", r.subject) == r.prompt for t in rel.train_templates)
        )
        out.add((r.subject, rel))
    return out


def _bench_digest_in_subprocess(hash_seed: str) -> str:
    import os
    import subprocess
    import sys
    from pathlib import Path

    code = ("import hashlib; from mend_jax.offline import build_geonames_benchmark as b; "
            "print(hashlib.sha256(repr(b(seed=0)).encode()).hexdigest())")
    root = Path(__file__).resolve().parent.parent
    env = dict(os.environ, PYTHONHASHSEED=hash_seed, PYTHONPATH=str(root))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True)
    return out.stdout.split()[-1]


def test_geonames_deterministic_and_sized(bench):
    import hashlib

    # the same benchmark in fresh processes with other string hashes (set/dict order)
    digest = hashlib.sha256(repr(bench).encode()).hexdigest()
    assert _bench_digest_in_subprocess("1") == _bench_digest_in_subprocess("2") == digest
    other = build_geonames_benchmark(seed=1)
    assert other["test"] != bench["test"] and other["facts"] == bench["facts"]
    assert len(bench["val"]) == 100 and len(bench["test"]) == 200 and len(bench["train"]) > 800
    small = build_geonames_benchmark(seed=0, n_train=50, n_val=10, n_test=20)
    assert [len(small[s]) for s in ("train", "val", "test")] == [50, 10, 20]
    capped = build_geonames_benchmark(seed=0, n_train=50)
    assert capped["test"] == bench["test"] and capped["val"] == bench["val"]
    assert capped["train"] == bench["train"][:50]


def test_geonames_city_pool_is_configurable(bench, monkeypatch, tmp_path):
    import mend_jax.pipeline as pipeline
    from mend_jax.config import load_config

    big = build_geonames_benchmark(seed=0, n_cities=2000, max_cities_per_country=50,
                                   n_test=1000, n_val=100)
    # 1,600 more city -> country facts (the names that are unambiguous among all the cities
    # searched), the country facts as before
    from mend_jax.offline.geonames import FORMS

    per_fact = sum(len(RELATIONS["city_country"].templates(f)) for f in FORMS)
    assert len(big["facts"]) - len(bench["facts"]) == 1600 * per_fact
    assert len(big["test"]) == 1000
    assert len(big["train"]) + 1100 == len(bench["train"]) + 300 + 1600
    with pytest.raises(ValueError, match="only 1700 usable cities .* n_cities=9000"):
        build_geonames_benchmark(seed=0, n_cities=9000, max_cities_per_country=10)
    with pytest.raises(ValueError, match="data.n_cities must be a positive integer"):
        load_config(["data.n_cities=0"])
    # the config's keys reach the builder
    seen = {}

    def builder(**kwargs):
        seen.update(kwargs)
        raise RuntimeError("stop here")

    monkeypatch.setattr(pipeline, "build_geonames_benchmark", builder)
    cfg = load_config([f"out_dir={tmp_path}", "data.n_cities=1000",
                       "data.max_cities_per_country=20"])
    with pytest.raises(RuntimeError, match="stop here"):
        pipeline.prepare(cfg, progress=False)
    assert (seen["n_cities"], seen["max_cities_per_country"]) == (1000, 20)


def test_geonames_held_out_relations(bench, monkeypatch, tmp_path):
    """Requests name their relation (kept through the written files); data.train_relations
    keeps the train and val requests of those relations only, the test split whole, and the
    held-out relations are recorded for evaluation; a relation that does not exist is refused."""
    import mend_jax.pipeline as pipeline
    from mend_jax.config import load_config

    for split in ("train", "val", "test"):
        assert [r.relation for r in bench[split]] == bench["relations"][split]
    assert set(bench["relations"]["test"]) == set(RELATIONS)
    # the tokenizer and base model are built from the whole benchmark (not needed here)
    monkeypatch.setattr(pipeline, "_built_base_model", lambda *a, **k: (None, None))
    full = pipeline.prepare(load_config([f"out_dir={tmp_path / 'a'}"]), progress=False)
    kept = ["capital", "city_country"]
    cfg = load_config([f"out_dir={tmp_path / 'b'}", f"data.train_relations=[{','.join(kept)}]"])
    prep = pipeline.prepare(cfg, progress=False)
    for split in ("train", "val"):
        assert prep.splits[split] == [r for r in full.splits[split] if r.relation in kept]
        assert 0 < len(prep.splits[split]) < len(full.splits[split])
    assert prep.splits["test"] == full.splits["test"]
    assert prep.info["held_out_relations"] == sorted(set(RELATIONS) - set(kept))
    assert "held_out_relations" not in full.info
    with pytest.raises(ValueError, match=r"data.train_relations must be .* got \['capitol'\]"):
        load_config(["data.train_relations=[capitol]"])


def test_geonames_splits_disjoint(bench):
    keys = {s: _keys(bench[s]) for s in ("train", "val", "test")}
    assert [len(keys[s]) for s in keys] == [len(bench[s]) for s in keys]
    assert not keys["train"] & keys["val"] and not keys["train"] & keys["test"]
    assert not keys["val"] & keys["test"]


def _all_templates(heldout: bool | None = None) -> list[str]:
    """Every template of every relation and form (only training / held-out ones if asked)."""
    from mend_jax.offline.geonames import FORMS

    kinds = (False, True) if heldout is None else (heldout,)
    return [t for rel in RELATIONS.values() for f in FORMS for h in kinds
            for t in rel.templates(f, heldout=h)]


def _subject_of(prompt: str) -> str:
    """The subject filled into a training template (the longest match, for "X North")."""
    found = []
    for t in _all_templates(heldout=False):
        head, tail = t.split("{}")
        if prompt.startswith(head) and prompt.endswith(tail):
            found.append(prompt[len(head) : len(prompt) - len(tail)])
    return max(found, key=len)


def test_geonames_templates_and_targets(bench):
    facts = set(bench["facts"])
    fact_prompts = {p for p, _ in facts}
    heldout = _all_templates(heldout=True)

    def fills(templates, prompt: str, subject: str | None) -> bool:
        return subject is not None and any(t.replace("{}", subject) == prompt for t in templates)

    statements = [t for rel in RELATIONS.values() for t in rel.train_templates]
    questions = [t for rel in RELATIONS.values() for t in rel.questions + rel.heldout_questions]
    for rel in RELATIONS.values():
        for form in ("statement", "question"):
            train, held = rel.templates(form), rel.templates(form, heldout=True)
            assert train and held and not set(train) & set(held)
    for split in ("train", "val", "test"):
        for r in bench[split]:
            assert r.target_new != r.target_true and r.target_true is not None
            assert (r.prompt, r.target_true) in facts  # edit prompt: a training template
            assert fills(statements, r.prompt, r.subject)  # of the edit form (statements)
            assert len(r.rephrase_forms) == len(r.rephrases)
            for p, form in zip(r.rephrases, r.rephrase_forms, strict=True):
                if form == "statement":  # the edit form: held-out templates only
                    assert fills(heldout, p, r.subject) and p not in fact_prompts
                else:  # another form: only on the test split, any of its templates
                    assert split == "test" and form == "question"
                    assert fills(questions, p, r.subject)
            assert ("question" in r.rephrase_forms) == (split == "test")
            assert (r.loc_prompt, r.loc_target) in facts
            assert _subject_of(r.loc_prompt) not in (r.subject, r.target_new)
            for p, a in r.neighborhood:
                assert (p, a) in facts and a == r.target_true and _subject_of(p) != r.subject
            texts = [r.prompt, r.target_new, r.loc_prompt, *r.rephrases]
            assert all(t.isascii() for t in texts)
            assert 1 <= len(r.target_new.split()) <= 3
    # No held-out template leaks into the facts the base model is trained on; both forms do.
    assert not {p for p, _ in facts} & {t.replace("{}", r.subject) for r in bench["test"]
                                        for t in heldout}
    assert any(p.startswith("Q: ") for p in fact_prompts) and any(
        p.endswith("?") for p in fact_prompts)
    for p, a in bench["facts"]:
        assert p.isascii() and a.isascii() and 1 <= len(a.split()) <= 3
    assert sum(bool(r.neighborhood) for r in bench["test"]) > 100


def test_geonames_question_edit_form():
    """edit_forms=("question",): the editor's prompts are questions and the test rephrases add
    every statement template; a bad form is refused."""
    b = build_geonames_benchmark(seed=0, n_train=20, n_val=5, n_test=10,
                                 edit_forms=("question",))
    questions = {t for rel in RELATIONS.values() for t in rel.questions}
    for r in b["train"] + b["test"]:
        assert any(t.replace("{}", r.subject) == r.prompt for t in questions)
    assert all("statement" not in r.rephrase_forms for r in b["train"])
    assert all("statement" in r.rephrase_forms for r in b["test"])
    with pytest.raises(ValueError, match="edit_forms"):
        build_geonames_benchmark(seed=0, edit_forms=("cloze",))


def test_geonames_write_load_roundtrip(bench, tmp_path):
    small = {**bench, "train": bench["train"][:30], "val": bench["val"][:10]}
    paths = write_benchmark(small, tmp_path)
    assert load_facts(paths["facts"]) == bench["facts"]
    for split in ("train", "val", "test"):
        assert load_zsre_easyedit(paths[f"{split}.zsre"]) == small[split]
        assert load_counterfact(paths[f"{split}.counterfact"]) == small[split]
    assert load_requests(tmp_path, split="val") == small["val"]
    assert load_requests(tmp_path / "test.zsre.json") == bench["test"]


def test_geonames_word_tokenizer(bench):
    tok = build_word_tokenizer(benchmark_texts(bench))
    assert len(tok) < 3000
    for r in bench["test"][:50]:
        for s in (r.prompt, *r.rephrases, r.target_new):
            ids = tok(s)["input_ids"]
            assert tok.unk_token_id not in ids and tok.decode(ids) == normalize_words(s)


def test_bpe_tokenizer_encodes_every_string(bench):
    """The default's byte-level BPE: no unknown token exists, and any string in any script
    (and random code points) decodes back exactly; the vocabulary depends only on the texts."""
    from mend_jax.offline import build_bpe_tokenizer, build_tokenizer

    texts = benchmark_texts(bench)
    tok = build_bpe_tokenizer(texts, vocab_size=1024)
    assert tok.unk_token_id is None and len(tok) == 1024
    rng = np.random.default_rng(0)
    samples = ["Lyon", " São Paulo", "東京", "Кыргызстан", "القاهرة", "Zyzzyva 42!", "\t a\nb ",
               "".join(chr(c) for c in rng.integers(32, 0x2FFFF, 60) if not 0xD800 <= c < 0xE000)]
    for s in samples:
        ids = tok(s, add_special_tokens=False)["input_ids"]
        assert ids and tok.decode(ids) == s
    batch = tokenize_pairs(tok, ["The capital of France is"], ["Lyon"], seq2seq=False,
                           max_length=16)
    labels = batch["labels"][0]
    assert tok.decode(labels[labels != IGNORE].tolist()) == " Lyon"
    shuffled = list(reversed(texts))
    assert build_tokenizer("bpe", shuffled, vocab_size=1024).get_vocab() == tok.get_vocab()
    with pytest.raises(ValueError, match="at least"):
        build_bpe_tokenizer(texts, vocab_size=100)
    with pytest.raises(ValueError, match="bpe or 'word'|'bpe' or 'word'"):
        build_tokenizer("sentencepiece", texts)


def test_make_edit_batch_and_iterator(bench):
    tok = build_word_tokenizer(benchmark_texts(bench))
    reqs = bench["train"][:10]
    rng = np.random.default_rng(0)
    b = make_edit_batch(tok, reqs, seq2seq=False, max_length=24, rng=rng, n_edits=4)
    assert set(b) == {"edit_inner", "edit_outer", "loc", "neighborhood"}
    assert b["edit_inner"]["input_ids"].shape == (4, 24) and b["loc"]["input_ids"].shape == (10, 24)
    for i, r in enumerate(reqs[:4]):
        ids = b["edit_outer"]["input_ids"][i][b["edit_outer"]["attention_mask"][i] == 1]
        text = tok.decode(ids.tolist())
        assert text.startswith(tuple(normalize_words(p) for p in r.rephrases))
        labels = b["edit_outer"]["labels"][i]
        assert tok.decode(labels[labels != IGNORE].tolist()) == normalize_words(r.target_new)
    s2s = make_edit_batch(tok, reqs, seq2seq=True, max_length=24, rng=rng, max_target_length=6)
    assert s2s["edit_inner"]["labels"].shape == (10, 6)

    it = batch_iterator(
        bench["val"], tok, batch_size=32, seq2seq=False, max_length=24, seed=3, epochs=2
    )
    batches = list(it)
    assert len(batches) == 6  # 100 // 32 = 3 per epoch, the last partial batch dropped
    assert all(x["edit_inner"]["input_ids"].shape == (32, 24) for x in batches)
    again = list(
        batch_iterator(
            bench["val"], tok, batch_size=32, seq2seq=False, max_length=24, seed=3, epochs=2
        )
    )
    assert all(
        (x[k]["input_ids"] == y[k]["input_ids"]).all()
        for x, y in zip(batches, again, strict=True)
        for k in x
    )
    first = next(
        iter(
            batch_iterator(
                bench["val"], tok, batch_size=8, seq2seq=False, max_length=24, seed=0, shuffle=False
            )
        )
    )
    assert (
        first["edit_inner"]["input_ids"].tolist()
        == make_edit_batch(
            tok, bench["val"][:8], seq2seq=False, max_length=24, rng=np.random.default_rng(0)
        )["edit_inner"]["input_ids"].tolist()
    )


def test_make_edit_batch_loc_neighbors(bench):
    """loc_neighbors: the edited requests' loc rows become one of their neighbourhood pairs."""
    tok = build_word_tokenizer(benchmark_texts(bench))
    reqs = [r for r in bench["train"] if r.neighborhood][:3] + \
        [r for r in bench["train"] if not r.neighborhood][:1] + bench["train"][20:26]
    k = 4
    plain = make_edit_batch(tok, reqs, seq2seq=False, max_length=24,
                            rng=np.random.default_rng(0), n_edits=k)
    hard = make_edit_batch(tok, reqs, seq2seq=False, max_length=24,
                           rng=np.random.default_rng(0), n_edits=k, loc_neighbors=True)

    def row(b, i):
        ids = b["loc"]["input_ids"][i][b["loc"]["attention_mask"][i] == 1]
        return tok.decode(ids.tolist())

    for i, r in enumerate(reqs):
        if i < 3:  # edited, with neighbours: a neighbour's prompt and the shared true object
            assert row(hard, i) in {normalize_words(f"{p} {t}") for p, t in r.neighborhood}
            assert r.neighborhood[0][1] == r.target_true
        else:  # edited without neighbours, or not edited: the plain loc pair
            own = normalize_words(f"{r.loc_prompt} {r.loc_target}")
            assert row(hard, i) == row(plain, i) == own
    for key in ("edit_inner", "edit_outer"):
        np.testing.assert_array_equal(plain[key]["input_ids"], hard[key]["input_ids"])


def test_make_edit_batch_loc_neighbors_fraction(bench):
    """A fraction in (0, 1) replaces some edited requests' loc rows by a neighbour, not all;
    0.0 replaces none and 1.0 is `True`."""
    tok = build_word_tokenizer(benchmark_texts(bench))
    reqs = [r for r in bench["train"] if r.neighborhood][:40]

    def n_replaced(frac):
        b = make_edit_batch(tok, reqs, seq2seq=False, max_length=24,
                            rng=np.random.default_rng(0), loc_neighbors=frac)
        plain = make_edit_batch(tok, reqs, seq2seq=False, max_length=24,
                                rng=np.random.default_rng(0))
        return int((b["loc"]["input_ids"] != plain["loc"]["input_ids"]).any(-1).sum()), b

    assert n_replaced(0.0)[0] == 0
    assert 8 <= n_replaced(0.5)[0] <= 32
    n_all, b_all = n_replaced(1.0)
    assert n_all >= 36  # a neighbour may equal the loc pair by chance, rarely
    np.testing.assert_array_equal(b_all["loc"]["input_ids"],
                                  n_replaced(True)[1]["loc"]["input_ids"])
    with pytest.raises(ValueError, match="fraction"):
        make_edit_batch(tok, reqs, seq2seq=False, max_length=24,
                        rng=np.random.default_rng(0), loc_neighbors=1.5)


def test_edit_request_is_frozen():
    r = EditRequest("p", "n", None, (), "l", "m")
    with pytest.raises(dataclasses.FrozenInstanceError):
        r.prompt = "x"  # type: ignore[misc]


def test_jsonl_content_in_a_json_file(tmp_path):
    path = _write(tmp_path, "mend.json", _mend_line() + "\n" + _mend_line(input="Who is Hera?"))
    assert sniff_format(path) == "zsre_mend"
    reqs = load_requests(path, loc_path=FIXTURES / "nq.jsonl")
    assert [r.prompt for r in reqs] == ["Who is the father of Zeus?", "Who is Hera?"]


def test_error_mend_locality_needs_an_answer(tmp_path):
    lines = [_mend_line(), _mend_line(input="Q2?", prediction="", output=[])]
    path = _write(tmp_path, "d.jsonl", "\n".join(lines))
    with pytest.raises(DataError) as e:
        load_zsre_mend(path)
    msg = str(e.value)
    assert str(path) in msg and "record 1" in msg and "'prediction'" in msg
    assert len(load_zsre_mend(path, loc_path=FIXTURES / "nq.jsonl")) == 2


def test_error_nq_loc_file(tmp_path):
    nq = _write(tmp_path, "nq.jsonl", '{"question": "q", "answer": "a"}\n{"question": "q2"}\n')
    with pytest.raises(DataError) as e:
        load_zsre_mend(FIXTURES / "zsre_mend.jsonl", loc_path=nq)
    msg = str(e.value)
    assert str(nq) in msg and "record 1" in msg and "line 2" in msg and "'answer'" in msg


def test_a_target_with_an_unknown_word_is_refused():
    from mend_jax.data import tokenize_pairs
    from mend_jax.errors import EditError
    from mend_jax.offline import build_word_tokenizer

    tok = build_word_tokenizer(["The capital of France is Paris"])
    ok = tokenize_pairs(tok, ["The capital of France is"], ["Paris"], seq2seq=False,
                        max_length=8)
    assert (ok["labels"] != -100).sum() == 1
    with pytest.raises(EditError, match="'Lyon'.*unknown token"):
        tokenize_pairs(tok, ["The capital of France is"], ["Lyon"], seq2seq=False, max_length=8)
