"""Teach a small base model a set of facts before editing it (as the paper fine-tunes on zsRE).

The result is saved as a Hugging Face checkpoint (config + safetensors + tokenizer), so the rest of
the pipeline loads it with `load_pretrained` like any other model, and a second run reuses it.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import transformers
from tqdm.auto import tqdm

from mend_jax.data import tokenize_pairs
from mend_jax.metrics import masked_nll, sequence_correct
from mend_jax.models import Model, from_config, load_pretrained, save_pretrained

log = logging.getLogger(__name__)


def cache_key(facts: Sequence[tuple[str, str]], model_cfg: dict, train_cfg: dict,
              tokenizer=None) -> str:
    """A digest of everything the cached base model depends on (the tokenizer's vocabulary and
    merges included: the same facts under another tokenizer are another model)."""
    vocab = tokenizer.backend_tokenizer.to_str() if tokenizer is not None else None
    blob = json.dumps([list(map(list, facts)), model_cfg, train_cfg, vocab],
                      sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def fact_accuracy(model: Model, params, batch: dict, chunk: int = 512,
                  shift: bool = True) -> float:
    """Fraction of facts whose whole answer is the greedy prediction (teacher forcing); with
    shift=False and a classifier's [B] labels, of examples whose class is the argmax."""
    fn = jax.jit(lambda p, b: sequence_correct(
        model.logits(p, b["input_ids"], b["attention_mask"]), b["labels"], shift=shift))
    n = len(batch["input_ids"])
    hits = []
    for i in range(0, n, chunk):
        part = {k: jnp.asarray(v[i:i + chunk]) for k, v in batch.items() if k != "truncated"}
        hits.append(np.asarray(fn(params, part)))
    return float(np.concatenate(hits).mean())


def pretrain_on_facts(
    facts: Sequence[tuple[str, str]],
    tokenizer,
    model_cfg: dict,
    *,
    steps: int = 3000,
    batch_size: int = 128,
    lr: float = 3e-3,
    max_length: int = 24,
    seed: int = 0,
    answer_weight_only: bool = False,
    progress: bool = True,
) -> tuple[Model, dict, float]:
    """Train a fresh GPT-2-style model on "prompt answer" sequences; returns (model, params, acc).

    The loss covers the whole sentence (the model learns the language of the prompts too) unless
    `answer_weight_only`; accuracy is measured on the answers.
    """
    hf_cfg = transformers.GPT2Config(
        vocab_size=len(tokenizer), n_positions=max_length, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **model_cfg)
    model = from_config(hf_cfg, seed=seed, tokenizer=tokenizer)
    prompts, answers = [p for p, _ in facts], [a for _, a in facts]
    data = tokenize_pairs(tokenizer, prompts, answers, seq2seq=False, max_length=max_length)
    answer_labels = data["labels"]
    lm_labels = np.where(data["attention_mask"] == 1, data["input_ids"], -100)
    train_labels = answer_labels if answer_weight_only else lm_labels

    schedule = optax.warmup_cosine_decay_schedule(0.0, lr, min(200, steps // 10), steps, lr * 0.05)
    opt = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=0.01))

    def loss_fn(params, ids, mask, labels, answers):
        logits = model.logits(params, ids, mask)
        # answers count double so the facts themselves are learned first
        return masked_nll(logits, labels, True) + masked_nll(logits, answers, True)

    @jax.jit
    def step(params, opt_state, ids, mask, labels, answers):
        loss, grads = jax.value_and_grad(loss_fn)(params, ids, mask, labels, answers)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    params, opt_state = model.params, opt.init(model.params)
    rng = np.random.default_rng(seed)
    n = len(prompts)
    bar = tqdm(range(steps), desc="pretrain base model", disable=not progress, mininterval=2)
    for i in bar:
        idx = rng.integers(0, n, batch_size)
        params, opt_state, loss = step(params, opt_state, data["input_ids"][idx],
                                       data["attention_mask"][idx], train_labels[idx],
                                       answer_labels[idx])
        if i % 100 == 0:
            bar.set_postfix(loss=f"{float(loss):.3f}")
    acc = fact_accuracy(model, params, {"input_ids": data["input_ids"],
                                        "attention_mask": data["attention_mask"],
                                        "labels": answer_labels})
    return model, params, acc


def cached_model(folder: Path, what: str, metric: str, build,
                 record: dict) -> tuple[Model, float]:
    """The model cached in `folder` and its `metric`; else `build()` -> (model, params, value),
    saved there first. pretrain.json, written last, marks a complete cache entry."""
    info = folder / "pretrain.json"
    if info.exists() and (folder / "model.safetensors").exists():
        value = json.loads(info.read_text())[metric]
        log.info("%s from cache %s (%s %.3f)", what, folder, metric.replace("_", " "), value)
        return load_pretrained(folder), value
    model, params, value = build()
    save_pretrained(model, params, folder)
    info.write_text(json.dumps({metric: value, **record}, indent=2))
    log.info("%s trained (%s %.3f), cached in %s", what, metric.replace("_", " "), value, folder)
    return load_pretrained(folder), value


def cached_base_model(cache_dir: str | Path, facts, tokenizer, model_cfg: dict, train_cfg: dict,
                      progress: bool = True) -> tuple[Model, float]:
    """Load the pretrained base model from the cache, or train and cache it."""
    folder = Path(cache_dir) / f"base-{cache_key(facts, model_cfg, train_cfg, tokenizer)}"
    return cached_model(
        folder, "base model", "fact_accuracy",
        lambda: pretrain_on_facts(facts, tokenizer, model_cfg, progress=progress, **train_cfg),
        {"n_facts": len(facts), "model": model_cfg, "train": train_cfg})
