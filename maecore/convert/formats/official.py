"""The official MAE releases (``{'model': state}``, official names) and our training checkpoints."""

from __future__ import annotations

from maecore.convert.formats import Format
from maecore.convert.formats._shared import ALL_PARTS, write_model

FORMATS = (
    Format("official", order=0, source_order=2, keep=ALL_PARTS, write=write_model),
    # a checkpoint of our pretraining (model + optimizer + args): official names, read only
    Format("ours", source_order=1),
)
