"""The pretraining monitor (issue #26): its measures against independent computations, its subset, and the hook in
real runs — logged, leaving training unchanged, the same on 1 and 2 ranks (DDP and FSDP), exact across a SIGKILL
and ``--resume auto``, and a failure that is one warning line while training goes on."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

from maecore.checkpoint import load_file
from maecore.engine import EngineConfig, HookBase, Trainer, read_log
from maecore.monitor import MonitorSubset, OnlineProbe, knn_scores, knn_top1, rankme
from maecore.monitor.subset import balanced_order
from tests import ROOT, forkserver

TINY = ["--model", "mae_vit_tiny_patch16", "--patch_size", "8", "--input_size", "32", "--depth", "2", "--decoder_depth", "1",
        "--decoder_embed_dim", "64", "--decoder_num_heads", "4", "--batch_size", "8", "--no_progress", "--vis_every", "0",
        "--warmup_epochs", "1", "--blr", "1e-3", "--log_every", "1", "--num_workers", "0", "--amp", "none"]
MONITOR = ["--monitor", "--monitor_every", "2", "--monitor_bank", "40", "--monitor_queries", "14"]
MEASURES = ("knn_top1", "linear_top1", "rankme", "linear_loss")


def monitored(out: Path) -> dict[int, dict]:
    """step -> the measures of its monitor record (a resumed run's later record wins)."""
    return {r["step"]: {k: r[k] for k in MEASURES if k in r} for r in read_log(out, "monitor")}


def losses(out: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_log(out, "train")}


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


# ---- the subset -------------------------------------------------------------------------------------------
def test_subset_is_class_balanced_split_like_solo_learn_and_unlabelled_gets_none(tiny_world, tmp_path):
    root = tiny_world["imagenet"]  # 7 classes, 8 train and 2 val images each
    order = balanced_order([0, 0, 0, 1, 1, 2], seed=0)
    assert sorted(order) == list(range(6)) and order[0] < 3 and order[1] in (3, 4) and order[2] == 5  # classes take turns
    sub = MonitorSubset(root, 32, bank=21, queries=10)
    bank_classes = [sub.bank.dataset.targets[i] for i in sub.bank.indices]
    assert sorted(bank_classes) == sorted(list(range(7)) * 3)  # 3 of each class
    assert sub.queries.dataset.root == root / "val" and len(sub.queries) == 10
    assert MonitorSubset(root, 32, bank=21, queries=10).bank.indices == sub.bank.indices  # fixed, seeded

    # val without the first class: queries keep their names' labels, the bank's indices
    data = tmp_path / "data"
    shutil.copytree(root, data)
    first = sorted(p.name for p in (data / "val").iterdir())[0]
    shutil.rmtree(data / "val" / first)
    sub = MonitorSubset(data, 32, bank=14, queries=12)
    sub.load()
    names = [sub.queries.dataset.samples[i][0].parent.name for i in sub.queries.indices]
    assert [sub.classes[y] for y in sub.queries.labels.tolist()] == names and first not in names
    assert tuple(sub.bank.images.shape) == (14, 3, 32, 32) and sub.bank.images.dtype == torch.uint8

    # no val/: the queries are other training images than the bank's
    sub = MonitorSubset(root / "train", 32, bank=30, queries=20)
    assert len(sub.queries) == 20 and not set(sub.bank.indices) & set(sub.queries.indices)

    loose = tmp_path / "loose"
    loose.mkdir()
    for p in sorted((root / "train").rglob("*.jpg"))[:12]:
        shutil.copy(p, loose / f"{p.parent.name}-{p.name}")
    sub = MonitorSubset(loose, 32, bank=10, queries=10)
    assert not sub.labelled and len(sub.bank) == 10 and len(sub.queries) == 0


# ---- the hook in real runs --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def reference(tiny_world, tmp_path_factory, run_module):
    """3 epochs (21 steps) with the monitor every 2 steps, checkpoints every 3; and the same run without it."""
    out = tmp_path_factory.mktemp("monitor") / "ref"
    common = [*TINY, "--data_path", tiny_world["imagenet"], "--epochs", "3", "--save_every_steps", "3"]
    run_module("pretrain", [*common, *MONITOR, "--output_dir", out])
    run_module("pretrain", [*common, "--output_dir", out.parent / "off"])
    return out, common


def test_monitor_logs_records_and_scalars_and_leaves_training_unchanged(reference):
    out, _ = reference
    recs = read_log(out, "monitor")
    assert [r["step"] for r in recs] == [0, *range(2, 21, 2), 21]  # step 0 (random init), every 2, the last
    assert recs[0]["subset"] == {"bank": 40, "queries": 14}
    for r in recs:
        assert 0 <= r["knn_top1"] <= 100 and 0 <= r["linear_top1"] <= 100 and 1 <= r["rankme"] <= 40
    assert "linear_loss" not in recs[0] and all(r["linear_loss"] > 0 for r in recs[1:])
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb = EventAccumulator(str(out / "tensorboard"))
    tb.Reload()
    for key in ("knn_top1", "linear_top1", "rankme"):
        assert [e.step for e in tb.Scalars(f"monitor/{key}")] == [r["step"] for r in recs]
    # nothing of the monitor reaches the training: the same losses and weights as the run without it
    off = out.parent / "off"
    assert losses(out) == losses(off) and len(losses(off)) == 21
    a, b = load_file(out / "checkpoint-last.pth"), load_file(off / "checkpoint-last.pth")
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in b["model"])
    assert set(a["extra"]) == {"monitor"} and b["extra"] == {}


