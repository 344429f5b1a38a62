"""The whole job, as library functions the CLIs call: prepare, meta-train, evaluate.

`prepare(cfg)` gives the base model, its tokenizer and the edit splits; `train(cfg)` meta-trains
the editor `alg.method` names (MEND, KE or ENN), evaluates it against the baselines and writes
the best editor as an artifact (`editor/`, with the base model it was built on in `base_model/`
when the run built it); `load_run(run_dir)` reloads a trained run.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field, is_dataclass
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from mend_jax.artifacts import save_editor
from mend_jax.checkpoint import load_best_editor
from mend_jax.config import read_mapping, validate_config
from mend_jax.data import EditRequest, load_requests
from mend_jax.data.batching import tokenize_pairs
from mend_jax.editors import make_editor
from mend_jax.errors import ConfigError
from mend_jax.evaluation import (
    MODEL_KEYS,
    evaluate_editor,
    evaluate_sequential,
    format_by_relation,
    format_table,
)
from mend_jax.loop import train_editor
from mend_jax.models import Model, load_pretrained, save_pretrained
from mend_jax.offline import (
    benchmark_texts,
    build_claims_benchmark,
    build_geonames_benchmark,
    build_tokenizer,
    claims_texts,
    write_benchmark,
    write_claims_benchmark,
)
from mend_jax.runs import run_lock, write_or_check_config
from mend_jax.schema import DTYPES as DTYPE_NAMES
from mend_jax.schema import METHODS, TRAINED, RunConfig
from mend_jax.training import MetaTrainer

log = logging.getLogger(__name__)

DTYPES = {name: getattr(jnp, name) for name in DTYPE_NAMES}


@dataclass
class Prepared:
    model: Model
    tokenizer: Any
    splits: dict[str, list[EditRequest]]
    info: dict
    # answer-key second moments of preserved facts measured on this base model, by (facts,
    # sequence length, edited weights), on the host: training and evaluation in one process
    # measure them once
    preserved: dict = field(default_factory=dict, repr=False, compare=False)


def as_config(cfg: RunConfig | dict) -> RunConfig:
    """The typed config (a plain mapping is checked against the schema)."""
    return cfg if isinstance(cfg, RunConfig) else validate_config(cfg)


def prepare(cfg: RunConfig | dict, progress: bool | None = None) -> Prepared:
    """Base model + tokenizer + train/val/test requests, as the config says."""
    cfg = as_config(cfg)
    progress = cfg.progress if progress is None else progress
    mcfg, dcfg = cfg.model, cfg.data
    info: dict = {}
    bench = claims = None
    if dcfg.format == "geonames":
        bench = build_geonames_benchmark(seed=cfg.seed, n_val=dcfg.n_val, n_test=dcfg.n_test,
                                         n_train=dcfg.n_train, edit_forms=dcfg.edit_forms,
                                         n_cities=dcfg.n_cities,
                                         max_cities_per_country=dcfg.max_cities_per_country)
        paths = write_benchmark(bench, Path(cfg.out_dir) / "data")
        # Read the splits back through the real zsRE loader: the default exercises the same path
        # a user's data file takes.
        splits = {s: load_requests(paths[f"{s}.zsre"], "zsre") for s in ("train", "val", "test")}
        info["data_files"] = {k: str(v) for k, v in paths.items()}
    elif dcfg.format == "fever" and dcfg.train_path is None:
        # The offline FEVER-style benchmark, read back through the FEVER loader.
        claims = build_claims_benchmark(seed=cfg.seed, n_val=dcfg.n_val, n_test=dcfg.n_test,
                                        n_train=dcfg.n_train)
        paths = write_claims_benchmark(claims, Path(cfg.out_dir) / "data")
        splits = {s: load_requests(paths[f"{s}.fever"], "fever")
                  for s in ("train", "val", "test")}
        info["data_files"] = {k: str(v) for k, v in paths.items()}
    else:
        splits = None  # wikitext targets come from the model, loaded below
        if dcfg.format != "wikitext":
            splits = {s: load_requests(getattr(dcfg, f"{s}_path"), dcfg.format,
                                       loc_path=dcfg.loc_path)
                      for s in ("train", "val", "test")}
    if mcfg.name is None:
        if claims is not None:
            model, tokenizer = _built_classifier(cfg, claims, info, progress)
        elif bench is not None:
            model, tokenizer = _built_base_model(cfg, bench, info, progress)
        else:
            raise ValueError("model.name is null (build a base model) but data is neither the "
                             "geonames benchmark nor the offline FEVER one: name a checkpoint "
                             "folder or hub name with model.name=...")
        if cfg.dtype != "float32":
            model = Model(model.arch, model.config, model.hf_config, model.module,
                          jax.tree.map(lambda x: x.astype(DTYPES[cfg.dtype]), model.params),
                          model.tokenizer, DTYPES[cfg.dtype])
    else:
        model = load_pretrained(mcfg.name, dtype=DTYPES[cfg.dtype])
        if model.targets == "token" and not model.seq2seq:
            raise ValueError(f"model.name={mcfg.name}: a {model.arch.name} masked LM; the "
                             "edit pipeline serves decoder-only and seq2seq language models and "
                             "sequence classifiers (with data.format=fever)")
        tokenizer = model.tokenizer
        if tokenizer is None:
            raise ValueError(f"{mcfg.name}: no tokenizer files next to the checkpoint")
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
    if splits is None:
        splits = _wikitext_splits(cfg, model, tokenizer)
    if dcfg.train_relations is not None:
        # After the tokenizer and the base model: they are built from the whole benchmark, so
        # they (and the cache) are the same with or without held-out relations.
        keep = set(dcfg.train_relations)
        for s in ("train", "val"):
            named = sorted({r.relation for r in splits[s] if r.relation})
            splits[s] = [r for r in splits[s] if r.relation in keep]
            if not splits[s]:
                raise ValueError(f"data.train_relations={list(dcfg.train_relations)} leaves no "
                                 f"{s} requests (their relations: {named or 'none named'})")
        info["held_out_relations"] = sorted({r.relation for r in splits["test"]
                                             if r.relation} - keep)
    if cfg.remat:
        model = model.with_remat(True)
    info.update({k: len(v) for k, v in splits.items()})
    return Prepared(model, tokenizer, splits, info)


def _built_base_model(cfg: RunConfig, bench: dict, info: dict,
                      progress: bool) -> tuple[Model, Any]:
    """The geonames default's GPT-2, taught the benchmark's facts (cached)."""
    from mend_jax.offline.pretrain import cached_base_model

    mcfg = cfg.model
    _check_build(mcfg, "GPT2Config",
                 "the geonames default builds a GPT-2 (model=geo_small or geo_tiny)")
    tokenizer = build_tokenizer(mcfg.tokenizer.kind, benchmark_texts(bench),
                                **mcfg.tokenizer.options())
    pre = dict(mcfg.pretrain.kwargs(), max_length=mcfg.max_length, seed=cfg.seed)
    model, acc = cached_base_model(cfg.cache_dir, bench["facts"], tokenizer, dict(mcfg.build),
                                   pre, progress=progress)
    info["base_fact_accuracy"] = acc
    return model, tokenizer


def _built_classifier(cfg: RunConfig, claims: dict, info: dict,
                      progress: bool) -> tuple[Model, Any]:
    """The offline FEVER benchmark's BERT claim classifier, trained on its claims (cached)."""
    from mend_jax.offline.pretrain_classifier import build_classifier_tokenizer, cached_classifier

    mcfg = cfg.model
    _check_build(mcfg, "BertConfig", "data=fever builds a BERT classifier (model=bert_tiny)")
    tokenizer = build_classifier_tokenizer(mcfg.tokenizer.kind, claims_texts(claims),
                                           **mcfg.tokenizer.options())
    pre = dict(mcfg.pretrain.kwargs(), max_length=mcfg.max_length, seed=cfg.seed)
    model, acc = cached_classifier(cfg.cache_dir, claims["claims"], tokenizer, dict(mcfg.build),
                                   pre, progress=progress)
    info["base_claim_accuracy"] = acc
    return model, tokenizer


