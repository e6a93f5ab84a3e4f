"""The models of the toolkit: the one ViT encoder and the registry of named sizes.

``layers``     attention, relative position, window partition, the block, the patch embedding
``pos_embed``  the sin-cos table and the resampling of a position table
``vit``        :class:`VisionTransformer` and its named sizes (``vit_tiny_patch16`` … ``vit_huge_patch14``)
``registry``   :func:`register_model`, :func:`resolve_model`, :func:`create_model`, :data:`SIZES`

Importing this package registers the ``vit_*`` builders; the ``mae_vit_*`` ones (encoder + decoder) are
registered by ``pretrain.model``, which whoever needs them imports (see :mod:`maecore.models.registry`).
"""

from maecore.models import _timm  # noqa: F401  (first: timm without its eager wandb import)
from maecore.models.registry import (
    FAMILY_HOME,
    MODEL_REGISTRY,
    SIZE_KEYS,
    SIZES,
    Family,
    FamilyNotLoadedError,
    ModelSpec,
    ResolvedModel,
    Size,
    UnknownModelError,
    canonical_name,
    create_model,
    model_kwargs,
    model_names,
    register_model,
    resolve_model,
)
from maecore.models.vit import (
    VisionTransformer,
    vit_base_patch16,
    vit_huge_patch14,
    vit_large_patch16,
    vit_small_patch16,
    vit_tiny_patch16,
)

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
    "VisionTransformer",
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
