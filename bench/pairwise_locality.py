"""Which unrelated facts does an edit break, and does the drawdown of k edits made together
follow from the single edits? Each of N test requests is edited alone (from the base weights),
and the locality fact of every one of the N requests is measured after it: broken[i, j] says
that edit i alone broke request j's locality fact (true before, false after).

Reported: the break rate over all pairs (i ≠ j) and by kind of pair (the locality fact's answer
is the edit's true object, its new object, or neither), and for each k the drawdown that the
single edits predict for k edits made together (request j's locality fact is lost when any edit
of its group broke it alone; the groups as `eval.py --n-edits k` forms them), next to the
measured one when `--measure`.

    python bench/pairwise_locality.py RUN --k 10 25 100 --measure
    python bench/pairwise_locality.py RUN --set alg.editor.preserve_weight=1.0 \\
        alg.editor.request_preserve=2000
"""

from __future__ import annotations

import argparse

import numpy as np


def pair_rates(broken: np.ndarray, masks: dict[str, np.ndarray]) -> dict[str, tuple[int, float]]:
    """{kind: (pairs, break rate)} over the off-diagonal pairs of each mask."""
    off = ~np.eye(len(broken), dtype=bool)
    return {kind: (int((m & off).sum()), float(broken[m & off].mean()) if (m & off).any()
                   else float("nan")) for kind, m in masks.items()}


def union_drawdown(broken: np.ndarray, order: np.ndarray, k: int) -> float:
    """Predicted drawdown of groups of k (consecutive in `order`, a remainder dropped): the
    fraction of the grouped requests whose locality fact some edit of its group broke alone."""
    n = len(order) // k * k
    lost = []
    for g in range(n // k):
        members = order[g * k:(g + 1) * k]
        lost.append(broken[np.ix_(members, members)].any(0))
    return float(np.concatenate(lost).mean()) if lost else float("nan")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_dir")
    p.add_argument("--n", type=int, default=200, help="test requests (the first N)")
    p.add_argument("--k", type=int, nargs="*", default=[10, 25, 100])
    p.add_argument("--set", nargs="*", default=[], dest="settings", metavar="KEY=VALUE",
                   help="the editor's evaluation-time options, as eval.py --set")
    p.add_argument("--measure", action="store_true",
                   help="also measure each k's drawdown as eval.py does")
    p.add_argument("--no-record", action="store_true")
    args = p.parse_args(argv)

    import common  # bench/'s helpers (this script's folder is on sys.path)
    import jax
    import jax.numpy as jnp

    from mend_jax import evaluation as ev
    from mend_jax.capture import labelled_logits
    from mend_jax.config import parse_value
    from mend_jax.metrics import sequence_correct
    from mend_jax.pipeline import evaluate_all, evaluation_state, load_run

    overrides = {k: parse_value(v) for k, v in (s.split("=", 1) for s in args.settings)}
    cfg, prep, mend, state = load_run(args.run_dir, overrides)
    state = evaluation_state(cfg, prep, mend, state)
    requests = prep.splits["test"][: args.n]
    model = prep.model
    _, batches, _ = ev.edit_groups(model, requests, prep.tokenizer, 1, seed=None,
                                   max_length=cfg.model.max_length)
    loc = {k: jnp.asarray(v[:, 0]) for k, v in batches["loc"].items()}
    edits = {k: jnp.asarray(v) for k, v in batches["edit_inner"].items()}

    @jax.jit
    def correct(params):
        logits, labels = labelled_logits(model, params, loc)
        return sequence_correct(logits, labels, model.shift_labels)

    @jax.jit
    def after(i):
        return correct(mend.edit(state, model.params, {k: v[i] for k, v in edits.items()}))

    pre = np.asarray(correct(model.params))
    broken = np.stack([pre & ~np.asarray(after(i)) for i in range(len(requests))])
    true_obj = np.array([[r.target_true == s.loc_target for s in requests] for r in requests])
    new_obj = np.array([[r.target_new == s.loc_target for s in requests] for r in requests])
    rates = pair_rates(broken, {"all pairs": np.ones_like(true_obj),
                                "locality answer = the edit's true object": true_obj,
                                "locality answer = the edit's new object": new_obj,
                                "neither": ~true_obj & ~new_obj})
    rows = [{"pairs (edit i, locality fact j ≠ i)": kind, "pairs": n,
             "broken by edit i alone": f"{rate:.4f}"} for kind, (n, rate) in rates.items()]
    table = common.markdown_table(rows, list(rows[0]))
    # the groups eval.py forms: the requests shuffled with the run's seed, k at a time
    shuffled = ev.edit_groups(model, requests, prep.tokenizer, 1, seed=cfg.seed,
                              max_length=cfg.model.max_length)[0]
    order = np.asarray([requests.index(r) for r in shuffled])
    krows = []
    for k in args.k:
        row = {"k": k, "predicted drawdown (union of single edits)":
               f"{union_drawdown(broken, order, k):.3f}"}
        if args.measure:
            got = evaluate_all(cfg, prep, mend, state, methods=["mend"], n_edits=k,
                               requests=requests)["mend"]
            row["measured drawdown"] = f"{got['drawdown']:.3f}"
            row["measured ES"] = f"{got['edit_success']:.3f}"
        krows.append(row)
    table += "\n\n" + common.markdown_table(krows, list(krows[0])) if krows else ""
    common.report(f"Pairwise locality of single edits ({args.run_dir})", table, notes=[
        f"{len(requests)} test requests, each edited alone from the base weights; "
        f"options: {overrides or 'as trained'}",
        f"diagonal (an edit's own locality fact): {broken.diagonal().mean():.4f}"],
        record=not args.no_record)


if __name__ == "__main__":
    main()
