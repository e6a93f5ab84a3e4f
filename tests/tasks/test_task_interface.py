"""One task interface: every task package (pretrain, classification, detection, segmentation) has the same names with
the same signatures, module by module (:data:`INTERFACE`: config, build model, build optimizer, data, train, evaluate,
predict, export, benchmark), ``benchmark_step`` on one skeleton, and a typed config built once from the command line:
frozen, its flags in the parser's order, derived values resolved before it is frozen, what a run learns later laid
over it where checkpoints store their ``args``."""

from __future__ import annotations

import dataclasses
import importlib
import inspect
from pathlib import Path

import pytest
import torch

from maecore.checkpoint import load_file
from maecore.config import RunConfig
from maecore.engine import EngineConfig

TASKS = ("pretrain", "classification", "detection", "segmentation")
ARGV = {"pretrain": ["--data_path", "d"], "classification": ["--data_path", "d"], "detection": [],
        "segmentation": ["--data_path", "d"]}
E = inspect.Parameter.empty
# module -> {name: its parameters (name, default)}: the same in every task package
INTERFACE: dict[str, dict[str, list[tuple[str, object]]]] = {
    "config": {"get_parser": [], "parse_config": [("argv", None), ("world_size", None)], "check_config": [("cfg", E)],
               "checkpoint_config": [("cfg", E), ("saved", E), ("source", E), ("log", print)]},
    "train": {"build_model": [("cfg", E), ("num_classes", None)], "build_optimizer": [("cfg", E), ("model", E), ("device", E)],
              "build_data": [("cfg", E)], "train": [("cfg", E), ("device", E)], "evaluate": [("cfg", E), ("device", E)],
              "main": [("argv", None)], "cli": [("argv", None)]},
    "predict": {"get_predict_parser": [], "predict": [("argv", None)], "cli": [("argv", None)]},
    "export": {"export": [("state", E), ("args", E)], "write": [("conv", E), ("dst", E), ("force", False)]},
    "benchmark": {"benchmark_step": [("device", E), ("batch_size", E), ("amp", E), ("compile", E), ("arch", None),
                                     ("input_size", None), ("patch_size", None)]},
}


def train_module(task: str):
    return importlib.import_module(f"{task}.train")


def params(fn) -> list[tuple[str, object]]:
    return [(p.name, p.default) for p in inspect.signature(fn).parameters.values()]


@pytest.mark.parametrize("module", INTERFACE)
@pytest.mark.parametrize("task", TASKS)
def test_every_task_has_the_same_names_and_signatures(task: str, module: str) -> None:
    mod = importlib.import_module(f"{task}.{module}")
    for name, expect in INTERFACE[module].items():
        assert callable(getattr(mod, name, None)), f"{task}.{module} has no {name}"
        assert params(getattr(mod, name)) == expect, (task, module, name)
    if module == "train":  # the CLI layer builds the config; train.py only re-exports its parse_config
        config = importlib.import_module(f"{task}.config")
        assert mod.parse_config is config.parse_config and mod.get_parser is config.get_parser
        assert "argparse" not in vars(mod)


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


@pytest.mark.parametrize("task", TASKS)
def test_every_task_takes_the_engines_loggers(task: str) -> None:
    """``--loggers`` is an engine flag: every task's run logs where it says (default: log.jsonl and TensorBoard)."""
    tm = train_module(task)
    assert tm.parse_config(ARGV[task]).engine().loggers == ["jsonl", "tensorboard"]
    assert tm.parse_config([*ARGV[task], "--loggers", "jsonl"]).engine().loggers == ["jsonl"]


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
    """The four task benchmarks are maecore.benchmark.task_step on what each supplies."""
    from maecore.benchmark import TaskBench

    for task in TASKS:
        bench = importlib.import_module(f"{task}.benchmark")
        assert isinstance(bench.BENCH, TaskBench)
        assert bench.BENCH.parse_config is train_module(task).parse_config
        assert bench.BENCH.build_optimizer is train_module(task).build_optimizer


def test_engine_config_from_a_typed_config_or_its_dict() -> None:
    from maecore.cli import config_from_args
    from segmentation.train import parse_config

    cfg = parse_config(["--data_path", "d", "--recipe", "demo"])
    assert config_from_args(cfg) == config_from_args(cfg.args()) == cfg.engine()
    assert config_from_args(cfg, best_key="mIoU").best_key == "mIoU"


def test_pretraining_evaluate_predict_export_and_benchmark(tiny_world, tmp_path: Path, capsys) -> None:
    """Pretraining's side of the interface on a one-step run: evaluate (eval.json, the figure), predict (the
    reconstruction figure, as pretrain.visualize), export (the converter's --to official, read back) and the step."""
    from maecore.convert.trained import trained_parts
    from pipeline import convert
    from pretrain import benchmark, export, predict
    from pretrain.train import evaluate, main, parse_config

    world = tiny_world["imagenet"]
    out = tmp_path / "pre"
    main(["--recipe", "demo", "--model", "mae_vit_tiny_patch16", "--patch_size", "8", "--depth", "1", "--input_size", "32",
          "--decoder_depth", "1", "--data_path", str(world), "--output_dir", str(out), "--batch_size", "4", "--epochs", "1",
          "--max_steps", "1", "--num_workers", "0", "--vis_every", "0", "--no_progress", "--device", "cpu"])
    ckpt = out / "checkpoint-last.pth"
    # evaluate: the model flags come from the checkpoint (--model etc. not repeated)
    res = evaluate(parse_config(["--data_path", str(world), "--resume", str(ckpt), "--output_dir", str(tmp_path / "ev"),
                                 "--vis_images", "3"]), torch.device("cpu"))
    assert res["n_images"] == 3 and res["loss"] > 0 and (tmp_path / "ev" / "recon-eval.png").is_file()
    assert load_file(ckpt)["step"] == 1 and '"task": "pretrain"' in (tmp_path / "ev" / "eval.json").read_text()
    # predict: the figure
    imgs = [str(p) for p in sorted((world / "val").rglob("*.jpg"))[:2]]
    assert predict.predict([str(ckpt), *imgs, "-o", str(tmp_path / "fig.png")]) == tmp_path / "fig.png"
    # export: what `python -m pipeline.convert CKPT --to official` writes, tensor for tensor
    conv = export.export(*trained_parts(load_file(ckpt)))
    ours = export.write(conv, tmp_path / "a" / "mae.pth")[0]
    (tmp_path / "b").mkdir()
    convert.main([str(ckpt), "-o", str(tmp_path / "b" / "mae.pth"), "--to", "official"])
    a, b = load_file(ours)["model"], load_file(tmp_path / "b" / "mae.pth")["model"]
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a) and "decoder_embed.weight" in a
    # the step benchmark
    step, images, info = benchmark.benchmark_step(torch.device("cpu"), 2, "none", False, arch="tiny", input_size=32, patch_size=8)
    assert images == 2 and torch.isfinite(step()) and info["patch_size"] == 8 and info["recipe"] == "paper"
