"""`python eval.py ...` in a checkout: the installed `mend-eval` (mend_jax/cli/eval.py)."""

import sys

from mend_jax.cli.eval import main

if __name__ == "__main__":
    sys.exit(main())
