"""Command-line conventions: one-line errors, exit status 2, no traceback."""

from __future__ import annotations

import argparse
import copy
import sys
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any, NoReturn

from maecore.errors import UserError  # noqa: F401  (re-exported: ``from maecore.cli import UserError`` keeps working)


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


# ---- flags a checkpoint can supply ---------------------------------------------------------------
def given_flags(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None) -> frozenset[str]:
    """The ``dest`` of every flag written on the command line ``argv`` (``None``: ``sys.argv[1:]``), whatever
    its value: ``argv`` is parsed a second time by a copy of ``parser`` whose defaults are all suppressed, so
    aliases (``--model`` for ``--arch``), abbreviations and ``--flag=value`` count as they do for argparse."""
    quiet = copy.deepcopy(parser)
    for action in quiet._actions:
        action.default = argparse.SUPPRESS
        action.required = False
    quiet._defaults.clear()
    ns, _ = quiet.parse_known_args(argv)
    return frozenset(vars(ns))


def _fits(action: argparse.Action | None, value: Any) -> bool:
    """Could ``action`` have produced ``value``?  (A sanity check of a checkpoint's saved args.)"""
    if value is None or action is None:
        return True
    if action.nargs == 0:  # store_true / store_false / store_const
        return isinstance(value, bool) or value == action.const
    if action.nargs not in (None, "?"):
        if not isinstance(value, (list, tuple)):
            return False
        if isinstance(action.nargs, int) and len(value) != action.nargs:
            return False
        items = list(value)
    else:
        items = [value]
    for v in items:
        if action.type is int and (isinstance(v, bool) or not isinstance(v, int)):
            return False
        if action.type is float and (isinstance(v, bool) or not isinstance(v, (int, float))):
            return False
        if action.type is None and not isinstance(v, str):
            return False
        if action.choices is not None and v not in action.choices:
            return False
    return True


def fill_from_checkpoint(
    parser: argparse.ArgumentParser,
    args: argparse.Namespace,
    saved: Mapping[str, Any] | None,
    keys: Sequence[str],
    given: Collection[str] = (),
    source: str = "the checkpoint",
    log: Callable[[str], object] | None = print,
) -> list[str]:
    """Set each of ``keys`` (argparse dests) on ``args`` from ``saved`` (a checkpoint's args dict) unless
    the user gave that flag (``given``, from :func:`given_flags`): what ``--eval --resume CKPT`` does so
    that the network is built as it was trained, without repeating its flags.  Returns the keys taken and
    reports them in one line through ``log``.  ``saved`` that is not a dict (no saved args, e.g. a
    converted or released file) takes nothing; a saved value that the flag could not have produced is a
    :class:`UserError`."""
    if not isinstance(saved, Mapping):
        return []
    actions = {a.dest: a for a in parser._actions}
    taken, kept = [], []
    for key in keys:
        if key not in saved:
            continue
        if key in given:
            kept.append(key)
            continue
        value = saved[key]
        if not _fits(actions.get(key), value):
            raise UserError(f"{source}: its saved args hold {key}={value!r}, not a valid value for that flag")
        setattr(args, key, list(value) if isinstance(value, tuple) else value)
        taken.append(key)
    if log is not None and taken:
        def show(v: Any) -> str:
            return " ".join(map(str, v)) if isinstance(v, list) else str(v)

        line = f"model flags from {source}: " + ", ".join(f"{k}={show(getattr(args, k))}" for k in taken)
        log(line + (f" (given on the command line: {', '.join(kept)})" if kept else ""))
    return taken
