"""The two records a conversion passes between its steps: the checkpoint read (:class:`Source`, from
:mod:`maecore.convert.io`) and the result to write (:class:`Converted`, from :mod:`maecore.convert.pipeline`).
They live below both, so that the format records (:mod:`maecore.convert.formats`), which io and the pipeline
ask, can name them without an import circle."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from maecore.convert.keys import Arch
from maecore.convert.report import ConversionReport


@dataclass
class Source:
    """A checkpoint read into canonical names."""

    state: dict[str, torch.Tensor]
    fmt: str
    path: str = "<state dict>"
    hints: dict[str, Any] = field(default_factory=dict)
    dropped: dict[str, str] = field(default_factory=dict)
    renamed: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


@dataclass
class Converted:
    """A conversion ready to be written."""

    target: str
    state: dict[str, torch.Tensor]
    report: ConversionReport
    arch: Arch
    meta: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] | None = None  # a config file written beside the weights (HF config.json)
