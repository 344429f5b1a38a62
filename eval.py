"""Evaluate a trained editor (and the FT / FT+L baselines) on held-out edits.

    python eval.py runs/default                          # the run's test split
    python eval.py runs/default --n-edits 1 5 25 --plot  # batched edits, plot vs k
    python eval.py runs/default --data path.json --format counterfact
"""

import argparse
import sys
from pathlib import Path

from mend_jax.data import load_requests
from mend_jax.errors import cli_main
from mend_jax.evaluation import format_table, plot_vs_n_edits
from mend_jax.pipeline import evaluate_all, load_run, write_results


def main(argv=None) -> int:
    return cli_main(run, argv)


def run(argv) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("run_dir", help="a train.py output folder")
    p.add_argument("--split", default=None, help="train/val/test of the run's data")
    p.add_argument("--data", default=None, help="evaluate on this file instead of a split")
    p.add_argument("--format", default=None, help="format of --data (sniffed when omitted)")
    p.add_argument("--n-edits", type=int, nargs="+", default=None,
                   help="simultaneous edits per edit call (several values: one table each)")
    p.add_argument("--methods", nargs="+", default=None, help="mend untrained ft ft_l ft_kl")
    p.add_argument("--max-examples", type=int, default=None)
    p.add_argument("--plot", action="store_true", help="PNG of metrics vs number of edits")
    p.add_argument("--out", default=None, help="JSON output (default RUN/eval_results.json)")
    p.add_argument("--debug", action="store_true", help="show the traceback of an error")
    args = p.parse_args(argv)
    cfg, prep, mend, state = load_run(args.run_dir)
    if args.split:
        cfg["eval"]["split"] = args.split
    if args.max_examples:
        cfg["eval"]["max_examples"] = args.max_examples
    requests = load_requests(args.data, args.format) if args.data else None
    by_n = {}
    for k in args.n_edits or [cfg["eval"]["n_edits"]]:
        by_n[k] = evaluate_all(cfg, prep, mend, state, methods=args.methods, requests=requests,
                               n_edits=k)
        print(f"\n{k} simultaneous edit(s), {args.data or cfg['eval']['split']}:")
        print(format_table(by_n[k]))
    out = Path(args.out) if args.out else Path(args.run_dir) / "eval_results.json"
    single = len(by_n) == 1
    write_results(out, next(iter(by_n.values())) if single
                  else {str(k): v for k, v in by_n.items()})
    print(f"results written to {out}")
    if args.plot:
        png = plot_vs_n_edits(by_n, out.with_suffix(".png"))
        print(f"plot written to {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
