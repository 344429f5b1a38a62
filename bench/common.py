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

# On a GPU, XLA by default preallocates 75% of the device's memory at start-up: device-memory
# numbers would be meaningless and a PyTorch process beside it would run short. Allocate on
# demand instead (read when jax's GPU backend starts, so it must be set before that; the workers
# measuring memory get it forced by `run_worker`).
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
# On CPU, JAX's LAPACK calls (Cholesky solves) go through SciPy's OpenBLAS, whose thread pool
# competes with XLA's for the cores (the default's step: 63 ms with the key projection, 35 ms with
# one OpenBLAS thread). One thread, as the command-line tools set it (`mend_jax/cli/__init__.py`);
# PyTorch's CPU build uses MKL and is not affected.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")


# ----------------------------------------------------------------------------- arguments
def base_parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--small", action="store_true", help="tiny configs for a quick smoke run")
    p.add_argument("--steps", type=int, default=5, help="timed repetitions (median reported)")
    p.add_argument("--warmup", type=int, default=2,
                   help="untimed repetitions first (the first one includes jit compilation)")
    p.add_argument("--no-record", action="store_true", help="do not append to bench/RESULTS.md")
    p.add_argument("--matmul-precision", choices=list(MATMUL_PRECISIONS), default="tf32",
                   help="float32 matmuls on a GPU (no effect on CPU): tf32 (default: both "
                        "frameworks may use TensorFloat-32, JAX's own GPU default), fp32 (full "
                        "float32 in both, PyTorch's own default), or default (each framework's "
                        "default: TF32 in JAX, float32 in PyTorch, an unequal comparison)")
    return p


def add_torch_device_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--torch-device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="where the PyTorch rows run (auto: cuda when torch.cuda.is_available())")


# ----------------------------------------------------------------------------- devices
# --matmul-precision -> (jax_default_matmul_precision or None to keep JAX's default,
#                        torch.set_float32_matmul_precision or None to keep PyTorch's)
MATMUL_PRECISIONS = {"tf32": ("tensorfloat32", "high"), "fp32": ("highest", "highest"),
                     "default": (None, None)}


def precision_note(precision: str, torch: bool = True) -> str:
    """A RESULTS.md note saying which float32 matmul precision a GPU run used."""
    if precision == "tf32":
        what = ("TensorFloat-32 allowed for float32 matmuls (jax_default_matmul_precision="
                "tensorfloat32" + (", torch.set_float32_matmul_precision('high')" if torch
                                   else "") + ")")
    elif precision == "fp32":
        what = ("full float32 matmuls (jax_default_matmul_precision=highest"
                + (", torch.set_float32_matmul_precision('highest')" if torch else "") + ")")
    else:
        what = ("each framework's default float32 matmul precision (JAX: TensorFloat-32 on the "
                "GPU" + (", PyTorch: full float32; not a like-for-like comparison" if torch
                         else "") + ")")
    return f"GPU matmul precision (--matmul-precision {precision}): {what}."


def setup_jax(precision: str) -> str:
    """Start JAX's runtime, apply --matmul-precision on a GPU; the backend's platform name."""
    import jax

    platform_ = jax.default_backend()
    jax_prec = MATMUL_PRECISIONS[precision][0]
    if platform_ != "cpu" and jax_prec is not None:
        jax.config.update("jax_default_matmul_precision", jax_prec)
    return platform_


def torch_device(choice: str = "auto"):
    """The torch.device for --torch-device (auto: cuda when PyTorch sees one)."""
    import torch

    if choice == "auto":
        choice = "cuda" if torch.cuda.is_available() else "cpu"
    if choice == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--torch-device cuda: PyTorch sees no CUDA device")
    return torch.device(choice)


def setup_torch(device, precision: str) -> None:
    """Apply --matmul-precision (CUDA only: on CPU 'high' may mean bfloat16 in some builds)."""
    import torch

    torch_prec = MATMUL_PRECISIONS[precision][1]
    if device.type == "cuda" and torch_prec is not None:
        torch.set_float32_matmul_precision(torch_prec)


