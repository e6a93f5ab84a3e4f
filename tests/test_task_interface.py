"""One task interface: every task package has the same names and signatures (``parse_config``, ``build_model``,
``build_optimizer``, ``build_data``, ``train``, ``evaluate``, ``main``/``cli``; ``benchmark_step`` on one skeleton),
and a typed config built once from the command line: frozen, its flags in the parser's order, derived values
resolved before it is frozen, what a run learns later laid over it where checkpoints store their ``args``."""

from __future__ import annotations

import dataclasses
import importlib
import inspect
from pathlib import Path

import pytest

from maecore.checkpoint import load_file
from maecore.config import RunConfig
from maecore.engine import EngineConfig

TASKS = ("pretrain", "classification", "detection", "segmentation")
ARGV = {"pretrain": ["--data_path", "d"], "classification": ["--data_path", "d"], "detection": [],
        "segmentation": ["--data_path", "d"]}


def train_module(task: str):
    return importlib.import_module(f"{task}.train")


def params(fn) -> list[tuple[str, object]]:
    return [(p.name, p.default) for p in inspect.signature(fn).parameters.values()]


@pytest.mark.parametrize("task", TASKS)
def test_every_task_has_the_same_entry_points(task: str) -> None:
    tm = train_module(task)
    config = importlib.import_module(f"{task}.config")
    assert tm.parse_config is config.parse_config and tm.get_parser is config.get_parser
    assert params(tm.parse_config) == [("argv", None), ("world_size", None)]
    assert params(tm.build_model) == [("cfg", inspect.Parameter.empty), ("num_classes", None)]
    assert params(tm.build_optimizer) == [("cfg", inspect.Parameter.empty), ("model", inspect.Parameter.empty),
                                          ("device", inspect.Parameter.empty)]
    assert params(tm.build_data)[0] == ("cfg", inspect.Parameter.empty)
    assert params(tm.train) == [("cfg", inspect.Parameter.empty), ("device", inspect.Parameter.empty)]
    assert params(tm.main) == [("argv", None)] and params(tm.cli) == [("argv", None)]
    if task != "pretrain":  # pretraining has no --eval
        assert params(tm.evaluate) == [("cfg", inspect.Parameter.empty), ("device", inspect.Parameter.empty)]
        bench = importlib.import_module(f"{task}.benchmark")
        assert params(bench.benchmark_step) == [("device", inspect.Parameter.empty), ("batch_size", inspect.Parameter.empty),
                                                ("amp", inspect.Parameter.empty), ("compile", inspect.Parameter.empty),
                                                ("arch", None), ("input_size", None), ("patch_size", None)]
        predict = importlib.import_module(f"{task}.predict")
        assert params(predict.predict) == [("argv", None)] and callable(predict.get_predict_parser)


@pytest.mark.parametrize("task", TASKS)
def test_the_config_is_frozen_and_lists_the_flags_in_the_parsers_order(task: str) -> None:
    tm = train_module(task)
    cfg = tm.parse_config(ARGV[task])
    assert isinstance(cfg, RunConfig)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.epochs = 1  # type: ignore[misc]
    dests = list(dict.fromkeys(a.dest for a in tm.get_parser()._actions if a.dest != "help"))
    assert list(cfg.args()) == dests  # what checkpoints store, in the order vars(namespace) had it
    assert "given" not in cfg.args() and cfg.given == frozenset(k.lstrip("-") for k in ARGV[task] if k.startswith("--"))
    # the engine is told an EngineConfig, never argparse
    engine = cfg.engine(max_steps=3)
    assert isinstance(engine, EngineConfig) and engine.max_steps == 3 and engine.epochs == cfg.epochs


