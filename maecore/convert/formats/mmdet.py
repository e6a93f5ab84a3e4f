"""mmdetection ViTDet (``mmdet.models.backbones.ViT`` of the ViTDet project): detectron2's names
without the ``backbone.net.`` prefix, in ``{'model': …}``."""

from __future__ import annotations

from maecore.convert.formats import Format
from maecore.convert.formats._shared import REL_POS, VITDET_WHY, vitdet_new_keys, vitdet_size_note, write_model

FORMATS = (
    Format("mmdet", order=5, source_order=6, extras=REL_POS, why=VITDET_WHY, pos_cls_slot=True, annotate=vitdet_size_note,
           new_keys=vitdet_new_keys, write=write_model),
)
