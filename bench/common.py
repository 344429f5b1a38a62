"""Shared benchmark helpers: model shapes, synthetic batches, timing, memory, tables, RESULTS.md.

Benchmarks are scripts, not tests: they print a markdown table and (unless `--no-record`) append
it to `bench/RESULTS.md` with the exact command, the machine, the date and the load average.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
RESULTS = BENCH_DIR / "RESULTS.md"
RESULT_TAG = "BENCH_RESULT "  # a worker subprocess prints one line "BENCH_RESULT {json}"

if str(REPO) not in sys.path:  # the benches run from a checkout, mend_jax need not be installed
    sys.path.insert(0, str(REPO))


# ----------------------------------------------------------------------------- arguments
def base_parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--small", action="store_true", help="tiny configs for a quick smoke run")
    p.add_argument("--steps", type=int, default=5, help="timed repetitions (median reported)")
    p.add_argument("--warmup", type=int, default=2,
                   help="untimed repetitions first (the first one includes jit compilation)")
    p.add_argument("--no-record", action="store_true", help="do not append to bench/RESULTS.md")
    return p


# ----------------------------------------------------------------------------- model shapes
SEQ, SEQ_SMALL = 64, 16          # tokens per sequence (encoder side for T5)
DEC_SEQ, DEC_SEQ_SMALL = 16, 8   # T5 decoder (answer) length
TARGET_TOKENS = 10               # GPT-style edit target: the last 10 tokens (Wikitext setup)


def hf_config(model: str, small: bool):
    """The transformers config of a benchmark shape (dropout off: both frameworks run it off)."""
    import transformers

    if model == "gpt2":
        if small:
            return transformers.GPT2Config(vocab_size=256, n_positions=64, n_embd=64, n_layer=3,
                                           n_head=4, resid_pdrop=0.0, embd_pdrop=0.0,
                                           attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
        # GPT-2 small: 12 layers, d 768, 12 heads, vocab 50257 (the transformers defaults)
        return transformers.GPT2Config(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    if model == "t5":
        if small:
            return transformers.T5Config(vocab_size=256, d_model=64, d_kv=16, d_ff=128,
                                         num_layers=2, num_decoder_layers=2, num_heads=4,
                                         feed_forward_proj="relu", dropout_rate=0.0)
        # T5-small: 6+6 layers, d_model 512, d_ff 2048, 8 heads, vocab 32128
        return transformers.T5Config(vocab_size=32128, d_model=512, d_kv=64, d_ff=2048,
                                     num_layers=6, num_decoder_layers=6, num_heads=8,
                                     feed_forward_proj="relu", dropout_rate=0.0)
    raise ValueError(f"unknown model {model!r}; choose gpt2 or t5")


def shape_name(model: str, small: bool) -> str:
    return {("gpt2", False): "GPT-2 small", ("t5", False): "T5-small"}.get(
        (model, small), f"{model} (tiny)")


# ----------------------------------------------------------------------------- batches
def lm_batch(rng, vocab: int, n: int, seq: int, seq2seq: bool, dec_seq: int,
             all_labels: bool = False) -> dict[str, np.ndarray]:
    """Random tokens, no padding. Decoder-only: the last TARGET_TOKENS tokens are the labels
    (or every token with all_labels). Seq2seq: the decoder sequence is the target."""
    ids = rng.integers(1, vocab, (n, seq)).astype(np.int32)
    batch = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    if seq2seq:
        target = rng.integers(1, vocab, (n, dec_seq)).astype(np.int32)
        dec_in = np.concatenate([np.zeros((n, 1), np.int32), target[:, :-1]], 1)  # T5 start = pad
        batch.update(decoder_input_ids=dec_in, decoder_attention_mask=np.ones_like(dec_in),
                     labels=target)
    else:
        labels = ids.copy() if all_labels else np.full_like(ids, -100)
        if not all_labels:
            labels[:, -min(TARGET_TOKENS, seq - 1):] = ids[:, -min(TARGET_TOKENS, seq - 1):]
        batch["labels"] = labels
    return batch


def meta_batch(model: str, vocab: int, n_edit: int, n_loc: int, small: bool,
               seed: int = 0) -> dict[str, dict[str, np.ndarray]]:
    """An edit / equivalent / locality triple of random sequences (numpy, framework-neutral).

    The equivalent input shares the edit's target and differs in its prompt; the locality
    example is labelled on every token (a Wikitext-style passage), as in the reference."""
    rng = np.random.default_rng(seed)
    seq2seq = model == "t5"
    seq = SEQ_SMALL if small else SEQ
    dec = DEC_SEQ_SMALL if small else DEC_SEQ
    inner = lm_batch(rng, vocab, n_edit, seq, seq2seq, dec)
    outer = {k: v.copy() for k, v in inner.items()}
    prompt = slice(0, seq // 2)  # rephrase: a new first half of the prompt, same target
    outer["input_ids"][:, prompt] = rng.integers(1, vocab, outer["input_ids"][:, prompt].shape)
    loc = lm_batch(rng, vocab, n_loc, seq, seq2seq, dec, all_labels=True)
    return {"edit_inner": inner, "edit_outer": outer, "loc": loc}


# ----------------------------------------------------------------------------- timing
def time_calls(fn: Callable[[], object], steps: int, warmup: int,
               block: Callable[[object], object] = lambda x: x) -> tuple[list[float], float]:
    """(timed seconds per call, seconds of the first warm-up call incl. compilation)."""
    first = 0.0
    for i in range(warmup):
        t = time.perf_counter()
        block(fn())
        if i == 0:
            first = time.perf_counter() - t
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        block(fn())
        times.append(time.perf_counter() - t)
    return times, first


def aot_compile(jitted, *args):
    """(compiled executable, seconds to lower and compile): compile without running once."""
    t = time.perf_counter()
    compiled = jitted.lower(*args).compile()
    return compiled, time.perf_counter() - t


def median(xs: Sequence[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def load1() -> float:
    return round(os.getloadavg()[0], 2)


# ----------------------------------------------------------------------------- memory
# Peak memory on CPU is the process's peak resident set size (VmHWM in /proc/self/status):
# XLA allocates outside Python's allocator, so tracemalloc sees nothing and getrusage cannot be
# reset. Each framework/config runs in its own subprocess so peaks never mix; writing "5" to
# /proc/self/clear_refs resets VmHWM to the current RSS (Linux >= 4.0), so a peak can be taken
# over the timed steps only, after compilation; glibc's malloc_trim first hands freed heap pages
# (compiler scratch, init transients) back to the OS so they do not count as resident.
def proc_status_kb() -> dict[str, int]:
    out = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(("VmHWM", "VmRSS")):
                    key, val = line.split(":", 1)
                    out[key] = int(val.split()[0])
    except OSError:
        pass
    return out


def reset_peak() -> bool:
    """Trim the heap and reset VmHWM to the current RSS; False where that is not possible."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def mib(kb: float) -> float:
    return round(kb / 1024, 1)


