"""Command-line conventions: one-line errors, exit status 2, no traceback."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import NoReturn


class UserError(Exception):
    """A problem with the user's input (path, file, flag) or with the run that the user must fix."""


def fail(msg: str) -> NoReturn:
    raise UserError(msg)


def run_cli(main: Callable[[list[str] | None], object], argv: list[str] | None = None) -> None:
    """Run ``main`` and turn the expected failures into ``error: …`` on stderr with status 2."""
    try:
        main(argv)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        sys.exit(130)
