"""Apply one edit with a trained editor and show the model before and after.

    python edit.py runs/default --prompt "The capital of France is" --target "Lyon" \
        --rephrase "France's capital city is" --neighbor "The capital of Spain is" \
        --save edited_model/
"""

import argparse
import logging
import sys

from mend_jax.editing import edit_report, format_report
from mend_jax.errors import cli_main
from mend_jax.models import save_pretrained
from mend_jax.pipeline import load_run


def main(argv=None) -> int:
    return cli_main(run, argv, log_level=logging.WARNING)


def run(argv) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("run_dir", help="a train.py output folder (its best editor is used)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--target", required=True, help="the new answer")
    p.add_argument("--rephrase", action="append", default=[], help="an equivalent prompt")
    p.add_argument("--neighbor", action="append", default=[], help="an unrelated prompt")
    p.add_argument("--max-new-tokens", type=int, default=6)
    p.add_argument("--save", default=None, help="export the edited model (Hugging Face format)")
    p.add_argument("--debug", action="store_true", help="show the traceback of an error")
    args = p.parse_args(argv)
    if not args.target.strip():
        p.error("--target must not be empty")
    cfg, prep, mend, state = load_run(args.run_dir)
    report, new_params = edit_report(
        prep.model, prep.tokenizer, mend, state, args.prompt, args.target,
        rephrases=args.rephrase, neighbors=args.neighbor,
        max_length=cfg["model"]["max_length"], max_new_tokens=args.max_new_tokens)
    print(format_report(report))
    if args.save:
        out = save_pretrained(prep.model, new_params, args.save)
        print(f"edited model written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
