"""detectron2 ViTDet: the encoder under ``backbone.net.`` (``SimpleFeaturePyramid.net``), a ``.pth``
``{'model': …}`` or a model-zoo ``.pkl`` of numpy arrays.  No cls token, but the position table keeps
its cls row; blocks carry decomposed relative position (zero from MAE)."""

from __future__ import annotations

import pickle
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from maecore.convert.formats import Canonical, Format, State
from maecore.convert.formats._shared import REL_POS, VITDET_WHY, vitdet_new_keys, vitdet_size_note, write_model
from maecore.convert.keys import Arch
from maecore.convert.writers import atomic_write

D2_PREFIX = "backbone.net."


def _to_canonical(state: State, config: dict[str, Any] | None) -> Canonical:
    out, dropped, renamed = {}, {}, {}
    for k, v in state.items():
        if k.startswith(D2_PREFIX):
            out[k[len(D2_PREFIX):]] = v
            renamed[k] = k[len(D2_PREFIX):]
        else:
            dropped[k] = "detectron2 detector part outside backbone.net (pyramid / RPN / ROI heads)"
    return Canonical(out, dropped, renamed, {"pos_prefix": 1})


def _from_canonical(state: State, arch: Arch) -> tuple[State, dict[str, str]]:
    return {D2_PREFIX + k: v for k, v in state.items()}, {k: D2_PREFIX + k for k in state}


def _write(conv, source, dst: Path, force: bool) -> list[Path]:
    if dst.suffix != ".pkl":
        return write_model(conv, source, dst, force)
    zoo = {"model": {k: v.detach().cpu().numpy() for k, v in conv.state.items()},
           "__author__": "maecore tools/convert.py", "matching_heuristics": False}  # exact names: no heuristics

    def dump(tmp: str) -> None:
        with open(tmp, "wb") as f:
            pickle.dump(zoo, f, protocol=4)

    atomic_write(dst, dump)
    return [dst]


def _detect(keys: Sequence[str]) -> bool:
    return any(k.startswith(D2_PREFIX) for k in keys)


FORMATS = (
    Format("detectron2", order=4, source_order=5, detect=_detect, to_canonical=_to_canonical, extras=REL_POS, why=VITDET_WHY,
           pos_cls_slot=True, annotate=vitdet_size_note, from_canonical=_from_canonical,
           new_keys=lambda job, written: vitdet_new_keys(job, written, D2_PREFIX), write=_write),
)
