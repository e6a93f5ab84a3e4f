"""Command-line conventions: one-line errors, exit status 2, no traceback."""

from __future__ import annotations

import argparse
import copy
import dataclasses
import math
import re
import sys
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

from maecore.errors import UserError  # noqa: F401  (re-exported: ``from maecore.cli import UserError`` keeps working)

if TYPE_CHECKING:  # the registry imports torch: the CLI layer imports it only when a parser is built
    from maecore.config import RunConfig
    from maecore.engine.config import EngineConfig
    from maecore.models import Family

C = TypeVar("C", bound="RunConfig")


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
    """argparse that reports a bad argument as one ``error: …`` line (no usage dump), status 2, ending with
    where to look: ``(see python -m pretrain --help)``."""

    def error(self, message: str) -> NoReturn:  # type: ignore[override]
        first = " ".join(message.split())  # argparse messages are one line already; be sure of it
        print(f"error: {first} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


# ---- argparse value types: a bad number is a one-line flag error, before anything runs ----------------
def _number_type(base: type, ok: Callable[[Any], bool], what: str) -> Callable[[str], Any]:
    """argparse ``type=`` for a ``base`` (int/float) value that must satisfy ``ok``; also accepts numbers,
    so a checkpoint's saved value can be checked with it.  ``.base`` tells :func:`flags_from_checkpoint`
    what Python type the flag stores."""

    def parse(text: str | int | float) -> Any:
        try:
            value = base(text)
        except (TypeError, ValueError, OverflowError):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if not ok(value):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value

    parse.base = base  # type: ignore[attr-defined]
    parse.__name__ = what.replace(" ", "_")
    return parse


positive_int = _number_type(int, lambda v: v >= 1, "a positive integer")
non_negative_int = _number_type(int, lambda v: v >= 0, "an integer >= 0")
finite_float = _number_type(float, math.isfinite, "a finite number")
non_negative_float = _number_type(float, lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0")
positive_float = _number_type(float, lambda v: math.isfinite(v) and v > 0, "a finite number > 0")


def byte_size(text: str | int) -> int:
    """``1G``, ``500M``, ``64K`` or a number of bytes (binary units)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)i?B?\s*", str(text), re.IGNORECASE)
    value = float(m.group(1)) * 1024 ** " KMGT".index(m.group(2).upper() or " ") if m else 0
    if value < 1024:
        raise argparse.ArgumentTypeError(f"expected a size of at least 1K such as 64K, 500M or 1G, got {text!r}")
    return int(value)


def add_cache_args(g: Any) -> None:
    """``--cache_dir`` / ``--cache_size``: a remote ``--data_path``'s records kept on local disk
    (:mod:`maecore.data.packed.cache`)."""
    g.add_argument("--cache_dir", default=None,
                   help="with a URL --data_path (http(s)://, s3:// …): keep the records fetched in this local folder, up to "
                        "--cache_size, and read them from there in later epochs")
    g.add_argument("--cache_size", type=byte_size, default="10G", help="bound of --cache_dir, all processes together (default 10G)")


def ratio(lo: float = 0.0, hi: float = 1.0, lo_open: bool = False, hi_open: bool = False) -> Callable[[str], float]:
    """argparse ``type=`` for a number in the interval lo..hi, each end closed unless ``*_open``."""
    span = f"{'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"

    def ok(v: float) -> bool:
        return math.isfinite(v) and (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi)

    return _number_type(float, ok, f"a number in {span}")


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


# ---- the model flags, one vocabulary for the four CLIs ----------------------------------------------
# today's flag spellings that stay accepted as aliases (README commands and user scripts keep working)
LEGACY_FLAGS: dict[str, tuple[str, ...]] = {
    "model": ("--arch",),
    "input_size": ("--image_size", "--crop_size"),
    "num_classes": ("--nb_classes",),
}
# keys of a checkpoint's saved args from before the shared vocabulary -> today's argparse dests
LEGACY_ARG_KEYS: dict[str, str] = {"arch": "model", "image_size": "input_size", "crop_size": "input_size",
                                   "nb_classes": "num_classes"}


def model_type(family: Family = "vit") -> Callable[[str], str]:
    """argparse ``type=`` for ``--model``: any registry name or alias -> the canonical name in ``family``
    (``mae`` for pretraining, whose CLI imports ``pretrain.model`` to register that family; ``vit`` for the
    transfer tasks)."""

    def parse(text: str) -> str:
        from maecore.models import UnknownModelError, resolve_model  # the registry imports torch: only when parsing

        try:
            return resolve_model(text, family).name
        except UnknownModelError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    parse.base = str  # type: ignore[attr-defined]
    parse.__name__ = "model_name"
    return parse


class _SidesAction(argparse.Action):
    """``--input_size H [W]``: one number stores an int, two an (H, W) tuple."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        if len(values) > 2:
            parser.error(f"argument {option_string}: takes H or H W, got {len(values)} numbers")
        setattr(namespace, self.dest, values[0] if len(values) == 1 else tuple(values))


def add_model_args(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    family: Family = "vit",
    *,
    model: str | None = None,
    input_size: int | None = None,
    input_size_help: str = "input side in pixels",
    two_sided: bool = False,
    num_classes: bool = True,
    num_classes_default: int | None = None,
    num_classes_help: str = "classes of the head",
) -> None:
    """The model flags every CLI shares: ``--model`` (any registry name or alias, stored canonical),
    ``--input_size``, ``--num_classes`` (unless ``num_classes=False``) and the size overrides ``--patch_size
    --embed_dim --depth --num_heads`` (default: the size's own).  Older spellings are aliases
    (:data:`LEGACY_FLAGS`).  ``two_sided``: ``--input_size H [W]``."""
    from maecore.models import model_names

    names = ", ".join(model_names(family))
    parser.add_argument("--model", *LEGACY_FLAGS["model"], dest="model", default=model, type=model_type(family),
                        metavar="NAME", help=f"{names}, or tiny/small/base/large/huge (with or without mae_)")
    if two_sided:
        parser.add_argument("--input_size", *LEGACY_FLAGS["input_size"], dest="input_size", default=input_size,
                            type=positive_int, nargs="+", action=_SidesAction, metavar="N",
                            help=f"{input_size_help}: H [W]")
    else:
        parser.add_argument("--input_size", *LEGACY_FLAGS["input_size"], dest="input_size", default=input_size,
                            type=positive_int, metavar="N", help=input_size_help)
    if num_classes:
        parser.add_argument("--num_classes", *LEGACY_FLAGS["num_classes"], dest="num_classes", default=num_classes_default,
                            type=positive_int, metavar="N", help=num_classes_help)
    parser.add_argument("--patch_size", type=positive_int, default=None, help="override the size's patch size")
    parser.add_argument("--embed_dim", type=positive_int, default=None, help="override the size's width")
    parser.add_argument("--depth", type=positive_int, default=None, help="override the size's number of blocks")
    parser.add_argument("--num_heads", type=positive_int, default=None, help="override the size's attention heads")


def check_model_args(args: argparse.Namespace) -> str | None:
    """What is wrong with the model flags taken together, if anything (one line naming the flags):
    the input size must be a multiple of the patch size, the width a multiple of the heads."""
    from maecore.models import model_kwargs

    kw = model_kwargs(args.model, *(getattr(args, k, None) for k in ("patch_size", "embed_dim", "depth", "num_heads")))
    size = args.input_size
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    if h % kw["patch_size"] or w % kw["patch_size"]:
        shown = str(size) if isinstance(size, int) else f"{h} {w}"
        return f"--input_size {shown} is not a multiple of the patch size {kw['patch_size']}"
    if kw["embed_dim"] % kw["num_heads"]:
        return f"the width {kw['embed_dim']} (--embed_dim) is not a multiple of the heads {kw['num_heads']} (--num_heads)"
    return None


def upgrade_saved_args(saved: Mapping[str, Any] | None) -> Mapping[str, Any] | None:
    """A checkpoint's saved args in today's vocabulary: the legacy keys (:data:`LEGACY_ARG_KEYS`: ``arch``,
    ``image_size``, ``crop_size``, ``nb_classes``) renamed; a key already in today's name wins."""
    if not isinstance(saved, Mapping):
        return saved
    out = dict(saved)
    for old, new in LEGACY_ARG_KEYS.items():
        if old in out:
            value = out.pop(old)
            out.setdefault(new, value)
    return out


# ---- the engine's flags --------------------------------------------------------------------------
def config_from_args(args: RunConfig | Mapping[str, Any] | argparse.Namespace, **overrides: Any) -> EngineConfig:
    """The :class:`~maecore.engine.config.EngineConfig` of a task's typed config (:class:`maecore.config.RunConfig`),
    of its flags as a dict, or of an argparse namespace: the values of the engine's names, then ``overrides``."""
    from maecore.config import RunConfig, engine_config

    values = args.args() if isinstance(args, RunConfig) else args if isinstance(args, Mapping) else vars(args)
    return engine_config(values, **overrides)


def logger_name(text: str) -> str:
    """argparse ``type=`` for ``--loggers``: a logger's name (:data:`maecore.engine.loggers.LOGGERS`), whose package is
    installed (wandb is an optional extra): a missing one is a flag error before anything runs."""
    from maecore.engine.loggers import LOGGERS
    from maecore.engine.loggers.wandb import INSTALL, available

    if text not in LOGGERS:
        raise argparse.ArgumentTypeError(f"no logger named {text!r} (choose from {', '.join(LOGGERS)})")
    if text == "wandb" and not available():
        raise argparse.ArgumentTypeError(f"wandb is not installed: {INSTALL}")
    return text


logger_name.base = str  # type: ignore[attr-defined]


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    """The engine's flags (:class:`maecore.engine.EngineConfig`), named as in the official MAE scripts where those
    have one."""
    from maecore.distributed import DEFAULT_TIMEOUT_MIN  # imports torch: only when a parser is built
    from maecore.engine.loggers import DEFAULT as DEFAULT_LOGGERS
    from maecore.engine.loggers import LOGGERS

    g = parser.add_argument_group("engine")
    g.add_argument("--output_dir", default="./output_dir", help="checkpoints, logs, figures")
    g.add_argument("--epochs", type=positive_int, default=800)
    g.add_argument("--batch_size", type=positive_int, default=64, help="per-process batch size")
    g.add_argument("--accum_iter", type=positive_int, default=1, help="gradient accumulation steps")
    g.add_argument("--num_workers", type=non_negative_int, default=8)
    g.add_argument("--pin_mem", action="store_true", default=True, help="pin host memory (GPU)")
    g.add_argument("--no_pin_mem", action="store_false", dest="pin_mem")
    g.add_argument("--seed", type=non_negative_int, default=0)
    g.add_argument("--amp", default="auto", choices=["auto", "bf16", "fp16", "none"],
                   help="auto = bf16 on GPUs that support it and on CPUs with native bf16 (AVX512-BF16/AMX), else fp32")
    g.add_argument("--attn", default="auto", choices=["auto", "fused", "explicit"],
                   help="attention kernel: auto = the explicit softmax path under bf16 on CPUs (torch's fused CPU kernel "
                        "is slow there), SDPA's fused kernels elsewhere")
    g.add_argument("--clip_grad", type=non_negative_float, default=None)
    g.add_argument("--log_every", type=positive_int, default=20, help="log (and sync) every N optimizer steps")
    g.add_argument("--save_every_steps", type=non_negative_int, default=0, help="also checkpoint every N steps")
    g.add_argument("--keep_every", type=non_negative_int, default=20, help="keep checkpoint-<epoch>.pth every N epochs")
    g.add_argument("--eval_every", type=positive_int, default=1)
    g.add_argument("--max_steps", type=non_negative_int, default=0, help="stop after N optimizer steps (smoke runs)")
    g.add_argument("--resume", default="", help="'auto' (output_dir/checkpoint-last.pth) or a checkpoint path")
    g.add_argument("--overwrite", action="store_true",
                   help="start afresh in a folder holding checkpoints: they are moved to previous-N/, not deleted")
    g.add_argument("--resume_override", default="", metavar="KEY[,KEY...]",
                   help="on resume, take these schedule flags (batch_size, lr, epochs…; 'all') from the command line "
                        "instead of refusing a change")
    g.add_argument("--no_progress", dest="progress", action="store_false")
    g.add_argument("--compile", action="store_true", help="torch.compile the model")
    g.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    g.add_argument("--dist_timeout", type=positive_float, default=DEFAULT_TIMEOUT_MIN, metavar="MIN",
                   help="under torchrun: minutes a collective waits for the other ranks before failing with a line "
                        "naming this rank (a dead or stuck rank never hangs the job forever)")
    g.add_argument("--loggers", nargs="+", type=logger_name, default=list(DEFAULT_LOGGERS), metavar="NAME",
                   help=f"where the run's records go, on rank 0: {', '.join(LOGGERS)} (default: {' '.join(DEFAULT_LOGGERS)}; "
                        "wandb is an optional extra: pip install 'mae-toolkit[wandb]', WANDB_MODE=offline without network)")


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


def _coerce(action: argparse.Action | None, value: Any) -> tuple[bool, Any]:
    """Could ``action`` have produced ``value``?  (A sanity check of a checkpoint's saved args.)  Returns the
    verdict and the value as the flag's ``type=`` stores it (a model alias becomes its canonical name)."""
    if value is None or action is None:
        return True, value
    if action.nargs == 0:  # store_true / store_false / store_const
        return isinstance(value, bool) or value == action.const, value
    many = action.nargs not in (None, "?") and not (isinstance(action, _SidesAction) and not isinstance(value, (list, tuple)))
    if many:  # (``--input_size H [W]`` stores one side as an int)
        if not isinstance(value, (list, tuple)):
            return False, value
        if isinstance(action.nargs, int) and len(value) != action.nargs:
            return False, value
        items = list(value)
    else:
        items = [value]
    base = getattr(action.type, "base", action.type)
    out = []
    for v in items:
        if base is int and (isinstance(v, bool) or not isinstance(v, int)):
            return False, value
        if base is float and (isinstance(v, bool) or not isinstance(v, (int, float))):
            return False, value
        if base in (None, str) and not isinstance(v, str):
            return False, value
        if action.type not in (None, int, float, str):  # one of ours: range checks, canonical names
            try:
                v = action.type(v)  # type: ignore[misc]
            except (argparse.ArgumentTypeError, TypeError, ValueError):
                return False, value
        if action.choices is not None and v not in action.choices:
            return False, value
        out.append(v)
    return True, (out if many else out[0])


def flags_from_checkpoint(
    parser: argparse.ArgumentParser,
    saved: Mapping[str, Any] | None,
    keys: Sequence[str],
    given: Collection[str] = (),
    source: str = "the checkpoint",
    log: Callable[[str], object] | None = print,
) -> dict[str, Any]:
    """The values of ``keys`` (argparse dests) in ``saved`` (a checkpoint's args dict), except the flags the user
    gave (``given``, from :func:`given_flags`): what ``--eval --resume CKPT`` builds the network from, so that it is
    built as it was trained without repeating its flags (``dataclasses.replace(cfg, **taken)`` builds that run's
    config).  Reports the keys taken in one line through ``log``.  ``saved`` that is not a dict (no saved args, e.g.
    a converted or released file) gives nothing; a saved value that the flag could not have produced is a
    :class:`UserError`.  Values come as the flag's ``type=`` stores them (a model alias canonical, tuples as lists)."""
    if not isinstance(saved, Mapping):
        return {}
    actions = {a.dest: a for a in parser._actions}
    taken: dict[str, Any] = {}
    kept = []
    for key in keys:
        if key not in saved:
            continue
        if key in given:
            kept.append(key)
            continue
        ok, value = _coerce(actions.get(key), saved[key])
        if not ok:
            raise UserError(f"{source}: its saved args hold {key}={value!r}, not a valid value for that flag")
        taken[key] = list(value) if isinstance(value, tuple) else value
    if log is not None and taken:
        def show(v: Any) -> str:
            return " ".join(map(str, v)) if isinstance(v, list) else str(v)

        line = f"model flags from {source}: " + ", ".join(f"{k}={show(v)}" for k, v in taken.items())
        log(line + (f" (given on the command line: {', '.join(kept)})" if kept else ""))
    return taken


def with_checkpoint_flags(parser: argparse.ArgumentParser, cfg: C, saved: Mapping[str, Any] | None, keys: Sequence[str],
                          source: str, log: Callable[[str], object] | None = print) -> C:
    """``cfg`` with the model flags ``keys`` a checkpoint saved (its args ``saved``; args saved before the CLIs shared
    one vocabulary count under today's names, :func:`upgrade_saved_args`), except those written on the command line
    (``cfg.given``): the config that builds the network of ``--eval --resume CKPT`` and of ``predict`` as it was
    trained (:func:`flags_from_checkpoint`; a new config, ``cfg`` is unchanged)."""
    taken = flags_from_checkpoint(parser, upgrade_saved_args(saved), keys, cfg.given, source=source, log=log)
    return dataclasses.replace(cfg, **taken)
