"""Ready for the cluster (issue #17): collective timeouts that name the rank, multi-node torchrun (two torchrun
"nodes" on 127.0.0.1), elastic restarts (torchrun --max-restarts after a SIGKILLed rank), the submitit launcher
with its requeue protocol (local executor), activation checkpointing and FSDP2 on CPU (gloo).

Every multi-process run is 2 gloo processes of one thread each on the tiny world; the pretraining runs share one
uninterrupted reference (``torchrun --standalone --nproc_per_node 2``) and must end with exactly its parameters."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from maecore.checkpoint import load_file
from maecore.engine import read_log
from tests import ROOT, forkserver

PY = sys.executable
# a 2-block ViT-tiny/8 MAE on 32 px, fp32; 4 images per rank: 56 / (4 x 2) = 7 steps an epoch
PRETRAIN = ["--model", "mae_vit_tiny_patch16", "--patch_size", "8", "--depth", "2", "--input_size", "32", "--decoder_depth", "1",
            "--decoder_embed_dim", "64", "--decoder_num_heads", "4", "--batch_size", "4", "--no_progress", "--vis_every", "0",
            "--warmup_epochs", "1", "--blr", "1e-3", "--log_every", "1", "--device", "cpu", "--amp", "none", "--num_workers", "0"]
PRETRAIN_EPOCHS = ["--epochs", "3", "--save_every_steps", "2"]  # 21 steps
FINETUNE = ["--model", "vit_tiny_patch16", "--patch_size", "8", "--depth", "2", "--input_size", "32", "--batch_size", "4",
            "--num_workers", "0", "--no_progress", "--log_every", "1", "--device", "cpu", "--amp", "none", "--epochs", "1",
            "--max_steps", "3", "--warmup_epochs", "1"]


def env(**extra: str) -> dict[str, str]:
    e = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), **forkserver.worker_env(), **extra}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):  # never inherit a launcher's
        if k not in extra:
            e.pop(k, None)
    return e


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_standalone(module: str, args: list[str], *launch: str) -> list[str]:
    return [PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *launch, "-m", module, *map(str, args)]


def torchrun_node(k: int, port: int, module: str, args: list[str]) -> list[str]:
    """Node ``k`` of a 2-node job with one process per node, c10d rendezvous on 127.0.0.1:port."""
    return [PY, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1", "--node_rank", str(k),
            "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{port}", "--rdzv_id", "test", "-m", module, *map(str, args)]


def check_run(cmd: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    p = forkserver.run(cmd, cwd=ROOT, env=env(), timeout=timeout)
    assert p.returncode == 0, f"exit {p.returncode}\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    return p


def two_nodes(module: str, args: list[str], timeout: float = 300) -> None:
    """Two torchrun agents, one "node" each, meeting at a free port of 127.0.0.1; both must exit 0."""
    port = free_port()
    procs = [subprocess.Popen(torchrun_node(k, port, module, args), cwd=ROOT, env=env(), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for k in (0, 1)]
    outs = [p.communicate(timeout=timeout)[0] for p in procs]
    for k, (p, out) in enumerate(zip(procs, outs)):
        assert p.returncode == 0, f"node {k} exit {p.returncode}\n{out[-3000:]}"


def same_parameters(a: Path, b: Path) -> None:
    """torch.equal on every tensor of the two checkpoints' models (and the step they are at)."""
    ca, cb = load_file(a), load_file(b)
    assert ca["step"] == cb["step"]
    assert sorted(ca["model"]) == sorted(cb["model"])
    differ = [k for k in ca["model"] if not torch.equal(ca["model"][k], cb["model"][k])]
    assert not differ, f"{len(differ)} tensors differ, first {differ[0]}"


def same_optimizer(a: Path, b: Path) -> None:
    oa, ob = load_file(a)["optimizer"], load_file(b)["optimizer"]
    assert sorted(oa["state"]) == sorted(ob["state"])
    for i in oa["state"]:
        for k, v in oa["state"][i].items():
            assert torch.equal(v, ob["state"][i][k]), (i, k)


