"""Edit latency: jitted `MEND.edit` vs one plain forward+backward of the base model (the floor).

An edit costs one forward/backward pass to capture (u, δ) plus the editor networks and the
rank-1 sums; the floor is the forward+backward alone on the same batch. Runs on JAX's default
backend (the GPU when jax has one). Usage:

    python bench/bench_edit_latency.py --edits 1,10,100 --steps 5
    python bench/bench_edit_latency.py --small --steps 2 --no-record     # smoke run
"""

from __future__ import annotations

import common


def main(argv=None) -> None:
    p = common.base_parser(__doc__.splitlines()[0])
    p.add_argument("--model", choices=["gpt2", "t5"], default="gpt2")
    p.add_argument("--edits", default="1,10,100", help="comma-separated numbers of edits")
    p.add_argument("--seq", type=int, default=None,
                   help="tokens per edit request (default 16, a zsRE-sized question + answer)")
    p.add_argument("--weights-only-max", type=int, default=10,
                   help="time edit_weights_only_s only up to this many edits")
    args = p.parse_args(argv)

    import jax
    import jax.numpy as jnp
    import numpy as np

    platform_ = common.setup_jax(args.matmul_precision)

    from mend_jax.capture import capture
    from mend_jax.editing import jit_edit
    from mend_jax.editors import MEND, MENDConfig
    from mend_jax.metrics import masked_nll
    from mend_jax.models import from_config, get_path, model_inputs

    seq = args.seq or 16
    cfg = common.hf_config(args.model, args.small)
    model = from_config(cfg, seed=0)
    params = model.params
    editor = MEND(model, config=MENDConfig())
    state = editor.init(jax.random.key(0))
    inner = editor.layout.inner_params
    paths = [model.names.path(n) for n in inner]
    shift = not model.seq2seq

    def nll(p, batch):
        return masked_nll(model.logits(p, *model_inputs(batch)), batch["labels"], shift)

    grad_inner = common.inner_grad_fn(model, paths)

    def edited_weights(s, p, b):
        new = editor.edit(s, p, b)
        return [get_path(new, path) for path in paths]

    calls = {
        "edit_s": jit_edit(editor),
        "edit_full_tree_s": jax.jit(editor.edit),
        "edit_weights_only_s": jax.jit(edited_weights),
        "capture_s": jax.jit(lambda s, p, b: capture(model, p, b, inner)[:2]),
        "fwd_bwd_inner_s": jax.jit(lambda s, p, b: grad_inner(p, b)),
        "fwd_bwd_all_s": jax.jit(lambda s, p, b: jax.value_and_grad(nll)(p, b)),
    }
    rows = []
    for k in [int(x) for x in args.edits.split(",") if x]:
        rng = np.random.default_rng(k)
        batch = jax.tree.map(jnp.asarray, common.lm_batch(
            rng, cfg.vocab_size, k, seq, model.seq2seq,
            common.DEC_SEQ_SMALL if args.small else common.DEC_SEQ))
        row = {"edits": k, "seq": seq}
        for name, fn in calls.items():
            if name == "edit_weights_only_s" and k > args.weights_only_max:
                continue
            if name == "edit_s":  # the library's edit: a jitted core and a host-side merge
                compiled, compile_s = fn, None
            else:
                compiled, compile_s = common.aot_compile(fn, state, params, batch)
            times, first = common.time_calls(lambda f=compiled, b=batch: f(state, params, b),
                                             args.steps, max(args.warmup, 1),
                                             jax.block_until_ready)
            row[name] = common.median(times)
            if name == "edit_s":
                row["edit_first_call_s"] = first
        row["edit/fwd_bwd_inner"] = row["edit_s"] / row["fwd_bwd_inner_s"]
        row["edit/fwd_bwd_all"] = row["edit_s"] / row["fwd_bwd_all_s"]
        row["load1"] = common.load1()
        print(f"  {k} edits: edit {row['edit_s']:.3f} s, fwd+bwd {row['fwd_bwd_inner_s']:.3f} s",
              flush=True)
        rows.append(row)

    table = common.markdown_table(rows, ["edits", "seq", "edit_s", "edit_full_tree_s",
                                         "edit_weights_only_s", "capture_s",
                                         "fwd_bwd_inner_s", "fwd_bwd_all_s",
                                         "edit/fwd_bwd_inner", "edit/fwd_bwd_all",
                                         "edit_first_call_s", "load1"])
    worst = max(r["edit/fwd_bwd_inner"] for r in rows)
    notes = [
        f"model: {common.shape_name(args.model, args.small)}, random weights; k edit requests of "
        f"{seq} tokens each (no padding, labels on the last {common.TARGET_TOKENS} tokens), "
        "edited in one call (their tokens pooled); fresh MENDConfig() editor (rank 1920).",
        "edit_s: the library's edit, `mend_jax.editing.jit_edit(editor)` (what `mend_jax.edit` "
        "and the evaluation run: capture + editor networks + W', the compiled program returning "
        "only the edited weights, merged into the parameter tree on the host); "
        "edit_full_tree_s: `jax.jit(MEND.edit)`, returning the full parameter tree (under jit "
        "every unchanged leaf is copied); "
        "edit_weights_only_s: the same edit returning only the edited weights (no copies; "
        f"timed up to {args.weights_only_max} edits); capture_s: the (u, δ) capture pass alone; "
        "fwd_bwd_inner_s: forward + backward for the gradients of the edited weights only (the "
        "tight floor: the backward stops at the lowest edited layer); fwd_bwd_all_s: forward + "
        "backward for every parameter (a plain training pass).",
        f"each function but edit_s compiled ahead of time (`jit(...).lower(...).compile()`; "
        f"edit_s compiles in its first call, edit_first_call_s), then median of {args.steps} "
        f"calls after {max(args.warmup, 1)} warm-up calls, blocked until ready "
        f"(jax.block_until_ready); device: "
        f"{common.jax_device_name()}.",
        "load1: 1-minute load average after the row (the cores are shared: compare ratios "
        "within a row, they are measured back to back).",
        f"target edit <= 1.2x forward+backward (inner-weight floor): "
        f"{'met' if worst <= 1.2 else 'NOT met'} (worst {worst:.2f}x).",
    ]
    if platform_ != "cpu":
        notes.append(common.precision_note(args.matmul_precision, torch=False))
    common.report(f"Edit latency ({'small' if args.small else 'full'} shape"
                  f"{'' if platform_ == 'cpu' else ', GPU'})", table, notes,
                  record=not args.no_record)


if __name__ == "__main__":
    main()
