"""A pretrained MAE of this toolkit whole (encoder and decoder) in the official releases' layout: ``{'model': state}``,
the official MAE names (which are ours).  Pretraining's ``export``, under the names every task's export has
(``export(state, args) -> TrainedExport``, ``write(conv, dst, force) -> list[Path]``; the names are ours, so there is
no ``import_state``).

It is the converter's own ``--to official`` conversion of the checkpoint (:func:`maecore.convert.pipeline.convert`,
the same tensors and report as ``python -m pipeline.convert CKPT -o DST --to official``, whose route is unchanged),
followed by the read-back every trained export does.  The other targets (timm, HF, the detectron2 / mmdet / mmseg
trunks) take the encoder through ``python -m pipeline.convert``, as for any MAE.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from maecore.convert.io import load_source
from maecore.convert.pipeline import convert, write_converted
from maecore.convert.records import Source
from maecore.convert.trained import TrainedExport, write_trained


def export(state: dict[str, torch.Tensor], args: dict[str, Any]) -> TrainedExport:
    """Our MAE (``state``: its state dict; ``args``: the run's saved args, ``{}`` when none) as the official release
    layout: every part kept (``decoder``, ``mask_token``…), the sizes read from the shapes and the saved args."""
    source = load_source({"model": dict(state), "args": dict(args)})  # as the converter reads our checkpoint
    conv = convert(source, "official")
    return TrainedExport(conv.target, conv.state, conv.report, conv.arch, conv.meta, conv.config, task="pretrain",
                         source_state=dict(conv.state))


def write(conv: TrainedExport, dst: str | os.PathLike, force: bool = False) -> list[Path]:
    """Write ``conv`` to ``dst`` (a torch file; never over a file without ``force``); every tensor is read back and
    compared."""
    return write_trained(conv, dst, force, _save)


def _save(conv: TrainedExport, dst: Path, force: bool) -> list[Path]:
    return write_converted(conv, Source(conv.source_state, "ours"), dst, force)
