"""Where the MEND meta-training step spends its time: the jitted step split into its parts.

Each part is compiled on its own and timed the way the step runs it, with XLA's own count of
its floating-point operations (`compiled.cost_analysis()`):

- capture: the edit example's forward + backward for (u, δ) of every edited weight;
- editor forward: statistics merge, normalisation, the editor networks, the rank-1 sums;
- editor forward + backward: the same, differentiated w.r.t. the editor's parameters (the
  cotangent of each update a fixed random matrix);
- loss passes: the edited model's forward on the equivalent input and the locality input, the
  base model's locality forward, NLL + KL, differentiated w.r.t. the edited weights (the
  backward that reaches the editor);
- optimizer: global-norm clip + Adam on the editor's parameters;
- step: `jax.jit(MetaTrainer.step)` whole. The parts overlap only in trivial work, so their sum
  against the step says what fusion across the parts saves (or costs).

Usage:

    python bench/profile_meta_step.py --model gpt2 --steps 5
    python bench/profile_meta_step.py --small --steps 2 --no-record     # smoke run
"""

from __future__ import annotations

import common


def main(argv=None) -> None:
    p = common.base_parser(__doc__.splitlines()[0])
    p.add_argument("--model", choices=["gpt2", "t5"], default="gpt2")
    p.add_argument("--n-edits", type=int, default=1,
                   help="edit requests per step (their tokens pooled into one edit)")
    p.add_argument("--full-logits", action="store_true",
                   help="compute the edit passes' logits at every position (by default only "
                        "where a label is predicted, as the library's training loop)")
    args = p.parse_args(argv)

    import jax
    import jax.numpy as jnp
    import optax

    platform_ = common.setup_jax(args.matmul_precision)

    from mend_jax.capture import capture, labelled_logits
    from mend_jax.editors import MEND, MENDConfig
    from mend_jax.metrics import loc_mask, locality_kl, masked_nll
    from mend_jax.models import from_config, get_path, model_inputs
    from mend_jax.training import MetaTrainer, TrainConfig

    cfg = common.hf_config(args.model, args.small)
    model = from_config(cfg, seed=0)
    params = model.params
    editor = MEND(model, config=MENDConfig())
    trainer = MetaTrainer(editor, TrainConfig(accumulate=1))
    state = trainer.init(jax.random.key(0))
    batch = common.meta_batch(args.model, cfg.vocab_size, args.n_edits, args.n_edits, args.small)
    if not args.full_logits:  # as the library's training loop: the edit heads at the labels only
        batch = common.with_positions(batch)
    batch = jax.tree.map(jnp.asarray, batch)
    names = editor.layout.inner_params
    paths = [model.names.path(n) for n in names]
    shift = model.shift_labels
    _, captured, _ = jax.jit(lambda p, b: capture(model, p, b, names))(params,
                                                                       batch["edit_inner"])
    estate = state["editor"]
    probes = {n: jax.random.normal(jax.random.key(i), get_path(params, q).shape)
              for i, (n, q) in enumerate(zip(names, paths))}

    def editor_fwd(ep, stats, cap):
        return editor.pseudo_gradients(ep, stats, cap, train=True)

    def editor_fwd_bwd(ep, stats, cap):
        def scalar(ep):
            updates, _ = editor.pseudo_gradients(ep, stats, cap, train=True)
            return sum(jnp.vdot(updates[n], probes[n]) for n in names)

        return jax.grad(scalar)(ep)

    def loss_passes(updates, p, b):
        def loss(updates):
            new = editor.apply_updates(p, updates)
            outer, loc = b["edit_outer"], b["loc"]
            edit_loss = masked_nll(*labelled_logits(model, new, outer), shift)
            base = jax.lax.stop_gradient(model.logits(p, *model_inputs(loc)))
            post = model.logits(new, *model_inputs(loc))
            return 0.1 * edit_loss + locality_kl(base, post, loc_mask(loc, model.seq2seq))

        return jax.value_and_grad(loss)(updates)

    updates0 = {n: jnp.zeros_like(get_path(params, q)) for n, q in zip(names, paths)}
    grads0 = jax.tree.map(jnp.ones_like, estate["params"])

    def optimizer(g, opt_state, ep):
        upd, opt_state = trainer.optimizer.update(g, opt_state, ep)
        return optax.apply_updates(ep, upd), opt_state

    parts = [
        ("capture", lambda p, b: capture(model, p, b, names)[:2], (params, batch["edit_inner"])),
        ("editor forward", editor_fwd, (estate["params"], estate["stats"], captured)),
        ("editor forward + backward", editor_fwd_bwd,
         (estate["params"], estate["stats"], captured)),
        ("loss passes (forward + backward to the edited weights)", loss_passes,
         (updates0, params, batch)),
        ("optimizer (clip + Adam)", optimizer, (grads0, state["opt_state"], estate["params"])),
        ("step (jax.jit(MetaTrainer.step))", trainer.step, (state, params, batch)),
    ]
    rows = []
    for name, fn, fn_args in parts:
        compiled, compile_s = common.aot_compile(jax.jit(fn), *fn_args)
        times, _ = common.time_calls(lambda c=compiled, a=fn_args: c(*a), args.steps,
                                     args.warmup, jax.block_until_ready)
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, list) else cost
        flops = float((cost or {}).get("flops", float("nan")))
        rows.append({"part": name, "median_s": common.median(times), "min_s": min(times),
                     "gflop": flops / 1e9, "gflop_per_s": flops / 1e9 / common.median(times),
                     "compile_s": compile_s, "load1": common.load1()})
        print(f"  {name}: {rows[-1]['median_s']:.3f} s", flush=True)
    step_s = rows[-1]["median_s"]
    for r in rows:
        r["share_of_step"] = r["median_s"] / step_s
    # the editor's forward runs inside its forward + backward: do not count it twice
    counted = [r for r in rows[:-1] if r["part"] != "editor forward"]
    total = sum(r["median_s"] for r in counted)
    table = common.markdown_table(rows, ["part", "median_s", "min_s", "share_of_step", "gflop",
                                         "gflop_per_s", "compile_s", "load1"])
    notes = [
        f"model: {common.shape_name(args.model, args.small)}, random weights; "
        f"{args.n_edits} edit + {args.n_edits} equivalent + {args.n_edits} locality "
        f"sequence(s) (`bench/common.py`'s meta_batch); MENDConfig() defaults (rank 1920, "
        "shared, norm); TrainConfig(accumulate=1); edit passes' logits "
        + ("at every position." if args.full_logits else "at the labelled positions only."),
        f"each part compiled on its own, median (and min) of {args.steps} calls after "
        f"{args.warmup} warm-up calls, blocked until ready; gflop is XLA's cost analysis of "
        "the compiled part; device: " + common.jax_device_name() + ".",
        f"capture + editor forward/backward + loss passes + optimizer = {total:.3f} s against "
        f"the whole step's {step_s:.3f} s ({total / step_s:.2f}x).",
    ]
    if platform_ != "cpu":
        notes.append(common.precision_note(args.matmul_precision, torch=False))
    common.report(f"Meta-training step profile ({'small' if args.small else 'full'} shape, "
                  f"{args.n_edits} edit(s){', full logits' if args.full_logits else ''})",
                  table, notes, record=not args.no_record)


if __name__ == "__main__":
    main()
