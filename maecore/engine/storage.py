"""What the loop measures between two log lines (detectron2's ``EventStorage``, reduced to what this engine needs)."""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import torch


class MetricStorage:
    """The loss and the step function's logs of every micro-batch since the last :meth:`reset`, summed on the
    device (no host sync: :class:`~maecore.engine.hooks.TrainLog` reads them every ``log_every`` steps, then
    resets), their count and when the window began; ``latest`` holds the last values logged (at ``latest_step``)
    for whoever shows them (the progress bar, the status line)."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.count = 0  # micro-batches summed
        self.since = time.time()
        self.latest: dict[str, Any] = {}
        self.latest_step = -1

    def put(self, values: Mapping[str, torch.Tensor]) -> None:
        """Add one micro-batch's values (detached, as float32 on their device)."""
        for k, v in values.items():
            v = v.detach().float()
            self.sums[k] = self.sums[k] + v if k in self.sums else v
        self.count += 1

    def reset(self) -> None:
        self.sums, self.count, self.since = {}, 0, time.time()
