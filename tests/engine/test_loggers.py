"""The run's loggers (issue #26 item 5): each one file behind one interface (maecore.engine.loggers), chosen with
``--loggers``; JSON lines and TensorBoard as before, a new logger sees every record ``log.jsonl`` holds, only rank 0
writes, Weights & Biases in offline mode (no network) holds the same scalars as ``log.jsonl`` and a resume appends to
the same W&B run; asked for but not installed, it is one ``error:`` line and exit status 2."""

from __future__ import annotations

import json
import struct
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.utils.data import TensorDataset

from maecore.checkpoint import load_file
from maecore.engine import EngineConfig, Trainer, read_log
from maecore.engine import loggers as lg
from maecore.errors import UserError

TINY = ["--model", "mae_vit_tiny_patch16", "--patch_size", "8", "--input_size", "32", "--depth", "2", "--decoder_depth", "1",
        "--decoder_embed_dim", "64", "--decoder_num_heads", "4", "--batch_size", "8", "--no_progress", "--vis_every", "0",
        "--warmup_epochs", "1", "--blr", "1e-3", "--log_every", "2", "--num_workers", "0", "--amp", "none", "--keep_every", "0"]


def linear_run(out: Path, **kw: Any) -> Trainer:
    torch.manual_seed(0)
    cfg = EngineConfig(output_dir=str(out), epochs=2, batch_size=4, num_workers=0, progress=False, amp="none", log_every=1,
                       keep_every=0, **kw)
    model = torch.nn.Linear(2, 1)
    data = TensorDataset(torch.randn(12, 2))
    return Trainer(cfg, model, torch.optim.SGD(model.parameters(), lr=0.1), data, lambda m, b: (m(b[0]).pow(2).mean(), {}),
                   lambda e: 0.1, torch.device("cpu"), evaluate=lambda m, e: {"score": float(e)})


class Memory(lg.Logger):
    """A logger in a few lines: every record, as written."""

    name = "memory"
    records: list[dict] = []

    def write(self, kind: str, step: int, values: dict[str, Any]) -> None:
        Memory.records.append({"type": kind, "step": step, **values})


def test_a_new_logger_is_one_class_and_sees_every_record_of_the_jsonl(tmp_path, monkeypatch):
    monkeypatch.setitem(lg.LOGGERS, "memory", Memory)
    Memory.records = []
    t = linear_run(tmp_path / "o", loggers=("jsonl", "memory"))
    assert [type(h).__name__ for h in t.hooks][:2] == ["JsonLines", "Memory"]  # hooks, before the hooks that log
    t.fit()
    assert Memory.records == read_log(tmp_path / "o") and {r["type"] for r in Memory.records} == {"run", "train", "eval"}
    assert not (tmp_path / "o" / "tensorboard").exists()  # not asked for