def losses(out: Path) -> dict[int, float]:
    """step -> loss, the latest entry winning (a resumed run re-logs the steps after its checkpoint)."""
    got: dict[int, float] = {}
    for r in read_log(out, "train"):
        got[r["step"]] = r["loss"]
    return got


def last_step(out: Path) -> int:
    path = out / "log.jsonl"
    steps = [0]
    for line in path.read_text().splitlines() if path.exists() else []:
        if '"type": "train"' in line:
            try:
                steps.append(int(line.split('"step": ', 1)[1].split(",", 1)[0]))
            except (IndexError, ValueError):
                pass  # a line being written
    return max(steps)


@pytest.fixture(scope="module")
def pretrain_ref(tiny_world, tmp_path_factory) -> Path:
    """The uninterrupted reference: ``torchrun --standalone --nproc_per_node 2``, 21 steps."""
    out = tmp_path_factory.mktemp("cluster") / "ref"
    check_run(torchrun_standalone("pretrain", [*PRETRAIN, *PRETRAIN_EPOCHS, "--data_path", tiny_world["imagenet"],
                                               "--output_dir", out]))
    assert sorted(losses(out)) == list(range(1, 22))
    return out


# ---- 1. collective timeouts; a failure names the rank ------------------------------------------------
@pytest.mark.slow
def test_a_stuck_rank_fails_the_other_within_dist_timeout_naming_its_rank(tiny_world, tmp_path):
    # two processes as torchrun starts them (RANK/WORLD_SIZE/MASTER_*); rank 1 is frozen (SIGSTOP) mid-run: rank 0
    # must not wait the default 30 minutes but fail after --dist_timeout (0.1 min) with one line naming itself
    out = tmp_path / "out"
    port = str(free_port())
    args = [*PRETRAIN, "--epochs", "50", "--data_path", str(tiny_world["imagenet"]), "--output_dir", str(out),
            "--dist_timeout", "0.1"]
    procs = [subprocess.Popen([PY, "-m", "pretrain", *args], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                              env=env(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=port))
             for r in (0, 1)]
    try:
        deadline = time.time() + 120
        while time.time() < deadline and procs[0].poll() is None and last_step(out) < 2:
            time.sleep(0.01)
        assert last_step(out) >= 2, "the run did not start"
        procs[1].send_signal(signal.SIGSTOP)
        t0 = time.time()
        _, err = procs[0].communicate(timeout=120)
        waited = time.time() - t0
    finally:
        procs[1].kill()
        procs[1].wait()
    assert procs[0].returncode == 2, err[-2000:]
    assert waited < 60
    assert "Traceback" not in err
    line = err.strip().splitlines()[-1]
    assert line.startswith("error: rank 0 of 2 (host ") and "within 6 s (--dist_timeout)" in line, line


def test_comm_failures_are_one_line_naming_the_rank(monkeypatch):
    from maecore import distributed as du

    monkeypatch.setattr(du, "rank", lambda: 3)
    monkeypatch.setattr(du, "world_size", lambda: 8)
    lost = RuntimeError("[/x/gloo/transport/tcp/pair.cc:545] Read error [10.0.0.2]:1234: Connection reset by peer. This is "
                        "typically caused by a remote worker hanging or bugs in the application.")
    msg = du.comm_failure(lost)
    assert msg.startswith("rank 3 of 8 (host ") and "lost the connection to another rank" in msg
    assert msg.endswith("[Read error [10.0.0.2]:1234: Connection reset by peer.]") and "\n" not in msg
    hung = RuntimeError("[/x/gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting 1800000ms for recv operation to complete")
    assert "no answer from the other ranks within 30 min (--dist_timeout)" in du.comm_failure(hung)
    assert du.comm_failure(RuntimeError("mat1 and mat2 shapes cannot be multiplied")) is None  # a bug stays a traceback
    assert du.comm_failure(RuntimeError("DataLoader timed out after 5 seconds")) is None
    assert du.comm_failure(ValueError("gloo")) is None


