"""Evaluate a trained editor (and the FT / FT+L baselines) on held-out edits.

    mend-eval runs/default                          # the run's test split
    mend-eval runs/default --n-edits 1 5 25 --plot  # batched edits, plot vs k
    mend-eval runs/default --n-edits 100 --sequential 10 --methods mend ultraedit ft
                                                    # lifelong: 10 batches of 100, one after
                                                    # another; retained ES after each batch
    mend-eval runs/default --data path.json --format counterfact
    mend-eval runs/default --methods ultraedit --set alg.baselines.ultraedit.lr=1e-2
                                                    # a baseline's options, set for this run
    mend-eval --editor runs/default/editor --model runs/default/base_model --data path.json
"""

import argparse
from pathlib import Path

import jax

from mend_jax.artifacts import editor_kind
from mend_jax.cli.common import add_source_args, load_source, positive_int
from mend_jax.config import load_config, parse_value
from mend_jax.data import load_requests
from mend_jax.editors import make_editor
from mend_jax.errors import ConfigError, cli_main
from mend_jax.evaluation import (
    evaluate_editor,
    evaluate_sequential,
    format_by_n_edits,
    format_by_relation,
    format_table,
    plot_sequential,
    plot_vs_n_edits,
)
from mend_jax.pipeline import (
    EDITOR_EVAL_OPTIONS,
    METHODS,
    TRAINED,
    evaluate_all,
    write_results,
)


def _evaluate_editor_folder(src, requests, methods, n_edits: int, max_length: int,
                            sequential: int | None = None) -> dict:
    """Every method on `requests`, the baselines with their default options."""
    results, trained = {}, editor_kind(src.editor)
    for method in methods:
        if method in TRAINED:
            if method not in ("mend", trained):
                raise ValueError(f"--methods {method}: {src.editor_source} holds a {trained} "
                                 "editor")
            # "mend" stands for the folder's trained editor whichever it is (as in a run's
            # evaluation); it is reported under its own kind
            method, editor, state = trained, src.editor, src.state
        elif method == "untrained":
            editor, state = src.editor, src.editor.init(jax.random.key(0))
        else:
            editor = make_editor(method, src.model, list(src.editor.layout.inner_params))
            state = editor.init(None)
        if sequential:
            results[method] = evaluate_sequential(
                src.model, editor, state, src.model.params, requests, src.tokenizer,
                n_edits=n_edits, n_batches=sequential, max_length=max_length)
        else:
            results[method] = evaluate_editor(src.model, editor, state, src.model.params,
                                              requests, src.tokenizer, n_edits=n_edits,
                                              max_length=max_length)
    return results


# the trained editor's evaluation-time options, as config keys
EDITOR_EVAL_KEYS = tuple(f"alg.editor.{k}" for k in EDITOR_EVAL_OPTIONS)


def _eval_settings(p: argparse.ArgumentParser, args) -> dict:
    """`--set KEY=VALUE` as {dotted key: parsed value}; only the baselines' options and the
    editor's evaluation-time options can change after training, and only a run folder has a
    config to change."""
    if args.settings and args.run_dir is None:
        p.error("--set needs a run folder (an editor folder has no baseline config)")
    settings = {}
    for item in args.settings:
        key, sep, raw = item.partition("=")
        if not sep or not raw:
            p.error(f"--set {item!r}: expected KEY=VALUE")
        if not key.startswith("alg.baselines.") and key not in EDITOR_EVAL_KEYS:
            p.error(f"--set {key}: only the baselines' options (alg.baselines.<method>.<key>) "
                    f"and the editor's evaluation-time options ({', '.join(EDITOR_EVAL_KEYS)}) "
                    "can be set at evaluation; the editor is as the run trained it")
        settings[key] = parse_value(raw)
    if settings:  # checked against the schema before a run is loaded
        try:
            load_config(args.settings)
        except ConfigError as e:
            p.error(f"--set: {e}")
    return settings


def main(argv=None) -> int:
    return cli_main(run, argv)


