"""The model registry: every named ViT of the toolkit, and the one resolver that turns what a user typed
(``vit_base_patch16``, ``mae_vit_base_patch16``, ``base``) into a canonical name and its size.

Each named model is a plain, greppable builder function that spells out its size, as timm's
``vision_transformer.py`` does, in the decorator that registers it::

    @register_model("base", patch_size=16, embed_dim=768, depth=12, num_heads=12)
    def vit_base_patch16(**kwargs) -> VisionTransformer:
        return VisionTransformer(**kwargs)

The registry records what the builder declares (never reads it off the name).  Two families:

``vit``  the shared encoder, :mod:`maecore.models.vit`; always loaded with :mod:`maecore.models`, and
         its declarations are the published sizes, :data:`SIZES`.
``mae``  encoder + decoder, ``pretrain/model.py``.  Loaded only by importing ``pretrain.model``:
         whoever asks for an ``mae_*`` model imports it (nothing in ``maecore`` does); asking before
         that is a :class:`FamilyNotLoadedError`, not a silent miss.

Both families have the same encoder sizes (checked at registration), so any spelling, with or
without ``mae_``, names one size, and resolves into either family.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple, TypeVar

from maecore.errors import UserError

Family = Literal["vit", "mae"]
F = TypeVar("F", bound=Callable[..., Any])

# the module whose import registers a family's builders (named in the error when it is not loaded)
FAMILY_HOME: dict[str, str] = {"vit": "maecore.models", "mae": "pretrain.model"}


@dataclass(frozen=True)
class Size:
    """A published ViT size (ViT paper, MAE paper)."""

    embed_dim: int
    depth: int
    num_heads: int
    patch_size: int

    def kwargs(self) -> dict[str, int]:
        return dict(embed_dim=self.embed_dim, depth=self.depth, num_heads=self.num_heads, patch_size=self.patch_size)


# size name -> the encoder size, as the ``vit_*`` builders declare them (smallest first)
SIZES: dict[str, Size] = {}
# the constructor arguments a size fixes, and that ``--patch_size/--embed_dim/--depth/--num_heads`` override
SIZE_KEYS = ("embed_dim", "depth", "num_heads", "patch_size")

# canonical name -> builder, for both families
MODEL_REGISTRY: dict[str, Callable[..., Any]] = {}


@dataclass(frozen=True)
class ModelSpec:
    """What a builder declared: its family, its size's name and encoder, and any further defaults (the MAE
    decoder's size)."""

    name: str
    family: Family
    size: str
    arch: Size
    defaults: dict[str, Any]


_SPECS: dict[str, ModelSpec] = {}
_BY_SIZE: dict[tuple[str, str], str] = {}  # (family, size) -> canonical name


class UnknownModelError(UserError, ValueError):
    """A model name that is not in the registry: a one-line user error for the CLIs, and still the
    ``ValueError`` that callers of the builders have always caught."""


class FamilyNotLoadedError(UnknownModelError):
    """A family's model asked for before the module that registers it was imported (``mae``:
    ``pretrain.model``)."""


class ResolvedModel(NamedTuple):
    """What a model name means: the canonical name, the constructor kwargs of its size and the size's name."""

    name: str
    kwargs: dict[str, int]
    size: str


def _check_family(family: str) -> None:
    if family not in FAMILY_HOME:
        raise ValueError(f"unknown model family {family!r}; choose from {', '.join(FAMILY_HOME)}")
    if not any(spec.family == family for spec in _SPECS.values()):
        raise FamilyNotLoadedError(f"no {family} models are registered: import {FAMILY_HOME[family]} first "
                                   f"(it registers the {family}_ builders)")


def model_names(family: Family = "vit") -> list[str]:
    """The canonical names of a family, smallest first."""
    _check_family(family)
    return [spec.name for spec in _SPECS.values() if spec.family == family]


def canonical_name(size: str, family: Family = "vit") -> str:
    """``("base", "mae")`` -> ``mae_vit_base_patch16``: the registered ``family`` model of that size."""
    _check_family(family)
    if (family, size) not in _BY_SIZE:
        raise UnknownModelError(f"no {family} model of size {size!r}; choose from {', '.join(model_names(family))}")
    return _BY_SIZE[family, size]


def _size_of(text: str) -> str | None:
    """The size a spelling names: a size, a registered name, or a ``vit_*`` name with ``mae_`` in front."""
    if text in SIZES:
        return text
    if (spec := _SPECS.get(text)) is not None:
        return spec.size
    # ``mae_`` + a vit name: resolvable before (and without) the mae family is loaded
    spec = _SPECS.get(text[len("mae_"):]) if text.startswith("mae_") else None
    return spec.size if spec is not None and spec.family == "vit" else None