# ---- 2. several nodes: torchrun --nnodes 2 --rdzv_backend c10d ----------------------------------------
@pytest.mark.slow
def test_two_nodes_pretrain_exactly_as_one_node(tiny_world, tmp_path, pretrain_ref):
    out = tmp_path / "nodes"
    two_nodes("pretrain", [*PRETRAIN, *PRETRAIN_EPOCHS, "--data_path", tiny_world["imagenet"], "--output_dir", out])
    same_parameters(out / "checkpoint-last.pth", pretrain_ref / "checkpoint-last.pth")
    same_optimizer(out / "checkpoint-last.pth", pretrain_ref / "checkpoint-last.pth")
    assert losses(out) == losses(pretrain_ref)


@pytest.fixture(scope="module")
def finetune_ref(tiny_world, tmp_path_factory) -> Path:
    """Classification fine-tuning (RandAugment, mixup/cutmix, drop path: all the per-rank randomness), 3 steps and
    the evaluation, under ``torchrun --standalone --nproc_per_node 2``."""
    out = tmp_path_factory.mktemp("cluster") / "ft_ref"
    check_run(torchrun_standalone("classification", [*FINETUNE, "--data_path", tiny_world["imagenet"], "--output_dir", out]))
    return out


@pytest.mark.slow
def test_two_nodes_finetune_exactly_as_one_node(tiny_world, tmp_path, finetune_ref):
    out = tmp_path / "nodes"
    two_nodes("classification", [*FINETUNE, "--data_path", tiny_world["imagenet"], "--output_dir", out])
    same_parameters(out / "checkpoint-last.pth", finetune_ref / "checkpoint-last.pth")
    assert read_log(out, "eval") == read_log(finetune_ref, "eval")


