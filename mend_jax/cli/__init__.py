"""The command-line tools (`mend-train`, `mend-eval`, `mend-edit`; `python train.py` etc. in a
checkout): parse arguments, call the library, print. Each module has `main(argv=None) -> int`.

On CPU, JAX runs its LAPACK calls (the Cholesky factorisations of `project_keys` and of the
least-squares solves) through SciPy's OpenBLAS, whose own thread pool competes with XLA's for the
same cores: on 2 cores the offline default's meta-training step took 63 ms with the projection
instead of 35 ms. The tools therefore start OpenBLAS with one thread unless the environment
already sets `OPENBLAS_NUM_THREADS` (OpenBLAS reads it once, when SciPy first loads it, which JAX
does lazily at its first LAPACK call). The library itself sets nothing.
"""

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
