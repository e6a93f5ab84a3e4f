"""A flat safetensors file of canonical tensors: everything the source has, extras included."""

from __future__ import annotations

from maecore.convert.formats import Format
from maecore.convert.formats._shared import ALL_PARTS, BEIT_EXTRAS, REL_POS, write_safetensors

FORMATS = (
    Format("safetensors", order=3, source_order=8, keep=ALL_PARTS, extras=REL_POS | BEIT_EXTRAS, write=write_safetensors,
           flat=True),
)