@pytest.mark.slow
def test_sigkill_then_resume_logs_the_same_monitor_values(reference, tmp_path):
    ref, common = reference
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "pretrain", *map(str, common), *MONITOR, "--output_dir", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 180
    while time.time() < deadline and proc.poll() is None:
        if max(losses(out), default=0) >= 11:  # the checkpoint of step 9 holds a classifier mid-window (2 steps logged)
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.005)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert load_file(out / "checkpoint-last.pth")["step"] == 9
    p = forkserver.run([*cmd, "--resume", "auto"], cwd=ROOT, env=env, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert monitored(out) == monitored(ref)


@pytest.mark.slow
def test_one_rank_and_two_ranks_measure_the_same(tiny_world, tmp_path, run_module):
    # the random-initialised network (rank 0's, broadcast) measured at step 0: the same bank, queries and classifier
    # whatever the number of processes, as DDP and as FSDP (features from the gathered weights)
    args = [*TINY, "--data_path", tiny_world["imagenet"], "--epochs", "1", "--max_steps", "1", "--monitoring",  # torchrun
            "--monitor_bank", "41", "--monitor_queries", "13"]  # shares of unequal sizes on 2 ranks
    one, two, fsdp = tmp_path / "one", tmp_path / "two", tmp_path / "fsdp"
    run_module("pretrain", [*args, "--output_dir", one])
    run_module("pretrain", [*args, "--output_dir", two], nproc=2)
    run_module("pretrain", [*args, "--output_dir", fsdp, "--fsdp"], nproc=2)
    want = read_log(one, "monitor")[0]
    assert want["step"] == 0 and want["subset"] == {"bank": 41, "queries": 13}
    for out in (two, fsdp):
        got = read_log(out, "monitor")[0]
        assert got["subset"] == want["subset"]
        assert got["knn_top1"] == want["knn_top1"] and got["linear_top1"] == want["linear_top1"]
        assert got["rankme"] == pytest.approx(want["rankme"], rel=1e-5)


def pretrain_in_process(argv: list[str]) -> dict:
    from pretrain.train import main

    return main([*map(str, argv)])


def test_a_failing_monitor_is_one_warning_line_and_training_goes_on(tiny_world, tmp_path, capsys, monkeypatch):
    from maecore.monitor.subset import MonitorSubset as Subset

    calls = {"n": 0}
    real = Subset.local_features

    def flaky(self, *a, **kw):
        calls["n"] += 1
        if calls["n"] == 5:  # the third measurement (bank and queries each time)
            raise RuntimeError("disk gone\nsecond line")
        return real(self, *a, **kw)

    monkeypatch.setattr(Subset, "local_features", flaky)
    out = tmp_path / "o"
    summary = pretrain_in_process([*TINY, *MONITOR, "--data_path", tiny_world["imagenet"], "--epochs", "2", "--output_dir", out])
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if "monitor" in ln]
    assert lines == ["warning: monitor off from step 4: RuntimeError: disk gone second line; training goes on"]
    assert summary["steps"] == 14 and len(losses(out)) == 14
    assert [r["step"] for r in read_log(out, "monitor")] == [0, 2]

    # a failure in the online classifier's per-step path: reported at the next measurement, then off
    monkeypatch.setattr(Subset, "local_features", real)
    forward = OnlineProbe.forward

    def failing_to_learn(self, x):
        if self.training:
            raise ValueError("bad")
        return forward(self, x)

    monkeypatch.setattr(OnlineProbe, "forward", failing_to_learn)
    out = tmp_path / "p"
    summary = pretrain_in_process([*TINY, *MONITOR, "--data_path", tiny_world["imagenet"], "--epochs", "1", "--output_dir", out])
    lines = [ln for ln in capsys.readouterr().err.splitlines() if "monitor" in ln]
    assert lines == ["warning: monitor off from step 2: ValueError: bad; training goes on"]
    assert summary["steps"] == 7 and [r["step"] for r in read_log(out, "monitor")] == [0]


def test_unlabelled_monitor_data_gets_rankme_only(tiny_world, tmp_path, capsys):
    loose = tmp_path / "loose"
    loose.mkdir()
    for p in sorted((tiny_world["imagenet"] / "val").rglob("*.jpg")):
        shutil.copy(p, loose / f"{p.parent.name}-{p.name}")
    out = tmp_path / "o"
    pretrain_in_process([*TINY, *MONITOR, "--data_path", tiny_world["imagenet"], "--monitor_data", loose, "--epochs", "1",
                         "--max_steps", "2", "--output_dir", out])
    said = capsys.readouterr().out
    assert f"monitor: {loose} has no class folders: RankMe only (kNN and the linear classifier need labels)" in said
    recs = read_log(out, "monitor")
    assert [r["step"] for r in recs] == [0, 2] and all(set(MEASURES) & set(r) == {"rankme"} for r in recs)
    assert recs[0]["subset"] == {"bank": 14, "queries": 0}