def _check_build(mcfg, config_class: str, what: str) -> None:
    """model.build's keys must be fields of the transformers config it builds: the config
    classes accept unknown keywords silently, and a model of their default size would follow."""
    import transformers

    fields = getattr(transformers, config_class)().to_dict()
    unknown = sorted(k for k in mcfg.build if k not in fields)
    if unknown:
        raise ConfigError(f"model.build: {unknown} are not {config_class} fields; {what}")


def _wikitext_splits(cfg: RunConfig, model: Model, tokenizer) -> dict[str, list[EditRequest]]:
    """Passage prefixes with targets sampled (greedily) from the base model, as in the paper."""
    import numpy as np

    from mend_jax.data import load_wikitext
    from mend_jax.models import generate

    dcfg = cfg.data
    n_new = dcfg.target_tokens

    def generate_fn(prompts: list[list[int]]) -> list[list[int]]:
        width = max(len(p) for p in prompts)
        ids = np.full((len(prompts), width), tokenizer.pad_token_id, np.int32)
        mask = np.zeros_like(ids)
        for i, p in enumerate(prompts):
            ids[i, : len(p)], mask[i, : len(p)] = p, 1
        out = generate(model, model.params, ids, n_new, attention_mask=mask)
        return np.asarray(out).tolist()

    return {s: load_wikitext(getattr(dcfg, f"{s}_path"), generate_fn, tokenizer,
                             prefix_tokens=dcfg.prefix_tokens, target_tokens=n_new,
                             seed=cfg.seed, n=getattr(dcfg, f"n_{s}"))
            for s in ("train", "val", "test")}


