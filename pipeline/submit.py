"""Submit a training task to SLURM with submitit, one process per GPU over ``--nodes`` nodes, requeued on the time
limit until it is done:

    python -m pipeline.submit --task pretrain --nodes 2 --gpus_per_node 8 --partition P --timeout_min 4320 -- \\
        --data_path /data/imagenet --output_dir /ckpt/mae_l --model mae_vit_large_patch16 --norm_pix_loss ...

Everything after ``--`` is the task's own command line (``python -m pretrain|classification|detection|segmentation``),
checked here before anything is submitted; ``--output_dir`` is required (made absolute) and ``--resume auto`` is added.

Inside the job each task sets the torch.distributed environment from SLURM through submitit's JobEnvironment
(RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR = the first node, MASTER_PORT from the job id) and
runs the task in its process.  The requeue protocol: SLURM sends ``SIGUSR2`` ``--signal_delay_s`` seconds before
the time limit (submitit's ``--signal=USR2@…``); the engine finishes the optimizer step, writes
``checkpoint-last.pth`` and stops on every rank (status 75, :class:`maecore.engine.Preempted`); then rank 0 hands
over to submitit, which calls :meth:`TaskJob.checkpoint` (the same job: ``--resume auto`` continues) and requeues
the job (``scontrol requeue``); the new job resumes exactly where the old one stopped.  A SIGTERM (``scancel``,
preemption) also checkpoints but does not requeue: the user or SLURM decides.

``--cluster local`` runs the job on this machine (submitit's LocalExecutor: ``--tasks_per_node`` processes, gloo
on CPU), ``--cluster debug`` in this process; ``--dry_run`` prints the sbatch script without submitting.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import signal
import sys
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from maecore.cli import OneLineParser, non_negative_int, positive_int, run_cli
from maecore.errors import UserError

TASKS = ("classification", "detection", "pretrain", "segmentation")


def task_train(task: str) -> Any:
    """The task's ``train`` module, imported only when asked for (a job loads its own task, not the four)."""
    if task == "pretrain":
        import pretrain.train as train
    elif task == "classification":
        import classification.train as train
    elif task == "detection":
        import detection.train as train
    elif task == "segmentation":
        import segmentation.train as train
    else:
        raise UserError(f"unknown task {task!r}; choose from {', '.join(TASKS)}")
    return train
REQUEUE_GRACE_S = 300  # ranks > 0 wait this long for rank 0's requeue to end the job (SLURM kills them then)


def _submitit():
    try:
        import submitit
    except ImportError:
        raise UserError("submitit is not installed: pip install 'mae-toolkit[cluster]' (or pip install submitit)") from None
    return submitit


