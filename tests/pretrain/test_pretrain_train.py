"""Pretraining CLI and the shared engine: exact resume after SIGKILL, bad files, NaN stop, DDP."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from maecore.checkpoint import load_file
from maecore.engine import read_log
from tests import ROOT, forkserver

TINY = ["--model", "mae_vit_tiny_patch16", "--patch_size", "8", "--input_size", "32", "--decoder_depth", "1",
        "--decoder_embed_dim", "64", "--decoder_num_heads", "4", "--batch_size", "8", "--no_progress",
        "--vis_every", "0", "--warmup_epochs", "1", "--blr", "1e-3", "--log_every", "1"]


def run(args, check=True, timeout: float | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    p = forkserver.run([sys.executable, "-m", "pretrain", *args], cwd=ROOT, env=env, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"exit {p.returncode}\n{p.stdout}\n{p.stderr}")
    return p


def losses(out: Path) -> dict[int, float]:
    """step -> loss; a resumed run re-logs steps after its checkpoint, the latest entry wins."""
    return {r["step"]: r["loss"] for r in read_log(out, "train")}


@pytest.mark.slow
def test_sigkill_then_resume_gives_identical_losses(tiny_world, tmp_path):
    data = str(tiny_world["imagenet"])
    common = [*TINY, "--data_path", data, "--epochs", "3", "--num_workers", "1", "--save_every_steps", "2"]
    ref = tmp_path / "ref"
    run([*common, "--output_dir", str(ref)])
    want = losses(ref)
    assert len(want) == 21  # 56 images / 8 = 7 steps x 3 epochs

    out = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "pretrain", *common, "--output_dir", str(out)], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if max(losses(out), default=0) >= 10:  # mid-epoch 2 (steps 8-14)
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.005)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    ckpt = load_file(out / "checkpoint-last.pth")
    assert ckpt["iter_in_epoch"] % 7 != 0 or ckpt["step"] % 7 == 0  # a mid-epoch checkpoint is possible
    assert isinstance(ckpt["args"], dict)
    run([*common, "--output_dir", str(out), "--resume", "auto"])
    got = losses(out)
    assert sorted(got) == sorted(want)
    assert got == want  # bit-identical, every step


def test_corrupt_images_are_skipped_and_counted(tiny_world, tmp_path):
    data = tmp_path / "imgs"
    shutil.copytree(tiny_world["imagenet"] / "train", data)
    files = sorted(data.rglob("*.jpg"))
    files[0].write_bytes(b"not a jpeg at all")
    files[5].write_bytes(files[5].read_bytes()[:40])  # truncated
    out = tmp_path / "out"
    p = run([*TINY, "--data_path", str(data), "--output_dir", str(out), "--epochs", "1", "--num_workers", "0"])
    skipped = sum(r["n_skipped"] for r in read_log(out, "train"))
    assert skipped == 2
    assert "skipping unreadable image" in p.stderr


@pytest.mark.slow
def test_nonfinite_loss_stops_and_keeps_last_good_checkpoint(tiny_world, tmp_path):
    data = str(tiny_world["imagenet"])
    out = tmp_path / "out"
    run([*TINY, "--data_path", data, "--output_dir", str(out), "--epochs", "1", "--num_workers", "0"])
    last = out / "checkpoint-last.pth"
    digest = hashlib.sha256(last.read_bytes()).hexdigest()
    # an absurd learning rate blows the weights up: the loss turns inf/NaN within a few steps
    p = run([*TINY, "--data_path", data, "--output_dir", str(out), "--epochs", "3", "--num_workers", "0",
             "--resume", "auto", "--lr", "1e38", "--save_every_steps", "100", "--resume_override", "epochs,lr"], check=False)
    assert p.returncode == 2
    err = p.stderr.strip().splitlines()
    assert err[-1].startswith("error: loss is not finite") and "checkpoint-last.pth" in err[-1]
    assert "Traceback" not in p.stderr
    assert hashlib.sha256(last.read_bytes()).hexdigest() == digest


@pytest.mark.parametrize("case", ["missing", "empty", "bad_ratio"])
def test_cli_errors_are_one_line(tmp_path, case):
    (tmp_path / "empty").mkdir()
    args = {"missing": ["--data_path", str(tmp_path / "nope")], "empty": ["--data_path", str(tmp_path / "empty")],
            "bad_ratio": ["--data_path", str(tmp_path), "--mask_ratio", "1.5"]}[case]
    p = run([*TINY, *args, "--output_dir", str(tmp_path / "o"), "--epochs", "1"], check=False)
    assert p.returncode == 2
    assert "Traceback" not in p.stderr and p.stderr.strip()


DDP_WORKER = r"""
import json, sys, torch
import torch.distributed as dist
from maecore import distributed as du
from maecore.data.sampler import ResumableSampler
from pretrain.train import build_trainer, parse_config
args = parse_config(sys.argv[1:])
device = du.init_distributed("cpu")
trainer = build_trainer(args, device)
trainer.fit()
flat = torch.cat([p.detach().flatten() for p in trainer.model.parameters()])
gathered = du.all_gather_object(flat)
s = ResumableSampler(trainer.sampler.n, True, args.seed, du.rank(), du.world_size())
s.set_epoch(0)
shards = du.all_gather_object([i for i, _ in s])
if du.rank() == 0:
    same = all(torch.equal(gathered[0], g) for g in gathered[1:])
    json.dump({"same": same, "world": du.world_size(), "shards": shards, "backend": dist.get_backend()},
              open(args.output_dir + "/ddp.json", "w"))