def run(argv) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    add_source_args(p)
    p.add_argument("--split", default=None, choices=("train", "val", "test"),
                   help="the run's data split to evaluate")
    p.add_argument("--data", default=None, help="evaluate on this file instead of a split")
    p.add_argument("--format", default=None, help="format of --data (sniffed when omitted)")
    p.add_argument("--n-edits", type=positive_int, nargs="+", default=None,
                   help="simultaneous edits per edit call (several values: one table each)")
    p.add_argument("--methods", nargs="+", default=None, choices=METHODS,
                   help="mend untrained ultraedit ft ft_l ft_kl (with --editor: default mend)")
    p.add_argument("--sequential", type=positive_int, default=None, metavar="T",
                   help="lifelong editing: T batches of --n-edits edits, each applied to the "
                        "model the previous one produced; reports what is retained at the end")
    p.add_argument("--set", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                   dest="settings",
                   help="with a run folder: override the baselines' options for this "
                        "evaluation (keys under alg.baselines., e.g. "
                        "alg.baselines.ultraedit.lr=1e-2) or the trained editor's "
                        "evaluation-time options (alg.editor.capture_loss=per_request: k "
                        "requests' gradients each as if edited alone; "
                        "alg.editor.chunk_tokens=N; alg.editor.aggregate=request_lstsq "
                        "with alg.editor.request_lambda=L and request_preserve=N: each of k "
                        "requests' own update solved jointly on their keys, keeping N training "
                        "facts' keys still; alg.editor.preserve_weight=W: those facts' keys "
                        "in the key projection too; alg.editor.lifelong=true with "
                        "--sequential: later edits leave earlier edits' keys alone); the "
                        "trained parameters are as trained")
    p.add_argument("--max-examples", type=positive_int, default=None)
    p.add_argument("--max-length", type=positive_int, default=None,
                   help="with --editor: token length of a row (default: the editor's)")
    p.add_argument("--plot", action="store_true", help="PNG of metrics vs number of edits")
    p.add_argument("--out", default=None,
                   help="JSON output (default RUN/eval_results.json, with --editor "
                        "./eval_results.json)")
    p.add_argument("--debug", action="store_true", help="show the traceback of an error")
    args = p.parse_args(argv)
    if args.editor and not args.data:
        p.error("--editor needs --data (a run folder has its own splits)")
    if args.out and Path(args.out).is_dir():
        p.error(f"--out {args.out} is a folder; expected a .json file to write")
    if args.out:  # before the evaluation, not after it: a bad --out fails at once
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    settings = _eval_settings(p, args)
    cfg, prep, src = load_source(p, args, {k: v for k, v in settings.items()
                                           if k in EDITOR_EVAL_KEYS})
    requests = load_requests(args.data, args.format) if args.data else None
    if cfg is not None:
        if args.split:
            cfg = cfg.replace(**{"eval.split": args.split})
        if args.max_examples:
            cfg = cfg.replace(**{"eval.max_examples": args.max_examples})
        if settings:
            cfg = cfg.replace(**settings)
    elif args.max_examples:
        requests = requests[: args.max_examples]
    by_n = {}
    for k in args.n_edits or [cfg.eval.n_edits if cfg else 1]:
        if cfg is not None:
            by_n[k] = evaluate_all(cfg, prep, src.editor, src.state, methods=args.methods,
                                   requests=requests, n_edits=k, sequential=args.sequential)
        else:
            by_n[k] = _evaluate_editor_folder(src, requests, args.methods or ["mend"], k,
                                              args.max_length or src.max_length or 64,
                                              sequential=args.sequential)
        where = args.data or cfg.eval.split
        if args.sequential:
            print(f"\n{args.sequential} sequential batches of {k} edit(s), {where}; "
                  "every edit re-measured on the final model:")
        else:
            print(f"\n{k} simultaneous edit(s), {where}:")
        print(format_table(by_n[k]))
        by_relation = format_by_relation(by_n[k])
        if by_relation and not args.sequential:
            print(f"\n{k} simultaneous edit(s) by relation:")
            print(by_relation)
        if args.sequential:
            for method, r in by_n[k].items():
                print(f"  retained ES after each batch, {method}: "
                      + " ".join(f"{v:.3f}" for v in r["retained_curve"]))
                print(f"  drawdown after each batch, {method}: "
                      + " ".join(f"{v:.3f}" for v in r["drawdown_curve"]))
    out = Path(args.out) if args.out else (Path(args.run_dir) / "eval_results.json"
                                           if args.run_dir else Path("eval_results.json"))
    single = len(by_n) == 1
    if not single:
        print("\nevery k side by side (each group of k requests edited together from the base "
              "weights):")
        print(format_by_n_edits(by_n))
    write_results(out, next(iter(by_n.values())) if single
                  else {str(k): v for k, v in by_n.items()})
    print(f"results written to {out}")
    if args.plot and args.sequential:
        png = plot_sequential(by_n, out.with_suffix(".png"))
        print(f"plot written to {png}")
    elif args.plot:
        png = plot_vs_n_edits(by_n, out.with_suffix(".png"))
        print(f"plot written to {png}")
    return 0
