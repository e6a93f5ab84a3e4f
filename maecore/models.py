"""The model registry: every named ViT of the toolkit, and the one resolver that turns what a user typed
(``vit_base_patch16``, ``mae_vit_base_patch16``, ``base``) into a canonical name and its size.

The published sizes live in :data:`SIZES` and nowhere else.  Each named model is a plain, greppable
builder function decorated with :func:`register_model`; its name says its family, size and patch
(``[mae_]vit_<size>_patch<p>``), and the decorator fills in the size's width, depth and heads::

    @register_model
    def vit_base_patch16(**kwargs) -> VisionTransformer:
        return VisionTransformer(**kwargs)

``vit_*`` builders (the shared encoder) are here; the ``mae_vit_*`` ones (encoder + decoder) are in
``pretrain/model.py``.  Names resolve without importing either: the name is computed from the size.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple, TypeVar

from maecore.errors import UserError
from maecore.vit import VisionTransformer

Family = Literal["vit", "mae"]
F = TypeVar("F", bound=Callable[..., Any])


@dataclass(frozen=True)
class Size:
    """A published ViT size (ViT paper, MAE paper)."""

    embed_dim: int
    depth: int
    num_heads: int
    patch_size: int

    def kwargs(self) -> dict[str, int]:
        return dict(embed_dim=self.embed_dim, depth=self.depth, num_heads=self.num_heads, patch_size=self.patch_size)


SIZES: dict[str, Size] = {
    "tiny": Size(192, 12, 3, 16),
    "small": Size(384, 12, 6, 16),
    "base": Size(768, 12, 12, 16),
    "large": Size(1024, 24, 16, 16),
    "huge": Size(1280, 32, 16, 14),
}
# the constructor arguments a size fixes, and that ``--patch_size/--embed_dim/--depth/--num_heads`` override
SIZE_KEYS = ("embed_dim", "depth", "num_heads", "patch_size")

_NAME = re.compile(r"(mae_)?vit_([a-z]+)_patch(\d+)")
# canonical name -> builder (``vit_*`` here; ``mae_vit_*`` once pretrain.model is imported)
MODEL_REGISTRY: dict[str, Callable[..., Any]] = {}


class UnknownModelError(UserError, ValueError):
    """A model name that is not in the registry: a one-line user error for the CLIs, and still the
    ``ValueError`` that callers of the builders have always caught."""


class ResolvedModel(NamedTuple):
    """What a model name means: the canonical name and the constructor kwargs of its size."""

    name: str
    kwargs: dict[str, int]

    @property
    def size(self) -> str:
        """The short size name (``base``)."""
        m = _NAME.fullmatch(self.name)
        assert m is not None
        return m.group(2)


def canonical_name(size: str, family: Family = "vit") -> str:
    """``("base", "mae")`` -> ``mae_vit_base_patch16``."""
    name = f"vit_{size}_patch{SIZES[size].patch_size}"
    return f"mae_{name}" if family == "mae" else name


def model_names(family: Family = "vit") -> list[str]:
    """The canonical names of a family, smallest first."""
    return [canonical_name(s, family) for s in SIZES]


def resolve_model(name: str, family: Family = "vit") -> ResolvedModel:
    """Any spelling of a registered model -> its canonical name in ``family`` and its size kwargs.

    Accepted: the full name with or without ``mae_`` (``vit_base_patch16``, ``mae_vit_base_patch16``)
    and the short size (``base``).  Pretraining asks for ``family="mae"``, the transfer tasks for
    ``"vit"``: the same encoder size either way.  Anything else is an :class:`UnknownModelError`."""
    text = str(name).strip().lower()
    size = text if text in SIZES else None
    if size is None and (m := _NAME.fullmatch(text)) and m.group(2) in SIZES and int(m.group(3)) == SIZES[m.group(2)].patch_size:
        size = m.group(2)
    if size is None:
        raise UnknownModelError(f"unknown model {name!r}; choose from {', '.join(model_names(family))} "
                                f"(or {', '.join(SIZES)}; with or without mae_)")
    return ResolvedModel(canonical_name(size, family), SIZES[size].kwargs())


def model_kwargs(name: str, patch_size: int | None = None, embed_dim: int | None = None, depth: int | None = None,
                 num_heads: int | None = None) -> dict[str, int]:
    """The size kwargs of ``name`` with the given overrides (``None``/0: the size's own value)."""
    kw = resolve_model(name).kwargs
    for key, value in (("patch_size", patch_size), ("embed_dim", embed_dim), ("depth", depth), ("num_heads", num_heads)):
        if value:
            kw[key] = int(value)
    return kw


def register_model(fn: F) -> F:
    """Register a builder under its own name, ``[mae_]vit_<size>_patch<p>``.

    The returned builder starts from the size's ``embed_dim/depth/num_heads/patch_size`` (from
    :data:`SIZES`); keyword arguments override them (``None`` keeps the size's value) and pass the rest
    to the constructor.  A name that does not match a size and its patch fails at import."""
    m = _NAME.fullmatch(fn.__name__)
    if m is None or m.group(2) not in SIZES or int(m.group(3)) != SIZES[m.group(2)].patch_size:
        raise ValueError(f"builder {fn.__name__!r}: name must be [mae_]vit_<size>_patch<p> for a size in SIZES with its patch")
    if fn.__name__ in MODEL_REGISTRY:
        raise ValueError(f"model {fn.__name__!r} is registered twice")
    size = SIZES[m.group(2)]

    @functools.wraps(fn)
    def build(**kwargs: Any) -> Any:
        kw: dict[str, Any] = size.kwargs()
        kw.update({k: v for k, v in kwargs.items() if not (k in SIZE_KEYS and v is None)})
        return fn(**kw)

    MODEL_REGISTRY[fn.__name__] = build
    return build  # type: ignore[return-value]


def create_model(name: str, family: Family = "vit", **kwargs: Any) -> Any:
    """Build the registered model ``name`` (any spelling) of ``family`` with constructor overrides."""
    canonical = resolve_model(name, family).name
    if canonical not in MODEL_REGISTRY:
        raise UnknownModelError(f"model {canonical!r} has no builder loaded (import pretrain.model for mae_ models)")
    return MODEL_REGISTRY[canonical](**kwargs)


# --------------------------------------------------------------------------------------------------
# The shared encoder, by size
# --------------------------------------------------------------------------------------------------
@register_model
def vit_tiny_patch16(**kwargs: Any) -> VisionTransformer:
    """ViT-Ti/16: 192 wide, 12 blocks, 3 heads."""
    return VisionTransformer(**kwargs)


@register_model
def vit_small_patch16(**kwargs: Any) -> VisionTransformer:
    """ViT-S/16: 384 wide, 12 blocks, 6 heads."""
    return VisionTransformer(**kwargs)


@register_model
def vit_base_patch16(**kwargs: Any) -> VisionTransformer:
    """ViT-B/16: 768 wide, 12 blocks, 12 heads."""
    return VisionTransformer(**kwargs)


@register_model
def vit_large_patch16(**kwargs: Any) -> VisionTransformer:
    """ViT-L/16: 1024 wide, 24 blocks, 16 heads."""
    return VisionTransformer(**kwargs)


@register_model
def vit_huge_patch14(**kwargs: Any) -> VisionTransformer:
    """ViT-H/14: 1280 wide, 32 blocks, 16 heads."""
    return VisionTransformer(**kwargs)


__all__ = [
    "MODEL_REGISTRY",
    "SIZES",
    "SIZE_KEYS",
    "ResolvedModel",
    "Size",
    "UnknownModelError",
    "canonical_name",
    "create_model",
    "model_kwargs",
    "model_names",
    "register_model",
    "resolve_model",
    "vit_base_patch16",
    "vit_huge_patch14",
    "vit_large_patch16",
    "vit_small_patch16",
    "vit_tiny_patch16",
]
