import os

# Deterministic, quiet CPU runs; sharding tests spawn their own subprocesses with 8 devices.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# Compiling dominates these tiny programs (about a third of the suite's CPU time goes to XLA's
# backend optimisation, measured). Without it (LLVM -O0, as tests/test_ke_enn.py and the sharding
# worker already compile) no value compared here changes beyond float rounding. Subprocesses
# inherit it; JAX_DISABLE_MOST_OPTIMIZATIONS=0 runs the suite fully optimised.
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")
# pytest-xdist runs a worker per core: OpenBLAS threads (JAX's LAPACK calls) would oversubscribe
# them, as the command-line tools avoid (mend_jax/cli/__init__.py).
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import contextlib  # noqa: E402
import logging  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _restore_root_logging():
    """The CLIs reconfigure the root logger (force=True) onto the test's captured stderr; put
    it back so later tests do not log into a closed stream."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@contextlib.contextmanager
def optimised_xla():
    """Compile with the backend's optimisations on, for code whose float32 tolerance was measured
    on fully optimised XLA code; the caches are cleared on both sides, so that nothing compiled
    one way runs the other."""
    import jax

    old = jax.config.values["jax_disable_most_optimizations"]
    jax.config.update("jax_disable_most_optimizations", False)
    jax.clear_caches()
    try:
        yield
    finally:
        jax.config.update("jax_disable_most_optimizations", old)
        jax.clear_caches()


@pytest.fixture
def full_xla_optimizations():
    with optimised_xla():
        yield
