"""The pretraining monitor (issue #26): its measures against independent computations, its subset, and the hook in
real runs — logged, leaving training unchanged, the same on 1 and 2 ranks (DDP and FSDP), exact across a SIGKILL
and ``--resume auto``, and a failure that is one warning line while training goes on."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

from maecore.engine import EngineConfig, HookBase, Trainer
from maecore.monitor.metrics import knn_scores, knn_top1, rankme

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


# ---- the measures, against brute force and numpy -------------------------------------------------------------
def test_weighted_knn_equals_a_brute_force_vote():
    g = torch.Generator().manual_seed(0)
    bank, queries = torch.randn(60, 8, generator=g), torch.randn(25, 8, generator=g)
    labels, qlabels = torch.randint(0, 4, (60,), generator=g), torch.randint(0, 4, (25,), generator=g)
    b, q = bank.double().numpy(), queries.double().numpy()
    b /= np.linalg.norm(b, axis=1, keepdims=True)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    for k in (1, 20, 100):  # 100 > the bank: every sample votes
        want = np.zeros((25, 4))
        for i in range(25):
            sims = [(float(q[i] @ b[j]), j) for j in range(60)]
            for s, j in sorted(sims, reverse=True)[:k]:
                want[i, int(labels[j])] += np.exp(s / 0.07)
        got = knn_scores(bank, labels, queries, 4, k=k, temperature=0.07, chunk=7).double().numpy()
        np.testing.assert_allclose(got, want, rtol=1e-4)
        acc = 100.0 * float(np.mean(want.argmax(1) == qlabels.numpy()))
        assert knn_top1(bank, labels, queries, qlabels, 4, k=k) == pytest.approx(acc)


def test_rankme_equals_the_entropy_of_numpy_singular_values():
    g = torch.Generator().manual_seed(1)
    low = torch.randn(200, 5, generator=g) @ torch.randn(5, 32, generator=g)  # rank 5
    for z in (low, torch.randn(200, 32, generator=g), low + 0.01 * torch.randn(200, 32, generator=g)):
        s = np.linalg.svd(z.double().numpy(), compute_uv=False)
        p = s / s.sum() + 1e-7
        assert rankme(z) == pytest.approx(float(np.exp(-(p * np.log(p)).sum())), rel=1e-9)
    assert rankme(low) < 5.0 < rankme(torch.randn(200, 32, generator=g)) <= 32
    assert rankme(torch.eye(16)) == pytest.approx(16.0, rel=1e-4)  # equal singular values: the full rank