def dist_env(job_env: Any, port: int) -> dict[str, str]:
    """torch.distributed's environment (what torchrun would set) from submitit's JobEnvironment: one process
    per task, rank 0 on the job's first node."""
    nodes = max(int(job_env.num_nodes), 1)
    return {
        "RANK": str(job_env.global_rank),
        "WORLD_SIZE": str(job_env.num_tasks),
        "LOCAL_RANK": str(job_env.local_rank),
        "LOCAL_WORLD_SIZE": str(job_env.num_tasks // nodes),
        "GROUP_RANK": str(job_env.node),
        "MASTER_ADDR": str(job_env.hostnames[0]),
        "MASTER_PORT": str(port),
    }


def job_port(job_id: str) -> int:
    """A port every task of a job derives alike from the job id (no communication needed), in 20000-39999."""
    return 20000 + zlib.crc32(str(job_id).encode()) % 20000


def requeue_signal() -> int:
    """The signal submitit asks SLURM to send before the time limit (``SIGUSR2`` unless SUBMITIT_PREEMPT_SIGNAL)."""
    return getattr(signal, "SIG" + _submitit().JobEnvironment.USR_SIG)


@dataclass
class TaskJob:
    """What each task of the job runs (pickled by submitit): ``python -m <task> <argv>`` in-process, under the
    distributed environment of the job; a checkpointable callable in submitit's sense."""

    task: str
    argv: list[str] = field(default_factory=list)
    master_port: int = 0  # 0: from the job id

    def __call__(self) -> Any:
        submitit = _submitit()
        from maecore.engine import Preempted

        job_env = submitit.JobEnvironment()
        if job_env.num_tasks > 1:
            os.environ.update(dist_env(job_env, self.master_port or job_port(job_env.job_id)))
        usr = requeue_signal()
        submitit_handler = signal.getsignal(usr)  # submitit's checkpoint-and-requeue, installed before this call
        try:
            return task_train(self.task).main(list(self.argv))
        except Preempted as e:
            if signal.Signals(usr).name not in e.signals or not callable(submitit_handler):
                raise  # SIGTERM (scancel, preemption): checkpointed, status 75, no requeue from here
            if job_env.global_rank == 0:
                print("requeueing the job (submitit): the next one continues with --resume auto", file=sys.stderr, flush=True)
                submitit_handler(usr, None)  # calls self.checkpoint(), requeues, exits
            elif job_env.cluster == "slurm":
                time.sleep(REQUEUE_GRACE_S)  # do not end the step before rank 0 has requeued the job
            raise
        except UserError as e:
            print(f"error: {e}", file=sys.stderr, flush=True)  # the job log shows the one line
            raise

    def checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        """submitit's requeue hook: the same job again; ``--resume auto`` continues from checkpoint-last.pth."""
        return _submitit().helpers.DelayedSubmission(TaskJob(self.task, list(self.argv), self.master_port))


# ---- the command line ------------------------------------------------------------------------------
def get_parser() -> argparse.ArgumentParser:
    p = OneLineParser("python -m pipeline.submit", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", required=True, choices=TASKS)
    p.add_argument("--cluster", default="auto", choices=["auto", "slurm", "local", "debug"],
                   help="auto = slurm (refused where srun is not found); local: this machine; debug: in this process")
    p.add_argument("--nodes", type=positive_int, default=1)
    p.add_argument("--gpus_per_node", type=non_negative_int, default=8, help="one process per GPU")
    p.add_argument("--tasks_per_node", type=positive_int, default=None, help="processes per node (default: --gpus_per_node; 1 without)")
    p.add_argument("--cpus_per_task", type=positive_int, default=10, help="DataLoader workers + 1 or 2")
    p.add_argument("--mem_gb", type=positive_int, default=None, help="memory per node")
    p.add_argument("--timeout_min", type=positive_int, default=4320, help="SLURM time limit of one job (it requeues itself)")
    p.add_argument("--partition", default=None)
    p.add_argument("--account", default=None)
    p.add_argument("--qos", default=None)
    p.add_argument("--constraint", default=None, help="e.g. volta32gb")
    p.add_argument("--comment", default=None)
    p.add_argument("--signal_delay_s", type=positive_int, default=120,
                   help="SIGUSR2 this long before the time limit: room for a step and a checkpoint")
    p.add_argument("--max_requeues", type=non_negative_int, default=100, help="time-limit requeues before giving up")
    p.add_argument("--job_name", default=None, help="default: mae-<task>")
    p.add_argument("--folder", default=None, help="submitit's logs and pickles (default: <output_dir>/submitit)")
    p.add_argument("--master_port", type=positive_int, default=0, help="default: derived from the job id")
    p.add_argument("--dry_run", action="store_true", help="print the sbatch script (slurm) and submit nothing")
    p.add_argument("--wait", action="store_true", help="wait for the job and print its result")
    return p


def split_argv(argv: list[str]) -> tuple[list[str], list[str]]:
    """(launcher flags, task flags): the task's come after ``--``."""
    if "--" in argv:
        i = argv.index("--")
        return argv[:i], argv[i + 1:]
    return argv, []


def task_argv(task: str, argv: list[str]) -> list[str]:
    """The task's flags, checked by the task's own parser (a bad flag is its one line, before submitting), with
    ``--output_dir`` made absolute and ``--resume auto`` added: the requeued job continues the same folder."""
    cfg = task_train(task).parse_config(argv)
    if "output_dir" not in cfg.given:
        raise UserError("give the task's --output_dir (after --): every requeued job continues in it")
    if getattr(cfg, "eval", False):
        raise UserError("--eval is a short single run: run it directly, not as a requeued cluster job")
    if cfg.overwrite:
        raise UserError("--overwrite starts afresh, but the job continues its folder (--resume auto): move the old folder "
                        "aside, or run once with --overwrite directly")
    if cfg.resume and cfg.resume != "auto":
        raise UserError(f"--resume {cfg.resume}: the job resumes with --resume auto (its own checkpoint-last.pth); "
                        "to start from other weights use --finetune, or copy the file to <output_dir>/checkpoint-last.pth")
    return [*argv, "--output_dir", str(Path(cfg.output_dir).resolve()), "--resume", "auto"]


def resolve_cluster(opts: argparse.Namespace) -> str:
    """``auto`` is SLURM; never a silent local run of a job meant for a cluster."""
    if opts.cluster != "auto":
        return opts.cluster
    if shutil.which("srun") is None and not opts.dry_run:
        raise UserError("no SLURM here (srun not found): submit from a SLURM login node, or give --cluster local to run "
                        "the job on this machine")
    return "slurm"


def slurm_parameters(opts: argparse.Namespace) -> dict[str, Any]:
    """submitit SlurmExecutor parameters (sbatch flags) for the launcher's flags."""
    params: dict[str, Any] = dict(job_name=opts.job_name or f"mae-{opts.task}", nodes=opts.nodes,
                                  ntasks_per_node=opts.tasks_per_node or max(opts.gpus_per_node, 1),
                                  cpus_per_task=opts.cpus_per_task, time=opts.timeout_min, signal_delay_s=opts.signal_delay_s,
                                  partition=opts.partition, account=opts.account, qos=opts.qos, constraint=opts.constraint,
                                  comment=opts.comment, mem=f"{opts.mem_gb}GB" if opts.mem_gb else None,
                                  gpus_per_node=opts.gpus_per_node or None)
    return {k: v for k, v in params.items() if v is not None}


def make_executor(opts: argparse.Namespace, folder: Path, cluster: str) -> Any:
    submitit = _submitit()
    tasks = opts.tasks_per_node or max(opts.gpus_per_node, 1)
    if cluster == "slurm":
        if shutil.which("srun") is None:
            raise UserError("--cluster slurm, but srun is not found here: submit from a SLURM login node (--cluster local "
                            "runs the job on this machine; --dry_run prints the sbatch script)")
        ex = submitit.SlurmExecutor(folder=folder, max_num_timeout=opts.max_requeues)
        ex.update_parameters(**slurm_parameters(opts))
        return ex
    if opts.nodes != 1:
        raise UserError(f"--cluster {cluster} runs on this machine: --nodes must be 1")
    if cluster == "local":
        ex = submitit.LocalExecutor(folder=folder, max_num_timeout=opts.max_requeues)
        ex.update_parameters(timeout_min=opts.timeout_min, tasks_per_node=tasks, gpus_per_node=opts.gpus_per_node,
                             signal_delay_s=opts.signal_delay_s)
        return ex
    if tasks != 1:
        raise UserError("--cluster debug runs one process: --tasks_per_node 1 (and --gpus_per_node 0 or 1)")
    return submitit.DebugExecutor(folder=folder)


def sbatch_script(opts: argparse.Namespace, folder: Path) -> str:
    """The sbatch file submitit writes for these flags (what ``--dry_run`` prints; no SLURM needed)."""
    _submitit()
    from submitit.slurm.slurm import _make_sbatch_string

    command = " ".join([shlex.quote(sys.executable), "-u -m submitit.core._submit", shlex.quote(str(folder))])
    return _make_sbatch_string(command=command, folder=folder, **slurm_parameters(opts))


def submit(argv: list[str]) -> Any:
    """Check the flags, make the executor, submit; returns the submitit job (None with ``--dry_run``)."""
    own, rest = split_argv(argv)
    opts = get_parser().parse_args(own)
    if not rest:
        raise UserError("no task flags: write them after -- (e.g. -- --data_path D --output_dir O …)")
    targv = task_argv(opts.task, rest)
    out = Path(targv[targv.index("--output_dir", len(rest)) + 1])
    folder = Path(opts.folder).resolve() if opts.folder else out / "submitit"
    cluster = resolve_cluster(opts)
    job_fn = TaskJob(opts.task, targv, opts.master_port)
    if opts.dry_run:
        if cluster == "slurm":
            print(sbatch_script(opts, folder))
        print(f"# each task runs: python -m {opts.task} {shlex.join(targv)}")
        return None
    executor = make_executor(opts, folder, cluster)
    job = executor.submit(job_fn)
    print(f"submitted job {job.job_id} ({opts.task}, {opts.nodes} node(s)); logs in {folder}; checkpoints in {out}")
    if opts.wait:
        print(job.result())
    return job


def main(argv: list[str] | None = None) -> Any:
    return submit(list(sys.argv[1:] if argv is None else argv))


def cli(argv: list[str] | None = None) -> None:
    run_cli(main, argv)


if __name__ == "__main__":
    cli()
