"""How many simultaneous edits can a one-step least-squares edit make on the default's base
model? A training-free probe of the capacity that a trained lstsq editor works within.

For each edited weight, the keys U are the raw layer inputs on the answer tokens of the k
requests and the values their negative gradients −δ (each request's own NLL, so a value does
not depend on k); the update is ΔW = lr · (UᵀU + λ C)⁻¹ Uᵀ δ, C = E[u uᵀ] over every real token
of the training split's fact sentences (MEMIT's covariance term; plus 1e-3·mean(diag C)·I,
as the editor's `whiten`). Every (k, lr, λ) of the grid
is evaluated as `eval.py` does (test split, groups of k edited together from the base weights).

    python bench/ridge_capacity.py --edits 1,10,100 --lr 5,20 --lam 100,1000
    python bench/ridge_capacity.py --override model.build.n_embd=128 --lr 100,300 --lam 30,300
"""

from __future__ import annotations

import argparse
import itertools

import common


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--edits", default="1,10,100")
    p.add_argument("--lr", default="5,20")
    p.add_argument("--lam", default="100,1000")
    p.add_argument("--override", nargs="*", default=[],
                   help="config overrides (the base model is built and cached as train.py does)")
    p.add_argument("--out-dir", default="/tmp/mend-jax-ridge-capacity")
    p.add_argument("--no-record", action="store_true")
    args = p.parse_args(argv)

    import jax
    import jax.numpy as jnp
    import numpy as np

    from mend_jax.capture import capture
    from mend_jax.config import load_config
    from mend_jax.data.batching import tokenize_pairs
    from mend_jax.editors.mend import selected_tokens, whitening_matrix
    from mend_jax.evaluation import evaluate_editor
    from mend_jax.metrics import sequence_nll
    from mend_jax.models import get_path, set_path
    from mend_jax.pipeline import inner_params, prepare

    cfg = load_config([f"out_dir={args.out_dir}", *args.override])
    prep = prepare(cfg, progress=False)
    model, tok = prep.model, prep.tokenizer
    names = inner_params(cfg, model)
    length = cfg.model.max_length
    keys = ("input_ids", "attention_mask", "labels")

    # C = E[u uᵀ] per weight over the training split's fact sentences
    train = prep.splits["train"]
    pairs = ([(r.prompt, r.target_true or r.target_new) for r in train]
             + [(r.loc_prompt, r.loc_target) for r in train])
    sums = {n: 0.0 for n in names}
    count = 0
    cap_fn = jax.jit(lambda b: capture(model, model.params, b, names)[1])
    for i in range(0, len(pairs), 256):
        chunk = pairs[i:i + 256]
        b = tokenize_pairs(tok, [q for q, _ in chunk], [t for _, t in chunk], seq2seq=False,
                           max_length=length)
        cap = cap_fn({k: jnp.asarray(v) for k, v in b.items() if k in keys})
        for n in names:
            real = np.asarray(cap[n].token_mask) > 0
            u = np.asarray(cap[n].layer_inputs)[real].astype(np.float64)
            sums[n] = sums[n] + u.T @ u
        count += int(real.sum())
    # as the lstsq editor's `whiten`: C + 1e-3·mean(diag C)·I (LayerNorm outputs make C nearly
    # singular along one direction)
    second = {n: whitening_matrix({"count": jnp.asarray(count, jnp.float32),
                                   "mean_uu": jnp.asarray(v / count, jnp.float32)})
              for n, v in sums.items()}

    class RidgeStep:
        def __init__(self, lr, lam):
            self.lr, self.lam = lr, lam

        def edit(self, state, params, batch):
            def loss(logits, b):
                return sequence_nll(logits, b["labels"], True).sum()

            _, caps, _ = capture(model, params, batch, names, loss_fn=loss)
            new = params
            for n in names:
                c = caps[n]
                m = selected_tokens(c, answer_only=True)[:, None]
                u, d = c.layer_inputs * m, c.output_grads * m
                dw = self.lr * jnp.linalg.solve(u.T @ u + self.lam * second[n], u.T @ d)
                path = model.names.path(n)
                new = set_path(new, path, get_path(params, path) - dw)
            return new

    rows = []
    grid = itertools.product([int(x) for x in args.edits.split(",")],
                             [float(x) for x in args.lr.split(",")],
                             [float(x) for x in args.lam.split(",")])
    for k, lr, lam in grid:
        r = evaluate_editor(model, RidgeStep(lr, lam), None, model.params, prep.splits["test"],
                            tok, n_edits=k, max_length=length, timed_edits=0)
        row = {"k": k, "lr": lr, "lam": lam, **{key: r[key] for key in (
            "edit_success", "generality", "drawdown", "locality_kl", "neighborhood_acc")}}
        print(row, flush=True)
        rows.append(row)
    table = common.markdown_table(rows, ["k", "lr", "lam", "edit_success", "generality",
                                         "drawdown", "locality_kl", "neighborhood_acc"])
    build = cfg.model.build
    notes = [f"base model: the offline default's ({build}), its {len(names)} edited weights "
             f"({', '.join(names)}); C from {count} tokens of the training split; test split "
             f"({len(prep.splits['test'])} requests), groups of k edited together from the base "
             "weights."]
    common.report("One-step whitened least-squares edits (training-free capacity probe)", table,
                  notes, record=not args.no_record)


if __name__ == "__main__":
    main()