def resolve_model(name: str, family: Family = "vit") -> ResolvedModel:
    """Any spelling of a registered model -> its canonical name in ``family`` and its size kwargs.

    Accepted: the full name with or without ``mae_`` (``vit_base_patch16``, ``mae_vit_base_patch16``)
    and the short size (``base``).  Pretraining asks for ``family="mae"`` (after importing
    ``pretrain.model``), the transfer tasks for ``"vit"``: the same encoder size either way.  Anything
    else is an :class:`UnknownModelError`; a family not loaded, a :class:`FamilyNotLoadedError`."""
    _check_family(family)
    size = _size_of(str(name).strip().lower())
    if size is None or (family, size) not in _BY_SIZE:
        raise UnknownModelError(f"unknown model {name!r}; choose from {', '.join(model_names(family))} "
                                f"(or {', '.join(SIZES)}; with or without mae_)")
    spec = _SPECS[_BY_SIZE[family, size]]
    return ResolvedModel(spec.name, spec.arch.kwargs(), size)


def model_kwargs(name: str, patch_size: int | None = None, embed_dim: int | None = None, depth: int | None = None,
                 num_heads: int | None = None) -> dict[str, int]:
    """The size kwargs of ``name`` with the given overrides (``None``/0: the size's own value)."""
    kw = resolve_model(name).kwargs
    for key, value in (("patch_size", patch_size), ("embed_dim", embed_dim), ("depth", depth), ("num_heads", num_heads)):
        if value:
            kw[key] = int(value)
    return kw


def register_model(
    size: str, *, family: Family = "vit", patch_size: int, embed_dim: int, depth: int, num_heads: int, **defaults: Any
) -> Callable[[F], F]:
    """Register a builder under its own name, with the size it declares.

    ``size`` names the size (``base``: the short spelling users type); ``patch_size/embed_dim/depth/num_heads``
    are its encoder and ``defaults`` any further constructor arguments the model fixes (the MAE decoder).  The
    returned builder starts from these; keyword arguments override them (``None`` keeps the declared value)
    and pass the rest to the constructor.  A ``vit`` builder defines its size in :data:`SIZES`; an ``mae``
    builder must declare the same encoder as the ``vit`` one of its size.  One builder per family and size,
    one per name: anything else fails at import."""
    arch = Size(embed_dim=embed_dim, depth=depth, num_heads=num_heads, patch_size=patch_size)
    declared: dict[str, Any] = {**arch.kwargs(), **defaults}

    def register(fn: F) -> F:
        name = fn.__name__
        if family not in FAMILY_HOME:
            raise ValueError(f"builder {name!r}: unknown family {family!r}")
        if not all(isinstance(v, int) and v > 0 for v in arch.kwargs().values()):
            raise ValueError(f"builder {name!r}: patch_size, embed_dim, depth and num_heads must be positive integers")
        if name in MODEL_REGISTRY:
            raise ValueError(f"model {name!r} is registered twice")
        if family != "vit" and SIZES.get(size) != arch:
            raise ValueError(f"builder {name!r}: its encoder {arch} is not the vit size {size!r} ({SIZES.get(size)})")
        if (family, size) in _BY_SIZE:
            raise ValueError(f"builder {name!r}: a {family} model of size {size!r} is registered already "
                             f"({_BY_SIZE[family, size]})")

        @functools.wraps(fn)
        def build(**kwargs: Any) -> Any:
            kw = dict(declared)
            kw.update({k: v for k, v in kwargs.items() if not (k in declared and v is None)})
            return fn(**kw)

        if family == "vit":
            SIZES[size] = arch
        _SPECS[name] = ModelSpec(name, family, size, arch, dict(defaults))
        _BY_SIZE[family, size] = name
        MODEL_REGISTRY[name] = build
        return build  # type: ignore[return-value]

    return register


def create_model(name: str, family: Family = "vit", **kwargs: Any) -> Any:
    """Build the registered model ``name`` (any spelling) of ``family`` with constructor overrides."""
    return MODEL_REGISTRY[resolve_model(name, family).name](**kwargs)


__all__ = [
    "FAMILY_HOME",
    "MODEL_REGISTRY",
    "SIZES",
    "SIZE_KEYS",
    "Family",
    "FamilyNotLoadedError",
    "ModelSpec",
    "ResolvedModel",
    "Size",
    "UnknownModelError",
    "canonical_name",
    "create_model",
    "model_kwargs",
    "model_names",
    "register_model",
    "resolve_model",
]
