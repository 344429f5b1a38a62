"""The offline default's own meta-training step (`python train.py`'s shapes and batches): the
jitted step with the edit passes' logits at the labelled positions (as the training loop runs
it) against the same step with full logits, alternating in one process; or (`--compare
lapack-threads`) the loop's step with one OpenBLAS thread (as the command-line tools start it)
against OpenBLAS with a thread per core, switched call by call with threadpoolctl: on CPU JAX runs
its LAPACK calls (the Cholesky solves of `alg.editor.project_keys`) through SciPy's OpenBLAS.

The base model is the default's GPT-2 shape with random weights (timing does not depend on what
it learned, and no cached model is needed); the batches are the loop's own (`loop.batch_at`) over
the default benchmark's training split and BPE tokenizer. Usage:

    python bench/bench_default_step.py --steps 50 --warmup 5
    python bench/bench_default_step.py --steps 20 --warmup 3 --compare lapack-threads
"""

from __future__ import annotations

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
                        "threads")
    args = p.parse_args(argv)
    if args.small:
        args.override = ["data.n_val=20", "data.n_test=20",
                         *args.override]

    import jax
    import numpy as np
    import transformers

    from mend_jax.config import load_config
    from mend_jax.loop import batch_at, label_width
    from mend_jax.metrics import POSITIONS
    from mend_jax.models import from_config
    from mend_jax.offline import benchmark_texts, build_geonames_benchmark, build_tokenizer
    from mend_jax.pipeline import build_editor
    from mend_jax.training import MetaTrainer

    platform_ = common.setup_jax(args.matmul_precision)
    cfg = load_config(args.override)
    mcfg, dcfg, loop = cfg.model, cfg.data, cfg.alg.loop
    bench = build_geonames_benchmark(seed=cfg.seed, n_val=dcfg.n_val, n_test=dcfg.n_test,
                                     n_train=dcfg.n_train, edit_forms=dcfg.edit_forms)
    tokenizer = build_tokenizer(mcfg.tokenizer.kind, benchmark_texts(bench),
                                **mcfg.tokenizer.options())
    # the zsRE round trip of the pipeline is not needed for timing: the requests themselves
    with tempfile.TemporaryDirectory() as tmp:
        from mend_jax.data import load_requests
        from mend_jax.offline import write_benchmark

        paths = write_benchmark(bench, tmp)
        train = load_requests(paths["train.zsre"], "zsre")
    hf = transformers.GPT2Config(vocab_size=len(tokenizer), n_positions=mcfg.max_length,
                                 bos_token_id=tokenizer.bos_token_id,
                                 eos_token_id=tokenizer.eos_token_id,
                                 pad_token_id=tokenizer.pad_token_id, **mcfg.build)
    model = from_config(hf, seed=0, tokenizer=tokenizer)
    editor = build_editor(cfg, model)
    trainer = MetaTrainer(editor, cfg.alg.train)
    step = jax.jit(trainer.step, donate_argnums=0)
    width = label_width(train, tokenizer, max_length=mcfg.max_length, **model.pair_format)
    batches = [batch_at(train, tokenizer, seed=cfg.seed, step=i, batch_size=loop.batch_size,
                        n_edits=loop.n_edits, n_edits_dist=loop.n_edits_dist,
                        loc_neighbors=loop.loc_neighbors,
                        max_length=mcfg.max_length, positions_width=width,
                        **model.pair_format)
               for i in range(args.steps + args.warmup)]
    cores = os.cpu_count() or 1
    if args.compare == "logits":
        kinds = {"labelled positions only (the loop's default)": batches,
                 "every position": [{k: {kk: vv for kk, vv in v.items() if kk != POSITIONS}
                                     for k, v in b.items()} for b in batches]}
        threads = dict.fromkeys(kinds)
    else:
        kinds = {"one OpenBLAS thread (the CLIs' setting)": batches,
                 f"{cores} OpenBLAS threads (one per core)": batches}
        threads = dict(zip(kinds, (1, cores)))
    widths = sorted({int(b["edit_inner"][POSITIONS].shape[1]) for b in batches})

    state = {k: trainer.init(jax.random.key(0)) for k in kinds}
    times: dict[str, list[float]] = {k: [] for k in kinds}
    first: dict[str, float] = {}
    for i in range(args.steps + args.warmup):
        for kind, bs in kinds.items():
            with _blas_threads(threads[kind]):
                t = time.perf_counter()
                state[kind], metrics = step(state[kind], model.params, bs[i])
                jax.block_until_ready(metrics)
                dt = time.perf_counter() - t
            if i == 0:
                first[kind] = dt
            if i >= args.warmup:
                times[kind].append(dt)
    loss = {k: float(step(state[k], model.params, bs[-1])[1]["loss"]) for k, bs in kinds.items()}
    rows = [{"step": k, "median_s": common.median(v), "min_s": min(v),
             "steps_per_s": 1 / common.median(v), "first_call_s": first[k],
             "load1": common.load1()} for k, v in times.items()]
    (a, ta), (b, tb) = times.items()
    ratio = common.median(tb) / common.median(ta)
    same = np.isclose(loss[a], loss[b], rtol=1e-4)
    table = common.markdown_table(rows, ["step", "median_s", "min_s", "steps_per_s",
                                         "first_call_s", "load1"])
    notes = [
        f"the default config{' with ' + ' '.join(args.override) if args.override else ''}: "
        f"GPT-2 {mcfg.build}, vocabulary {len(tokenizer)}, {mcfg.max_length} tokens; "
        f"`alg.loop` batch_size {loop.batch_size}, n_edits {loop.n_edits}; "
        f"edit_on {cfg.alg.train.edit_on}; project_keys {cfg.alg.editor.project_keys}; "
        f"random weights; device {platform_}.",
        f"the two steps alternate on the same {args.steps} batches after {args.warmup} warm-up "
        f"steps each (first_call_s includes compilation); logit_positions width {widths} "
        "(the run's `loop.label_width`).",
        f"{b} / {a} = {ratio:.2f}x; the loss after the last step agrees "
        f"({loss[a]:.6f} vs {loss[b]:.6f}: {'equal' if same else 'DIFFERENT'} to 1e-4).",
    ]
    common.report("The offline default's meta-training step", table, notes,
                  record=not args.no_record)


def _blas_threads(n):
    """A context with OpenBLAS limited to n threads (n None: unchanged)."""
    import contextlib

    if n is None:
        return contextlib.nullcontext()
    from threadpoolctl import threadpool_limits

    return threadpool_limits(limits=n, user_api="blas")


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    main()
