"""The MEND meta-step with the edit passes' logits at the labelled positions only against the
same step with full logits, alternating call by call in one process (a load change on a shared
machine then hits both alike). GPT-2 small by default (`--small`: the tiny shape). Usage:

    python bench/bench_logit_positions.py --steps 6 --warmup 1
"""

from __future__ import annotations

import os
import time

import common


def main(argv=None) -> None:
    p = common.base_parser(__doc__.splitlines()[0])
    p.add_argument("--n-edits", type=int, default=1)
    args = p.parse_args(argv)

    import jax
    import jax.numpy as jnp

    from mend_jax.editors import MEND, MENDConfig
    from mend_jax.models import from_config
    from mend_jax.training import MetaTrainer, TrainConfig

    platform_ = common.setup_jax(args.matmul_precision)
    cfg = common.hf_config("gpt2", args.small)
    model = from_config(cfg, seed=0)
    raw = common.meta_batch("gpt2", cfg.vocab_size, args.n_edits, args.n_edits, args.small)
    batches = {"labelled": jax.tree.map(jnp.asarray, common.with_positions(raw)),
               "full": jax.tree.map(jnp.asarray, raw)}
    trainer = MetaTrainer(MEND(model, config=MENDConfig()), TrainConfig(accumulate=1))
    step = jax.jit(trainer.step)  # no donation: both kinds step from the same state
    state = trainer.init(jax.random.key(0))
    first, times, losses = {}, {k: [] for k in batches}, {}
    for i in range(args.warmup + args.steps):
        for kind, batch in batches.items():
            t = time.perf_counter()
            _, metrics = step(state, model.params, batch)
            jax.block_until_ready(metrics)
            dt = time.perf_counter() - t
            first.setdefault(kind, dt)
            losses[kind] = float(metrics["loss"])
            if i >= args.warmup:
                times[kind].append(dt)
    rows = [{"logits": "labelled positions only" if k == "labelled" else "every position",
             "median_s": common.median(v), "min_s": min(v), "first_call_s": first[k],
             "loss": losses[k], "load1": common.load1()} for k, v in times.items()]
    ratio = common.median(times["full"]) / common.median(times["labelled"])
    table = common.markdown_table(rows, ["logits", "median_s", "min_s", "first_call_s", "loss",
                                         "load1"])
    notes = [
        f"{common.shape_name('gpt2', args.small)}, random weights, {args.n_edits} edit + "
        f"{args.n_edits} equivalent + {args.n_edits} locality sequence(s) "
        "(`bench/common.py`'s meta_batch: the edit labels are the last "
        f"{common.TARGET_TOKENS} tokens); MENDConfig() defaults, TrainConfig(accumulate=1); "
        f"device {platform_}.",
        f"the two steps alternate call by call, {args.steps} timed calls each after "
        f"{args.warmup} warm-up calls (first_call_s includes compilation).",
        f"full logits / labelled positions = {ratio:.2f}x.",
    ]
    common.report(f"Logits at the labelled positions ({'small' if args.small else 'full'} "
                  "shape)", table, notes, record=not args.no_record)


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    main()
