"""maecore.models: one registry of named ViTs, one resolver for every spelling of a name."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import pretrain.model  # noqa: F401  (registers the mae_vit_* builders)
from maecore.errors import UserError
from maecore.models import (
    MODEL_REGISTRY,
    SIZES,
    FamilyNotLoadedError,
    Size,
    UnknownModelError,
    VisionTransformer,
    create_model,
    model_kwargs,
    model_names,
    register_model,
    registry,
    resolve_model,
)
from tests import ROOT

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


@pytest.fixture
def scratch_registry():
    """Registrations made in a test are undone afterwards (the registry is process-wide)."""
    saved = [(d, dict(d)) for d in (MODEL_REGISTRY, SIZES, registry._SPECS, registry._BY_SIZE)]
    yield
    for d, copy in saved:
        d.clear()
        d.update(copy)


def test_the_registry_records_the_size_a_builder_declares(scratch_registry) -> None:
    @register_model("medium", patch_size=16, embed_dim=512, depth=8, num_heads=8)
    def my_encoder(**kwargs):  # the name says nothing about the size: the declaration does
        return VisionTransformer(**kwargs)

    assert SIZES["medium"] == Size(embed_dim=512, depth=8, num_heads=8, patch_size=16)
    for spelling in ("medium", "my_encoder", "mae_my_encoder"):
        assert resolve_model(spelling) == ("my_encoder", dict(embed_dim=512, depth=8, num_heads=8, patch_size=16), "medium")
    with torch.device("meta"):
        m = create_model("medium", img_size=32, depth=None, num_heads=4)  # None keeps the declared depth
    assert (m.embed_dim, m.depth, m.num_heads, m.patch_size) == (512, 8, 4, 16)
    assert model_names()[-1] == "my_encoder" and MODEL_REGISTRY["my_encoder"].__name__ == "my_encoder"


def test_conflicting_declarations_fail_at_registration(scratch_registry) -> None:
    before = dict(MODEL_REGISTRY), dict(SIZES)
    cases = [
        (register_model("base", patch_size=14, embed_dim=768, depth=12, num_heads=12), "vit_base_patch14",
         "a vit model of size 'base' is registered already"),
        (register_model("base", family="mae", patch_size=16, embed_dim=768, depth=24, num_heads=12), "mae_deep_base",
         "is not the vit size 'base'"),
        (register_model("gigantic", family="mae", patch_size=14, embed_dim=1664, depth=48, num_heads=16), "mae_gigantic",
         "is not the vit size 'gigantic'"),
        (register_model("medium", patch_size=16, embed_dim=512, depth=8, num_heads=8), "vit_base_patch16", "registered twice"),
        (register_model("medium", patch_size=16, embed_dim=512, depth=0, num_heads=8), "vit_medium", "positive integers"),
    ]
    for decorate, name, match in cases:
        fn = lambda **kwargs: VisionTransformer(**kwargs)  # noqa: E731
        fn.__name__ = name
        with pytest.raises(ValueError, match=match):
            decorate(fn)
    assert (dict(MODEL_REGISTRY), dict(SIZES)) == before


def test_the_mae_family_is_there_only_after_importing_pretrain_model() -> None:
    """Nothing in maecore imports pretrain: the vit vocabulary (``mae_`` spellings included) works without it, and
    asking for the mae family before ``import pretrain.model`` is a one-line user error naming the import."""
    code = (
        "import sys\n"
        "from maecore.models import FamilyNotLoadedError, UnknownModelError, model_kwargs, resolve_model\n"
        "import maecore.cli, maecore.convert, maecore.engine, maecore.predict\n"
        "assert 'pretrain.model' not in sys.modules, 'maecore imported pretrain.model'\n"
        "assert resolve_model('mae_vit_base_patch16').name == 'vit_base_patch16'\n"
        "assert model_kwargs('mae_vit_huge_patch14')['patch_size'] == 14\n"
        "for ask in ('mae_vit_base_patch16', 'base', 'giant'):\n"
        "    try:\n"
        "        resolve_model(ask, 'mae')\n"
        "    except FamilyNotLoadedError as e:\n"
        "        assert isinstance(e, UnknownModelError) and isinstance(e, ValueError)\n"
        "        print(e)\n"
        "import pretrain.model\n"
        "print(resolve_model('base', 'mae').name)\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    lines = p.stdout.splitlines()
    assert lines == ["no mae models are registered: import pretrain.model first (it registers the mae_ builders)"] * 3 + [
        "mae_vit_base_patch16"]
    assert issubclass(FamilyNotLoadedError, UnknownModelError)