def inner_params(cfg: RunConfig, model: Model) -> list[str]:
    return list(cfg.model.inner_params or model.default_inner_params())


def build_editor(cfg: RunConfig | dict, model: Model):
    """The editor `alg.method` names (MEND, KE or ENN), built from `alg.editor`."""
    cfg = as_config(cfg)
    return make_editor(cfg.alg.method, model, inner_params(cfg, model), config=cfg.alg.editor)


def training_mesh(cfg: RunConfig) -> jax.sharding.Mesh:
    """The ("data", "model") mesh `cfg.mesh` asks for, over this process's devices."""
    from mend_jax.sharding import make_mesh

    try:
        return make_mesh(cfg.mesh.data, cfg.mesh.model)
    except ValueError as e:
        raise ConfigError(f"mesh.data={cfg.mesh.data}, mesh.model={cfg.mesh.model}: {e}") from None


# The trained editor's options that change how an edit is computed, not what was learned: the
# loss whose gradient is captured (per_request: each of k requests' δ as if edited alone), the
# token chunking (memory only), how k requests combine: sum ↔ request_lstsq, with its λ and
# preserved facts (lstsq learns a λ of its own: `_check_eval_aggregate`), the preserved
# facts' weight in the key projection, and whether sequential edits keep earlier edits' keys
# (lifelong). eval.py --set may change them; results record them.
EDITOR_EVAL_OPTIONS = ("capture_loss", "chunk_tokens", "aggregate", "request_lambda",
                       "request_eps", "request_preserve", "preserve_weight", "lifelong",
                       "edit_scales")


def evaluation_state(cfg: RunConfig, prep: Prepared, editor, state: dict) -> dict:
    """The editor state as its evaluation-time options need it. With `request_preserve` N (and
    request_lstsq or `preserve_weight`): the answer-key second moments of N true facts of the
    training split (other subjects' facts first, then the edited subjects' own true answers),
    which the edits keep still; with `lifelong`, an empty record of earlier edits' keys if the
    run trained without one."""
    ecfg = editor.config
    if getattr(ecfg, "lifelong", False) and "edited_keys" not in state["stats"]:
        # a run trained without it: sequential editing starts with no earlier edit
        state = {**state, "stats": {**state["stats"], "edited_keys": editor.zero_moments()}}
    if not getattr(ecfg, "request_preserve", 0) and "preserved_keys" in state["stats"]:
        # a run trained with preserved facts, evaluated with request_preserve=0: none kept
        state = {**state, "stats": {k: v for k, v in state["stats"].items()
                                    if k != "preserved_keys"}}
    if not getattr(ecfg, "request_preserve", 0) or not (
            ecfg.aggregate == "request_lstsq" or ecfg.preserve_weight):
        return state
    key = (ecfg.request_preserve, cfg.model.max_length, tuple(editor.layout.inner_params),
           id(prep.model.params))
    if key in prep.preserved:   # fresh device arrays: a training step may donate the state's
        kept = jax.tree.map(jnp.asarray, prep.preserved[key])
        return {**state, "stats": {**state["stats"], "preserved_keys": kept}}
    train = prep.splits["train"]
    facts = ([(r.loc_prompt, r.loc_target) for r in train]
             + [(r.prompt, r.target_true) for r in train if r.target_true])
    facts = facts[: ecfg.request_preserve]
    if len(facts) < ecfg.request_preserve:
        log.warning("request_preserve=%d: the training split has %d facts; using them all",
                    ecfg.request_preserve, len(facts))
    batches = []
    for i in range(0, len(facts), 256):
        chunk = facts[i: i + 256]
        b = tokenize_pairs(prep.tokenizer, [p for p, _ in chunk], [t for _, t in chunk],
                           max_length=cfg.model.max_length, **prep.model.pair_format)
        batches.append({k: jnp.asarray(v) for k, v in b.items() if k in MODEL_KEYS})
    state = editor.preserve_keys(state, prep.model.params, batches)
    prep.preserved[key] = jax.device_get(state["stats"]["preserved_keys"])   # host copies
    return state


