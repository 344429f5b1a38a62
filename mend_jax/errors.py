"""The errors mend-jax raises on bad input, one type per layer, and the CLIs' handling of them.

Every error a person can act on is a `MendError`: its message names the file, record, key,
tensor or token at fault and what was expected. The types are also `ValueError`s (and
`UnknownNameError` a `KeyError`), so code written against the builtin types keeps working.
"""

from __future__ import annotations

import importlib
import logging
import sys
import traceback
from collections.abc import Callable, Sequence


class MendError(Exception):
    """Base of every error raised on bad input (config, data, checkpoint, edit, run folder)."""


class ConfigError(MendError, ValueError):
    """A config file or override that cannot be applied."""


class DataError(MendError, ValueError):
    """A data file is malformed; the message names the file, the record and the field."""


class CheckpointError(MendError, ValueError):
    """A checkpoint folder or file that cannot be loaded as asked."""


class EditError(MendError, ValueError):
    """An edit request the model cannot take (token ids outside the vocabulary, too long)."""


class RunError(MendError):
    """A run folder that cannot be used as asked (held by another process, other config)."""


class UnknownNameError(MendError, KeyError):
    """A parameter name the model does not have; the message lists the closest valid ones."""

    def __str__(self) -> str:  # KeyError would print the message quoted
        return str(self.args[0]) if self.args else ""


# Raised on user input by the standard library (a missing file, a bad value) and shown the same.
USER_ERRORS = (MendError, FileNotFoundError, FileExistsError, ValueError)


class MissingExtraError(MendError, ImportError):
    """An optional dependency (a pip extra of mend-jax) is not installed."""


def import_extra(module: str, extra: str, what: str):
    """`module`, imported; or a one-line `MissingExtraError` naming the extra that installs it
    (`datasets` and `matplotlib` are extras: the offline default needs neither)."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise MissingExtraError(f"{what} needs {module.split('.')[0]}, which is not installed: "
                                f"pip install 'mend-jax[{extra}]'") from None


def cli_main(main: Callable[[list[str]], int], argv: Sequence[str] | None = None, *,
             log_level: int = logging.INFO) -> int:
    """Run a CLI's `main(argv)`: bad input gives a one-line `error: ...` and exit code 2.

    With `--debug` in argv the traceback is printed as well. Logging is configured here with
    `force=True`: absl (imported by orbax) installs a handler first, which would make a plain
    `logging.basicConfig` do nothing. Orbax's INFO messages (through absl) show with `--debug`.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    logging.basicConfig(level=log_level, format="%(asctime)s %(name)s: %(message)s", force=True)
    if not debug:  # orbax reports every save and restore at INFO through absl
        logging.getLogger("absl").setLevel(max(log_level, logging.WARNING))
    try:
        return main(argv)
    except USER_ERRORS as e:
        if debug:
            traceback.print_exc()
        message = " ".join(str(e).split()) or type(e).__name__
        print(f"error: {message}", file=sys.stderr)
        return 2


__all__ = ["USER_ERRORS", "CheckpointError", "ConfigError", "DataError", "EditError",
           "MendError", "MissingExtraError", "RunError", "UnknownNameError", "cli_main",
           "import_extra"]
