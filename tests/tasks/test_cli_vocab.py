"""The four CLIs share one model vocabulary (``--model --input_size --num_classes`` + size overrides) and
answer a bad flag with one line before anything runs: README commands and old spellings still parse,
bad values exit 2 with exactly one ``error: … (see python -m X --help)`` line, old checkpoints' saved
args map onto today's names."""

from __future__ import annotations

import importlib
import os
import re
import shlex
import sys
from pathlib import Path

import pytest

from maecore.checkpoint import checkpoint_args, load_file, save_atomic
from maecore.cli import given_flags, upgrade_saved_args
from maecore.errors import UserError
from tests import ROOT, forkserver

CLIS = ("pretrain", "classification", "detection", "segmentation")
READMES = ("README.md", "classification/README.md", "segmentation/README.md")


def train_module(name: str):
    return importlib.import_module(f"{name}.train")


def readme_commands() -> list[tuple[str, list[str]]]:
    """``(module, argv)`` for every ``python -m X …`` / ``torchrun … -m X …`` line in the READMEs' code blocks
    (continuation lines joined, comments and ``...`` placeholders dropped)."""
    found = []
    for readme in READMES:
        blocks = re.findall(r"```[a-z]*\n(.*?)```", (ROOT / readme).read_text(), flags=re.S)
        for block in blocks:
            for line in block.replace("\\\n", " ").splitlines():
                words = shlex.split(line, comments=True)
                if "-m" not in words or words[0] not in ("python", "torchrun"):
                    continue
                i = words.index("-m")
                if words[i + 1] in CLIS:
                    argv = [w for w in words[i + 2:] if w != "..."]
                    if "..." in words and "--data_path" not in argv:  # an elided command: the rest as in the lines above
                        argv += ["--data_path", "DATA"]
                    found.append((words[i + 1], argv))
    return found


def test_every_readme_command_parses() -> None:
    commands = readme_commands()
    assert {m for m, _ in commands} == set(CLIS) and len(commands) >= 15, commands
    for module, argv in commands:
        if argv[:1] == ["predict"]:  # python -m X predict CKPT INPUT… -o OUT: the task's predict parser
            args = importlib.import_module(f"{module}.predict").get_predict_parser().parse_args(argv[1:])
            assert args.checkpoint and args.inputs and args.output, (module, argv)
            continue
        args = train_module(module).parse_config(argv)
        family = "mae_vit_" if module == "pretrain" else "vit_"
        assert args.model.startswith(family), (module, argv, args.model)


# old spellings (and the values each CLI took) -> what they mean today
OLD_SPELLINGS = [
    ("pretrain", ["--model", "mae_vit_base_patch16", "--input_size", "224", "192"],
     dict(model="mae_vit_base_patch16", input_size=(224, 192))),
    ("pretrain", ["--model", "vit_base_patch16", "--input_size", "224"], dict(model="mae_vit_base_patch16", input_size=224)),
    ("pretrain", ["--arch", "large", "--image_size", "64", "--patch_size", "8"], dict(model="mae_vit_large_patch16", input_size=64)),
    ("classification", ["--model", "vit_base_patch16", "--input_size", "448", "--nb_classes", "10"],
     dict(model="vit_base_patch16", input_size=448, num_classes=10)),
    ("classification", ["--model", "mae_vit_huge_patch14", "--num_classes", "5"], dict(model="vit_huge_patch14", num_classes=5)),
    ("detection", ["--arch", "base", "--image_size", "512"], dict(model="vit_base_patch16", input_size=512)),
    ("detection", ["--model", "large", "--image_size", "1024"], dict(model="vit_large_patch16", input_size=1024)),
    ("detection", ["--model", "mae_vit_base_patch16", "--input_size", "256", "--num_classes", "80"],
     dict(model="vit_base_patch16", input_size=256, num_classes=80)),
    ("segmentation", ["--model", "base", "--crop_size", "512", "--num_classes", "150"],
     dict(model="vit_base_patch16", input_size=512, num_classes=150)),
    ("segmentation", ["--model", "tiny", "--crop_size", "64", "--patch_size", "8", "--nb_classes", "7"],
     dict(model="vit_tiny_patch16", input_size=64, num_classes=7)),
]