# ---- 3. elastic restart: torchrun --max-restarts 1 after a SIGKILLed rank ------------------------------
def worker_pid(agent: int, rank: int) -> int | None:
    """The pid of the worker with RANK=``rank`` that torchrun (pid ``agent``) started, if it runs."""
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            environ = (d / "environ").read_bytes().split(b"\0") if ppid == agent else []
        except (OSError, IndexError, ValueError):
            continue
        if f"RANK={rank}".encode() in environ:
            return int(d.name)
    return None


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds torchrun's workers through /proc")
@pytest.mark.slow
def test_elastic_restart_after_a_killed_rank_resumes_exactly(tiny_world, tmp_path, pretrain_ref):
    out = tmp_path / "elastic"
    cmd = torchrun_standalone("pretrain", [*PRETRAIN, *PRETRAIN_EPOCHS, "--data_path", tiny_world["imagenet"], "--output_dir", out,
                                           "--resume", "auto"], "--max-restarts", "1", "--monitor-interval", "0.2")
    agent = subprocess.Popen(cmd, cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    killed_at = 0
    deadline = time.time() + 200
    while time.time() < deadline and agent.poll() is None:
        if last_step(out) >= 3 and (out / "checkpoint-last.pth").exists() and (pid := worker_pid(agent.pid, 1)):
            os.kill(pid, signal.SIGKILL)  # rank 1 dies mid-run, with a --save_every_steps checkpoint on disk
            killed_at = last_step(out)
            break
        time.sleep(0.005)
    log, _ = agent.communicate(timeout=300)
    assert killed_at, "the run ended before rank 1 could be killed"
    assert agent.returncode == 0, log[-3000:]
    assert killed_at < 21
    resumed = read_log(out, "resume")
    assert len(resumed) == 1 and 2 <= resumed[0]["step"] <= killed_at + 1, resumed
    same_parameters(out / "checkpoint-last.pth", pretrain_ref / "checkpoint-last.pth")
    same_optimizer(out / "checkpoint-last.pth", pretrain_ref / "checkpoint-last.pth")
    assert losses(out) == losses(pretrain_ref)  # every step, the re-run ones included


# ---- 4. SLURM through submitit: the requeue protocol, on submitit's local executor -----------------------
def child_pid(parent: int, **environ: str) -> int | None:
    """A child process of ``parent`` whose environment holds every KEY=VALUE of ``environ``."""
    want = [f"{k}={v}".encode() for k, v in environ.items()]
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            if int((d / "stat").read_text().rsplit(")", 1)[1].split()[1]) != parent:
                continue
            env_vars = (d / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        if all(w in env_vars for w in want):
            return int(d.name)
    return None


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds the job's tasks through /proc")
@pytest.mark.slow
def test_submitit_job_requeues_itself_on_the_time_limit_signal_and_resumes_exactly(tiny_world, tmp_path, pretrain_ref, monkeypatch):
    # Also the FSDP2 save/resume round trip (one run where two would do): the job trains with --fsdp on 2 gloo
    # processes, its stop checkpoint is gathered whole, the requeued job cuts its shards from it, and it ends with
    # exactly the DDP reference's parameters and optimizer state.  The final reconstruction figure is drawn by
    # rank 0 alone on gathered weights at the end (its fixed-seed masks leave the training RNG alone).
    pytest.importorskip("submitit")
    from pipeline.submit import submit

    for k, v in env().items():  # the local executor's tasks inherit this process's environment
        monkeypatch.setenv(k, v)
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    out = tmp_path / "job"
    job = submit(["--task", "pretrain", "--cluster", "local", "--tasks_per_node", "2", "--gpus_per_node", "0", "--timeout_min", "30",
                  "--", *PRETRAIN, *PRETRAIN_EPOCHS, "--data_path", str(tiny_world["imagenet"]), "--output_dir", str(out),
                  "--fsdp", "--vis_every", "3", "--vis_images", "2"])
    sent = 0
    try:
        deadline = time.time() + 200
        while time.time() < deadline and job.state == "RUNNING":
            # SLURM's "time limit in --signal_delay_s" signal (SIGUSR2), here to one task only: the ranks agree
            if last_step(out) >= 3 and (pid := child_pid(job._process.pid, SUBMITIT_LOCAL_GLOBALID="1")):
                os.kill(pid, signal.SIGUSR2)
                sent = last_step(out)
                break
            time.sleep(0.005)
        results = job.results()  # waits for the requeued job
    finally:
        job.cancel(check=False)
    assert sent, "the job ended before it could be signalled"
    assert [r["steps"] for r in results] == [21, 21]
    stops, resumes = read_log(out, "stop"), read_log(out, "resume")
    assert len(stops) == 1 and stops[0]["signals"] == ["SIGUSR2"] and sent <= stops[0]["step"] <= sent + 2  # the vote is one step behind
    assert len(resumes) == 1 and resumes[0]["step"] == stops[0]["step"]
    log0 = "".join((out / "submitit" / f"{job.job_id}_0_log.{x}").read_text() for x in ("out", "err"))
    assert "requeueing the job (submitit)" in log0 and "Requeued job" in log0  # ours, then submitit's
    same_parameters(out / "checkpoint-last.pth", pretrain_ref / "checkpoint-last.pth")  # same keys: the official layout
    same_optimizer(out / "checkpoint-last.pth", pretrain_ref / "checkpoint-last.pth")
    assert losses(out) == losses(pretrain_ref)
    assert (out / "recon" / "epoch_0002.png").is_file()


def test_submit_command_line(tmp_path, capsys, monkeypatch):
    pytest.importorskip("submitit")
    from pipeline.submit import cli, dist_env, job_port

    out = tmp_path / "o"
    task = ["--data_path", str(tmp_path), "--output_dir", str(out), "--model", "mae_vit_large_patch16", "--norm_pix_loss"]
    cli(["--task", "pretrain", "--cluster", "slurm", "--nodes", "2", "--gpus_per_node", "8", "--partition", "P", "--timeout_min", "4320",
         "--dry_run", "--", *task])
    script = capsys.readouterr().out
    for line in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=8", "#SBATCH --gpus-per-node=8", "#SBATCH --partition=P",
                 "#SBATCH --time=4320", "#SBATCH --signal=USR2@120", "#SBATCH --job-name=mae-pretrain"):
        assert line in script.splitlines(), line
    assert f"srun --unbuffered --output {out}/submitit/%j_%t_log.out" in script
    assert script.strip().splitlines()[-1].endswith(f"--norm_pix_loss --output_dir {out} --resume auto")

    # bad combinations are one line, before anything is submitted
    monkeypatch.setattr("pipeline.submit.shutil.which", lambda _: None)  # a machine without SLURM
    for extra, task_flags, expect in [
        ([], ["--data_path", "d"], "give the task's --output_dir"),
        ([], ["--data_path", "d", "--output_dir", "o", "--resume", "x.pth"], "the job resumes with --resume auto"),
        ([], ["--data_path", "d", "--output_dir", "o", "--overwrite"], "--overwrite starts afresh"),
        ([], [], "no task flags"),
        (["--cluster", "local", "--nodes", "2"], ["--data_path", "d", "--output_dir", "o"], "--nodes must be 1"),
        ([], ["--data_path", "d", "--output_dir", "o"], "no SLURM here (srun not found)"),
        ([], ["--data_path", "d", "--output_dir", "o", "--mask_ratio", "2"], "--mask_ratio"),
    ]:
        with pytest.raises(SystemExit) as e:
            cli(["--task", "pretrain", *extra, "--", *task_flags] if task_flags else ["--task", "pretrain", *extra])
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and err[-1].startswith("error: ") and expect in err[-1], err

    class Env:  # what submitit's JobEnvironment says in task 11 of a 2 x 8 job
        global_rank, local_rank, num_tasks, num_nodes, node, hostnames, job_id = 11, 3, 16, 2, 1, ["n7", "n8"], "123"

    got = dist_env(Env(), job_port("123"))
    assert got == {"RANK": "11", "WORLD_SIZE": "16", "LOCAL_RANK": "3", "LOCAL_WORLD_SIZE": "8", "GROUP_RANK": "1",
                   "MASTER_ADDR": "n7", "MASTER_PORT": str(job_port("123"))}
    assert 20000 <= job_port("123") < 40000 and job_port("123") == job_port("123") != job_port("124")


# ---- 5. memory: activation checkpointing, FSDP2 -------------------------------------------------------
def test_grad_checkpointing_gives_the_same_loss_and_gradients(tiny_world):
    from pretrain.model import build_mae
    from pretrain.train import build_trainer, parse_config

    torch.manual_seed(0)
    m = build_mae("mae_vit_tiny_patch16", img_size=32, patch_size=8, depth=2, decoder_depth=1, decoder_embed_dim=64, decoder_num_heads=4)
    imgs, noise = torch.randn(3, 3, 32, 32), torch.rand(3, 16)
    calls = []
    m.blocks[0].register_forward_pre_hook(lambda *_: calls.append(1))

    def run(enable: bool):
        m.zero_grad(set_to_none=True)
        m.set_grad_checkpointing(enable)
        calls.clear()
        loss, _, _ = m(imgs, mask_ratio=0.75, noise=noise)
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}, len(calls)

    plain, ckpt = run(False), run(True)
    assert plain[2] == 1 and ckpt[2] == 2  # the block's forward runs again in the backward pass: checkpointing is on
    assert torch.equal(plain[0], ckpt[0])
    assert plain[1].keys() == ckpt[1].keys() and all(torch.equal(plain[1][k], ckpt[1][k]) for k in plain[1])

    # the pretraining flag turns it on for the encoder blocks
    args = parse_config([*PRETRAIN, "--data_path", str(tiny_world["imagenet"]), "--output_dir", "unused", "--grad_checkpointing"])
    assert build_trainer(args, torch.device("cpu")).model.grad_checkpointing


