"""Meta-train a MEND editor, then evaluate it against the baselines on held-out edits.

    mend-train                                  # offline default (geonames facts)
    mend-train model=gpt2 data=zsre alg=mend    # a real model and dataset
    mend-train alg.loop.max_steps=500 out_dir=runs/x --resume
"""

import argparse
import sys

from mend_jax.config import load_config
from mend_jax.errors import cli_main
from mend_jax.pipeline import print_table, train


def main(argv=None) -> int:
    return cli_main(run, argv)


def run(argv) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("overrides", nargs="*", help="config overrides: group=name or a.b.c=value")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")
    p.add_argument("--debug", action="store_true", help="show the traceback of an error")
    args = p.parse_args(argv)
    cfg = load_config(args.overrides)
    run_dir, results = train(cfg, resume=args.resume)
    print_table(results)
    print(f"results written to {run_dir / 'results.json'}, the editor to {run_dir / 'editor'}")
    print(run_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
