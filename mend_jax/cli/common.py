"""What the CLIs share: a trained editor and its base model, from a run or an editor folder."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mend_jax.artifacts import load_editor, read_editor_config
from mend_jax.models import Model, load_pretrained


@dataclass
class Loaded:
    model: Model
    tokenizer: Any
    editor: Any
    state: dict
    max_length: int | None
    base_model: str | None   # the base model's name or folder
    editor_source: str       # the run or editor folder


def add_source_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", nargs="?", default=None,
                   help="a train.py output folder (its best editor is used)")
    p.add_argument("--editor", default=None,
                   help="an editor folder (RUN/editor, or one written by save_editor) instead")
    p.add_argument("--model", default=None,
                   help="with --editor: the base model, a folder holding a tokenizer or a hub "
                        "name (default: the one editor.json names, e.g. RUN/base_model)")


def load_source(p: argparse.ArgumentParser, args: argparse.Namespace,
                overrides: dict | None = None):
    """(cfg or None, prepared run or None, Loaded) from `run_dir` or `--editor [--model]`;
    `overrides` (dotted keys) change a run folder's config before its editor is built."""
    if (args.run_dir is None) == (args.editor is None):
        p.error("give a run folder or --editor DIR (not both)")
    if args.run_dir is not None:
        if args.model:
            p.error("--model goes with --editor; a run folder knows its model")
        from mend_jax.pipeline import load_run

        cfg, prep, mend, state = load_run(args.run_dir, overrides)
        base = cfg.model.name
        if base is None and (Path(args.run_dir) / "base_model").is_dir():
            base = str(Path(args.run_dir) / "base_model")
        return cfg, prep, Loaded(prep.model, prep.tokenizer, mend, state,
                                 cfg.model.max_length, base, args.run_dir)
    meta = read_editor_config(args.editor)
    name = args.model or meta["base_model"].get("name_or_path")
    if not name:
        p.error(f"{args.editor}/editor.json names no base model; pass --model")
    model = load_pretrained(name)
    if model.tokenizer is None:
        p.error(f"{name}: no tokenizer files next to the checkpoint")
    if model.tokenizer.pad_token_id is None:
        model.tokenizer.pad_token = model.tokenizer.eos_token
    editor, state = load_editor(args.editor, model)
    return None, None, Loaded(model, model.tokenizer, editor, state, meta.get("max_length"),
                              name, args.editor)


def positive_int(text: str) -> int:
    """argparse type of a count or a length: an integer >= 1 (0 would mean "the default")."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value