# ----------------------------------------------------------------------------- subprocesses
def emit(result: dict) -> None:
    """Worker side: hand a result dict to the parent."""
    print(RESULT_TAG + json.dumps(result), flush=True)


def run_worker(script: str, args: Sequence[str], env: dict | None = None,
               timeout: float = 3600) -> dict:
    """Run `python bench/<script> <args>` in a fresh process and return its emitted result."""
    full_env = dict(os.environ)
    full_env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    full_env.setdefault("TRANSFORMERS_VERBOSITY", "error")
    full_env.update(env or {})
    cmd = [sys.executable, str(BENCH_DIR / script), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=full_env, timeout=timeout,
                          cwd=REPO)
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_TAG):
            return json.loads(line[len(RESULT_TAG):])
    raise RuntimeError(f"worker {shlex.join(cmd)} failed (exit {proc.returncode}):\n"
                       f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")


# ----------------------------------------------------------------------------- output
def markdown_table(rows: Sequence[dict], columns: Sequence[str]) -> str:
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.4g}" if abs(v) < 1e4 else f"{v:.0f}"
        return str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def machine() -> dict:
    import jax

    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")),
                       cpu)
    except OSError:
        pass
    dev = jax.devices()[0]
    return {"platform": platform.platform(), "python": platform.python_version(), "cpu": cpu,
            "cpu_count": os.cpu_count(), "jax": jax.__version__,
            "jax_device": f"{dev.platform}:{dev.device_kind} x{jax.device_count()}"}


def command_line() -> str:
    argv = [os.path.relpath(sys.argv[0], REPO) if os.path.exists(sys.argv[0]) else sys.argv[0],
            *sys.argv[1:]]
    return shlex.join(["python", *argv])


def report(title: str, table: str, notes: Sequence[str] = (), record: bool = True,
           extra_machine: dict | None = None) -> None:
    """Print the table and notes; append a dated section to bench/RESULTS.md when `record`."""
    m = dict(machine(), **(extra_machine or {}))
    date = _dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    header = [f"## {title}", "", f"- command: `{command_line()}`", f"- date: {date}",
              "- machine: " + ", ".join(f"{k} {v}" for k, v in m.items()),
              f"- load average at the end (1/5/15 min): "
              f"{', '.join(f'{x:.2f}' for x in os.getloadavg())}", ""]
    body = [table, ""] + [f"- {n}" for n in notes]
    text = "\n".join(header + body) + "\n"
    print(text)
    if record:
        new = not RESULTS.exists()
        with open(RESULTS, "a") as f:
            if new:
                f.write("# Benchmark results\n\nAppended by the scripts in `bench/` "
                        "(newest last). Timings are wall-clock medians; see each section's "
                        "notes for the method.\n\n")
            f.write(text + "\n")
        print(f"(appended to {os.path.relpath(RESULTS, REPO)})")
