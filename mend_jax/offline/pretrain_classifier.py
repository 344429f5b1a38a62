"""Train a small BERT claim classifier before editing it (as the paper fine-tunes BERT on FEVER).

The counterpart of `pretrain.py` for the FEVER-style benchmark: a fresh
BertForSequenceClassification whose labels are named as the claims' ("REFUTES" 0, "SUPPORTS" 1),
saved as a Hugging Face checkpoint (config + safetensors + tokenizer) under a digest of
everything it depends on, so a second run loads it with `load_pretrained`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import jax
import numpy as np
import optax
import transformers
from tokenizers.processors import TemplateProcessing
from tqdm.auto import tqdm

from mend_jax.data import tokenize_pairs
from mend_jax.data.fever import LABELS
from mend_jax.metrics import masked_nll
from mend_jax.models import Model, from_config
from mend_jax.offline.pretrain import cache_key, cached_model, fact_accuracy
from mend_jax.offline.tokenizer import build_tokenizer

log = logging.getLogger(__name__)


def build_classifier_tokenizer(kind: str, texts, **options):
    """`build_tokenizer(kind, texts, **options)` that wraps every encoded text as
    "<bos> text <eos>": BERT's [CLS] text [SEP], so the pooler reads a token of its own."""
    tok = build_tokenizer(kind, texts, **options)
    tok.backend_tokenizer.post_processor = TemplateProcessing(
        single="<bos> $A <eos>",
        special_tokens=[("<bos>", tok.bos_token_id), ("<eos>", tok.eos_token_id)])
    return tok


def claim_accuracy(model: Model, params, batch: dict, chunk: int = 512) -> float:
    """Fraction of claims whose label is the classifier's argmax."""
    return fact_accuracy(model, params, batch, chunk, shift=False)


def pretrain_classifier(
    claims: Sequence[tuple[str, str]],
    tokenizer,
    model_cfg: dict,
    *,
    steps: int = 2000,
    batch_size: int = 64,
    lr: float = 1e-3,
    max_length: int = 32,
    seed: int = 0,
    progress: bool = True,
) -> tuple[Model, dict, float]:
    """Train a fresh BERT classifier on (claim, label) pairs; returns (model, params, accuracy
    on the claims). `model_cfg` holds transformers.BertConfig fields (hidden_size, ...)."""
    hf_cfg = transformers.BertConfig(
        vocab_size=len(tokenizer), max_position_embeddings=max_length, type_vocab_size=1,
        pad_token_id=tokenizer.pad_token_id, architectures=["BertForSequenceClassification"],
        id2label=dict(enumerate(LABELS)), label2id={name: i for i, name in enumerate(LABELS)},
        **model_cfg)
    model = from_config(hf_cfg, seed=seed, tokenizer=tokenizer)
    data = tokenize_pairs(tokenizer, [c for c, _ in claims], [label for _, label in claims],
                          **model.pair_format, max_length=max_length)
    data = {k: v for k, v in data.items() if k != "truncated"}

    schedule = optax.warmup_cosine_decay_schedule(0.0, lr, min(200, steps // 10), steps, lr * 0.05)
    opt = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=0.01))

    @jax.jit
    def step(params, opt_state, ids, mask, labels):
        loss, grads = jax.value_and_grad(
            lambda p: masked_nll(model.logits(p, ids, mask), labels, shift=False))(params)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    params, opt_state = model.params, opt.init(model.params)
    rng = np.random.default_rng(seed)
    bar = tqdm(range(steps), desc="pretrain claim classifier", disable=not progress,
               mininterval=2)
    for i in bar:
        idx = rng.integers(0, len(claims), batch_size)
        params, opt_state, loss = step(params, opt_state, data["input_ids"][idx],
                                       data["attention_mask"][idx], data["labels"][idx])
        if i % 100 == 0:
            bar.set_postfix(loss=f"{float(loss):.3f}")
    return model, params, claim_accuracy(model, params, data)


def cached_classifier(cache_dir: str | Path, claims, tokenizer, model_cfg: dict, train_cfg: dict,
                      progress: bool = True) -> tuple[Model, float]:
    """Load the trained claim classifier from the cache, or train and cache it."""
    key = cache_key(claims, {"classifier": model_cfg}, train_cfg, tokenizer)
    return cached_model(
        Path(cache_dir) / f"classifier-{key}", "claim classifier", "claim_accuracy",
        lambda: pretrain_classifier(claims, tokenizer, model_cfg, progress=progress, **train_cfg),
        {"n_claims": len(claims), "model": model_cfg, "train": train_cfg})
