"""The formats the converter reads and writes, one module each.

Every public module of this package defines ``FORMATS``, a tuple of :class:`Format` records; the
registry finds them by listing the package (modules whose name starts with ``_`` hold shared helpers and
are skipped).  Adding a format is adding a module here: nothing else names it.

A record says, for its format, everything the generic pipeline (:mod:`maecore.convert.pipeline`)
would otherwise branch on: how its names map to and from the canonical (official MAE / timm) ones,
which canonical parts it keeps, which relative-position / layer-scale extras it can hold, the keys its
model has that the file leaves to their init, and how the file is written.  Hooks that a format does not
need stay ``None``.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import torch

from maecore.errors import UserError

if TYPE_CHECKING:
    from maecore.convert.keys import Arch
    from maecore.convert.records import Converted, Source
    from maecore.convert.report import ConversionReport

State = dict[str, torch.Tensor]


class Canonical(NamedTuple):
    """A source state dict read into canonical names."""

    state: State
    dropped: dict[str, str]  # source key -> why it has no canonical place
    renamed: dict[str, str]  # source key -> canonical key
    hints: dict[str, Any]  # sizes the source records besides its tensors


@dataclass
class Job:
    """One conversion in progress, as a format's hooks see it."""

    state: State  # the canonical source
    arch: Arch
    report: ConversionReport
    hints: dict[str, Any]
    pool: str | None = None  # timm global pooling (token / avg)
    fc_norm: str = "reinit"  # reinit / copy (from the final norm)
    out: State = field(default_factory=dict)  # canonical keys this target keeps, in source order


@dataclass(frozen=True)
class Format:
    """A checkpoint format: its name, how it is read, what it keeps, how it is written."""

    name: str
    order: int | None = None  # position among the --to targets; None: not a target
    source_order: int | None = None  # position among the --from sources; None: not a source

    # ---- reading (None: the format already uses canonical names) ----
    detect: Callable[[Sequence[str]], bool] | None = None  # does a key set use this naming?
    to_canonical: Callable[[State, dict[str, Any] | None], Canonical] | None = None  # (state, config.json or None)

    # ---- converting: which canonical parts the file keeps ----
    keep: frozenset[str] = frozenset()  # key kinds (maecore.convert.keys.key_kind) kept as they are
    extras: frozenset[str] = frozenset()  # rel_pos_h / rel_pos_w / relative_position_bias_table / gamma it can hold
    why: Mapping[str, str] = field(default_factory=dict)  # kind -> why this format drops it (else keys.DROP_REASONS)
    pos_cls_slot: bool = False  # its pos_embed always has the cls row (ViTDet), even without a cls token
    records_heads: bool = False  # the file records num_heads: say so when it was guessed
    prepare: Callable[[Job], None] | None = None  # before the keys: resolve options
    place: Callable[[Job, str, str | None, torch.Tensor], bool] | None = None  # (job, key, kind, value): handled?
    complete: Callable[[Job], None] | None = None  # after the keys, before resampling
    annotate: Callable[[Job], None] | None = None  # after resampling: notes for the user

    # ---- writing ----
    from_canonical: Callable[[State, Arch], tuple[State, dict[str, str]]] | None = None  # -> (written, renamed)
    config: Callable[[Arch, State, dict[str, Any]], dict[str, Any]] | None = None  # (arch, kept keys, hints) -> config
    new_keys: Callable[[Job, State], dict[str, str]] | None = None  # keys its model has that the file leaves to init
    write: Callable[[Converted, Source, Path, bool], list[Path]] | None = None  # (conv, source, dst, force)
    directory: bool = False  # writes a directory (checks dst itself)
    flat: bool = False  # a bare tensor dict, so a .safetensors name is fine

    @property
    def is_target(self) -> bool:
        return self.order is not None and self.write is not None

    @property
    def is_source(self) -> bool:
        return self.source_order is not None


@cache
def registry() -> dict[str, Format]:
    """Every format of this package's modules, by name."""
    found: dict[str, Format] = {}
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        for fmt in getattr(module, "FORMATS", ()):
            if fmt.name in found:
                raise RuntimeError(f"format {fmt.name!r} is defined twice (second in {module.__name__})")
            found[fmt.name] = fmt
    return found


def targets() -> tuple[str, ...]:
    """Names of the formats the converter writes, in --to order."""
    return tuple(f.name for f in sorted((f for f in registry().values() if f.is_target), key=lambda f: f.order))


def sources() -> tuple[str, ...]:
    """Names of the formats the converter reads (and ``auto``), in --from order."""
    return ("auto", *(f.name for f in sorted((f for f in registry().values() if f.is_source), key=lambda f: f.source_order)))


def target_format(name: str) -> Format:
    fmt = registry().get(name)
    if fmt is None or not fmt.is_target:
        raise UserError(f"unknown target {name!r}; choose from {', '.join(targets())}")
    return fmt


def source_format(name: str) -> Format:
    fmt = registry().get(name)
    if fmt is None or not fmt.is_source:
        raise UserError(f"unknown source format {name!r}; choose from {', '.join(sources())}")
    return fmt


def detect_naming(keys: Sequence[str]) -> Format | None:
    """The format whose own naming a key set uses, or None for canonical names."""
    for fmt in sorted((f for f in registry().values() if f.is_source and f.detect), key=lambda f: f.source_order):
        if fmt.detect(keys):
            return fmt
    return None
