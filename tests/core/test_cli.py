"""maecore.cli: which flags the command line gave, and ``--eval`` taking the model flags from a checkpoint."""

from __future__ import annotations

import argparse

import pytest

from maecore.checkpoint import checkpoint_args
from maecore.cli import flags_from_checkpoint, given_flags
from maecore.errors import UserError

KEYS = ("arch", "embed_dim", "depth", "global_blocks", "anchor_sizes", "score_thresh", "global_pool", "image_size")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser()
    p.add_argument("--arch", "--model", dest="arch", default="base", choices=["tiny", "base"])
    p.add_argument("--embed_dim", type=int, default=None)
    p.add_argument("--depth", type=int, default=None)
    p.add_argument("--global_blocks", type=int, nargs="*", default=None)
    p.add_argument("--anchor_sizes", type=int, nargs=3, default=[32, 64, 128])
    p.add_argument("--score_thresh", type=float, default=0.05)
    p.add_argument("--global_pool", action="store_true", default=None)
    p.add_argument("--cls_token", action="store_false", dest="global_pool")
    p.add_argument("--image_size", type=int, default=1024)
    p.add_argument("--data_path", required=True)
    p.add_argument("--output_dir", default="out")
    p.add_argument("--eval", action="store_true")
    p.set_defaults(depth=12)  # a recipe's default is not a flag given
    return p


def test_given_flags_sees_aliases_abbreviations_and_equals_forms() -> None:
    argv = ["--model", "tiny", "--embed=64", "--global_blocks", "--cls_token", "--data_path", "d", "--eval"]
    assert given_flags(parser(), argv) == {"arch", "embed_dim", "global_blocks", "global_pool", "data_path", "eval"}
    p = parser()
    given_flags(p, ["--depth", "3", "--data_path", "d"])
    assert p.get_default("depth") == 12 and p.parse_args(["--data_path", "d"]).depth == 12  # the parser is untouched


def test_fill_takes_model_flags_unless_given(capsys: pytest.CaptureFixture[str]) -> None:
    p = parser()
    argv = ["--data_path", "new", "--depth", "6", "--eval"]
    args = p.parse_args(argv)
    saved = {"arch": "tiny", "embed_dim": 64, "depth": 4, "global_blocks": (1, 3), "anchor_sizes": [8, 16, 32],
             "score_thresh": 0.0, "global_pool": True, "image_size": 64, "data_path": "old", "output_dir": "old"}
    taken = flags_from_checkpoint(p, saved, KEYS, given_flags(p, argv), source="ck.pth")
    assert list(taken) == ["arch", "embed_dim", "global_blocks", "anchor_sizes", "score_thresh", "global_pool", "image_size"]
    args = argparse.Namespace(**{**vars(args), **taken})  # what dataclasses.replace(cfg, **taken) builds
    assert (args.arch, args.embed_dim, args.depth, args.global_blocks, args.score_thresh) == ("tiny", 64, 6, [1, 3], 0.0)
    assert args.global_pool is True and args.image_size == 64
    assert args.data_path == "new" and args.output_dir == "out"  # not a model key: never taken
    out = capsys.readouterr().out.splitlines()
    assert out == ["model flags from ck.pth: arch=tiny, embed_dim=64, global_blocks=1 3, anchor_sizes=8 16 32, "
                   "score_thresh=0.0, global_pool=True, image_size=64 (given on the command line: depth)"]
    # a saved None (the size's own width) replaces a recipe's value too
    assert flags_from_checkpoint(p, {"embed_dim": None}, KEYS, given=(), log=None) == {"embed_dim": None}


def test_no_saved_args_keeps_the_flags(capsys: pytest.CaptureFixture[str]) -> None:
    p = parser()
    args = p.parse_args(["--data_path", "d"])
    before = vars(args).copy()
    for ckpt in ({"model": {}}, {"model": {}, "args": "Namespace(arch='tiny')"}, [1, 2]):
        assert flags_from_checkpoint(p, checkpoint_args(ckpt), KEYS) == {}
    assert vars(args) == before and capsys.readouterr().out == ""


@pytest.mark.parametrize("key,value", [("arch", "huge"), ("embed_dim", "64"), ("anchor_sizes", [8, 16]),
                                       ("global_blocks", 3), ("score_thresh", True), ("global_pool", 1.5)])
def test_bad_saved_value_is_a_user_error(key: str, value: object) -> None:
    p = parser()
    with pytest.raises(UserError, match=f"ck.pth: its saved args hold {key}="):
        flags_from_checkpoint(p, {key: value}, KEYS, source="ck.pth")
