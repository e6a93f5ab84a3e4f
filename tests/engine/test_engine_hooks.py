"""The engine's hooks (issue #25): the events in order, a hook's state checkpointed and restored exactly across a
stop and ``--resume auto``, a failing hook, and the logged values the loop's storage gives."""

from __future__ import annotations

import ast
import os
import signal
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from maecore.checkpoint import load_file
from maecore.engine import EngineConfig, HookBase, Preempted, Trainer, read_log
from tests import ROOT


def world(n: int = 24) -> TensorDataset:
    """Points in 8-d and a class each (3 classes, a linear rule): what the small network below learns."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 8, generator=g)
    return TensorDataset(x, (x[:, :3].argmax(1)))


def network() -> nn.Module:
    torch.manual_seed(0)
    # dropout draws from the global RNG: an exact resume must restore it
    return nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Dropout(0.2), nn.Linear(16, 3))


def step_fn(m: nn.Module, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    x, y = batch
    logits = m(x)
    return F.cross_entropy(logits, y), {"acc": (logits.argmax(1) == y).float().mean(), "n_seen": torch.tensor(len(y))}


def trainer(out: Path, hooks=(), step=step_fn, **kw) -> Trainer:
    """3 epochs of 3 optimizer steps (6 micro-batches of 4 points, 2 a step) on the CPU in fp32; ``kw``: config
    fields or Trainer arguments."""
    cfg = dict(output_dir=str(out), epochs=3, batch_size=4, accum_iter=2, num_workers=0, log_every=2, progress=False,
               amp="none", keep_every=0)
    cfg.update({k: v for k, v in kw.items() if k in EngineConfig.__dataclass_fields__})
    rest = {k: v for k, v in kw.items() if k not in EngineConfig.__dataclass_fields__}
    model = network()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    return Trainer(EngineConfig(**cfg), model, opt, world(), step, lambda e: 1e-2 * (1 - e / 4), torch.device("cpu"),
                   args={"lr": 1e-2}, hooks=hooks, **rest)


class Recorder(HookBase):
    """Writes down every event it sees, with the step it came at."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, int]] = []

    def __getattribute__(self, name: str):
        if name in ("before_train", "before_epoch", "before_step", "after_backward", "after_step", "after_eval",
                    "after_epoch", "on_stop", "after_train"):
            return lambda: self.seen.append((name, self.trainer.step))
        return super().__getattribute__(name)


