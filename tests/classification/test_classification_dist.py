"""classification evaluation under torchrun: 2 gloo processes count each of 15 samples once, use
rank 0's buffers, and gather features in dataset order.  Imports kept light: the spawned workers import this module."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn as nn
from torch.utils.data import TensorDataset

from classification.evaluate import eval_loader, evaluate, extract_features


class _FeatModel(nn.Module):
    def __init__(self, shift: float = 0.0) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.head = nn.Linear(6, 7)
        # stands in for BN running statistics, which differ between ranks after DDP training
        self.register_buffer("shift", torch.full((6,), shift))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return x * 2

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return x if pre_logits else self.head(x + self.shift)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x + self.shift)


def _data() -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(15, 6, generator=g), torch.randint(0, 7, (15,), generator=g), torch.zeros(15, dtype=torch.long))


def _worker(rank: int, world_size: int, init: str, out: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world_size)
    try:
        ds = _data()
        res = evaluate(_FeatModel(shift=float(rank)), eval_loader(ds, 4, 0), torch.device("cpu"), 7)
        f, t = extract_features(_FeatModel(), eval_loader(ds, 4, 0), torch.device("cpu"))
        if rank == 0:
            torch.save({"res": res, "f": f, "t": t}, out)
    finally:
        dist.destroy_process_group()


def test_distributed_eval_counts_each_sample_once(tmp_path: Path) -> None:
    import torch.multiprocessing as mp

    ds = _data()
    single = evaluate(_FeatModel(), eval_loader(ds, 4, 0), torch.device("cpu"), 7)
    assert single["n_images"] == 15
    out = tmp_path / "res.pt"
    mp.start_processes(_worker, args=(2, f"file://{tmp_path / 'rdzv'}", str(out)), nprocs=2, start_method="spawn")
    got = torch.load(out, weights_only=True)
    assert got["res"]["n_images"] == 15  # a padding sampler (DistributedSampler) would report 16
    for k in ("acc1", "acc5", "loss"):
        assert got["res"][k] == pytest.approx(single[k])
    assert torch.equal(got["res"]["confusion"], single["confusion"])
    x, y, _ = ds.tensors
    torch.testing.assert_close(got["f"], x * 2)  # features come back in dataset order
    assert torch.equal(got["t"], y)
