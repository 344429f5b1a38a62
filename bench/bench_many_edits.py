"""Many edits in one call: one jitted k-edit `MEND.edit` against k separate one-edit calls.

Aggregates sum, lstsq, whitened lstsq and request_lstsq, on the previous offline default's
model shape (geo_tiny).

Usage:

    python bench/bench_many_edits.py --edits 1000 --steps 3
    python bench/bench_many_edits.py --edits 20 --steps 1 --no-record     # smoke run
"""

from __future__ import annotations

import dataclasses

import common

# The previous offline default's base model (mend_jax/configs/model/geo_tiny.yaml), its edited
# weights and row length (the numbers in bench/RESULTS.md were measured on it); the vocabulary
# is about its word-level one.
GEO_TINY = dict(n_embd=64, n_layer=4, n_head=4, vocab_size=1000, n_positions=16)
INNER = [f"transformer.h.{i}.mlp.{w}.weight" for i in (1, 2, 3) for w in ("c_fc", "c_proj")]
SEQ, TARGET = 16, 2


def default_shape_model():
    """A randomly initialised model of the previous offline default's shape (GEO_TINY)."""
    import transformers

    from mend_jax.models import from_config

    cfg = transformers.GPT2Config(**GEO_TINY, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                  bos_token_id=0, eos_token_id=0)
    return from_config(cfg, seed=0)


def request_batch(k: int, vocab: int) -> dict:
    """k random edit requests of SEQ tokens, labelled on the last TARGET (the same for every k
    from the same seed)."""
    import jax.numpy as jnp
    import numpy as np

    ids = np.random.default_rng(0).integers(1, vocab, (k, SEQ)).astype(np.int32)
    labels = np.full_like(ids, -100)
    labels[:, -TARGET:] = ids[:, -TARGET:]
    return {"input_ids": jnp.asarray(ids), "attention_mask": jnp.ones_like(jnp.asarray(ids)),
            "labels": jnp.asarray(labels)}


def aggregate_variants() -> dict:
    """The editor configurations the rows compare, by name."""
    from mend_jax.editors import MENDConfig

    return {
        "sum": MENDConfig(),
        "lstsq": MENDConfig(aggregate="lstsq", tokens="answer"),
        "lstsq_whiten": MENDConfig(aggregate="lstsq", tokens="answer", whiten=True),
        "request_lstsq": MENDConfig(aggregate="request_lstsq"),
    }


def main(argv=None) -> None:
    p = common.base_parser(__doc__.splitlines()[0])
    p.add_argument("--edits", type=int, default=1000, help="k: edits in the one batched call")
    p.add_argument("--aggregates", default="sum,lstsq,lstsq_whiten",
                   help="comma-separated rows: sum, lstsq, lstsq_whiten, request_lstsq")
    p.add_argument("--chunk-tokens", default="none",
                   help="comma-separated MENDConfig.chunk_tokens values, 'none' for one pass; "
                        "a row per aggregate and value")
    args = p.parse_args(argv)

    import jax

    common.setup_jax(args.matmul_precision)
    from mend_jax.editors import MEND
    from mend_jax.models import get_path

    model = default_shape_model()
    params = model.params
    k = args.edits
    batch = request_batch(k, model.config.vocab_size)
    paths = [model.names.path(n) for n in INNER]

    def weights_only(editor):
        # the edited weights alone: the comparison is the editing, not copying the tree
        return jax.jit(lambda s, p, b: [get_path(editor.edit(s, p, b), q) for q in paths])

    variants = aggregate_variants()
    chosen = args.aggregates.split(",")
    unknown = sorted(set(chosen) - set(variants))
    if unknown:
        p.error(f"unknown --aggregates {unknown}; choose from {sorted(variants)}")
    chunk_sizes = [None if c == "none" else int(c) for c in args.chunk_tokens.split(",")]
    rows = []
    for name, mcfg, chunk in ((n, variants[n], c) for n in chosen for c in chunk_sizes):
        mcfg = dataclasses.replace(mcfg, chunk_tokens=chunk)
        editor = MEND(model, INNER, mcfg)
        state = editor.init(jax.random.key(0))
        fn = weights_only(editor)
        compiled, compile_s = common.aot_compile(fn, state, params, batch)
        times, _ = common.time_calls(lambda c=compiled, s=state: c(s, params, batch), args.steps,
                                     args.warmup, jax.block_until_ready)
        one = jax.tree.map(lambda x: x[:1], batch)
        single, _ = common.aot_compile(fn, state, params, one)
        singles = [jax.tree.map(lambda x, i=i: x[i:i + 1], batch) for i in range(k)]
        jax.block_until_ready(single(state, params, singles[0]))

        def all_singles(c=single, s=state, bs=singles):
            out = None
            for b in bs:
                out = c(s, params, b)
            return out

        loop_times, _ = common.time_calls(all_singles, max(1, args.steps // 2), 1,
                                          jax.block_until_ready)
        row = {"aggregate": name, "chunk_tokens": chunk or "all", "edits": k,
               "one_call_s": common.median(times),
               "compile_s": compile_s, f"{k}_single_calls_s": common.median(loop_times)}
        row["speedup"] = row[f"{k}_single_calls_s"] / row["one_call_s"]
        temp = common.step_buffer_bytes(fn, state, params, batch)
        row["call_buffers_mib"] = temp / 2**20 if temp is not None else float("nan")
        row["load1"] = common.load1()
        print(f"  {name}: one {k}-edit call {row['one_call_s']:.3f} s, {k} single calls "
              f"{row[f'{k}_single_calls_s']:.3f} s ({row['speedup']:.1f}x)", flush=True)
        rows.append(row)

    table = common.markdown_table(rows, ["aggregate", "chunk_tokens", "edits", "one_call_s",
                                         f"{k}_single_calls_s", "speedup", "compile_s",
                                         "call_buffers_mib", "load1"])
    notes = [
        "model: the offline default's shape (GPT-2, 4 layers, d 64, vocab 1000, random "
        f"weights); {k} edit requests of {SEQ} tokens (labels on the last {TARGET}); the "
        "default's 6 edited MLP weights; fresh editors (timing does not depend on trained "
        "values); each call returns the edited weights only.",
        f"one_call_s: median of {args.steps} calls of one jitted {k}-edit edit (tokens pooled; "
        f"lstsq: one ridge solve per weight over the answer tokens); {k}_single_calls_s: {k} "
        "back-to-back calls of the same jitted function on one request each (compiled once); "
        "speedup = their ratio, measured in the same run.",
        "call_buffers_mib: XLA's temporary + output buffers of the compiled k-edit call "
        "(`compiled.memory_analysis()`), i.e. its peak beyond the model and editor; "
        "chunk_tokens: the editor run over that many token rows at a time (`all`: one pass).",
        f"device: {common.jax_device_name()}; load1: 1-minute load average after the row.",
        "target (≥ 20x faster than single calls at k = 1000): "
        + ", ".join(f"{r['aggregate']} ({r['chunk_tokens']}) "
                    f"{'met' if r['speedup'] >= 20 else 'NOT met'}"
                    for r in rows) + ".",
    ]
    common.report(f"Many edits in one call (k = {k})", table, notes, record=not args.no_record)


if __name__ == "__main__":
    main()