def torch_sync(device) -> None:
    """Wait for the device's queued kernels (CUDA launches are asynchronous)."""
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def torch_device_name(device) -> str:
    import torch

    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    return "cpu"


def jax_device_name() -> str:
    import jax

    dev = jax.devices()[0]
    return "cpu" if dev.platform == "cpu" else f"{dev.platform}:{dev.device_kind}"


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


def inner_grad_fn(model, paths):
    """(params, batch) -> (NLL, [its gradients w.r.t. the weights at `paths`]): the forward +
    backward of the edited weights alone, the floor the edit benchmarks compare with."""
    import jax

    from mend_jax.metrics import masked_nll
    from mend_jax.models import get_path, model_inputs, set_path

    def grad_inner(params, batch):
        def loss(weights):
            p = params
            for path, w in zip(paths, weights):
                p = set_path(p, path, w)
            return masked_nll(model.logits(p, *model_inputs(batch)), batch["labels"],
                              not model.seq2seq)

        return jax.value_and_grad(loss)([get_path(params, path) for path in paths])

    return grad_inner


def with_positions(batch: dict) -> dict:
    """The meta batch with `logit_positions` on its edit parts (decoder-only models): mend-jax
    then runs the output head only where an edit label is predicted (`metrics.logit_view`)."""
    from mend_jax.metrics import POSITIONS, logit_positions, positions_width

    if "decoder_input_ids" in batch["edit_inner"]:
        return batch
    parts = ("edit_inner", "edit_outer")
    width = positions_width(*(batch[k]["labels"] for k in parts))
    return {**batch, **{k: {**batch[k], POSITIONS: logit_positions(batch[k]["labels"], width)}
                        for k in parts}}


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


def jax_device_memory() -> dict | None:
    """The first JAX device's allocator statistics, or None (CPU: XLA's host allocator keeps
    none; any backend without both bytes_in_use and peak_bytes_in_use)."""
    import jax

    dev = jax.devices()[0]
    if dev.platform == "cpu":
        return None
    try:
        stats = dev.memory_stats()
    except Exception:  # not every backend implements it
        return None
    if not stats or not {"bytes_in_use", "peak_bytes_in_use"} <= set(stats):
        return None
    return stats


# Each meter follows one worker: start() right after imports (the baseline), before_steps() after
# warm-up, finish() after the timed steps. All numbers are MiB relative to the baseline.
# finish() takes a callable giving the bytes one step allocates beyond its arguments
# (`step_buffer_bytes`); only JaxDeviceMeter uses it.
#   peak_steps_mib  peak over the timed steps (steady-state training)
#   peak_all_mib    peak over the whole worker (model init, compilation, warm-up included)
#   resident_mib    in use right before the timed steps (params, editor, optimizer state, batch)
class HostMeter:
    """Host resident set (VmHWM/VmRSS): where the framework computes on the CPU."""

    mem = "host RSS"

    def start(self) -> None:
        reset_peak()  # trim import garbage so the baseline is what stays resident
        self.base = proc_status_kb().get("VmRSS", 0)

    def before_steps(self) -> None:
        self.whole = proc_status_kb().get("VmHWM", 0)
        self.reset = reset_peak()
        self.resident = proc_status_kb().get("VmRSS", 0)

    def finish(self, step_buffers: Callable[[], float | None] | None = None) -> dict:
        hwm = proc_status_kb().get("VmHWM", 0)
        return {"mem": self.mem,
                "peak_steps_mib": mib(hwm - self.base) if self.reset else float("nan"),
                "peak_all_mib": mib(max(self.whole, hwm) - self.base),
                "resident_mib": mib(self.resident - self.base),
                "baseline_mib": mib(self.base)}


