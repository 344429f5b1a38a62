"""Meta-training step time on 1, 2, 4, 8 simulated CPU devices (data-parallel mesh, batch of 8).

Each device count runs in its own subprocess with
`XLA_FLAGS=--xla_force_host_platform_device_count=N`. The simulated devices share this
machine's cores, so the numbers measure the partitioning overhead (collectives, replicated
editor update), not a speedup. Usage:

    python bench/bench_scaling.py --devices 1,2,4,8 --steps 3
    python bench/bench_scaling.py --small --steps 2 --no-record     # smoke run
"""

from __future__ import annotations

import argparse
import os
import time

import common

BATCH = 8


def mid_config():
    """A GPT-2-style shape between the smoke config and GPT-2 small: 8 replicas of GPT-2 small
    plus its 59M-parameter editor and Adam moments would need ~12 GB of host memory."""
    import transformers

    return transformers.GPT2Config(n_layer=6, n_embd=384, n_head=6, resid_pdrop=0.0,
                                   embd_pdrop=0.0, attn_pdrop=0.0)


def worker(args) -> None:
    import jax
    import jax.numpy as jnp

    from mend_jax.editors import MEND, MENDConfig
    from mend_jax.models import from_config
    from mend_jax.training import MetaTrainer, TrainConfig

    n = jax.device_count()
    if args.model == "gpt2-small":
        cfg = common.hf_config("gpt2", False)
    elif args.small:
        cfg = common.hf_config("gpt2", True)
    else:
        cfg = mid_config()
    model = from_config(cfg, seed=0)
    trainer = MetaTrainer(MEND(model, config=MENDConfig()), TrainConfig(accumulate=1))
    state = trainer.init(jax.random.key(0))
    batch = common.meta_batch("gpt2", cfg.vocab_size, BATCH, BATCH, args.small)
    if args.seq:
        batch = jax.tree.map(lambda x: x[:, -args.seq:], batch)
    batch = jax.tree.map(jnp.asarray, batch)
    try:
        from mend_jax import sharding

        mesh = sharding.make_mesh(data=n, model=1)
        step, state, params = sharding.make_sharded_step(trainer, mesh, state, model.params,
                                                         batch)
        batch = sharding.shard_batch(mesh, batch)
        how = "mend_jax.sharding (make_mesh(data=N, model=1), make_sharded_step)"
    except ImportError:
        from jax.sharding import Mesh, NamedSharding, PartitionSpec

        mesh = Mesh(jax.devices(), ("data",))
        rep = NamedSharding(mesh, PartitionSpec())
        data = NamedSharding(mesh, PartitionSpec("data"))
        state = jax.device_put(state, rep)
        params = jax.device_put(model.params, rep)
        batch = jax.device_put(batch, data)
        step = jax.jit(trainer.step, in_shardings=(rep, rep, data), out_shardings=(rep, rep),
                       donate_argnums=0)
        how = "jax.sharding directly (Mesh over 'data', params and editor state replicated)"
    box = {"state": state}

    def call():
        box["state"], metrics = step(box["state"], params, batch)
        return metrics

    times, first = common.time_calls(call, args.steps, args.warmup, jax.block_until_ready)
    metrics = call()
    common.emit({"devices": n, "batch": BATCH, "seq": int(batch["loc"]["input_ids"].shape[1]),
                 "median_s": common.median(times), "min_s": min(times),
                 "first_call_s": first, "loss": float(metrics["loss"]),
                 "load1": common.load1(), "how": how})


def main(argv=None) -> None:
    p = common.base_parser(__doc__.splitlines()[0])
    p.add_argument("--devices", default="1,2,4,8", help="comma-separated device counts")
    p.add_argument("--model", choices=["gpt2-mid", "gpt2-small"], default="gpt2-mid",
                   help="gpt2-mid: 6 layers, d 384, vocab 50257 (default); gpt2-small: 12 "
                        "layers, d 768 (needs ~12 GB for 8 replicas)")
    p.add_argument("--seq", type=int, default=32,
                   help="tokens per sequence (default 32; the --small config uses 16)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.small:
        args.seq = min(args.seq, common.SEQ_SMALL)
    if args.worker:
        return worker(args)

    rows = []
    for n in [int(x) for x in args.devices.split(",") if x]:
        env = {"XLA_FLAGS": (os.environ.get("XLA_FLAGS", "") +
                             f" --xla_force_host_platform_device_count={n}").strip(),
               "JAX_PLATFORMS": "cpu"}
        flags = ["--worker", "--steps", str(args.steps), "--warmup", str(args.warmup),
                 "--model", args.model, "--seq", str(args.seq)] + (
                     ["--small"] if args.small else [])
        t = time.perf_counter()
        r = common.run_worker("bench_scaling.py", flags, env=env)
        print(f"  {n} devices: {r['median_s']:.3f} s/step ({time.perf_counter() - t:.0f} s)",
              flush=True)
        rows.append(r)
    base = rows[0]["median_s"] if rows else float("nan")
    for r in rows:
        r["vs_first"] = r["median_s"] / base
    table = common.markdown_table(rows, ["devices", "batch", "seq", "median_s", "min_s",
                                         "vs_first", "first_call_s", "load1"])
    cores = os.cpu_count()
    model = ("gpt2 (tiny)" if args.small else
             "GPT-2 small" if args.model == "gpt2-small" else
             "GPT-2 mid (6 layers, d 384, 6 heads, vocab 50257)")
    notes = [
        f"SIMULATED devices: all N share this machine's {cores} CPU cores, so this measures the "
        "overhead of partitioning the step (collectives, the replicated editor update on every "
        "device), NOT a speedup; vs_first is the step time relative to the first row.",
        f"model: {model}, random weights; MEND meta-step, batch of {BATCH} edits + {BATCH} "
        f"equivalents + {BATCH} locality sequences of {rows[0]['seq'] if rows else '?'} tokens "
        "split over the 'data' mesh axis; model params and editor state replicated; "
        "MENDConfig() defaults, TrainConfig(accumulate=1).",
        f"sharding: {rows[0]['how'] if rows else '?'}.",
        f"median of {args.steps} steps after {args.warmup} warm-up steps, each device count in "
        "its own subprocess (XLA_FLAGS=--xla_force_host_platform_device_count=N, "
        "JAX_PLATFORMS=cpu: CPU devices even on a machine with a GPU, which the machine line's "
        "jax_device may name).",
    ]
    common.report(f"Data-parallel scaling on simulated CPU devices "
                  f"({'small' if args.small else args.model})", table, notes,
                  record=not args.no_record)


if __name__ == "__main__":
    main()
