"""Nothing lost, never a traceback (issue #14, the engine side): finite checkpoints only, one run per output
folder, resume checks the run's flags, bad images in figures and odd image modes, a full disk, a DataLoader
worker's error, and SIGTERM -> checkpoint + exit 75 -> identical resume.  Imports kept light: the spawned DDP
workers import this module."""

from __future__ import annotations

import hashlib
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests import ROOT, forkserver

# a 2-block ViT-tiny/8 on 32 px: 7 steps an epoch over the tiny world's 56 images
TINY = ["--model", "mae_vit_tiny_patch16", "--patch_size", "8", "--depth", "2", "--input_size", "32", "--decoder_depth", "1",
        "--decoder_embed_dim", "64", "--decoder_num_heads", "4", "--batch_size", "8", "--no_progress", "--vis_every", "0",
        "--warmup_epochs", "1", "--blr", "1e-3", "--log_every", "1", "--device", "cpu"]


def env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def run(args, check=True, **popen) -> subprocess.CompletedProcess:
    """``python -m pretrain ARGS``; from the warm fork server unless it needs ``subprocess.run``'s own options."""
    cmd = [sys.executable, "-m", "pretrain", *map(str, args)]
    p = (subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300, **popen) if popen
         else forkserver.run(cmd, cwd=ROOT, env=env(), timeout=300))
    if check and p.returncode != 0:
        raise AssertionError(f"exit {p.returncode}\n{p.stdout}\n{p.stderr}")
    return p


