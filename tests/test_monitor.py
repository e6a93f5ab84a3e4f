"""The pretraining monitor (issue #26): its measures against independent computations, its subset, and the hook in
real runs — logged, leaving training unchanged, the same on 1 and 2 ranks (DDP and FSDP), exact across a SIGKILL
and ``--resume auto``, and a failure that is one warning line while training goes on."""

from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.data import TensorDataset

from maecore.engine import EngineConfig, HookBase, Trainer

ROOT = Path(__file__).resolve().parents[1]


# ---- the engine's one addition: the micro-batch, for a hook's after_backward ---------------------------------
def test_a_hook_sees_the_batch_it_follows(tmp_path):
    x = torch.arange(24.0).view(12, 2)
    seen = []

    class Watch(HookBase):
        def after_backward(self) -> None:
            seen.append(self.trainer.batch[0].clone())

        def after_step(self) -> None:
            assert self.trainer.batch is None  # not kept alive past its micro-batch

    cfg = EngineConfig(output_dir=str(tmp_path / "o"), epochs=1, batch_size=4, num_workers=0, progress=False, amp="none",
                       keep_every=0)
    model = torch.nn.Linear(2, 1)
    t = Trainer(cfg, model, torch.optim.SGD(model.parameters(), lr=0.1), TensorDataset(x),
                lambda m, b: (m(b[0]).pow(2).mean(), {}), lambda e: 0.1, torch.device("cpu"), hooks=[Watch()])
    t.fit()
    assert len(seen) == 3 and sorted(torch.cat(seen)[:, 0].tolist()) == x[:, 0].tolist()  # each sample once