@pytest.mark.parametrize("task", ["pretrain", "classification"])
def test_the_lr_is_resolved_before_the_config_is_frozen(task: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """lr = blr x (batch x accumulation x processes) / 256, the processes torchrun announces before the group starts."""
    tm = train_module(task)
    argv = [*ARGV[task], "--blr", "1e-3", "--batch_size", "8", "--accum_iter", "2"]
    assert tm.parse_config(argv, world_size=4).lr == 1e-3 * 64 / 256
    monkeypatch.delenv("RANK", raising=False)
    assert tm.parse_config(argv).lr == 1e-3 * 16 / 256
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "3")
    assert tm.parse_config(argv).lr == 1e-3 * 48 / 256
    assert tm.parse_config([*argv, "--lr", "0.5"]).lr == 0.5  # an absolute lr stays


def test_a_config_must_match_its_parser() -> None:
    from pretrain.config import PretrainConfig, get_parser

    ns = get_parser().parse_args(["--data_path", "d"])
    ns.extra = 1
    with pytest.raises(TypeError, match=r"flags without a field \['extra'\]"):
        PretrainConfig.from_namespace(ns)


def test_learned_values_keep_their_place_in_the_saved_args() -> None:
    """A known key keeps its place (num_classes, epochs), a new one is appended (classes, category ids): the args dict
    the namespace had once the run had written them into it."""
    from detection.config import DetectorData
    from detection.train import parse_config

    cfg = parse_config(["--recipe", "demo"])
    saved = cfg.saved_args(DetectorData(3, [5, 7, 9], ["a", "b", "c"]), {"epochs": 11})
    assert list(saved) == [*cfg.args(), "category_ids", "category_names"]
    assert (saved["num_classes"], saved["epochs"], saved["category_ids"]) == (3, 11, [5, 7, 9])
    assert cfg.num_classes is None and cfg.epochs == 3  # the config itself is unchanged
    engine = cfg.engine({"epochs": 11})
    assert engine.epochs == 11 and not hasattr(engine, "category_ids")


def test_a_training_checkpoint_stores_the_config_and_what_the_data_told(tiny_world, tmp_path: Path) -> None:
    from classification.config import ClassifierData
    from classification.train import main, parse_config

    world = tiny_world["imagenet"]
    argv = ["--model", "vit_tiny_patch16", "--patch_size", "8", "--depth", "1", "--input_size", "32", "--data_path",
            str(world), "--output_dir", str(tmp_path / "o"), "--batch_size", "4", "--epochs", "1", "--max_steps", "1",
            "--num_workers", "1", "--no_progress", "--device", "cpu", "--protocol", "linprobe", "--cache_features"]
    main(argv)
    saved = load_file(tmp_path / "o" / "checkpoint-last.pth")["args"]
    cfg = parse_config(argv)
    classes = sorted(p.name for p in (world / "train").iterdir() if p.is_dir())
    # the features are in memory: training's loader had no workers (the features were extracted with the flag's one)
    assert saved == cfg.saved_args(ClassifierData(classes, len(classes)), {"num_workers": 0})
    assert list(saved) == [*cfg.args(), "classes"] and saved["num_classes"] == len(classes) and saved["num_workers"] == 0
    assert cfg.num_classes is None and cfg.num_workers == 1  # the config is the command line's


def test_one_benchmark_skeleton() -> None:
    """The three task benchmarks are maecore.benchmark.task_step on what each supplies."""
    from maecore.benchmark import TaskBench

    for task in ("classification", "detection", "segmentation"):
        bench = importlib.import_module(f"{task}.benchmark")
        assert isinstance(bench.BENCH, TaskBench)
        assert bench.BENCH.parse_config is train_module(task).parse_config


def test_engine_config_from_a_typed_config_or_its_dict() -> None:
    from maecore.cli import config_from_args
    from segmentation.train import parse_config

    cfg = parse_config(["--data_path", "d", "--recipe", "demo"])
    assert config_from_args(cfg) == config_from_args(cfg.args()) == cfg.engine()
    assert config_from_args(cfg, best_key="mIoU").best_key == "mIoU"
