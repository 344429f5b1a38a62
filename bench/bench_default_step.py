"""The offline default's own meta-training step (`python train.py`'s shapes and batches): the
jitted step with the edit passes' logits at the labelled positions (as the training loop runs
it) against the same step with full logits, alternating in one process; or (`--compare
lapack-threads`) the loop's step with one OpenBLAS thread (as the command-line tools start it)
against one OpenBLAS thread per core. On CPU JAX runs its LAPACK calls (the Cholesky solves of
`alg.editor.project_keys`) through SciPy's OpenBLAS; its setting is read when the library loads,
and switching it inside one process (threadpoolctl) leaves the threads of the earlier calls
spinning, so each setting runs in a process of its own, one after the other in this run.

The base model is the default's GPT-2 shape with random weights (timing does not depend on what
it learned, and no cached model is needed); the batches are the loop's own (`loop.batch_at`) over
the default benchmark's training split and BPE tokenizer. Usage:

    python bench/bench_default_step.py --steps 50 --warmup 5
    python bench/bench_default_step.py --steps 20 --warmup 3 --compare lapack-threads
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import common


def main(argv=None) -> None:
    p = common.base_parser(__doc__.splitlines()[0])
    p.add_argument("--override", action="append", default=[],
                   help="a key=value config override (repeatable), as train.py takes")
    p.add_argument("--compare", choices=["logits", "lapack-threads"], default="logits",
                   help="labelled-position vs full logits, or one vs one-per-core OpenBLAS "
                        "threads (a process each)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.small:
        args.override = ["data.n_val=20", "data.n_test=20",
                         *args.override]
    if args.compare == "lapack-threads" and not args.worker:
        return _compare_lapack_threads(args)

    import jax
    import numpy as np

    from mend_jax.metrics import POSITIONS

    platform_ = common.setup_jax(args.matmul_precision)
    cfg, tokenizer, trainer, model, batches = _setup(args)
    step = jax.jit(trainer.step, donate_argnums=0)
    if args.worker:
        kinds = {"loop": batches}
    else:
        kinds = {"labelled positions only (the loop's default)": batches,
                 "every position": [{k: {kk: vv for kk, vv in v.items() if kk != POSITIONS}
                                     for k, v in b.items()} for b in batches]}
    widths = sorted({int(b["edit_inner"][POSITIONS].shape[1]) for b in batches})

    state = {k: trainer.init(jax.random.key(0)) for k in kinds}
    times: dict[str, list[float]] = {k: [] for k in kinds}
    first: dict[str, float] = {}
    for i in range(args.steps + args.warmup):
        for kind, bs in kinds.items():
            t = time.perf_counter()
            state[kind], metrics = step(state[kind], model.params, bs[i])
            jax.block_until_ready(metrics)
            dt = time.perf_counter() - t
            if i == 0:
                first[kind] = dt
            if i >= args.warmup:
                times[kind].append(dt)
    loss = {k: float(step(state[k], model.params, bs[-1])[1]["loss"]) for k, bs in kinds.items()}
    if args.worker:
        common.emit({"times": times["loop"], "first": first["loop"], "loss": loss["loop"],
                     "load1": common.load1()})
        return
    rows = [{"step": k, "median_s": common.median(v), "min_s": min(v),
             "steps_per_s": 1 / common.median(v), "first_call_s": first[k],
             "load1": common.load1()} for k, v in times.items()]
    (a, ta), (b, tb) = times.items()
    notes = [_config_note(args, cfg, tokenizer, platform_),
             f"the two steps alternate on the same {args.steps} batches after {args.warmup} "
             f"warm-up steps each (first_call_s includes compilation); logit_positions width "
             f"{widths} (the run's `loop.label_width`).",
             _ratio_note(a, ta, loss[a], b, tb, loss[b], np)]
    _report(args, rows, notes)


def _setup(args):
    """(config, tokenizer, trainer, model, the loop's batches for steps + warmup steps)."""
    import transformers

    from mend_jax.config import load_config
    from mend_jax.data import load_requests
    from mend_jax.loop import batch_at, label_width
    from mend_jax.models import from_config
    from mend_jax.offline import (
        benchmark_texts,
        build_geonames_benchmark,
        build_tokenizer,
        write_benchmark,
    )
    from mend_jax.pipeline import build_editor
    from mend_jax.training import MetaTrainer

    cfg = load_config(args.override)
    mcfg, dcfg, loop = cfg.model, cfg.data, cfg.alg.loop
    bench = build_geonames_benchmark(seed=cfg.seed, n_val=dcfg.n_val, n_test=dcfg.n_test,
                                     n_train=dcfg.n_train, edit_forms=dcfg.edit_forms)
    tokenizer = build_tokenizer(mcfg.tokenizer.kind, benchmark_texts(bench),
                                **mcfg.tokenizer.options())
    # the zsRE round trip of the pipeline is not needed for timing: the requests themselves
    with tempfile.TemporaryDirectory() as tmp:
        train = load_requests(write_benchmark(bench, tmp)["train.zsre"], "zsre")
    hf = transformers.GPT2Config(vocab_size=len(tokenizer), n_positions=mcfg.max_length,
                                 bos_token_id=tokenizer.bos_token_id,
                                 eos_token_id=tokenizer.eos_token_id,
                                 pad_token_id=tokenizer.pad_token_id, **mcfg.build)
    model = from_config(hf, seed=0, tokenizer=tokenizer)
    trainer = MetaTrainer(build_editor(cfg, model), cfg.alg.train)
    width = label_width(train, tokenizer, max_length=mcfg.max_length, **model.pair_format)
    batches = [batch_at(train, tokenizer, seed=cfg.seed, step=i, batch_size=loop.batch_size,
                        n_edits=loop.n_edits, n_edits_dist=loop.n_edits_dist,
                        loc_neighbors=loop.loc_neighbors,
                        max_length=mcfg.max_length, positions_width=width,
                        **model.pair_format)
               for i in range(args.steps + args.warmup)]
    return cfg, tokenizer, trainer, model, batches


def _compare_lapack_threads(args) -> None:
    """Each OpenBLAS setting in a fresh process of this script (`--worker`), one after another."""
    import numpy as np

    from mend_jax.config import load_config

    cores = os.cpu_count() or 1
    flags = ["--worker", "--steps", str(args.steps), "--warmup", str(args.warmup),
             *[f"--override={o}" for o in args.override]]
    kinds = {"one OpenBLAS thread (the CLIs' setting)": 1,
             f"{cores} OpenBLAS threads (one per core)": cores}
    res = {k: common.run_worker("bench_default_step.py", flags,
                                env={"OPENBLAS_NUM_THREADS": str(n)})
           for k, n in kinds.items()}
    rows = [{"step": k, "median_s": common.median(r["times"]), "min_s": min(r["times"]),
             "steps_per_s": 1 / common.median(r["times"]), "first_call_s": r["first"],
             "load1": r["load1"]} for k, r in res.items()]
    (a, ra), (b, rb) = res.items()
    cfg = load_config(args.override)
    notes = [_config_note(args, cfg, None, "cpu"),
             f"each setting in its own process (`OPENBLAS_NUM_THREADS`), one after the other, "
             f"{args.steps} steps after {args.warmup} warm-up steps on the same batches "
             "(first_call_s includes compilation).",
             # OpenBLAS's Cholesky rounds differently with another thread count, so the two
             # runs drift apart over the steps (measured: 0.2% in the loss after 23 steps)
             _ratio_note(a, ra["times"], ra["loss"], b, rb["times"], rb["loss"], np, rtol=1e-2)]
    _report(args, rows, notes)


def _config_note(args, cfg, tokenizer, platform_) -> str:
    mcfg, loop = cfg.model, cfg.alg.loop
    vocab = f", vocabulary {len(tokenizer)}" if tokenizer is not None else ""
    return (f"the default config{' with ' + ' '.join(args.override) if args.override else ''}: "
            f"GPT-2 {mcfg.build}{vocab}, {mcfg.max_length} tokens; `alg.loop` batch_size "
            f"{loop.batch_size}, n_edits {loop.n_edits}; edit_on {cfg.alg.train.edit_on}; "
            f"project_keys {cfg.alg.editor.project_keys}; random weights; device {platform_}.")


def _ratio_note(a, ta, loss_a, b, tb, loss_b, np, rtol: float = 1e-4) -> str:
    ratio = common.median(tb) / common.median(ta)
    same = np.isclose(loss_a, loss_b, rtol=rtol)
    return (f"{b} / {a} = {ratio:.2f}x; the loss after the last step agrees ({loss_a:.6f} vs "
            f"{loss_b:.6f}: {'equal' if same else 'DIFFERENT'} to {rtol:g}).")


def _report(args, rows, notes) -> None:
    table = common.markdown_table(rows, ["step", "median_s", "min_s", "steps_per_s",
                                         "first_call_s", "load1"])
    common.report("The offline default's meta-training step", table, notes,
                  record=not args.no_record)


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    main()