@pytest.mark.parametrize("module,argv,expect", OLD_SPELLINGS)
def test_old_spellings_parse_into_the_shared_names(module: str, argv: list[str], expect: dict) -> None:
    args = train_module(module).parse_config(["--data_path", "unused", *argv]).args()
    assert {k: args[k] for k in expect} == expect
    assert not {"arch", "image_size", "crop_size", "nb_classes"} & set(args)


def test_recipes_use_the_shared_keys() -> None:
    for module in CLIS:
        recipes = importlib.import_module(f"{module}.recipes").RECIPES
        for name, recipe in recipes.items():
            assert not {"arch", "image_size", "crop_size", "nb_classes"} & set(recipe), (module, name)
            args = train_module(module).parse_config(["--data_path", "unused", "--recipe", name])
            assert args.model == recipe.get("model", args.model)


# ---- bad flags: one line, status 2, before anything runs -------------------------------------------
COMMON_BAD = [
    (["--batch_size", "0"], "--batch_size"),
    (["--accum_iter", "0"], "--accum_iter"),
    (["--blr", "nan"], "--blr"),  # detection/segmentation have no --blr: still one line
    (["--lr", "nan"], "--lr"),
    (["--lr", "-1"], "--lr"),
    (["--weight_decay", "inf"], "--weight_decay"),
    (["--epochs", "-1"], "--epochs"),
    (["--epochs", "0"], "--epochs"),
    (["--num_workers", "-2"], "--num_workers"),
    (["--eval_every", "0"], "--eval_every"),
    (["--batch_size", "two"], "--batch_size"),
    (["--input_size", "0"], "--input_size"),
    (["--input_size", "60", "--patch_size", "8"], "--input_size 60 is not a multiple of the patch size 8"),
    (["--image_size", "100"], "--input_size 100 is not a multiple of the patch size"),
    (["--model", "giant"], "unknown model 'giant'"),
    (["--arch", "vit_base_patch8"], "unknown model"),
    (["--embed_dim", "100"], "--embed_dim"),
    (["--depth", "0"], "--depth"),
    (["--num_classes", "0"], "--num_classes"),
]
PRETRAIN_BAD = [
    (["--mask_ratio", "0.0"], "--mask_ratio"),
    (["--mask_ratio", "1"], "--mask_ratio"),
    (["--input_size", "64", "64", "64"], "--input_size"),
    (["--input_size", "64", "60", "--patch_size", "8"], "--input_size 64 60 is not a multiple of the patch size 8"),
    (["--decoder_embed_dim", "30", "--decoder_num_heads", "3"], "--decoder_embed_dim"),
]
CASES = [(m, argv, expect) for m in CLIS for argv, expect in COMMON_BAD] + [("pretrain", a, e) for a, e in PRETRAIN_BAD] + [
    ("classification", ["--drop_path", "1.5"], "--drop_path"),
    ("classification", ["--protocol", "partial", "--tune_blocks", "1.5"], "--tune_blocks"),
    ("classification", ["--recipe", "demo", "--protocol", "partial", "--tune_blocks", "5"],
     "--tune_blocks must be 0.5 or an integer in [0, 4]"),
    ("detection", ["--input_size", "48", "--patch_size", "8"], "not a multiple of 32"),
    ("detection", ["--score_thresh", "2"], "--score_thresh"),
    ("detection", ["--global_blocks", "12"], "--global_blocks"),
    ("segmentation", ["--num_classes", "300"], "--num_classes must be in 1..254"),
    ("segmentation", ["--max_iters", "0"], "--max_iters"),
    ("segmentation", ["--out_indices", "1", "2", "3", "12"], "--out_indices"),
]


