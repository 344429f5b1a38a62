"""Apply one edit with a trained editor and show the model before and after.

    mend-edit runs/default --prompt "The capital of France is" --target "Madrid" \
        --rephrase "France's capital city is" --neighbor "The capital of Spain is" \
        --save edited_model/
    mend-edit --editor runs/default/editor --model runs/default/base_model --prompt ... --target ...

`--save` exports the edited model (Hugging Face format) with a model card (README.md): base
model, editor, the edit, and its measured reliability / generalization / locality.
"""

import argparse
import logging

from mend_jax.api import evaluate_edit
from mend_jax.artifacts import write_model_card
from mend_jax.cli.common import add_source_args, load_source, positive_int
from mend_jax.editing import edit_report, format_report
from mend_jax.errors import cli_main
from mend_jax.models import save_pretrained


def main(argv=None) -> int:
    return cli_main(run, argv, log_level=logging.WARNING)


def run(argv) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    add_source_args(p)
    p.add_argument("--prompt", required=True)
    p.add_argument("--target", required=True, help="the new answer")
    p.add_argument("--rephrase", action="append", default=[], help="an equivalent prompt")
    p.add_argument("--neighbor", action="append", default=[], help="an unrelated prompt")
    p.add_argument("--max-new-tokens", type=positive_int, default=6)
    p.add_argument("--max-length", type=positive_int, default=None,
                   help="token length of a prompt+target row (default: the editor's)")
    p.add_argument("--save", default=None, help="export the edited model (Hugging Face format)")
    p.add_argument("--debug", action="store_true", help="show the traceback of an error")
    args = p.parse_args(argv)
    for flag, texts in (("--prompt", [args.prompt]), ("--target", [args.target]),
                        ("--rephrase", args.rephrase), ("--neighbor", args.neighbor)):
        if any(not t.strip() for t in texts):
            p.error(f"{flag} must not be empty")
    _, _, src = load_source(p, args)
    max_length = args.max_length or src.max_length or 64
    report, new_params = edit_report(
        src.model, src.tokenizer, src.editor, src.state, args.prompt, args.target,
        rephrases=args.rephrase, neighbors=args.neighbor, max_length=max_length,
        max_new_tokens=args.max_new_tokens)
    print(format_report(report))
    if args.save:
        out = save_pretrained(src.model, new_params, args.save)
        # Locality on the neighbours: their base-model continuations, unchanged or not.
        loc = [(r["prompt"], r["before"]) for r in report["rows"]
               if r["kind"] == "neighbor" and r["before"].strip()]
        metrics = evaluate_edit(
            src.model, src.model.params, new_params, [args.prompt], [args.target],
            rephrases=[args.rephrase], locality_prompts=[q for q, _ in loc] if loc else None,
            locality_targets=[t for _, t in loc] if loc else None, tokenizer=src.tokenizer,
            max_length=max_length)
        metrics = {k: v for k, v in metrics.items() if k != "portability"}
        card = write_model_card(out, base_model=src.base_model, editor=src.editor_source,
                                edits=[{"prompt": args.prompt, "target": args.target,
                                        "rephrases": args.rephrase}], metrics=metrics)
        print(f"edited model written to {out} (model card {card.name})")
    return 0