class TorchCudaMeter:
    """PyTorch's CUDA caching allocator: bytes handed to tensors (memory_allocated), not what the
    allocator reserves from the driver, and not the CUDA context."""

    mem = "GPU (torch)"

    def __init__(self, device):
        import torch

        self.torch, self.device = torch, device

    def start(self) -> None:
        torch_sync(self.device)
        self.base = self.torch.cuda.memory_allocated(self.device)

    def before_steps(self) -> None:
        cuda = self.torch.cuda
        torch_sync(self.device)
        self.whole = cuda.max_memory_allocated(self.device)
        self.resident = cuda.memory_allocated(self.device)
        cuda.reset_peak_memory_stats(self.device)

    def finish(self, step_buffers: Callable[[], float | None] | None = None) -> dict:
        torch_sync(self.device)
        peak = self.torch.cuda.max_memory_allocated(self.device)
        return {"mem": self.mem, "peak_steps_mib": mib((peak - self.base) / 1024),
                "peak_all_mib": mib((max(self.whole, peak) - self.base) / 1024),
                "resident_mib": mib((self.resident - self.base) / 1024),
                "baseline_mib": mib(self.base / 1024),
                "reserved_peak_mib": mib(self.torch.cuda.max_memory_reserved(self.device)
                                         / 1024)}


class JaxDeviceMeter:
    """XLA's device allocator (`jax.devices()[0].memory_stats()`), which has no peak reset.

    peak_all_mib is measured: peak_bytes_in_use at the end minus bytes_in_use at the baseline.
    resident_mib is measured: bytes_in_use right before the timed steps. peak_steps_mib is
    resident plus the step executable's own buffers from XLA's buffer assignment
    (`compiled.memory_analysis()`: temp + outputs not aliased to donated inputs), the memory a
    step allocates on top of what is resident; XLA GPU allocates these once per execution."""

    mem = "GPU (XLA)"

    def start(self) -> None:
        self.base = jax_device_memory()["bytes_in_use"]

    def before_steps(self) -> None:
        stats = jax_device_memory()
        self.resident, self.peak_before = stats["bytes_in_use"], stats["peak_bytes_in_use"]

    def finish(self, step_buffers: Callable[[], float | None] | None = None) -> dict:
        stats = jax_device_memory()  # before step_buffers(), in case that has to compile
        step_extra_bytes = step_buffers() if step_buffers is not None else None
        resident = self.resident - self.base
        steps = (resident + step_extra_bytes if step_extra_bytes is not None
                 else float("nan"))
        return {"mem": self.mem, "peak_steps_mib": mib(steps / 1024),
                "peak_all_mib": mib((stats["peak_bytes_in_use"] - self.base) / 1024),
                "resident_mib": mib(resident / 1024), "baseline_mib": mib(self.base / 1024),
                "step_buffers_mib": (mib(step_extra_bytes / 1024)
                                     if step_extra_bytes is not None else float("nan")),
                # the whole-run peak rose during the timed steps: then peak_all is a step's peak
                "peak_rose_in_steps": stats["peak_bytes_in_use"] > self.peak_before}


def step_buffer_bytes(jitted, *args) -> float | None:
    """Bytes a call of `jitted(*args)` allocates beyond its arguments: XLA's temp buffers plus
    the outputs that do not reuse a donated argument. The executable is the one already
    compiled by the jit call (lowering again hits jax's compilation cache)."""
    try:
        ma = jitted.lower(*args).compile().memory_analysis()
    except Exception:  # memory_analysis is not available everywhere
        return None
    if ma is None:
        return None
    return float(ma.temp_size_in_bytes + ma.output_size_in_bytes - ma.alias_size_in_bytes)


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
    full_env["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"  # real device-memory numbers on a GPU
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
    out = {"platform": platform.platform(), "python": platform.python_version(), "cpu": cpu,
           "cpu_count": os.cpu_count(), "jax": jax.__version__,
           "jax_device": f"{dev.platform}:{dev.device_kind} x{jax.device_count()}"}
    if dev.platform != "cpu":
        out["gpu"] = dev.device_kind
        version = getattr(dev.client, "platform_version", "")
        if version:
            out["jax_backend"] = version
    return out


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