class OnlineProbe(HookBase):
    """What a new capability costs: every ``every`` steps, a linear classifier on the network's detached hidden
    features of the batch just trained on takes one SGD step; its weights, optimizer and count are checkpointed
    with the run (``extra["online_probe"]``) and restored on resume."""

    state_key = "online_probe"

    def __init__(self, every: int = 2) -> None:
        self.every, self.updates = every, 0
        self.head = nn.Linear(16, 3)
        nn.init.zeros_(self.head.weight), nn.init.zeros_(self.head.bias)  # the same start in every run
        self.opt = torch.optim.SGD(self.head.parameters(), lr=0.1, momentum=0.9)
        self.batch = world()[:8]

    def after_step(self) -> None:
        if self.trainer.step % self.every:
            return
        with torch.no_grad():
            feats = self.trainer.model[:2](self.batch[0])
        F.cross_entropy(self.head(feats), self.batch[1]).backward()
        self.opt.step()
        self.opt.zero_grad()
        self.updates += 1

    def state_dict(self) -> dict:
        return {"head": self.head.state_dict(), "opt": self.opt.state_dict(), "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        self.head.load_state_dict(state["head"])
        self.opt.load_state_dict(state["opt"])
        self.updates = state["updates"]


def test_hooks_run_in_priority_order_and_see_every_event(tmp_path):
    rec = Recorder()
    t = trainer(tmp_path / "r", hooks=[rec], epochs=2, evaluate=lambda m, e: {"score": float(e)},
                after_step=lambda m, s: None, on_epoch_end=lambda m, e: None, extra_state={"ema": nn.Linear(2, 2)})
    assert [type(h).__name__ for h in t.hooks] == ["StepCallback", "ModuleState", "JsonLines", "TensorBoard", "TrainLog",
                                                   "Progress", "Recorder", "Evaluation", "Checkpointer", "EpochEndCallback",
                                                   "StopOnSignal"]
    t.fit()
    # 24 samples, batches of 4, 2 micro-batches a step: 6 micro-batches and 3 optimizer steps an epoch
    one_step = lambda s: [("before_step", s - 1), ("after_backward", s - 1), ("after_backward", s - 1), ("after_step", s)]
    epoch = lambda first: [("before_epoch", first - 1), *(e for s in range(first, first + 3) for e in one_step(s)),
                           ("after_epoch", first + 2), ("after_eval", first + 2)]  # Evaluation runs after Recorder
    assert rec.seen == [("before_train", 0), *epoch(1), *epoch(4), ("after_train", 6)]
    assert t.finished and t.eval_results == {"score": 1.0}


def test_storage_logs_the_means_of_the_micro_batches(tmp_path):
    """Every log_every steps the record holds the mean of the micro-batches' values since the last record (summed
    on the device in order, then divided), counts (``n_``) summed, the lr of the last step and the epoch position of
    its last micro-batch — what the loop logged before hooks."""
    seen: list[dict[str, torch.Tensor]] = []

    def recording(m, batch):
        loss, logs = step_fn(m, batch)
        seen.append({"loss": loss.detach().clone(), **{k: v.detach().clone() for k, v in logs.items()}})
        return loss, logs

    trainer(tmp_path / "s", step=recording, epochs=2, log_every=2).fit()
    recs = read_log(tmp_path / "s", "train")
    # 3 steps an epoch, a record every 2 steps and at the run's end; windows restart with each epoch
    assert [r["step"] for r in recs] == [2, 4, 6]
    windows = [seen[0:4], seen[6:8], seen[8:12]]  # steps 1-2; (step 3: its window ends with the epoch) 4; 5-6
    for rec, win in zip(recs, windows):
        for key in ("loss", "acc"):
            total = win[0][key].float()
            for v in win[1:]:
                total = total + v[key].float()
            assert rec[key] == float(total / len(win)), key
        assert rec["n_seen"] == sum(int(v["n_seen"]) for v in win)
    assert recs[0]["epoch"] == 3 / 6 and recs[1]["epoch"] == 1 + 1 / 6 and recs[2]["epoch"] == 1 + 5 / 6
    assert recs[0]["lr"] == 1e-2 * (1 - (2 / 6) / 4)  # set at step 2's first micro-batch


def test_a_hook_state_is_checkpointed_and_restored_exactly_across_a_stop(tmp_path):
    """A run stopped by SIGUSR1 at step 4 (mid-epoch) and resumed with --resume auto ends with the same network,
    the same probe (weights, momentum, count) and the same logged losses as one that ran through."""
    whole = OnlineProbe()
    a = trainer(tmp_path / "a", hooks=[whole])
    a.fit()

    class SignalAt(HookBase):
        def after_step(self) -> None:
            if self.trainer.step == 4:
                os.kill(os.getpid(), signal.SIGUSR1)

    first = OnlineProbe()
    with pytest.raises(Preempted) as stopped:
        trainer(tmp_path / "b", hooks=[first, SignalAt()]).fit()
    ckpt = load_file(tmp_path / "b" / "checkpoint-last.pth")
    assert (ckpt["step"], ckpt["iter_in_epoch"]) == (4, 2) and ckpt["extra"]["online_probe"]["updates"] == 2 == first.updates
    assert signal.getsignal(signal.SIGUSR1) != signal.SIG_DFL  # a stopped process ignores stop signals to its exit …
    stopped.value.release()  # … unless it carries on
    assert signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL  # the handlers were the run's only

    again = OnlineProbe()
    b = trainer(tmp_path / "b", hooks=[again], resume="auto")
    b.fit()
    assert again.updates == whole.updates == 4
    for x, y in [*zip(a.model.state_dict().values(), b.model.state_dict().values()),
                 *zip(whole.head.state_dict().values(), again.head.state_dict().values()),
                 *((s["momentum_buffer"], r["momentum_buffer"]) for s, r in
                   zip(whole.opt.state_dict()["state"].values(), again.opt.state_dict()["state"].values()))]:
        assert torch.equal(x, y)
    losses = lambda out: {r["step"]: r["loss"] for r in read_log(out, "train")}
    assert losses(tmp_path / "b") == losses(tmp_path / "a")

    # an older checkpoint (no key for the hook) resumes, the hook as constructed; code without the hook ignores the key
    ckpt = load_file(tmp_path / "b" / "checkpoint-last.pth")
    assert ckpt["step"] == 9 and "online_probe" in ckpt["extra"]
    ckpt["extra"].pop("online_probe")
    torch.save(ckpt, tmp_path / "old.pth")
    late = OnlineProbe()
    trainer(tmp_path / "c", hooks=[late], resume=str(tmp_path / "old.pth"), epochs=4).fit()
    assert late.updates == 2  # steps 10 and 12, from a fresh head
    trainer(tmp_path / "d", resume=str(tmp_path / "b" / "checkpoint-last.pth"), epochs=4).fit()
    assert "online_probe" not in load_file(tmp_path / "d" / "checkpoint-last.pth")["extra"]


def test_a_failing_hook_ends_the_run_and_resume_continues(tmp_path):
    """The hook's error leaves fit unchanged; every hook's after_train ran (the folder unlocked, signal handlers
    restored); the newest checkpoint is the last one written before the failure, and --resume auto from it ends
    where an uninterrupted run does."""

    class Fails(HookBase):
        def after_step(self) -> None:
            if self.trainer.step == 5:
                raise RuntimeError("the probe broke")

    rec = Recorder()
    with pytest.raises(RuntimeError, match="the probe broke"):
        trainer(tmp_path / "f", hooks=[Fails(), rec], save_every_steps=2).fit()
    assert rec.seen[-1] == ("after_train", 5) and ("after_step", 5) not in rec.seen  # Fails runs before Recorder
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    assert load_file(tmp_path / "f" / "checkpoint-last.pth")["step"] == 4
    resumed = trainer(tmp_path / "f", resume="auto")
    resumed.fit()  # the folder was unlocked
    whole = trainer(tmp_path / "w")
    whole.fit()
    assert all(torch.equal(x, y) for x, y in zip(whole.model.state_dict().values(), resumed.model.state_dict().values()))


def test_two_hooks_cannot_share_a_state_key(tmp_path):
    with pytest.raises(ValueError, match="online_probe"):
        trainer(tmp_path / "k", hooks=[OnlineProbe(), OnlineProbe()])


def test_the_engine_does_not_import_the_command_line_layer():
    """Flags are parsed in maecore.cli (add_engine_args, config_from_args); the engine never imports it."""
    for path in (ROOT / "maecore" / "engine").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                assert node.module != "maecore.cli", path.name
            elif isinstance(node, ast.Import):
                assert all(a.name != "maecore.cli" for a in node.names), path.name
    from maecore.cli import add_engine_args, config_from_args  # noqa: F401


def test_hooks_see_the_trainer_through_the_run_protocol(tmp_path):
    """Hooks and the NaN/inf guard are typed against maecore.engine.run.Run (so the loop imports its hooks without
    an import circle): every member the protocol names is there on a real trainer, and no engine module but the
    trainer's own imports maecore.engine.trainer."""
    from maecore.engine.run import Run

    t = trainer(tmp_path)
    names = set(Run.__annotations__) | {n for n in vars(Run) if not n.startswith("_")}
    missing = sorted(n for n in names if not hasattr(t, n))
    assert not missing, missing
    for path in (ROOT / "maecore" / "engine").glob("*.py"):
        if path.name in ("trainer.py", "__init__.py"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                assert node.module != "maecore.engine.trainer", path.name
