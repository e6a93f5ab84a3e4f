"""Trained task checkpoints of this toolkit, the task-independent part: which task a checkpoint belongs to, which
format takes its whole trained model (not only its trunk), and the writing and read-back every such export shares.

Told from the keys: a classifier is the encoder with ``head`` (a linear probe's ``head.0`` BatchNorm +
``head.1`` Linear); a detector holds the trunk under ``backbone.net.`` and torchvision's ``rpn.`` /
``roi_heads.``; a segmentor the trunk under ``backbone.`` and mmseg's ``decode_head.``; an MAE its decoder.

The layouts themselves live beside the knowledge they need, one module per task with the same names
(``export(state, args) -> TrainedExport``, ``write(conv, dst, force) -> list[Path]``, and for the two with a
way back ``import_state(state) -> state``): ``classification/export.py`` (-> timm), ``segmentation/export.py``
(<-> mmseg) and ``detection/export.py`` (<-> detectron2).  ``python -m pipeline.convert CKPT -o DST --to …``
routes a trained checkpoint to its task's export (:func:`trained_route`); every tensor of the written file is
read back and compared with the checkpoint (:func:`read_back`).  This module imports no task package.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from maecore.checkpoint import checkpoint_args, unwrap_state_dict
from maecore.convert.io import _load_path
from maecore.convert.keys import Arch, guess_heads, infer_arch
from maecore.convert.records import Converted
from maecore.errors import UserError
from maecore.models import model_kwargs

TASKS = ("classification", "detection", "segmentation")
TASK_COMMANDS = {t: f"python -m {t}" for t in TASKS}
# the framework each trained task goes to whole (other targets take the trunk, as for any encoder)
EXPORTS = {"classification": "timm", "segmentation": "mmseg", "detection": "detectron2"}

State = dict[str, torch.Tensor]


# ---- which task ----------------------------------------------------------------------------------
def _state_keys(obj: Any) -> list[str]:
    if isinstance(obj, dict):
        for key in ("model", "state_dict", "module"):
            if isinstance(obj.get(key), dict):
                return _state_keys(obj[key])
        if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            return [k.removeprefix("module.") for k in obj]
    return []


def task_of_keys(keys: Iterable[str]) -> str | None:
    """``classification``, ``detection``, ``segmentation``, ``pretrain`` (an MAE) or ``None`` from state-dict keys."""
    keys = list(keys)
    starts = lambda *p: any(k.startswith(p) for k in keys)  # noqa: E731
    # our own names only: an mmseg UperNet (backbone.layers.*) or a detectron2 detector (proposal_generator.*) is not ours
    if starts("decode_head.") and "backbone.patch_embed.proj.weight" in keys:
        return "segmentation"
    if starts("rpn.head.") and "backbone.net.patch_embed.proj.weight" in keys:
        return "detection"
    if starts("decoder_embed.", "decoder_blocks."):
        return "pretrain"
    if ("head.weight" in keys or "head.1.weight" in keys) and "patch_embed.proj.weight" in keys:
        return "classification"
    return None


def task_of(obj: Any) -> str | None:
    """The task of a checkpoint object (ours, or a bare state dict with our task's keys); see :func:`task_of_keys`."""
    return task_of_keys(_state_keys(obj))


def describe_task(task: str | None) -> str:
    return {
        "classification": "a trained classification checkpoint",
        "detection": "a trained detection checkpoint",
        "segmentation": "a trained segmentation checkpoint",
        "pretrain": "an MAE pretraining checkpoint (fine-tune it first)",
        None: "not a trained task checkpoint of this toolkit",
    }[task]


def trained_route(obj: Any, to: str) -> str | None:
    """The task whose whole trained model ``--to to`` writes (see :data:`EXPORTS`), or ``None`` when the
    conversion is the ordinary encoder one.  A classifier takes this route when it is ours (saved args) or a
    linear probe (whose BatchNorm head no encoder format holds)."""
    task = task_of(obj)
    if task is None or EXPORTS.get(task) != to:
        return None
    if task == "classification" and checkpoint_args(obj) is None and "head.1.weight" not in _state_keys(obj):
        return None  # a plain timm-style classifier: the encoder path already keeps head and fc_norm
    return task


def trained_parts(obj: Any) -> tuple[State, dict[str, Any]]:
    """A trained checkpoint's state dict and its saved run args (``{}`` when it has none): what ``export`` takes."""
    return unwrap_state_dict(obj), checkpoint_args(obj) or {}


# ---- shared by the tasks' exports ------------------------------------------------------------------------
@dataclass
class TrainedExport(Converted):
    """A trained task model converted whole: ``source_state`` (our names) is what the written file must give back."""

    task: str = ""
    source_state: State = field(default_factory=dict)


def _heads(args: dict[str, Any], dim: int) -> tuple[int, bool]:
    """The encoder's attention heads from the saved model flags (a state dict does not record them)."""
    try:
        kw = model_kwargs(args.get("model") or args.get("arch") or "base", args.get("patch_size"), args.get("embed_dim"),
                          args.get("depth"), args.get("num_heads"))
    except UserError:
        return guess_heads(dim), True
    return (kw["num_heads"], False) if kw["embed_dim"] == dim else (guess_heads(dim), True)


def trunk_arch(trunk: State, args: dict[str, Any], **hints: Any) -> Arch:
    """The architecture of a trained model's encoder (``trunk``: its state in canonical names), with the heads its
    saved args name."""
    dim = int(trunk["patch_embed.proj.weight"].shape[0])
    heads, guessed = _heads(args, dim)
    arch = infer_arch(trunk, {"num_heads": heads, **hints})
    arch.heads_guessed = guessed
    return arch


def write_trained(conv: TrainedExport, dst: str | os.PathLike, force: bool, save: Callable[[TrainedExport, Path, bool], list[Path]],
                  import_state: Callable[[State], State] | None = None, *, folder: bool = False) -> list[Path]:
    """Write ``conv`` to ``dst`` with the task's ``save`` (never over a file without ``force``; ``folder``: DST is a
    folder, whose ``save`` guards its own files), then read it back and check that every tensor gives the
    checkpoint's own (see :func:`read_back`)."""
    dst = Path(dst)
    if not folder:
        if dst.is_dir():
            raise UserError(f"{dst} is a directory; give a file name")
        if dst.exists() and not force:
            raise UserError(f"{dst} exists (use --force to overwrite)")
    written = save(conv, dst, force)
    n = read_back(conv, written[0], import_state)
    conv.report.notes.append(f"read back: all {n} tensors of {written[0].name} give the checkpoint's own, bit for bit")
    return written


def read_back(conv: TrainedExport, path: Path, import_state: Callable[[State], State] | None = None) -> int:
    """Load a written export, map it back to our names (``import_state``; none: the names are ours) and compare
    with ``conv.source_state``, tensor by tensor."""
    state = unwrap_state_dict(_load_path(path))
    back = import_state(state) if import_state else state
    expect = conv.source_state
    missing = sorted(set(expect) - set(back))
    extra = sorted(set(back) - set(expect))
    differ = [k for k in expect if k in back and not torch.equal(back[k].cpu(), expect[k].cpu())]
    if missing or extra or differ:
        raise UserError(f"{path}: read back differs from the checkpoint (missing {missing[:3]}, extra {extra[:3]}, "
                        f"changed {differ[:3]})")
    return len(back)
