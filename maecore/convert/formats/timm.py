"""timm ``VisionTransformer``: a bare state dict in canonical names.

timm's pooling decides the norms: token pooling keeps the final ``norm`` (no ``fc_norm``); average
pooling has no final norm and a ``fc_norm`` after the average, which official MAE fine-tuning starts
fresh (``--fc-norm copy`` starts it from the final norm instead).
"""

from __future__ import annotations

import torch

from maecore.checkpoint import save_atomic
from maecore.convert.formats import Format, Job, State
from maecore.errors import UserError


def _prepare(job: Job) -> None:
    has_norm, has_fc_norm = "norm.weight" in job.state, "fc_norm.weight" in job.state
    job.pool = job.pool or ("avg" if has_fc_norm and not has_norm else "token")
    if job.pool not in ("token", "avg"):
        raise UserError(f"--pool must be token or avg, not {job.pool!r}")


def _place(job: Job, key: str, kind: str | None, value: torch.Tensor) -> bool:
    if kind == "norm" and job.pool == "avg":
        job.report.dropped[key] = "timm avg pooling has no final norm (uses fc_norm)"
        if job.fc_norm == "copy" and "fc_norm.weight" not in job.state:
            new = "fc_norm." + key.split(".")[-1]
            job.out[new] = value
            job.report.renamed[key] = new
        return True
    if kind == "fc_norm" and job.pool == "token":
        job.report.dropped[key] = "timm token pooling has no fc_norm"
        return True
    return False


def _new_keys(job: Job, written: State) -> dict[str, str]:
    new = {}
    if job.pool == "avg" and "fc_norm.weight" not in written:
        new.update({"fc_norm.weight": "timm init (official MAE fine-tuning re-initialises fc_norm)",
                    "fc_norm.bias": "timm init (official MAE fine-tuning re-initialises fc_norm)"})
    if "head.weight" not in written:
        new.update({"head.weight": "classifier, timm init", "head.bias": "classifier, timm init"})
    return new


def _write(conv, source, dst, force):
    save_atomic(conv.state, dst)  # a bare state dict, as timm's hub weights are
    return [dst]


FORMATS = (
    Format("timm", order=1, source_order=3, keep=frozenset({"cls_token", "norm", "fc_norm", "head"}), prepare=_prepare,
           place=_place, new_keys=_new_keys, write=_write, flat=True),
)
