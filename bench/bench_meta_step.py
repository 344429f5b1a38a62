"""MEND meta-training step: mend-jax (`jax.jit(trainer.step)`) vs the PyTorch reference-style step.

Also plain fine-tuning (one forward+backward and an Adam step) for the memory comparison.
Every framework/config runs in its own subprocess, so compile caches and peak-memory marks never
mix. mend-jax runs on JAX's default backend (the GPU when jax has one); the PyTorch rows on
`--torch-device` (auto: CUDA when PyTorch sees it). On a GPU, memory is the device allocator's,
on the CPU the process's resident set (see `common.py`'s meters). Usage:

    python bench/bench_meta_step.py --model both --steps 5
    python bench/bench_meta_step.py --small --steps 2 --no-record     # smoke run
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import common

# name -> (framework, what)
WORKERS = {
    "jax-mend": ("mend-jax", "MEND meta-step"),
    "jax-mend-full": ("mend-jax", "MEND meta-step, full logits"),
    "jax-mend-adafactor": ("mend-jax", "MEND meta-step, Adafactor"),
    "torch-mend": ("pytorch", "MEND meta-step"),
    "jax-ft-inner": ("mend-jax", "fine-tune inner weights"),
    "torch-ft-inner": ("pytorch", "fine-tune inner weights"),
    "jax-ft-all": ("mend-jax", "fine-tune all weights"),
    "torch-ft-all": ("pytorch", "fine-tune all weights"),
}
FT_LR = 1e-5


# ----------------------------------------------------------------------------- workers
def _jax_step(worker: str, model_kind: str, small: bool, n_edits: int = 1):
    """(call, block, describe, analyse) for a mend-jax worker; analyse() gives the bytes
    a step allocates beyond its arguments (XLA's buffer assignment). Every mend-jax worker but
    jax-mend-full computes the edit passes' logits at the labelled positions alone (as the
    library's training loop does); jax-mend-full computes them everywhere."""
    import jax
    import jax.numpy as jnp
    import optax

    from mend_jax.capture import labelled_logits
    from mend_jax.editors import MEND, MENDConfig
    from mend_jax.metrics import masked_nll
    from mend_jax.models import from_config, get_path, set_path
    from mend_jax.training import MetaTrainer, TrainConfig

    cfg = common.hf_config(model_kind, small)
    model = from_config(cfg, seed=0)
    params = model.params
    batch = common.meta_batch(model_kind, cfg.vocab_size, n_edits, n_edits, small)
    if worker != "jax-mend-full":
        batch = common.with_positions(batch)
    batch = jax.tree.map(jnp.asarray, batch)
    if worker.startswith("jax-mend"):
        optimizer = "adafactor" if worker == "jax-mend-adafactor" else "adam"
        trainer = MetaTrainer(MEND(model, config=MENDConfig()),
                              TrainConfig(accumulate=1, optimizer=optimizer))
        box = {"state": trainer.init(jax.random.key(0))}
        step = jax.jit(trainer.step, donate_argnums=0)

        def call():
            box["state"], metrics = step(box["state"], params, batch)
            return metrics

        return call, jax.block_until_ready, lambda m: {"loss": float(m["loss"]),
                                                       "skipped": float(m["skipped"])}, (
            lambda: common.step_buffer_bytes(step, box["state"], params, batch))

    names = model.default_inner_params() if worker == "jax-ft-inner" else None
    paths = ([model.names.path(n) for n in names] if names is not None
             else None)
    weights = ({str(i): get_path(params, p) for i, p in enumerate(paths)} if paths is not None
               else params)
    opt = optax.adam(FT_LR)
    inner = batch["edit_inner"]

    def ft_step(ft_state, params, batch):
        weights, opt_state = ft_state

        def loss(w):
            p = w if paths is None else params
            if paths is not None:
                for i, path in enumerate(paths):
                    p = set_path(p, path, w[str(i)])
            return masked_nll(*labelled_logits(model, p, batch), not model.seq2seq)

        value, grads = jax.value_and_grad(loss)(weights)
        updates, opt_state = opt.update(grads, opt_state, weights)
        return (optax.apply_updates(weights, updates), opt_state), value

    if paths is None:  # all weights: the params are the state, copy so donation is safe
        weights = jax.tree.map(jnp.copy, weights)
    box = {"state": (weights, opt.init(weights))}
    step = jax.jit(ft_step, donate_argnums=0)

    def call():
        box["state"], value = step(box["state"], params, inner)
        return value

    return call, jax.block_until_ready, lambda v: {"loss": float(v)}, (
        lambda: common.step_buffer_bytes(step, box["state"], params, inner))


def _torch_step(worker: str, model_kind: str, small: bool, device, n_edits: int = 1):
    """(call, block, describe, analyse) for a PyTorch worker on `device`."""
    import torch
    import torch_mend
    import transformers

    from mend_jax.editors import MENDConfig
    from mend_jax.models import get_architecture
    from mend_jax.training import TrainConfig

    torch.manual_seed(0)
    cfg = common.hf_config(model_kind, small)
    cls = (transformers.T5ForConditionalGeneration if model_kind == "t5"
           else transformers.GPT2LMHeadModel)
    model = cls(cfg).eval().to(device)
    arch = get_architecture(cfg.model_type)
    inner = arch.default_inner_params(arch.config_from_hf(cfg))
    batch = torch_mend.to_torch(common.meta_batch(model_kind, cfg.vocab_size, n_edits, n_edits,
                                                  small), device)

    def block(x):  # CUDA kernels run asynchronously: the call is done when the device is
        common.torch_sync(device)
        return x

    if worker == "torch-mend":
        trainer = torch_mend.TorchMEND(model, inner, MENDConfig(), TrainConfig(accumulate=1))
        return (lambda: trainer.step(batch)), block, (
            lambda m: {"loss": float(m["loss"])}), (lambda: None)

    trained = [p for n, p in model.named_parameters() if worker == "torch-ft-all" or n in inner]
    for p in model.parameters():
        p.requires_grad_(False)
    for p in trained:
        p.requires_grad_(True)
    opt = torch.optim.Adam(trained, lr=FT_LR)
    seq2seq = model_kind == "t5"
    b = batch["edit_inner"]

    def call():
        logits = model(**torch_mend.model_inputs(b)).logits
        loss = torch_mend.masked_nll(logits, b["labels"], not seq2seq)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.detach()

    return call, block, (lambda v: {"loss": float(v)}), (lambda: None)


def run_worker_here(worker: str, model_kind: str, small: bool, steps: int, warmup: int,
                    precision: str = "tf32", torch_device: str = "auto",
                    n_edits: int = 1) -> None:
    info = {}
    # everything imported before the baseline, so imports (jax and transformers in every worker,
    # mend_jax's configs in the PyTorch ones) do not count as the workload's memory
    import transformers

    import mend_jax.editors  # noqa: F401
    import mend_jax.models  # noqa: F401
    import mend_jax.training  # noqa: F401

    for cls in ("GPT2LMHeadModel", "T5ForConditionalGeneration"):  # load the lazy modules
        getattr(transformers, cls)
    if worker.startswith("jax"):
        import optax  # noqa: F401

        import mend_jax.capture  # noqa: F401
        import mend_jax.metrics  # noqa: F401

        platform_ = common.setup_jax(precision)  # starts the runtime before the baseline
        meter = (common.JaxDeviceMeter() if common.jax_device_memory() is not None
                 else common.HostMeter())
        info["device"] = common.jax_device_name()
        build = _jax_step
        sync = lambda: None  # JAX outputs are blocked on by `block`
    else:
        import torch
        import torch_mend  # noqa: F401

        device = common.torch_device(torch_device)
        common.setup_torch(device, precision)
        if device.type == "cuda":
            torch.cuda.init()  # the CUDA context before the baseline, as JAX's runtime above
        platform_ = device.type
        meter = common.TorchCudaMeter(device) if device.type == "cuda" else common.HostMeter()
        info.update(device=common.torch_device_name(device),
                    torch=torch.__version__, torch_threads=torch.get_num_threads())
        build = lambda w, m, s, k: _torch_step(w, m, s, device, k)
        sync = lambda: common.torch_sync(device)
    meter.start()
    call, block, describe, analyse = build(worker, model_kind, small, n_edits)
    sync()  # nothing queued (weights moved to the device, ...) leaks into the first timing
    _, first = common.time_calls(call, 0, 1, block)
    common.time_calls(call, 0, max(0, warmup - 1), block)
    meter.before_steps()
    times = []
    out = None
    for _ in range(steps):
        t = time.perf_counter()
        out = block(call())
        times.append(time.perf_counter() - t)
    mem = meter.finish(analyse)
    framework, what = WORKERS[worker]
    common.emit({
        "model": common.shape_name(model_kind, small), "framework": framework, "what": what,
        "n_edits": n_edits,
        "platform": platform_,
        "median_s": common.median(times), "min_s": min(times) if times else float("nan"),
        "first_call_s": first, **mem, "load1": common.load1(), **info,
        **(describe(out) if out is not None else {}),
    })


# ----------------------------------------------------------------------------- driver
def main(argv=None) -> None:
    p = common.base_parser(__doc__.splitlines()[0])
    p.add_argument("--model", choices=["gpt2", "t5", "both"], default="both")
    p.add_argument("--workers", default=",".join(WORKERS),
                   help=f"comma-separated subset of {', '.join(WORKERS)}")
    p.add_argument("--torch-omp-wait", choices=["passive", "default"], default="passive",
                   help="OMP_WAIT_POLICY for the PyTorch workers (default passive: spin-waiting "
                        "OpenMP threads slow PyTorch several-fold on a shared machine)")
    common.add_torch_device_arg(p)
    p.add_argument("--n-edits", type=int, default=1,
                   help="edits (and equivalents and locality sequences) per meta-step")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return run_worker_here(args.worker, args.model, args.small, args.steps, args.warmup,
                               args.matmul_precision, args.torch_device, args.n_edits)

    models = ["gpt2", "t5"] if args.model == "both" else [args.model]
    workers = [w for w in args.workers.split(",") if w]
    unknown = [w for w in workers if w not in WORKERS]
    if unknown:
        p.error(f"--workers: unknown {unknown}; choose from {', '.join(WORKERS)}")
    rows = []
    for m in models:
        for w in workers:
            flags = ["--worker", w, "--model", m, "--steps", str(args.steps),
                     "--warmup", str(args.warmup), "--matmul-precision", args.matmul_precision,
                     "--torch-device", args.torch_device, "--n-edits", str(args.n_edits)] + (
                         ["--small"] if args.small else [])
            env = {}
            if w.startswith("torch"):
                # JAX (imported through mend_jax for configs) must leave the GPU to PyTorch
                env["JAX_PLATFORMS"] = "cpu"
                if args.torch_omp_wait == "passive":
                    env["OMP_WAIT_POLICY"] = "PASSIVE"
            r = common.run_worker("bench_meta_step.py", flags, env=env)
            print(f"  {r['model']:12s} {r['framework']:9s} {r['what']:24s} {r['device']} "
                  f"{r['median_s']:.3f} s  peak {r['peak_steps_mib']} MiB ({r['mem']})",
                  file=sys.stderr, flush=True)
            rows.append(r)
    table = common.markdown_table(rows, ["model", "framework", "what", "n_edits", "device",
                                         "median_s",
                                         "min_s", "first_call_s", "mem", "peak_steps_mib",
                                         "peak_all_mib", "resident_mib", "load1"])
    torch_rows = [r for r in rows if r["framework"] == "pytorch"]
    torch_threads = torch_rows[0]["torch_threads"] if torch_rows else _torch_threads()
    extra = {"torch_threads": torch_threads}
    if torch_rows:
        extra.update(torch=torch_rows[0]["torch"], torch_device=torch_rows[0]["device"])
    on_gpu = any(r["platform"] != "cpu" for r in rows)
    notes = [
        f"batch per meta-step: {args.n_edits} edit + {args.n_edits} equivalent + "
        f"{args.n_edits} locality sequence(s) of "
        f"{common.SEQ_SMALL if args.small else common.SEQ} tokens (T5: encoder length; decoder "
        f"{common.DEC_SEQ_SMALL if args.small else common.DEC_SEQ}); random weights and tokens; "
        "edited weights are the defaults (GPT-2: last 3 blocks' mlp c_fc/c_proj; T5: last 2 "
        "encoder and decoder blocks' wi/wo); MENDConfig() defaults (rank 1920, 2 layers, "
        "shared, norm); TrainConfig defaults but accumulate=1, so every step is an Adam step in "
        "both frameworks. Fine-tuning rows: one forward+backward on the edit sequence + Adam.",
        f"time: median (and min) of {args.steps} steps after {args.warmup} warm-up steps; "
        "first_call_s is the first warm-up call (includes jit compilation for mend-jax). "
        "JAX results are blocked until ready; PyTorch CUDA rows call torch.cuda.synchronize() "
        "before the first call and at the end of every timed call.",
        "memory: each row is its own subprocess; every number is relative to a baseline taken "
        "after imports with the runtime started and nothing built, so it counts model params, "
        "editor, optimizer state and activations. peak_steps_mib: peak over the timed steps "
        "(steady-state training); peak_all_mib: peak over the whole run, incl. model init and "
        "compilation; resident_mib: in use right before the timed steps. The mem column says "
        "what was measured: " + "; ".join(_mem_notes(rows)) + ".",
        "load1 is the 1-minute load average when the row finished: this machine's cores are "
        "shared, so compare rows with similar load.",
        f"PyTorch workers ran with {torch_threads} intra-op threads and OMP_WAIT_POLICY="
        f"{'PASSIVE' if args.torch_omp_wait == 'passive' else 'unset (spin-waiting)'}: with the "
        "default spin-waiting, a GPT-2 small forward measured 3.6x slower (2.6 s vs 0.7 s) "
        "on this shared 2-core machine under load ~3 (a CPU-run measurement).",
    ]
    if on_gpu:
        notes.append(common.precision_note(args.matmul_precision))
    notes += summarise(rows)
    common.report(f"MEND meta-training step ({'small' if args.small else 'full'} shapes"
                  f"{', GPU' if on_gpu else ''})", table, notes, record=not args.no_record,
                  extra_machine=extra)


def _mem_notes(rows) -> list[str]:
    kinds = dict.fromkeys(r["mem"] for r in rows)
    text = {
        "host RSS": "'host RSS' (CPU rows): VmHWM/VmRSS from /proc/self/status; the heap is "
                    "trimmed (malloc_trim) and VmHWM reset (clear_refs 5) after warm-up, so "
                    "peak_steps_mib is the peak over the timed steps",
        "GPU (torch)": "'GPU (torch)': PyTorch's CUDA caching allocator, bytes held by tensors "
                       "(torch.cuda.memory_allocated / max_memory_allocated, not the cache it "
                       "reserves, not the CUDA context, but the cuBLAS workspaces it takes on "
                       "the first matmul); torch.cuda.reset_peak_memory_stats() "
                       "after warm-up, so peak_steps_mib is the measured peak over the timed "
                       "steps",
        "GPU (XLA)": "'GPU (XLA)': XLA's device allocator, jax.devices()[0].memory_stats() "
                     "(bytes_in_use, peak_bytes_in_use; XLA_PYTHON_CLIENT_PREALLOCATE=false, "
                     "not the CUDA context). JAX cannot reset the peak, so peak_all_mib is the "
                     "measured peak_bytes_in_use of the whole subprocess and resident_mib the "
                     "measured bytes_in_use before the timed steps, while peak_steps_mib = "
                     "resident_mib + the jitted step's own buffers from XLA's buffer assignment "
                     "(compiled.memory_analysis(): temp + outputs not aliased to donated "
                     "inputs), which XLA allocates for every execution",
    }
    return [text.get(k, k) for k in kinds]



def _torch_threads():
    try:
        import torch

        return torch.get_num_threads()
    except ImportError:
        return "n/a"


def summarise(rows) -> list[str]:
    out = []
    by = {(r["model"], r["framework"], r["what"]): r for r in rows}
    for model in dict.fromkeys(r["model"] for r in rows):
        jm, tm = by.get((model, "mend-jax", "MEND meta-step")), by.get((model, "pytorch",
                                                                           "MEND meta-step"))
        if jm and tm and (jm["platform"] == "cpu") != (tm["platform"] == "cpu"):
            out.append(f"{model}: mend-jax ran on {jm['device']} and PyTorch on "
                       f"{tm['device']}: step times not compared.")
        elif jm and tm:
            s = tm["median_s"] / jm["median_s"]
            out.append(f"{model}: mend-jax meta-step is {s:.2f}x faster than PyTorch "
                       f"(target >= 3x: {'met' if s >= 3 else 'NOT met'}).")
        full = by.get((model, "mend-jax", "MEND meta-step, full logits"))
        if jm and full:
            out.append(f"{model}: logits at the labelled positions only make the mend-jax step "
                       f"{full['median_s'] / jm['median_s']:.2f}x faster than with full "
                       "logits.")
        for fw, what in (("mend-jax", "MEND meta-step"), ("pytorch", "MEND meta-step"),
                         ("mend-jax", "MEND meta-step, Adafactor")):
            m = by.get((model, fw, what))
            for ft in ("fine-tune inner weights", "fine-tune all weights"):
                f = by.get((model, fw, ft))
                if m and f and f["peak_steps_mib"] > 0:
                    ratio = m["peak_steps_mib"] / f["peak_steps_mib"]
                    target = (f" (target <= 1.5x: {'met' if ratio <= 1.5 else 'NOT met'})"
                              if ft.endswith("inner weights") else "")
                    name = "MEND" + (" (Adafactor)" if what.endswith("Adafactor") else "")
                    out.append(f"{model} {fw}: {name} peak / {ft} peak = {ratio:.2f}x{target}.")
        ada = by.get((model, "mend-jax", "MEND meta-step, Adafactor"))
        if jm and ada:
            out.append(f"{model}: the Adafactor step takes {ada['median_s'] / jm['median_s']:.2f}x "
                       "the Adam step's time.")
    return out


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    main()
