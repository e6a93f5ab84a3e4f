"""Carry pretrained weights into any encoder built from :class:`maecore.models.vit.VisionTransformer`, and
between the formats other frameworks load.

``load_backbone(model, src)`` is what every task calls: it reads an MAE checkpoint (ours, an official
release, timm, HF ViTMAE, a detectron2 / mmseg file, or a trunk file written by the converter), keeps
the encoder, drops what the target has no use for (decoder, mask tokens, cls token, final norm,
classifier), leaves the target's new parts at their neutral init (relative position zero, layer scale
1), resamples ``pos_embed`` to the target grid, and refuses unknown keys and shape mismatches by name.

Everything goes through one *canonical* naming, the official MAE / timm one (``cls_token``,
``pos_embed``, ``patch_embed.proj``, ``blocks.i.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}``,
``norm``, ``fc_norm``, ``head``, ``decoder_*``, ``mask_token``).  The package:

* :mod:`.io` reads files safely and maps a source into canonical names (:func:`load_source`);
* :mod:`.keys` knows the canonical keys and the architecture their shapes imply (:func:`infer_arch`);
* :mod:`.formats` holds one module per format (name maps, what it keeps, its writer), found by listing
  the package — a new format is a new file there;
* :mod:`.pipeline` maps a canonical source into a target format (:func:`convert`) and writes it
  (:func:`write_converted`), asking the format's record wherever formats differ;
* :mod:`.load` loads weights into a model (:func:`load_weights`, :func:`load_backbone`);
* :mod:`.trained` tells a trained task checkpoint's task and routes it, and writes and reads back the whole
  trained model that its task's ``export`` module lays out (``classification/export.py`` -> timm,
  ``segmentation/export.py`` -> mmseg, ``detection/export.py`` -> detectron2); :mod:`.onnx_export` writes the
  ``--to onnx`` graph of the network a task's ``predict.onnx_module`` hands it;
* ``python -m pipeline.convert SRC -o DST --to …`` is the command line (also ``tools/convert.py``): it lives in
  ``pipeline/``, the one package that imports every task, because this package imports none.
"""

from __future__ import annotations

from maecore.convert import formats
from maecore.convert.formats import Format, detect_naming, registry
from maecore.convert.io import load_source, read_state
from maecore.convert.keys import (
    HEADS_BY_DIM,
    Arch,
    check_shapes,
    guess_decoder_heads,
    guess_heads,
    infer_arch,
    is_decoder_key,
    key_kind,
    why_dropped,
)
from maecore.convert.load import adapt_pos_embed, load_backbone, load_weights
from maecore.convert.pipeline import convert, write_converted
from maecore.convert.records import Converted, Source
from maecore.convert.report import ConversionReport
from maecore.convert.writers import TRUNK_FORMAT, save_safetensors

TASKS = ("classification", "detection", "segmentation")  # the trunk formats our task packages load
TARGETS: tuple[str, ...] = formats.targets()
SOURCES: tuple[str, ...] = formats.sources()

__all__ = [
    "HEADS_BY_DIM", "SOURCES", "TARGETS", "TASKS", "TRUNK_FORMAT", "Arch", "ConversionReport", "Converted", "Format",
    "Source", "adapt_pos_embed", "check_shapes", "convert", "detect_naming", "guess_decoder_heads", "guess_heads",
    "infer_arch", "is_decoder_key", "key_kind", "load_backbone", "load_source", "load_weights", "read_state", "registry",
    "save_safetensors", "why_dropped", "write_converted",
]
