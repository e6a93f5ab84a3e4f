"""The toolkit's error types, in their own module so that model, data and engine code can raise them
without importing the command-line layer (``maecore.cli`` turns them into one ``error: …`` line)."""

from __future__ import annotations


class UserError(Exception):
    """A problem with the user's input (path, file, flag value) or with the run that the user must fix.

    The message is one line, written for the person at the terminal; it names the thing (a path, a
    value, a key), not a command-line flag, unless the code raising it is itself the CLI layer."""


class NonFiniteError(UserError):
    """Training produced a NaN/inf loss or weight; the run stops without writing a checkpoint."""


__all__ = ["NonFiniteError", "UserError"]
