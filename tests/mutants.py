"""Do the tests fail when their subject breaks? One-line mutations of core files, each applied
to a fresh copy of the project, then the tests that guard that line; a mutant is killed when
they fail. Not collected by pytest (no test_ functions); run it by hand:

    python tests/mutants.py            # every mutant (minutes each on a small CPU)
    python tests/mutants.py 3 7        # only mutants 3 and 7 (indices as listed)
    python tests/mutants.py --list
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
COPIED = ("mend_jax", "tests", "train.py", "eval.py", "edit.py", "pyproject.toml")

# (file, original text, mutated text, pytest arguments that should fail)
MUTANTS = [
    ("mend_jax/capture.py", "return batch[param.mask_key]", 'return batch["attention_mask"]',
     ["tests/test_capture.py", "-k", "unequal and t5"]),
    ("mend_jax/models/t5.py", 'lin in ("k", "v")', 'lin in ("k",)',
     ["tests/test_capture.py", "-k", "cross_attention"]),
    ("mend_jax/metrics.py", "return hit.all(-1) & mask.any(-1)",
     "return ((jnp.argmax(logits, -1) == labels) & mask).any(-1)",
     ["tests/test_metrics.py", "-k", "every_token"]),
    ("mend_jax/evaluation.py", '"drawdown": acc_pre - acc_post', '"drawdown": acc_post - acc_pre',
     ["tests/test_metrics.py", "-k", "drawdown"]),
    ("mend_jax/evaluation.py", "(correct * weights).sum(-1)[has] / n[has]",
     "correct.mean(-1)[has]", ["tests/test_metrics.py", "-k", "weighted"]),
    ("mend_jax/training.py", "every_k_schedule=c.accumulate)",
     "every_k_schedule=c.accumulate, use_grad_mean=False)",
     ["tests/test_training.py", "-k", "accumulation"]),
    ("mend_jax/editors/mend.py", "(w.astype(jnp.float32) - update)",
     "(w.astype(jnp.float32) + update)", ["tests/test_editor.py"]),
    ("mend_jax/checkpoint.py", "cleanup_tmp_directories=True", "cleanup_tmp_directories=False",
     ["tests/test_checkpoint.py"]),
    ("mend_jax/checkpoint.py", "for step in steps:", "for step in steps[:1]:",
     ["tests/test_checkpoint.py"]),
    ("mend_jax/schema.py", '"alg.loop.val_every": 1', '"alg.loop.val_every": 0',
     ["tests/test_errors.py", "-k", "bad_values"]),
    ("mend_jax/schema.py",
     "return value if isinstance(value, int) and not isinstance(value, bool) else _NO",
     "return value if isinstance(value, (int, float)) and not isinstance(value, bool) else _NO",
     ["tests/test_errors.py", "-k", "bad_values"]),
    ("mend_jax/schema.py", "        if key not in names:", "        if False:",
     ["tests/test_errors.py", "-k", "bad_values"]),
    ("mend_jax/loop.py", 'return r["step"] < resume_step or', 'return r["step"] <= resume_step or',
     ["tests/test_train_sharded.py", "-k", "scalar"]),
    ("mend_jax/loop.py", "    check_requests([*train_requests, *val_requests], tokenizer,",
     "    (lambda *a, **k: None)([*train_requests, *val_requests], tokenizer,",
     ["tests/test_bad_inputs.py", "-k", "step_0"]),
    ("mend_jax/errors.py", "force=True)", "force=False)", ["tests/test_errors.py", "-k", "cli"]),
    ("mend_jax/pipeline.py", "    if isinstance(value, float) and not math.isfinite(value):\n"
     "        return None", "    if isinstance(value, float) and not math.isfinite(value):\n"
     "        return value", ["tests/test_errors.py", "-k", "strict_json"]),
    ("mend_jax/models/hf_io.py", "if n_bad:", "if False:",
     ["tests/test_errors.py", "-k", "non_finite"]),
    ("mend_jax/editing.py", "bad = (ids < 0) | (ids >= vocab)", "bad = ids > vocab",
     ["tests/test_errors.py", "-k", "edit"]),
    ("mend_jax/editing.py", "if limit is not None and part.shape[-1] > limit:",
     "if limit is not None and part.shape[-1] > limit + 1:",
     ["tests/test_errors.py", "-k", "positions"]),
    ("mend_jax/runs.py", "fcntl.LOCK_EX | fcntl.LOCK_NB", "fcntl.LOCK_SH | fcntl.LOCK_NB",
     ["tests/test_runs.py"]),
    ("mend_jax/runs.py", "    if resume and path.exists():", "    if False:",
     ["tests/test_runs.py"]),
    ("mend_jax/editors/mend.py", "solved = _spd_solve(whitening_matrix(acc, eps) / s, update)",
     "solved = update",
     ["tests/test_editor.py", "-k", "projected_keys"]),
    ("mend_jax/metrics.py",
     "return jnp.concatenate([labels[:, 1:], jnp.full_like(labels[:, :1], IGNORE)], 1)",
     "return labels", ["tests/test_metrics.py"]),
    ("mend_jax/cli/__init__.py", 'os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")',
     'os.environ.setdefault("OPENBLAS_NUM_THREAD", "1")',
     ["tests/test_errors.py", "-k", "openblas"]),
    ("mend_jax/cli/eval.py", "cfg = cfg.replace(**settings)", "cfg = cfg",
     ["tests/test_pipeline.py", "-m", "slow", "-k", "sets_the_baselines"]),
]


def _copy(dst: Path) -> None:
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", ".pytest_cache")
    for name in COPIED:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, dst / name, ignore=ignore)
        else:
            shutil.copy2(src, dst / name)


def run_mutant(i: int) -> bool:
    """True when the mutant is killed (its tests fail)."""
    rel, old, new, args = MUTANTS[i]
    with tempfile.TemporaryDirectory(prefix="mutant-") as tmp:
        work = Path(tmp)
        _copy(work)
        path = work / rel
        text = path.read_text()
        if text.count(old) != 1:
            raise SystemExit(f"mutant {i}: {rel} holds {old!r} {text.count(old)} times, not once")
        path.write_text(text.replace(old, new))
        env = dict(os.environ, PYTHONPATH=str(work), PYTHONDONTWRITEBYTECODE="1")
        proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p",
                               "no:cacheprovider", *args], cwd=work, env=env,
                              capture_output=True, text=True)
        if proc.returncode not in (0, 1):
            tail = (proc.stdout + proc.stderr)[-600:]
            raise SystemExit(f"mutant {i}: pytest exited {proc.returncode}\n{tail}")
        return proc.returncode == 1


def main(argv: list[str]) -> int:
    if "--list" in argv:
        for i, (rel, old, new, args) in enumerate(MUTANTS):
            print(f"{i:2d} {rel}: {old!r} -> {new!r}  [{' '.join(args)}]")
        return 0
    chosen = [int(a) for a in argv] or list(range(len(MUTANTS)))
    killed = 0
    for i in chosen:
        rel, old, new, _ = MUTANTS[i]
        start = time.time()
        dead = run_mutant(i)
        killed += dead
        print(f"{i:2d} {'killed ' if dead else 'SURVIVED'} {time.time() - start:5.0f}s  {rel}: "
              f"{old.strip()!r} -> {new.strip()!r}", flush=True)
    print(f"killed {killed}/{len(chosen)}")
    return 0 if killed == len(chosen) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