def main(args) -> dict:
    from pretrain.train import main as pretrain_main

    return pretrain_main([*TINY, *map(str, args)])


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` (recursively) -> sha256 of its bytes."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*"))
            if p.is_file()}


def train_log(out: Path) -> dict[int, float]:
    """step -> loss, the latest entry winning; a line being written as we read is skipped."""
    got: dict[int, float] = {}
    path = out / "log.jsonl"
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            r = json.loads(line)
        except json.JSONDecodeError:
            continue
        if r["type"] == "train":
            got[r["step"]] = r["loss"]
    return got


def all_finite(ckpt: dict) -> bool:
    """Every floating tensor of the model and the optimizer state, one by one."""
    tensors = list(ckpt["model"].values()) + [v for st in ckpt["optimizer"]["state"].values() for v in st.values()]
    tensors = [t for t in tensors if isinstance(t, torch.Tensor) and t.is_floating_point()]
    return len(tensors) > len(ckpt["model"]) and all(bool(torch.isfinite(t).all()) for t in tensors)


@pytest.fixture(scope="module")
def trained(tiny_world, tmp_path_factory) -> Path:
    """One epoch (7 steps) of the tiny pretraining run: checkpoint-last.pth at step 7."""
    out = tmp_path_factory.mktemp("trained") / "run"
    main(["--data_path", tiny_world["imagenet"], "--output_dir", out, "--epochs", "1", "--num_workers", "0"])
    return out


@pytest.fixture
def used(trained, tmp_path) -> Path:
    """A private copy of the trained run's folder."""
    out = tmp_path / "run"
    shutil.copytree(trained, out)
    return out


# ---- 1. non-finite: checkpoints only from finite state ---------------------------------------------
def test_nan_stop_names_a_finite_checkpoint_and_never_writes_a_nonfinite_one(tiny_world, used):
    from maecore.checkpoint import load_file
    from maecore.errors import NonFiniteError, UserError

    before = (used / "checkpoint-last.pth").read_bytes()
    # weight decay 1e300 (lr x wd overflows float32 at once; --lr inf is refused as a flag): step 8 turns the
    # weights to inf/NaN; --save_every_steps 1 tries to checkpoint them at once
    with pytest.raises(NonFiniteError) as e:
        main(["--data_path", tiny_world["imagenet"], "--output_dir", used, "--epochs", "2", "--num_workers", "0",
              "--resume", "auto", "--resume_override", "epochs,weight_decay", "--weight_decay", "1e300", "--save_every_steps", "1"])
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("weights are not finite (NaN/inf) after step 8")
    assert msg.endswith(f"the last finite checkpoint is {used / 'checkpoint-last.pth'} (step 7)")
    ckpt = load_file(used / "checkpoint-last.pth")
    assert ckpt["step"] == 7 and all_finite(ckpt)
    assert (used / "checkpoint-last.pth").read_bytes() == before

    # a checkpoint holding NaN (written by an older version) is refused for resume, the folder untouched
    ckpt["model"]["blocks.0.attn.qkv.weight"][0, 0] = float("nan")
    bad = used.parent / "nan.pth"
    torch.save(ckpt, bad)
    snap = snapshot(used)
    with pytest.raises(UserError, match=r"cannot resume from .*nan\.pth: it holds NaN/inf in 1 of \d+ model tensors") as e:
        main(["--data_path", tiny_world["imagenet"], "--output_dir", used, "--epochs", "1", "--num_workers", "0",
              "--resume", bad])
    assert "\n" not in str(e.value) and snapshot(used) == snap


def test_nan_stop_without_any_checkpoint_says_so(tiny_world, tmp_path):
    from maecore.errors import NonFiniteError

    out = tmp_path / "out"
    with pytest.raises(NonFiniteError, match=r"^weights are not finite .* after step 1 .*; stopped, no checkpoint was written$"):
        main(["--data_path", tiny_world["imagenet"], "--output_dir", out, "--epochs", "1", "--num_workers", "0",
              "--weight_decay", "1e300", "--warmup_epochs", "0", "--save_every_steps", "1"])
    assert not list(out.glob("*.pth"))


# ---- 2. an output folder belongs to one run ---------------------------------------------------------
def test_fresh_run_into_a_used_folder_is_refused_and_overwrite_sets_the_old_run_aside(tiny_world, used):
    from maecore.errors import UserError

    snap = snapshot(used)
    args = ["--data_path", tiny_world["imagenet"], "--output_dir", used, "--epochs", "1", "--num_workers", "0",
            "--max_steps", "2"]
    with pytest.raises(UserError, match="holds checkpoint-0.pth, checkpoint-last.pth from an earlier run") as e:
        main(args)
    assert "\n" not in str(e.value)
    assert snapshot(used) == snap  # nothing written, moved or overwritten
    main([*args, "--overwrite"])
    aside = snapshot(used / "previous-1")
    for name in ("checkpoint-last.pth", "checkpoint-0.pth", "args.json"):
        assert aside[name] == snap[name]  # set aside, byte for byte
    assert snapshot(used)["log.1.jsonl"] == snap["log.jsonl"]
    from maecore.checkpoint import load_file

    assert load_file(used / "checkpoint-last.pth")["step"] == 2


def test_a_second_concurrent_run_is_refused_and_a_dead_run_leaves_no_stale_lock(tiny_world, tmp_path):
    from maecore.errors import UserError

    out = tmp_path / "out"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from maecore.checkpoint import FolderLock; FolderLock(sys.argv[1]).acquire(); "
         "print('locked', flush=True); time.sleep(120)", str(out)],
        cwd=ROOT, env=env(), stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        snap = snapshot(out)
        args = ["--data_path", tiny_world["imagenet"], "--output_dir", out, "--epochs", "1", "--num_workers", "0",
                "--max_steps", "1"]
        with pytest.raises(UserError, match=rf"is in use by another run \(pid {holder.pid} on ") as e:
            main(args)
        assert "\n" not in str(e.value) and snapshot(out) == snap
        with pytest.raises(UserError, match="in use by another run"):
            main([*args, "--resume", "auto"])
    finally:
        holder.kill()  # as a crash would: the OS drops the lock
        holder.wait()
    main(args)
    assert (out / "checkpoint-last.pth").is_file()
    pid, host = (out / "run.lock").read_text().split()
    assert int(pid) == os.getpid()


@pytest.mark.slow
def test_temporaries_of_a_save_killed_mid_write_go_when_the_next_run_takes_the_folder(tiny_world, tmp_path):
    """A SIGKILL while checkpoint-last.pth is written leaves its temporary (a whole checkpoint's worth); the next run
    to take the folder's lock removes it, says so in one line and logs it.  Other files stay."""
    from maecore.checkpoint import load_file
    from maecore.engine import read_log

    out = tmp_path / "out"
    common = [*TINY, "--data_path", tiny_world["imagenet"], "--output_dir", out, "--epochs", "50", "--num_workers", "0",
              "--save_every_steps", "1"]
    proc = subprocess.Popen([sys.executable, "-m", "pretrain", *map(str, common)], cwd=ROOT, env=env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    left: list[Path] = []
    deadline = time.time() + 200
    while time.time() < deadline and proc.poll() is None and not left:
        # a save under way (not the first: there is a checkpoint to resume from): freeze the run, kill it if still saving
        if (out / "checkpoint-last.pth").exists() and list(out.glob(".checkpoint-last.pth.*.tmp")):
            os.kill(proc.pid, signal.SIGSTOP)
            if left := list(out.glob(".checkpoint-last.pth.*.tmp")):
                os.kill(proc.pid, signal.SIGKILL)
            else:
                os.kill(proc.pid, signal.SIGCONT)
        time.sleep(0.001)
    _, err = proc.communicate(timeout=60)
    assert left and proc.returncode == -signal.SIGKILL, err[-2000:]
    assert list(out.glob(".checkpoint-last.pth.*.tmp")) == left
    others = [out / ".checkpoint-last.pth.tmp", out / ".notes.pth.abcd1234.tmp", out / "previous-1" / left[0].name]
    for f in others:  # not a temporary of this folder's checkpoints: never touched
        f.parent.mkdir(exist_ok=True)
        f.write_bytes(b"keep")
    step, size = load_file(out / "checkpoint-last.pth")["step"], left[0].stat().st_size
    p = run([*common, "--resume", "auto", "--max_steps", step + 1])
    lines = [ln for ln in p.stdout.splitlines() if "temporary checkpoint" in ln]
    assert lines == [f"{out}: removed 1 temporary checkpoint file(s) of saves killed mid-write "
                     f"({size / 2**20:.1f} MiB): {left[0].name}"], p.stdout
    assert not left[0].exists() and all(f.read_bytes() == b"keep" for f in others)
    assert read_log(out, "cleanup") == [{"type": "cleanup", "step": 0, "removed": [left[0].name], "bytes": size}]
    assert load_file(out / "checkpoint-last.pth")["step"] == step + 1


# ---- 4. resume checks the run's flags before touching anything --------------------------------------
@pytest.mark.parametrize("change, expect", [
    (["--depth", "3"], r"it was trained with other model flags \(depth 2 -> 3\)"),
    (["--model", "mae_vit_small_patch16"], r"other model flags \(model mae_vit_tiny_patch16 -> mae_vit_small_patch16\)"),
    (["--batch_size", "4", "--mask_ratio", "0.5", "--mask_type", "block", "--blr", "2e-3"],
     r"flags changed since its run \(batch_size 8 -> 4, blr 0\.001 -> 0\.002, mask_ratio 0\.75 -> 0\.5, mask_type random -> "
     r"block\); pass --resume_override batch_size,blr,mask_ratio,mask_type \(or all\)"),
    (["--resume_override", "depth"], "model flags cannot change on resume"),
])
def test_resume_with_changed_flags_is_refused_before_anything_is_written(tiny_world, used, change, expect):
    from maecore.errors import UserError

    snap = snapshot(used)
    with pytest.raises(UserError, match=expect) as e:
        main(["--data_path", tiny_world["imagenet"], "--output_dir", used, "--epochs", "1", "--num_workers", "0",
              "--resume", "auto", *change])
    assert "\n" not in str(e.value)
    assert snapshot(used) == snap  # args.json, log, checkpoints, tensorboard: file list and bytes unchanged


def test_resume_override_takes_the_new_values_and_logs_them(tiny_world, used, capsys):
    from maecore.checkpoint import load_file
    from maecore.engine import read_log

    main(["--data_path", tiny_world["imagenet"], "--output_dir", used, "--epochs", "2", "--num_workers", "0",
          "--resume", "auto", "--mask_ratio", "0.5", "--resume_override", "mask_ratio,epochs"])
    said = "resume: new values taken over the checkpoint's (--resume_override): epochs 1 -> 2, mask_ratio 0.75 -> 0.5"
    assert said in capsys.readouterr().out
    rec = read_log(used, "resume")[-1]
    assert rec["overrides"] == {"epochs": [1, 2], "mask_ratio": [0.75, 0.5]} and rec["step"] == 7
    ckpt = load_file(used / "checkpoint-last.pth")
    assert ckpt["step"] == 14 and ckpt["args"]["mask_ratio"] == 0.5
    assert json.loads((used / "args.json").read_text())["mask_ratio"] == 0.5


# ---- 3. images: figures survive bad files; other bit depths and modes are scaled, not saturated -----
def test_zero_byte_image_among_the_figure_images_does_not_stop_the_run(tiny_world, tmp_path, caplog):
    from pretrain.data import fixed_images

    data = tmp_path / "data"
    shutil.copytree(tiny_world["imagenet"], data)
    vals = sorted((data / "val").rglob("*.jpg"))
    vals[0].write_bytes(b"")  # the first of the fixed figure images
    assert vals[0] not in fixed_images(data, 8) and len(fixed_images(data, 8)) == 8
    out = tmp_path / "out"
    main(["--data_path", data, "--output_dir", out, "--epochs", "1", "--num_workers", "0", "--max_steps", "2",
          "--vis_every", "1", "--vis_images", "8"])
    assert Image.open(out / "recon-last.png").size[1] == 34 + 8 * 132 + 4  # eight rows of 128 px + padding


def test_reconstruction_figure_draws_the_readable_images_and_skips_when_none(tiny_world, tmp_path, caplog):
    from pretrain.evaluate import reconstruction_figure
    from pretrain.model import MaskedAutoencoderViT

    m = MaskedAutoencoderViT(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2, decoder_embed_dim=32,
                             decoder_depth=1, decoder_num_heads=2)
    good = sorted((tiny_world["imagenet"] / "val").rglob("*.jpg"))[:2]
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    path = reconstruction_figure(m, [good[0], empty, good[1]], tmp_path / "fig.png", 32)
    assert path is not None and Image.open(path).size[1] == 34 + 2 * 132 + 4
    assert any("skipping unreadable image" in r.getMessage() and "empty.jpg" in r.getMessage() for r in caplog.records)
    caplog.clear()
    assert reconstruction_figure(m, [empty], tmp_path / "none.png", 32) is None
    assert not (tmp_path / "none.png").exists()
    assert any("no readable image" in r.getMessage() for r in caplog.records)


def test_sixteen_bit_and_other_modes_are_scaled_not_saturated(tmp_path):
    from maecore.data.images import ImageFiles, load_rgb

    ramp = np.linspace(0, 65535, 64 * 64).round().astype(np.uint16).reshape(64, 64)
    Image.fromarray(ramp).save(tmp_path / "ramp16.png")  # a 16-bit greyscale PNG (Pillow: I;16)
    assert Image.open(tmp_path / "ramp16.png").mode == "I;16"
    got = np.asarray(load_rgb(tmp_path / "ramp16.png"))
    want = np.rint(ramp / 257).astype(np.uint8)  # value / 257: full scale to full scale, the inverse of v * 257
    assert got.shape == (64, 64, 3) and np.array_equal(got[..., 0], want) and np.array_equal(got[..., 2], want)
    assert (got == 255).mean() < 0.01  # not 99.7 % white
    dark = (ramp // 16).astype(np.uint16)  # a 12-bit camera's range: stays dark, not stretched
    Image.fromarray(dark).save(tmp_path / "dark16.png")
    assert np.asarray(load_rgb(tmp_path / "dark16.png")).max() == round(4095 / 257)
    # 32-bit int within the 16-bit range, float in [0, 1]: the same scale; out of range: refused with a reason
    Image.fromarray(ramp.astype(np.int32)).save(tmp_path / "ramp32.tif")
    assert np.array_equal(np.asarray(load_rgb(tmp_path / "ramp32.tif"))[..., 1], want)
    Image.fromarray((ramp / 65535).astype(np.float32)).save(tmp_path / "unit.tif")
    assert abs(np.asarray(load_rgb(tmp_path / "unit.tif"))[..., 0].astype(int) - want).max() <= 1
    Image.fromarray((ramp / 65535 * 100).astype(np.float32)).save(tmp_path / "big.tif")
    from maecore.data.images import UnusableImage

    with pytest.raises(UnusableImage, match=r"32-bit float image with values 0\.\.100 .*no known scale"):
        load_rgb(tmp_path / "big.tif")
    # transparency (LA, RGBA, P with a transparent index) over white, no Pillow warning; CMYK converted
    la = Image.fromarray(np.stack([np.zeros((4, 4), np.uint8), np.full((4, 4), 0, np.uint8)], -1), "LA")
    la.save(tmp_path / "la.png")
    assert np.asarray(load_rgb(tmp_path / "la.png")).min() == 255
    pal = Image.new("P", (4, 4), 1)
    pal.putpalette([0, 0, 0, 10, 20, 30] + [0] * 762)
    pal.save(tmp_path / "p.png", transparency=1)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert np.asarray(load_rgb(tmp_path / "p.png")).min() == 255
    Image.new("CMYK", (4, 4), (0, 255, 255, 0)).save(tmp_path / "c.jpg")
    assert tuple(np.asarray(load_rgb(tmp_path / "c.jpg"))[0, 0]) > (240, 0, 0)
    # in a dataset, a refused file is skipped and counted like an unreadable one
    folder = tmp_path / "ds"
    folder.mkdir()
    shutil.copy(tmp_path / "big.tif", folder / "a.tif")
    shutil.copy(tmp_path / "ramp16.png", folder / "b.png")
    img, _, skipped = ImageFiles(folder)[0]
    assert skipped == 1 and np.array_equal(np.asarray(img)[..., 0], want)


# ---- 5. a full disk and a worker's error are one line -----------------------------------------------
def _small_files_only() -> None:
    """Child process: files may not grow past 1 MB (EFBIG, as a full disk gives ENOSPC) — a checkpoint
    cannot be written, the logs can."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))


def test_failed_checkpoint_write_is_one_line_and_keeps_the_previous_checkpoint(tiny_world, used):
    before = (used / "checkpoint-last.pth").read_bytes()
    p = run([*TINY, "--data_path", tiny_world["imagenet"], "--output_dir", used, "--epochs", "2", "--num_workers", "0",
             "--resume", "auto", "--resume_override", "epochs"], check=False, preexec_fn=_small_files_only)
    assert p.returncode == 2, p.stderr[-2000:]
    assert "Traceback" not in p.stderr and "inline_container" not in p.stderr
    last = p.stderr.strip().splitlines()[-1]
    assert last == (f"error: cannot write checkpoint {used / 'checkpoint-last.pth'}: File too large; "
                    f"kept {used / 'checkpoint-last.pth'} (step 7), intact")
    assert (used / "checkpoint-last.pth").read_bytes() == before
    assert not list(used.glob(".*.tmp"))  # no half-written temp file left behind


def test_dataloader_worker_error_is_one_line(tiny_world, tmp_path):
    data = tmp_path / "flat"
    data.mkdir()
    for i in range(40):
        (data / f"a{i:02d}.jpg").write_bytes(b"")
    for i, f in enumerate(sorted((tiny_world["imagenet"] / "train").rglob("*.jpg"))[:8]):
        shutil.copy(f, data / f"b{i}.jpg")
    p = run([*TINY, "--data_path", data, "--output_dir", tmp_path / "out", "--epochs", "1", "--num_workers", "1"],
            check=False)
    assert p.returncode == 2
    assert "Traceback" not in p.stderr
    errors = [line for line in p.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: 20 unreadable images in a row near ")
    assert p.stderr.strip().splitlines()[-1] == errors[0]


# ---- 6. SIGTERM: finish the step, checkpoint, exit 75; resume continues identically -------------------
@pytest.mark.slow
def test_sigterm_checkpoints_exits_75_and_resume_matches_an_uninterrupted_run(tiny_world, tmp_path):
    from maecore.checkpoint import load_file

    common = [*TINY, "--data_path", tiny_world["imagenet"], "--epochs", "2", "--num_workers", "1"]
    ref = tmp_path / "ref"
    run([*common, "--output_dir", ref])
    want = train_log(ref)
    assert sorted(want) == list(range(1, 15))

    out = tmp_path / "stopped"
    # a new session: the signal goes to the whole process group (the DataLoader worker too), as SLURM sends it
    proc = subprocess.Popen([sys.executable, "-m", "pretrain", *map(str, common), "--output_dir", str(out)], cwd=ROOT,
                            env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.time() + 200
    at = 0
    while time.time() < deadline and proc.poll() is None:
        if max(train_log(out), default=0) >= 3:
            os.killpg(proc.pid, signal.SIGSTOP)  # hold it still to read the step it is at
            at = max(train_log(out))
            os.killpg(proc.pid, signal.SIGTERM)
            os.killpg(proc.pid, signal.SIGCONT)
            break
        time.sleep(0.005)
    _, err = proc.communicate(timeout=120)
    assert at, "the run ended before it could be signalled"
    assert proc.returncode == 75, err[-2000:]  # EX_TEMPFAIL: requeue me
    from maecore.engine import EXIT_REQUEUE

    assert EXIT_REQUEUE == 75
    assert "Traceback" not in err
    ckpt = load_file(out / "checkpoint-last.pth")
    step = ckpt["step"]
    # the step it was in when signalled: finished (at + 1), or the one just logged (at) if it was between steps
    assert step in (at, at + 1)
    assert err.strip().splitlines()[-1].startswith(f"stopped by SIGTERM after step {step} ")
    assert max(train_log(out)) == step and all_finite(ckpt)
    run([*common, "--output_dir", out, "--resume", "auto"])
    assert train_log(out) == want  # bit-identical, every step


def _vote_worker(rank: int, world_size: int, init: str, out: str) -> None:
    import torch.distributed as dist

    from maecore.distributed import AnyRank

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world_size)
    try:
        vote = AnyRank()
        answers = [vote.poll(rank == 1 and i >= 3) for i in range(8)]  # only rank 1 is signalled, at call 3
        vote.close()
        torch.save(answers, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def test_ranks_agree_on_a_stop_at_the_same_call(tmp_path):
    import torch.multiprocessing as mp

    out = str(tmp_path / "votes")
    mp.start_processes(_vote_worker, args=(2, f"file://{tmp_path / 'rdzv'}", out), nprocs=2, start_method="spawn")
    a, b = (torch.load(f"{out}.{r}", weights_only=True) for r in range(2))
    assert a == b == [False] * 4 + [True] * 4  # every rank, one call after rank 1 raised it


def test_a_second_signal_never_interrupts_a_save():
    from maecore.engine import StopSignals

    s = StopSignals()
    s.install()
    try:
        os.kill(os.getpid(), signal.SIGUSR1)
        assert s.name == "SIGUSR1"  # the first signal asks for a stop at the next step boundary
        with s.deferred():  # a checkpoint being written: later signals, Ctrl-C included, are ignored
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGTERM)
        assert s.name == "SIGUSR1"
        with pytest.raises(KeyboardInterrupt):  # outside a save, a second Ctrl-C insists
            os.kill(os.getpid(), signal.SIGINT)
    finally:
        s.restore()
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL


def test_workers_end_with_the_run(tiny_world, tmp_path, monkeypatch):
    """--max_steps stops mid-epoch: the persistent loader's workers (which ignore SIGTERM) are shut down when fit
    ends, even while the trainer lives on (a reference cycle can keep it to the exit, where multiprocessing's
    SIGTERM-and-wait hook would hang on them)."""
    import multiprocessing

    from maecore.engine import Trainer

    kept: list[Trainer] = []
    fit = Trainer.fit
    monkeypatch.setattr(Trainer, "fit", lambda self: (kept.append(self), fit(self))[1])
    main(["--data_path", tiny_world["imagenet"], "--output_dir", tmp_path / "run", "--epochs", "1", "--num_workers", "1",
          "--max_steps", "2"])
    assert kept and kept[0].loader._iterator is None
    assert [p for p in multiprocessing.active_children() if p.is_alive()] == []


def test_exit_never_waits_on_a_worker(tmp_path):
    """A script that lets go of a persistent loader mid-epoch still exits: the exit hook kills the worker that
    ignores SIGTERM (before the hook, this process waited on it forever)."""
    script = tmp_path / "leave_loader.py"
    script.write_text(
        "import torch\n"
        "from torch.utils.data import DataLoader\n"
        "from maecore.data.workers import ignore_stop_signals\n"
        "loader = DataLoader(list(range(64)), batch_size=4, num_workers=1, persistent_workers=True,\n"
        "                    worker_init_fn=ignore_stop_signals)\n"
        "it = iter(loader)\n"
        "print(int(next(it).sum()), flush=True)\n")
    p = forkserver.run([sys.executable, str(script)], cwd=ROOT, env=env(), timeout=60)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "6"