def test_default_loggers_write_todays_jsonl_and_tensorboard(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    t = linear_run(tmp_path / "o")
    assert t.cfg.loggers == ("jsonl", "tensorboard")
    t.fit()
    recs = read_log(tmp_path / "o")
    tb = EventAccumulator(str(tmp_path / "o" / "tensorboard"))
    tb.Reload()
    train = [r for r in recs if r["type"] == "train"]
    assert [(e.step, e.value) for e in tb.Scalars("train/loss")] == [(r["step"], pytest.approx(r["loss"])) for r in train]
    assert "train/epoch" not in tb.Tags()["scalars"] and "eval/score" in tb.Tags()["scalars"]


def test_only_rank_0_logs(tmp_path):
    """A logger is opened by the RunLogger of rank 0 only (enabled): elsewhere it writes nothing, starts no W&B run."""
    memory = Memory()
    Memory.records = []
    logger = lg_run_logger(tmp_path / "o", enabled=False, loggers=[lg.JsonLines(), memory])
    logger.open()
    logger.log("train", 1, loss=1.0)
    assert Memory.records == [] and not (tmp_path / "o").exists()


def lg_run_logger(out: Path, enabled: bool, loggers: list) -> Any:
    from maecore.engine.logs import RunLogger

    return RunLogger(out, enabled, loggers)


def test_wandb_asked_for_but_not_installed_is_one_error_line(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb raises ImportError
    from pretrain.train import cli

    with pytest.raises(SystemExit) as e:
        cli(["--data_path", "d", "--loggers", "jsonl", "wandb"])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1
    assert err.startswith("error: argument --loggers: wandb is not installed: pip install 'mae-toolkit[wandb]'")
    with pytest.raises(UserError, match="wandb package is not installed"):  # the engine's own check, without a CLI
        lg.build_loggers(["wandb"])


# ---- Weights & Biases, offline -----------------------------------------------------------------------------------
def wandb_history(path: Path) -> tuple[str, list[dict]]:
    """The run id and the history rows of an offline run's ``.wandb`` file: W&B's records (its own protobuf schema,
    ``wandb.proto``) in the LevelDB log framing W&B writes them in (a 7-byte header, 32 KiB blocks of chunks: crc, length,
    type)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, buf, run_id, rows = 7, b"", "", []
    while pos + 7 <= len(data):
        if (left := 32768 - pos % 32768) < 7:
            pos += left
            continue
        _, n, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:
            break
        buf += data[pos + 7:pos + 7 + n]
        pos += 7 + n
        if kind in (1, 4):  # a full record, or the last chunk of one
            rec = pb.Record.FromString(buf)
            buf = b""
            if rec.WhichOneof("record_type") == "run":
                run_id = rec.run.run_id
            elif rec.WhichOneof("record_type") == "history":
                items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item}
                rows.append({k: v for k, v in items.items() if not k.startswith("_")})
    return run_id, rows


def expected_rows(records: list[dict]) -> list[dict]:
    """What the W&B logger writes of ``log.jsonl``'s records: their numbers, ``<type>/<key>``, against ``step``."""
    rows = []
    for r in records:
        row = {f"{r['type']}/{k}": v for k, v in r.items() if k not in ("type", "step") and isinstance(v, (int, float))}
        if row:
            rows.append({**row, "step": r["step"]})
    return rows


@pytest.mark.slow
def test_wandb_offline_holds_the_jsonl_scalars_and_a_resume_appends_to_the_same_run(tiny_world, tmp_path, monkeypatch,
                                                                                       run_module):
    pytest.importorskip("wandb")
    for k, v in {"WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path / "wb"), "WANDB_SILENT": "true",
                 "WANDB_DISABLE_GIT": "true", "WANDB_CONSOLE": "off"}.items():
        monkeypatch.setenv(k, v)
    (tmp_path / "wb").mkdir()
    out = tmp_path / "o"
    args = [*TINY, "--data_path", tiny_world["imagenet"], "--output_dir", out, "--loggers", "jsonl", "wandb"]
    run_module("pretrain", [*args, "--epochs", "1"])
    first = read_log(out)
    run_module("pretrain", [*args, "--epochs", "2", "--resume", "auto", "--resume_override", "epochs"])
    second = read_log(out)[len(first):]
    assert [r["type"] for r in second][:2] == ["resume", "run"] and any(r["type"] == "train" for r in second)

    runs = sorted((tmp_path / "wb" / "wandb").glob("offline-run-*/run-*.wandb"), key=lambda p: p.parent.name)
    assert len(runs) == 2
    (id1, rows1), (id2, rows2) = map(wandb_history, runs)
    assert id1 == id2 == load_file(out / "checkpoint-last.pth")["extra"]["wandb"]["id"]  # one W&B run, resumed
    for rows, records in ((rows1, first), (rows2, second)):
        want = expected_rows(records)
        assert [sorted(r) for r in rows] == [sorted(w) for w in want]
        assert rows == [{k: pytest.approx(v, rel=1e-6) for k, v in w.items()} for w in want]
    assert not (tmp_path / "o" / "tensorboard").exists()


def test_wandb_failing_to_start_is_one_line_and_failing_later_leaves_training_on(tmp_path, monkeypatch, capsys):
    """(A stand-in wandb module: no W&B process.)  Online without a login, ``wandb.init`` raises: one ``error:`` line
    before training.  A ``log`` that raises mid-run: one warning line, W&B off, the run ends as without it."""
    class Run:
        id = "fake1"
        logged: list = []

        def define_metric(self, *a, **kw) -> None: ...

        def log(self, row) -> None:
            if len(Run.logged) == 2:
                raise OSError("disk full")
            Run.logged.append(row)

        def finish(self, exit_code: int = 0) -> None: ...

    def no_login(**kw):
        raise RuntimeError("api_key not configured (no-tty)")

    fake = type(sys)("wandb")
    fake.init = no_login
    monkeypatch.setitem(sys.modules, "wandb", fake)
    with pytest.raises(UserError, match=r"^--loggers wandb: W&B could not start a run: api_key not configured"):
        linear_run(tmp_path / "a", loggers=("jsonl", "wandb")).fit()
    fake.init = lambda **kw: Run()
    t = linear_run(tmp_path / "b", loggers=("jsonl", "wandb"))
    t.fit()
    assert t.finished and len(Run.logged) == 2 and len(read_log(tmp_path / "b", "train")) == 6
    err = capsys.readouterr().err
    assert "warning: --loggers wandb: OSError: disk full; W&B logging off, training goes on" in err