@pytest.mark.parametrize("module,argv,expect", CASES, ids=[f"{m}:{' '.join(a)}" for m, a, _ in CASES])
def test_bad_flag_is_one_line_up_front(module: str, argv: list[str], expect: str, tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        train_module(module).cli(["--data_path", str(tmp_path / "missing"), "--output_dir", str(out), *argv])
    err = capsys.readouterr().err
    assert e.value.code == 2
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith("error: ") and expect in err, err
    assert err.rstrip().endswith(f"(see python -m {module} --help)"), err
    assert not out.exists()  # refused before anything ran


@pytest.mark.parametrize("module", CLIS)
def test_no_traceback_reaches_stderr_of_the_real_command(module: str, tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    p = forkserver.run([sys.executable, "-m", module, "--data_path", str(tmp_path), "--batch_size", "0"],
                       cwd=ROOT, env=env, timeout=120)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert p.stderr.strip().splitlines() == [
        f"error: argument --batch_size: expected a positive integer, got '0' (see python -m {module} --help)"]


# ---- checkpoints saved before the shared vocabulary ---------------------------------------------------
def test_upgrade_saved_args_renames_the_legacy_keys() -> None:
    old = {"arch": "base", "image_size": 1024, "nb_classes": 10, "lr": 1e-4}
    assert upgrade_saved_args(old) == {"model": "base", "input_size": 1024, "num_classes": 10, "lr": 1e-4}
    assert upgrade_saved_args({"crop_size": 512, "input_size": 256}) == {"input_size": 256}  # today's name wins
    assert upgrade_saved_args(None) is None and old == {"arch": "base", "image_size": 1024, "nb_classes": 10, "lr": 1e-4}


# old-style saved args of each task (as their checkpoints hold them) -> today's argparse names
LEGACY_CKPTS = [
    ("classification", "MODEL_KEYS",
     {"model": "vit_tiny_patch16", "patch_size": 8, "depth": 4, "input_size": 32, "global_pool": True, "nb_classes": 7,
      "crop_pct": 1.0, "data_path": "old"},
     dict(model="vit_tiny_patch16", patch_size=8, depth=4, input_size=32, num_classes=7, global_pool=True)),
    ("detection", "MODEL_KEYS",
     {"backbone": "vitdet", "arch": "tiny", "patch_size": 16, "embed_dim": 64, "depth": 4, "num_heads": 2, "image_size": 64,
      "pretrain_img_size": 64, "window_size": 2, "global_blocks": [1, 3], "anchor_sizes": [8, 16, 32, 64, 128]},
     dict(model="vit_tiny_patch16", input_size=64, embed_dim=64, global_blocks=[1, 3])),
    ("segmentation", "ARCH_KEYS",
     {"model": "tiny", "patch_size": 8, "embed_dim": 64, "depth": 4, "num_heads": 2, "crop_size": 32, "num_classes": 7,
      "channels": 16, "aux_channels": 8, "aux_weight": 0.4, "out_indices": None},
     dict(model="vit_tiny_patch16", input_size=32, num_classes=7, channels=16)),
]


@pytest.mark.parametrize("module,keys,saved,expect", LEGACY_CKPTS, ids=[c[0] for c in LEGACY_CKPTS])
def test_eval_resume_reads_an_old_checkpoints_saved_args(module: str, keys: str, saved: dict, expect: dict, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    tm, config = train_module(module), importlib.import_module(f"{module}.config")
    assert getattr(tm, keys) == config.MODEL_KEYS  # the keys --eval takes (segmentation's older name too)
    path = save_atomic({"model": {}, "args": saved}, tmp_path / "old.pth")
    argv = ["--data_path", "d", "--eval", "--resume", str(path)]
    cfg = config.checkpoint_config(tm.parse_config(argv), checkpoint_args(load_file(path)), str(path))
    assert {k: getattr(cfg, k) for k in expect} == expect
    line = capsys.readouterr().out.strip()
    assert line.startswith(f"model flags from {path}:") and "model=vit_tiny_patch16" in line and "arch=" not in line
    # a flag written on the command line (here in its old spelling) still wins over the checkpoint
    argv2 = [*argv, "--image_size", "128"]
    cfg = tm.parse_config(argv2)
    assert cfg.given == given_flags(tm.get_parser(), argv2)
    cfg = config.checkpoint_config(cfg, saved, str(path))
    assert cfg.input_size == 128 and cfg.model == "vit_tiny_patch16"


def test_a_saved_value_out_of_range_is_a_user_error(tmp_path: Path) -> None:
    from segmentation.config import checkpoint_config, parse_config

    for bad in ({"arch": "giant"}, {"crop_size": 0}, {"depth": -1}, {"nb_classes": "7"}):
        with pytest.raises(UserError, match="bad.pth: its saved args hold"):
            checkpoint_config(parse_config(["--data_path", "d"]), bad, str(tmp_path / "bad.pth"))
