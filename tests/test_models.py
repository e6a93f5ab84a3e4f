"""maecore.models: one registry of named ViTs, one resolver for every spelling of a name."""

from __future__ import annotations

import pytest
import torch

import pretrain.model  # noqa: F401  (registers the mae_vit_* builders)
from maecore.errors import UserError
from maecore.models import (
    MODEL_REGISTRY,
    SIZES,
    UnknownModelError,
    create_model,
    model_kwargs,
    model_names,
    register_model,
    resolve_model,
)
from maecore.vit import VisionTransformer

PATCH = {"tiny": 16, "small": 16, "base": 16, "large": 16, "huge": 14}


@pytest.mark.parametrize("size", list(PATCH))
def test_every_spelling_resolves_to_one_canonical_name(size: str) -> None:
    vit, mae = f"vit_{size}_patch{PATCH[size]}", f"mae_vit_{size}_patch{PATCH[size]}"
    for spelling in (vit, mae, size, size.upper(), f" {mae} "):
        assert resolve_model(spelling).name == vit
        assert resolve_model(spelling, "mae").name == mae
        assert resolve_model(spelling).kwargs == SIZES[size].kwargs()
    assert resolve_model(mae).size == size


def test_sizes_are_the_published_ones() -> None:
    got = {s: (v.embed_dim, v.depth, v.num_heads, v.patch_size) for s, v in SIZES.items()}
    assert got == {"tiny": (192, 12, 3, 16), "small": (384, 12, 6, 16), "base": (768, 12, 12, 16),
                   "large": (1024, 24, 16, 16), "huge": (1280, 32, 16, 14)}

@pytest.mark.parametrize("name", ["giant", "vit_base_patch8", "mae_vit_huge_patch16", "", "vit_base"])
def test_unknown_name_is_a_one_line_user_error_listing_the_choices(name: str) -> None:
    with pytest.raises(UnknownModelError) as e:
        resolve_model(name, "mae")
    assert isinstance(e.value, UserError) and isinstance(e.value, ValueError)  # CLIs print it; callers may catch ValueError
    msg = str(e.value)
    assert "\n" not in msg and f"unknown model {name!r}" in msg
    assert all(n in msg for n in model_names("mae")) and "tiny, small, base, large, huge" in msg


def test_registry_holds_explicit_builders_for_both_families() -> None:
    assert set(model_names("vit")) | set(model_names("mae")) <= set(MODEL_REGISTRY)
    for name in model_names("vit") + model_names("mae"):
        assert MODEL_REGISTRY[name].__name__ == name  # greppable: the function is called by its name
    with torch.device("meta"):
        m = create_model("base", img_size=64, depth=2)  # a size override; other kwargs reach the constructor
        assert type(m) is VisionTransformer and (m.embed_dim, m.depth, m.patch_size, m.img_size) == (768, 2, 16, (64, 64))
        mae = create_model("large", "mae", patch_size=None, decoder_depth=1)  # None keeps the size's value
        assert type(mae).__name__ == "MaskedAutoencoderViT" and (mae.embed_dim, mae.depth, mae.patch_size) == (1024, 24, 16)
        assert len(mae.decoder_blocks) == 1


def test_model_kwargs_applies_only_the_given_overrides() -> None:
    assert model_kwargs("huge") == dict(embed_dim=1280, depth=32, num_heads=16, patch_size=14)
    assert model_kwargs("mae_vit_huge_patch14", patch_size=16, depth=None, embed_dim=0) == \
        dict(embed_dim=1280, depth=32, num_heads=16, patch_size=16)


def test_a_builder_whose_name_does_not_fit_a_size_fails_at_registration() -> None:
    def vit_base_patch14(**kwargs):  # ViT-B has 16-px patches
        return VisionTransformer(**kwargs)

    def vit_medium_patch16(**kwargs):
        return VisionTransformer(**kwargs)

    for fn in (vit_base_patch14, vit_medium_patch16):
        with pytest.raises(ValueError, match="name must be"):
            register_model(fn)
    assert "vit_base_patch14" not in MODEL_REGISTRY