def _preserved_for_training(cfg: RunConfig, prep: Prepared, editor):
    """The hook that fills the preserved keys before step 0, for an editor that trains with them
    (`preserve_weight`; its fresh state holds them, empty). Otherwise none: the state keeps the
    structure `editor.init` gives it, which is what the run's checkpoints restore into."""
    if not getattr(editor.config, "preserve_weight", 0):
        return None
    return lambda state: evaluation_state(cfg, prep, editor, state)


def evaluate_all(cfg: RunConfig | dict, prep: Prepared, mend, editor_state: dict, *,
                 methods=None, requests=None, n_edits: int | None = None,
                 progress: bool = False, sequential: int | None = None) -> dict:
    """Held-out metrics of every method on the same requests; with `sequential` = T, T batches
    of `n_edits` edits applied one after another (`evaluate_sequential`).

    `mend` is the run's trained editor (MEND, KE or ENN, as `alg.method` says); it is reported
    under its method's name, and the entry "mend" of `methods` (the default list's) stands for
    it whichever it is. "untrained" is a freshly initialised editor of the same kind."""
    cfg = as_config(cfg)
    ecfg = cfg.eval
    trained = cfg.alg.method
    methods = list(methods or ecfg.methods)
    requests = list(requests if requests is not None else prep.splits[ecfg.split])
    if ecfg.max_examples:
        requests = requests[: ecfg.max_examples]
    n_edits = n_edits or ecfg.n_edits
    model, names = prep.model, inner_params(cfg, prep.model)
    results = {}
    for method in methods:
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}; choose from {METHODS}")
        if method in TRAINED:
            if method not in ("mend", trained):
                raise ValueError(f"eval method {method!r}: this run trained {trained}")
            if method != trained:
                log.info("eval method mend: the run's trained %s editor, reported as %r",
                         trained, trained)
            method, editor, state = trained, mend, editor_state
            state = evaluation_state(cfg, prep, editor, state)
        elif method == "untrained":
            editor, state = mend, mend.init(jax.random.key(cfg.seed))
        else:
            editor = make_editor(method, model, names, config=cfg.alg.baselines.get(method))
            state = editor.init(None)
        t = time.time()
        if sequential:
            results[method] = evaluate_sequential(
                model, editor, state, model.params, requests, prep.tokenizer, n_edits=n_edits,
                n_batches=sequential, max_length=cfg.model.max_length, seed=cfg.seed)
        else:
            results[method] = evaluate_editor(
                model, editor, state, model.params, requests, prep.tokenizer, n_edits=n_edits,
                max_length=cfg.model.max_length, seed=cfg.seed, progress=progress,
                perplexity=cfg.data.format == "wikitext",
                held_out_relations=prep.info.get("held_out_relations"))
        if method not in TRAINED and method != "untrained" and is_dataclass(editor.config):
            # the baseline's options, so that a result says which step size etc. it measured
            results[method]["options"] = asdict(editor.config)
        elif method in TRAINED and hasattr(editor.config, "capture_loss"):
            # the trained editor's evaluation-time options (eval.py --set alg.editor.*)
            results[method]["options"] = {k: getattr(editor.config, k)
                                          for k in EDITOR_EVAL_OPTIONS}
        log.info("%s evaluated in %.1fs", method, time.time() - t)
    return results


def train(cfg: RunConfig | dict, *, resume: bool = False) -> tuple[Path, dict]:
    """Meta-train the configured editor, then evaluate all methods; writes results.json."""
    cfg = as_config(cfg)
    run_dir = Path(cfg.out_dir)
    if not resume and (run_dir / "checkpoints").exists():
        # Never overwrite a finished or interrupted run: a fresh run goes next to it.
        n = 1
        while (run_dir.parent / f"{run_dir.name}-{n}" / "checkpoints").exists():
            n += 1
        run_dir = run_dir.parent / f"{run_dir.name}-{n}"
        log.warning("%s holds a run already (use --resume to continue it); writing to %s",
                    cfg.out_dir, run_dir)
        cfg = cfg.replace(out_dir=str(run_dir))
    with run_lock(run_dir):
        write_or_check_config(run_dir, cfg, resume)
        return _train(cfg, run_dir, resume)