def test_fsdp_without_torchrun_is_one_line(tiny_world, tmp_path):
    from maecore.errors import UserError
    from pretrain.train import main

    with pytest.raises(UserError, match="--fsdp shards the model over the processes of a torchrun job"):
        main([*PRETRAIN, "--data_path", str(tiny_world["imagenet"]), "--output_dir", str(tmp_path / "o"), "--fsdp"])


@pytest.mark.slow
def test_fsdp_finetune_equals_ddp(tiny_world, tmp_path, finetune_ref):
    # FSDP2 on CPU over gloo, sharded per block: bitwise the DDP run (2 ranks: the reduce-scatter adds the same two
    # numbers as the all-reduce); pretraining under FSDP, stopped and resumed, is in the submitit test above
    out = tmp_path / "fsdp"
    check_run(torchrun_standalone("classification", [*FINETUNE, "--data_path", tiny_world["imagenet"], "--output_dir", out, "--fsdp"]))
    same_parameters(out / "checkpoint-last.pth", finetune_ref / "checkpoint-last.pth")
    same_optimizer(out / "checkpoint-last.pth", finetune_ref / "checkpoint-last.pth")
    assert read_log(out, "eval") == read_log(finetune_ref, "eval")  # evaluated with the gathered weights


# ---- 6. a stop signal to one rank under torchrun: every rank ends with 75 --------------------------------
# Loaded by every process of the job (a sitecustomize on PYTHONPATH): rank 1's exit takes 3 s more, as a library's
# exit hook (a metrics uploader, a flush to a slow file system) or the interpreter's teardown can make it.  torchrun
# ends the ranks still running with SIGTERM once one has exited, so rank 1 is still ending when that comes.
SLOW_EXIT = """\
import atexit, os, time
if os.environ.get("RANK") == "1":
    if os.environ.get("SLOW_EXIT_AT") == "atexit":
        atexit.register(time.sleep, 3)
    else:  # in the interpreter's teardown (modules cleared), after Python has dropped its own signal handlers
        class _SlowTeardown:
            def __del__(self, sleep=time.sleep):
                sleep(3)
        _slow = _SlowTeardown()
"""


