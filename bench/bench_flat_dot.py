"""Linear layers and the tied output head as one 2-D matmul (`x.reshape(-1, d) @ W`, what
mend-jax runs) against the same dot contracting over the leading axes
(`einsum("...i,io->...o")`, what it ran before), alternating in one process.

Two jitted programs per variant: the offline default base model's pretraining step (GPT-2,
4 layers, d 64, vocab 2,048, batch 64 x 32 tokens, AdamW) and a forward + backward of a
GPT-2-small-shape language model on one 64-token sequence (the edit capture's pass). Random
weights: timing does not depend on what the model learned. Usage:

    python bench/bench_flat_dot.py --steps 20 --warmup 3
"""

from __future__ import annotations

import common


def main(argv=None) -> None:
    p = common.base_parser(__doc__.splitlines()[0])
    args = p.parse_args(argv)

    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    import transformers

    import mend_jax.models.common as layers
    from mend_jax.metrics import masked_nll
    from mend_jax.models import from_config

    common.setup_jax(args.matmul_precision)
    flat = layers._flat_dot

    def einsum_dot(x, w):
        return jnp.einsum("...i,io->...o", x, w)

    small = args.small
    default = transformers.GPT2Config(vocab_size=256 if small else 2048, n_positions=32,
                                      n_embd=64, n_layer=4, n_head=4, resid_pdrop=0.0,
                                      embd_pdrop=0.0, attn_pdrop=0.0)
    gpt2 = common.hf_config("gpt2", small)
    rng = np.random.default_rng(0)
    opt = optax.adamw(1e-3)

    def programs():
        """(name, thunk) pairs traced with whatever `_flat_dot` is at the time."""
        out = []
        model = from_config(default, seed=0)
        ids = rng.integers(0, default.vocab_size, (8 if small else 64, 32))
        mask = np.ones_like(ids)

        def loss(params):
            return masked_nll(model.logits(params, ids, mask), ids, True)

        @jax.jit
        def step(params, state):
            value, grads = jax.value_and_grad(loss)(params)
            updates, state = opt.update(grads, state, params)
            return optax.apply_updates(params, updates), state, value

        state = opt.init(model.params)
        out.append((f"default base model: pretraining step ({ids.shape[0]} x {ids.shape[1]})",
                    lambda: step(model.params, state)))
        lm = from_config(gpt2, seed=0)
        seq = rng.integers(0, gpt2.vocab_size, (1, 16 if small else 64))
        grad = jax.jit(jax.grad(lambda p: masked_nll(lm.logits(p, seq, np.ones_like(seq)), seq,
                                                     True)))
        out.append((f"{common.shape_name('gpt2', small)}: forward + backward (1 x "
                    f"{seq.shape[1]})", lambda: grad(lm.params)))
        return out

    variants = {}
    for name, fn in (("flat 2-D matmul", flat), ("einsum over leading axes", einsum_dot)):
        layers._flat_dot = fn
        try:
            variants[name] = programs()
            for _, thunk in variants[name]:           # compile while this variant is patched in
                jax.block_until_ready(thunk())
        finally:
            layers._flat_dot = flat

    times = {(v, i): [] for v in variants for i in range(len(variants[v]))}
    for _ in range(args.warmup):
        for progs in variants.values():
            for _, thunk in progs:
                jax.block_until_ready(thunk())
    for _ in range(args.steps):                        # alternate: load drifts hit both alike
        for v, progs in variants.items():
            for i, (_, thunk) in enumerate(progs):
                t = common.time.perf_counter()
                jax.block_until_ready(thunk())
                times[(v, i)].append(common.time.perf_counter() - t)

    rows = []
    names = list(variants)
    for i, (label, _) in enumerate(variants[names[0]]):
        new, old = (common.median(times[(v, i)]) for v in names)
        rows.append({"program": label, "flat 2-D (ms)": 1e3 * new, "einsum (ms)": 1e3 * old,
                     "einsum / flat": old / new})
    common.report("Linear as one 2-D matmul vs a dot over the leading axes (CPU backward)",
                  common.markdown_table(rows, list(rows[0])),
                  [f"medians of {args.steps} alternating calls per program after {args.warmup} "
                   "warm-up rounds, both variants compiled in the same process; random weights"],
                  record=not args.no_record)


if __name__ == "__main__":
    main()
