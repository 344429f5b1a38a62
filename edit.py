"""`python edit.py ...` in a checkout: the installed `mend-edit` (mend_jax/cli/edit.py)."""

import sys

from mend_jax.cli.edit import main

if __name__ == "__main__":
    sys.exit(main())