def rank_exit_codes(report: str) -> dict[int, int]:
    """rank -> exit code, from torchrun's failure report (``rank : 1 (local_rank: 1)`` / ``exitcode : 75 (pid: …)``)."""
    import re

    found = re.findall(r"rank\s*:\s*(\d+) \(local_rank: \d+\)\s*\n\s*exitcode\s*:\s*(-?\d+)", report)
    return {int(r): int(c) for r, c in found}


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds torchrun's workers through /proc")
@pytest.mark.parametrize("signalled, slow_at", [(0, "atexit"), (1, "teardown")])
@pytest.mark.slow
def test_a_stop_signal_to_one_rank_ends_every_rank_with_75(tiny_world, tmp_path, signalled, slow_at):
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(SLOW_EXIT)
    out = tmp_path / "run"
    cmd = torchrun_standalone("pretrain", [*PRETRAIN, "--epochs", "50", "--data_path", tiny_world["imagenet"], "--output_dir", out])
    agent = subprocess.Popen(cmd, cwd=ROOT, env=env(PYTHONPATH=f"{site}{os.pathsep}{ROOT}", SLOW_EXIT_AT=slow_at),
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    sent = 0
    deadline = time.time() + 200
    while time.time() < deadline and agent.poll() is None:
        if last_step(out) >= 2 and (pid := worker_pid(agent.pid, signalled)):
            os.kill(pid, signal.SIGUSR1)
            sent = last_step(out)
            break
        time.sleep(0.005)
    report, _ = agent.communicate(timeout=300)
    assert sent, "the run ended before a rank could be signalled"
    assert "closing signal SIGTERM" in report  # torchrun did end the slow rank's exit with SIGTERM …
    assert rank_exit_codes(report) == {0: 75, 1: 75}, report[-3000:]  # … and still every rank ended with 75
    assert agent.returncode == 1  # torchrun's own status when its workers fail (the README says so)
    stops = read_log(out, "stop")
    assert len(stops) == 1 and stops[0]["signals"] == ["SIGUSR1"] and sent <= stops[0]["step"] <= sent + 2
    assert load_file(out / "checkpoint-last.pth")["step"] == stops[0]["step"]
    who = "SIGUSR1" if signalled == 0 else "SIGUSR1 on another rank"  # rank 0 prints the line
    assert f"stopped by {who} after step {stops[0]['step']} " in report