du.cleanup()
"""


@pytest.mark.slow
def test_ddp_two_processes_gloo(tiny_world, tmp_path):
    worker = tmp_path / "worker.py"
    worker.write_text(DDP_WORKER)
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(worker), *TINY, "--data_path", str(tiny_world["imagenet"]), "--output_dir", str(out), "--epochs", "1",
           "--num_workers", "0", "--batch_size", "4", "--save_every_steps", "3"]
    p = forkserver.run(cmd, cwd=ROOT, env=env, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.loads((out / "ddp.json").read_text())
    assert res["world"] == 2 and res["backend"] == "gloo"
    assert res["same"], "parameters differ across ranks"
    a, b = map(set, res["shards"])
    assert not a & b and len(a | b) == 56
    steps = [r["step"] for r in read_log(out, "train")]
    assert steps == list(range(1, 8))  # 56 / (4 x 2) = 7 steps, each logged once (rank 0 only)
    assert len(list((out / "tensorboard").glob("events.*"))) == 1
    assert sorted(x.name for x in out.glob("*.pth")) == ["checkpoint-0.pth", "checkpoint-last.pth"]
    assert load_file(out / "checkpoint-last.pth")["args"]["batch_size"] == 4


@pytest.mark.slow
def test_visualize_tool(tiny_world, tmp_path, capsys):
    from pretrain.model import MaskedAutoencoderViT

    m = MaskedAutoencoderViT(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4, decoder_embed_dim=32,
                             decoder_depth=1, decoder_num_heads=4)
    full, enc = tmp_path / "full.pth", tmp_path / "enc.pth"
    torch.save({"model": m.state_dict()}, full)
    torch.save({"model": {k: v for k, v in m.state_dict().items() if not k.startswith(("decoder", "mask"))}}, enc)
    imgs = [str(p) for p in sorted((tiny_world["imagenet"] / "val").rglob("*.jpg"))[:3]]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    tool = [sys.executable, str(ROOT / "tools" / "visualize.py")]
    p = forkserver.run([*tool, str(full), *imgs, "-o", str(tmp_path / "v.png")], env=env)
    assert p.returncode == 0, p.stderr
    from PIL import Image

    w, h = Image.open(tmp_path / "v.png").size
    assert w > 4 * 32 and h > 3 * 32
    p = forkserver.run([*tool, str(enc), *imgs, "-o", str(tmp_path / "x.png")], env=env)
    assert p.returncode == 2 and "encoder-only" in p.stderr and "Traceback" not in p.stderr

    # bad values and unreadable images: one line, exit 2, no figure (in-process: the same main as the tool)
    from pretrain.visualize import cli

    bad_img = tmp_path / "empty.jpg"
    bad_img.write_bytes(b"")
    for argv, expect in [([str(full), *imgs, "-o", str(tmp_path / "y.png"), "--mask_ratio", "1.5"], "--mask_ratio"),
                         ([str(full), *imgs, "-o", str(tmp_path / "y.png"), "--input_size", "60"], "not a multiple of the patch"),
                         ([str(full), str(bad_img), "-o", str(tmp_path / "y.png")], "none of the 1 images could be read")]:
        with pytest.raises(SystemExit) as e:
            cli(argv)
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and err[-1].startswith("error: ") and expect in err[-1], err
        assert not (tmp_path / "y.png").exists()


def test_size_overrides_build_a_smaller_encoder():
    # --embed_dim/--depth/--num_heads shrink a named model (the demo's 4-block ViT-tiny), as in the task CLIs
    from pretrain.train import build_model, parse_config

    args = parse_config(["--data_path", "unused", "--recipe", "demo", "--embed_dim", "48", "--depth", "2", "--num_heads", "2"])
    model = build_model(args)
    assert (len(model.blocks), model.embed_dim, model.blocks[0].attn.num_heads) == (2, 48, 2)
    assert model.patch_size == 8 and len(model.decoder_blocks) == args.decoder_depth


def test_fresh_run_in_a_used_folder_sets_the_old_log_aside(tiny_world, tmp_path):
    # readers of log.jsonl (studies, the demo report) must see this run only; the old log is kept
    from pretrain.train import main

    out = tmp_path / "out"
    args = [*TINY, "--data_path", str(tiny_world["imagenet"]), "--output_dir", str(out), "--epochs", "1",
            "--num_workers", "0", "--max_steps", "2", "--device", "cpu"]
    main(args)
    first = (out / "log.jsonl").read_text()
    main([*args, "--overwrite"])  # a fresh run into a folder holding a checkpoint must say so
    assert (out / "log.1.jsonl").read_text() == first
    assert [r["step"] for r in read_log(out, "train")] == [1, 2]
