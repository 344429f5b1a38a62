"""`python train.py ...` in a checkout: the installed `mend-train` (mend_jax/cli/train.py)."""

import sys

from mend_jax.cli.train import main

if __name__ == "__main__":
    sys.exit(main())
