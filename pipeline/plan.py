"""What the demo and the study's aggregate report (``pipeline.results``) both need: the stages' names in run
order, which of them run as transfer jobs, and the machine facts every report states."""

from __future__ import annotations

import os

# The stages in the order they run.  The transfer stages longest first: their runs share one pool ("parallel" at a
# time), and starting the long ones first leaves the short ones to fill the gaps at the end (longest-processing-time
# order: ~40 s less on 2 cores than linear probe first, where detection and segmentation ran last side by side); the
# report's rows keep the paper's order whatever the order of the runs.  The study's probes of its kept pretraining
# checkpoints (``checkpoints``, pipeline.checkpoint_jobs: a fine-tune and short linear probes) go first
STAGE_NAMES: tuple[str, ...] = ("data", "pretrain", "figures", "convert", "checkpoints", "finetune", "detection",
                                "segmentation", "linprobe", "partial", "report")
# the transfer stages build jobs (run_jobs: side by side with "parallel" > 1, across stages); the others run in-process
JOB_STAGES = ("linprobe", "partial", "finetune", "detection", "segmentation", "checkpoints")


def transfer_threads(parallel: int) -> int:
    """Torch threads of each transfer run when ``parallel`` go side by side: an equal share of the cores."""
    return max(1, (os.cpu_count() or 1) // parallel)


def machine_line(cfg: dict) -> str:
    """Where the numbers came from: they are bit-reproducible only on the same CPU kind, thread count and
    precision (README, "Reproducibility"), so the report says which."""
    import platform

    import torch

    from maecore.engine import describe_amp, resolve_amp, resolve_attention

    cpu = torch.device("cpu")
    parallel = int(cfg.get("parallel", 1))
    transfer = (f"; the transfer runs {parallel} side by side, {transfer_threads(parallel)} thread(s) each"
                if parallel > 1 else "")
    amp = resolve_amp("auto", cpu)
    return (f"Machine: {platform.machine()}, {os.cpu_count()} cores; pretraining on {torch.get_num_threads()} torch "
            f"threads{transfer}; torch {torch.__version__}; "
            f"{describe_amp('auto', amp, cpu)}; attention: {resolve_attention('auto', cpu, amp)} (--attn auto) "
            "unless a stage's command says otherwise.")


def partial_label(blocks: float) -> str:
    """The results row of partial fine-tuning of the last ``blocks`` blocks (0.5: the last block's MLP only)."""
    return "partial fine-tune, last MLP" if blocks == 0.5 else f"partial fine-tune, {blocks:g} block(s)"
