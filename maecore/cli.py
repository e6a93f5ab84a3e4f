"""Command-line conventions: one-line errors, exit status 2, no traceback."""

from __future__ import annotations

import argparse
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


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports a bad argument as one ``error: …`` line (no usage dump), status 2."""

    def error(self, message: str) -> NoReturn:  # type: ignore[override]
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)


def size_type(min_side: int = 1) -> Callable[[str], tuple[int, int]]:
    """argparse type for ``N`` or ``HxW`` -> (H, W), each side at least ``min_side``."""

    def parse(text: str) -> tuple[int, int]:
        parts = text.lower().split("x")
        try:
            if len(parts) not in (1, 2):
                raise ValueError
            hw = tuple(int(p) for p in parts)
        except ValueError:
            raise argparse.ArgumentTypeError(f"bad size {text!r} (use N or HxW, e.g. 224 or 512x1024)") from None
        h, w = (hw[0], hw[0]) if len(hw) == 1 else hw
        if min(h, w) < min_side:
            raise argparse.ArgumentTypeError(f"size {text!r} too small (minimum {min_side})")
        return h, w

    return parse