def _train(cfg: RunConfig, run_dir: Path, resume: bool) -> tuple[Path, dict]:
    t0 = time.time()
    prep = prepare(cfg)
    t_prep = time.time() - t0
    mend = build_editor(cfg, prep.model)
    trainer = MetaTrainer(mend, cfg.alg.train)
    summary = train_editor(trainer, prep.model.params, prep.splits["train"], prep.splits["val"],
                           prep.tokenizer, run_dir=run_dir, cfg=cfg.alg.loop, seed=cfg.seed,
                           max_length=cfg.model.max_length, resume=resume,
                           progress=cfg.progress, mesh=training_mesh(cfg),
                           prepare_editor=_preserved_for_training(cfg, prep, mend))
    editor_state, _ = load_best_editor(run_dir, mend.init(jax.random.key(0)))
    t1 = time.time()
    results = evaluate_all(cfg, prep, mend, editor_state, progress=cfg.progress)
    out = {
        **results,
        "_run": {"split": cfg.eval.split, "info": prep.info,
                 "best_step": summary["best_step"],
                 "steps": summary["step"], "n_skipped": summary["n_skipped"],
                 "prepare_time_s": t_prep, "train_time_s": summary["train_time_s"],
                 "eval_time_s": time.time() - t1},
    }
    write_results(run_dir / "results.json", out)
    # What a user keeps: the best editor as an artifact, and a model built here next to it.
    base = cfg.model.name
    if base is None:
        base = str(save_pretrained(prep.model, None, run_dir / "base_model"))
    save_editor(run_dir / "editor", mend, editor_state, base_model=base,
                max_length=cfg.model.max_length)
    return run_dir, out


def write_results(path: Path, results: dict) -> None:
    """Strict JSON, written atomically: a NaN or infinite metric is written as null."""
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(strict_json(results), indent=2, allow_nan=False))
    tmp.replace(path)


def strict_json(value: Any) -> Any:
    """`value` with every non-finite float replaced by None (and numpy scalars by Python's)."""
    if isinstance(value, dict):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(v) for v in value]
    if hasattr(value, "item") and getattr(value, "shape", None) == ():
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _check_eval_aggregate(run_dir: Path, trained, now) -> None:
    """An evaluation-time `aggregate` must need no parameters or statistics the run did not
    train: sum and request_lstsq share the editor's parameters; lstsq has its own λ."""
    was, new = getattr(trained, "aggregate", None), getattr(now, "aggregate", None)
    if was == new:
        return
    if "lstsq" in (was, new):
        raise ValueError(f"{run_dir}: trained with alg.editor.aggregate={was}; it cannot be "
                         f"evaluated with aggregate={new} (lstsq learns its own λ: train with it)")
    def keeps_moments(c):
        return c.whiten or c.project_keys or c.aggregate == "request_lstsq"

    if keeps_moments(trained) != keeps_moments(now):
        raise ValueError(f"{run_dir}: alg.editor.aggregate=request_lstsq needs the keys' second "
                         "moments, which a run keeps only when trained with request_lstsq, "
                         f"alg.editor.project_keys or whiten; this one (aggregate={was}) "
                         + ("was not" if new == "request_lstsq" else
                            f"kept them and aggregate={new} does not read them"))


def load_run(run_dir: str | Path, overrides: dict | None = None) -> tuple[RunConfig, Prepared,
                                                                          Any, dict]:
    """(config, prepared model/data, editor, best editor state) of a trained run; `overrides`
    are dotted keys (`{"eval.split": "val"}`)."""
    run_dir = Path(run_dir)
    cfg_file = run_dir / "config.yaml"
    if not cfg_file.exists():
        raise FileNotFoundError(f"{run_dir}: no config.yaml (is this a train.py output folder?)")
    run_cfg = validate_config(read_mapping(cfg_file))
    cfg = run_cfg.replace(out_dir=str(run_dir), **(overrides or {}))
    _check_eval_aggregate(run_dir, run_cfg.alg.editor, cfg.alg.editor)
    prep = prepare(cfg, progress=False)
    mend = build_editor(cfg, prep.model)
    # The checkpoint holds what the run trained (its state's structure: e.g. preserved keys),
    # whatever evaluation-time options change; `evaluate_all` adds what they need.
    like = build_editor(run_cfg, prep.model).init(jax.random.key(0))
    state, _ = load_best_editor(run_dir, like)
    return cfg, prep, mend, state


def print_table(results: dict) -> str:
    methods = {k: v for k, v in results.items() if not k.startswith("_")}
    table = format_table(methods)
    by_relation = format_by_relation(methods)
    if by_relation:
        table += "\n\nby relation:\n" + by_relation
    print(table)
    return table
