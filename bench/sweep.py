"""Grid search over train.py overrides, several seeds each, runs in parallel processes.

    python bench/sweep.py --grid alg.train.lr=1e-4,3e-4 alg.train.edit_on=outer,both \
        --seeds 0 1 --parallel 2 --out runs/sweep

Every combination of the `--grid` values (comma-separated per key) runs `train.py` with those
overrides plus `--set` ones, once per seed (`seed=` changes the benchmark split, the base model
and the editor's initialisation), evaluating only the methods in `--methods` (default: mend).
Prints a markdown table of the held-out metrics, mean ± std over seeds, best first by
edit_success − 10·max(drawdown − 0.02, 0); `--record` appends it to bench/RESULTS.md.
The base models are trained (and cached) one seed at a time before the parallel runs start.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
KEYS = ("edit_success", "generality", "drawdown", "locality_kl", "neighborhood_acc")


def combos(grid: list[str]) -> list[list[str]]:
    axes = []
    for item in grid:
        key, _, values = item.partition("=")
        if not values:
            raise SystemExit(f"--grid {item!r}: expected key=v1,v2,...")
        axes.append([f"{key}={v}" for v in values.split(",")])
    return [list(c) for c in itertools.product(*axes)] if axes else [[]]


def run_one(overrides: list[str], seed: int, out: Path, methods: str,
            log: Path) -> subprocess.Popen:
    args = [sys.executable, str(ROOT / "train.py"), *overrides, f"seed={seed}",
            f"out_dir={out}", f"eval.methods={methods}", "progress=false"]
    log.parent.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen(args, cwd=ROOT, stdout=log.open("w"), stderr=subprocess.STDOUT,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--grid", nargs="*", default=[], help="key=v1,v2,... (cartesian product)")
    p.add_argument("--set", nargs="*", default=[], help="overrides applied to every run")
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--parallel", type=int, default=1)
    p.add_argument("--methods", default="[mend]")
    p.add_argument("--out", default="runs/sweep")
    p.add_argument("--record", action="store_true", help="append the table to bench/RESULTS.md")
    args = p.parse_args(argv)

    out = Path(args.out).resolve()
    if out.exists() and any(out.iterdir()):
        raise SystemExit(f"{out}: exists and is not empty (results there would be mistaken for "
                         "this sweep's); choose another --out")
    jobs = [(c, s) for c in combos(args.grid) for s in args.seeds]
    # Train (and cache) each seed's base model once, before runs race for the same cache entry.
    for s in args.seeds:
        prep = [sys.executable, "-c",
                "import sys; from mend_jax.config import load_config; "
                "from mend_jax.pipeline import prepare; "
                "prepare(load_config(sys.argv[1:]), progress=False)",
                *args.set, f"seed={s}", f"out_dir={out / f'prep-{s}'}"]
        subprocess.run(prep, cwd=ROOT, check=True)

    t0, running, done = time.time(), [], {}
    queue = list(enumerate(jobs))
    while queue or running:
        while queue and len(running) < args.parallel:
            i, (c, s) = queue.pop(0)
            d = out / f"run{i:03d}"
            running.append((i, run_one(args.set + c, s, d, args.methods, d / "log.txt"), d))
        time.sleep(1)
        for item in list(running):
            i, proc, d = item
            if proc.poll() is not None:
                running.remove(item)
                res = d / "results.json"
                done[i] = json.loads(res.read_text()) if proc.returncode == 0 and res.exists() \
                    else None
                print(f"[{time.time() - t0:6.0f}s] run{i:03d} {' '.join(jobs[i][0])} "
                      f"seed={jobs[i][1]}: "
                      + ("FAILED, see " + str(d / "log.txt") if done[i] is None else
                         " ".join(f"{k}={done[i]['mend'][k]:.3f}" for k in KEYS[:3])),
                      flush=True)

    rows = []
    for c in combos(args.grid):
        got = [done[i]["mend"] for i, (cc, _) in enumerate(jobs) if cc == c and done[i]]
        if not got:
            rows.append((float("-inf"), c, None))
            continue
        stats = {k: (np.mean([g[k] for g in got if g[k] is not None] or [np.nan]),
                     np.std([g[k] for g in got if g[k] is not None] or [np.nan])) for k in KEYS}
        score = stats["edit_success"][0] - 10 * max(stats["drawdown"][0] - 0.02, 0)
        rows.append((score, c, (stats, len(got))))
    rows.sort(key=lambda r: -r[0])
    lines = ["| overrides | seeds | " + " | ".join(KEYS) + " |",
             "|---|---|" + "---|" * len(KEYS)]
    for _, c, got in rows:
        if got is None:
            lines.append(f"| {' '.join(c)} | 0 |" + " failed |" * len(KEYS))
            continue
        stats, n = got
        lines.append(f"| {' '.join(c) or '(defaults)'} | {n} | "
                     + " | ".join(f"{m:.3f} ± {s:.3f}" for m, s in (stats[k] for k in KEYS))
                     + " |")
    table = "\n".join(lines)
    print(table)
    if args.record:
        import platform

        import jax

        cmd = "python bench/sweep.py " + " ".join(sys.argv[1:])
        with (ROOT / "bench" / "RESULTS.md").open("a") as f:
            f.write(f"\n### sweep ({time.strftime('%Y-%m-%d')}, {platform.node()}, "
                    f"{jax.devices()[0].device_kind}, {time.time() - t0:.0f} s)\n\n"
                    f"`{cmd}` (common overrides: {' '.join(args.set) or 'none'})\n\n"
                    f"{table}\n")
    return 0 if all(v is not None for v in done.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
