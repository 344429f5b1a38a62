"""Arithmetic floors of the speed targets: XLA's FLOP counts of the compiled programs and this
machine's matmul rate, so a measured ratio can be read against the best the arithmetic allows.

Rows (`compiled.cost_analysis()["flops"]`, the XLA program each benchmark times):
- GPT-2 small, k edits of 16 tokens (`bench_edit_latency.py`'s shapes): the edit returning the
  edited weights, its capture pass, the editor networks + update on captured (u, δ), and the
  forward+backward for the edited weights (the latency target's floor);
- the offline default's shape, 1 and k = 1000 edits in one call (`bench_many_edits.py`'s
  shapes), per aggregate.
`matmul_gflops`: a jitted float32 2048×2048 product on the default backend (median of 5).

    python bench/flop_bounds.py
    python bench/flop_bounds.py --small --no-record     # smoke run
"""

from __future__ import annotations

import common


def main(argv=None) -> None:
    p = common.base_parser(__doc__.splitlines()[0])
    p.add_argument("--edits", default="1,10", help="GPT-2 edit sizes (comma-separated)")
    p.add_argument("--many", type=int, default=1000, help="k of the one-call rows")
    args = p.parse_args(argv)

    import jax
    import jax.numpy as jnp
    import numpy as np

    common.setup_jax(args.matmul_precision)
    from bench_many_edits import INNER, aggregate_variants, default_shape_model, request_batch

    from mend_jax.capture import capture
    from mend_jax.editors import MEND, MENDConfig
    from mend_jax.models import from_config, get_path

    def gflop(fn, *a) -> float:
        cost = jax.jit(fn).lower(*a).compile().cost_analysis()
        cost = cost[0] if isinstance(cost, list) else cost
        return float(cost["flops"]) / 1e9

    n = 512 if args.small else 2048
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    mm = jax.jit(lambda x: x @ x)
    times, _ = common.time_calls(lambda: mm(a), 5, 2, jax.block_until_ready)
    rate = 2 * n ** 3 / common.median(times) / 1e9

    rows = []
    cfg = common.hf_config("gpt2", args.small)
    model = from_config(cfg, seed=0)
    params = model.params
    editor = MEND(model, config=MENDConfig())
    state = editor.init(jax.random.key(0))
    paths = [model.names.path(nm) for nm in editor.layout.inner_params]

    grad_inner = common.inner_grad_fn(model, paths)

    def capture_fn(p, b):
        return capture(model, p, b, editor.layout.weights)

    for k in [int(x) for x in args.edits.split(",") if x]:
        batch = jax.tree.map(jnp.asarray, common.lm_batch(
            np.random.default_rng(k), cfg.vocab_size, k, 16, False, common.DEC_SEQ))
        captured = jax.jit(lambda p, b: capture_fn(p, b)[1])(params, batch)
        edit = gflop(lambda s, p, b: [get_path(editor.edit(s, p, b), q) for q in paths],
                     state, params, batch)
        cap = gflop(lambda p, b: capture_fn(p, b)[:2], params, batch)
        nets = gflop(lambda s, c: editor.pseudo_gradients(s["params"], s["stats"], c)[0],
                     state, captured)
        floor = gflop(grad_inner, params, batch)
        rows.append({"program": f"{common.shape_name('gpt2', args.small)}, {k} edit(s) of 16 "
                                "tokens", "edit_gflop": edit, "capture_gflop": cap,
                     "editor_update_gflop": nets, "floor_gflop": floor,
                     "edit/floor": edit / floor, "edit_s_at_peak": edit / rate})

    tiny = default_shape_model()
    tpaths = [tiny.names.path(nm) for nm in INNER]
    for name in ("sum", "lstsq"):
        ed = MEND(tiny, INNER, aggregate_variants()[name])
        st = ed.init(jax.random.key(0))
        per_k = {k: gflop(lambda s, p, b, ed=ed: [get_path(ed.edit(s, p, b), q) for q in tpaths],
                          st, tiny.params, request_batch(k, tiny.config.vocab_size))
                 for k in (1, args.many)}
        rows.append({"program": f"offline default's shape, {args.many} edits in one call, "
                                f"{name}", "edit_gflop": per_k[args.many],
                     "floor_gflop": per_k[1] * args.many,
                     "edit/floor": per_k[args.many] / (per_k[1] * args.many),
                     "edit_s_at_peak": per_k[args.many] / rate})

    table = common.markdown_table(rows, ["program", "edit_gflop", "capture_gflop",
                                         "editor_update_gflop", "floor_gflop", "edit/floor",
                                         "edit_s_at_peak"])
    notes = [
        f"matmul rate: {rate:.1f} GFLOP/s (jitted float32 {n}x{n} product, median of 5, "
        f"device {common.jax_device_name()}, load1 {common.load1():.2f}).",
        "GPT-2 rows: floor_gflop = forward + backward for the gradients of the edited weights "
        "(the edit-latency target's denominator); capture + editor_update = the edit's two "
        "stages compiled apart. One-call rows: floor_gflop = the single-edit program's FLOPs "
        "times k, i.e. the arithmetic of k single calls; edit/floor near 1 means batching saves "
        "no arithmetic, so on a machine where a single call is arithmetic-bound the speedup of "
        "one k-edit call is at most (a single call's time) / (its FLOPs at the matmul rate).",
        "edit_s_at_peak: the program's FLOPs at the matmul rate, a lower bound on its time.",
    ]
    common.report("Arithmetic floors of the speed targets (XLA FLOP counts)", table, notes,
                  record=not args.no_record)


if __name__ == "__main__":
    main()
