"""The run folder (``--output_dir``): one run at a time, never overwritten by mistake, resumed only by a run it
fits.

* One run per output folder.  ``run.lock`` (pid and host; an OS record lock, so a crashed run leaves no
  stale lock) refuses a second concurrent run.  The run that takes it removes the temporaries that saves killed
  mid-write left (one line, and a ``cleanup`` record in the log).  A fresh run into a folder that holds a
  checkpoint is refused unless ``--resume`` or ``--overwrite`` is given; ``--overwrite`` moves the old checkpoints
  and ``args.json`` into ``previous-N/`` (and the old ``log.jsonl`` to ``log.N.jsonl``): nothing is deleted.
  ``args.json`` is written only after these checks.
* Resume checks the run's flags against the checkpoint's saved args before anything in the folder is touched:
  the task's model flags (``model_keys``) must match; the schedule flags (:data:`SCHEDULE_KEYS`) must too,
  unless ``--resume_override KEY[,KEY…]`` (or ``all``) takes the new value, which is printed and logged.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn

from maecore import distributed as du
from maecore.checkpoint import (
    FolderLock,
    checkpoint_args,
    checkpoint_nonfinite,
    folder_checkpoints,
    load_file,
    remove_stale_temporaries,
    set_aside,
)
from maecore.engine.config import SCHEDULE_KEYS, EngineConfig
from maecore.errors import UserError

if TYPE_CHECKING:
    from maecore.engine.run import RunLog

LAST = "checkpoint-last.pth"


class RunFolder:
    """``cfg.output_dir`` as one run sees it: its lock, its resume policy, its ``args.json``.  ``model_keys``: the
    ``args`` keys that define the network (a resume must match them); ``schedule_keys``: those a resume keeps
    unless ``--resume_override`` names them.  Constructing it writes nothing; :meth:`claim` does the checks and
    then takes the folder."""

    def __init__(self, cfg: EngineConfig, args: dict[str, Any], logger: RunLog, model_keys: Sequence[str] = (),
                 schedule_keys: Sequence[str] = SCHEDULE_KEYS) -> None:
        self.cfg = cfg
        self.args = args
        self.logger = logger
        self.out = Path(cfg.output_dir)
        self.lock = FolderLock(self.out)
        self.model_keys = tuple(model_keys)
        self.schedule_keys = tuple(k for k in schedule_keys if k not in self.model_keys)

    @property
    def last_path(self) -> Path:
        return self.out / LAST

    def resume_path(self) -> Path | None:
        if not self.cfg.resume:
            return None
        if self.cfg.resume == "auto":
            return self.last_path if self.last_path.exists() else None
        return Path(self.cfg.resume)

    def check_resume(self, ckpt: Any, path: Path, model: nn.Module,
                     optimizer: torch.optim.Optimizer) -> dict[str, tuple[Any, Any]]:
        """Refuse (one line) a checkpoint this run cannot continue; return the overridden schedule flags
        ``{key: (old, new)}``.  Reads only: nothing is written or moved."""
        if not isinstance(ckpt, dict) or "optimizer" not in ckpt or "model" not in ckpt:
            raise UserError(f"{path}: not a training checkpoint of this toolkit (no model/optimizer state)")
        saved = checkpoint_args(ckpt) or {}

        def differ(keys: Sequence[str]) -> list[tuple[str, Any, Any]]:
            return [(k, saved[k], self.args[k]) for k in keys
                    if k in saved and k in self.args and _jsonable(saved[k]) != _jsonable(self.args[k])]

        def show(d: list[tuple[str, Any, Any]]) -> str:
            return ", ".join(f"{k} {show_value(old)} -> {show_value(new)}" for k, old, new in d)

        if d := differ(self.model_keys):
            raise UserError(f"cannot resume from {path}: it was trained with other model flags ({show(d)}); the network "
                            "cannot change on resume: resume with its flags, or start afresh in another --output_dir (or with --overwrite)")
        wanted = {k.strip() for k in self.cfg.resume_override.split(",") if k.strip()}
        if bad := sorted(wanted & set(self.model_keys)):
            raise UserError(f"--resume_override {','.join(bad)}: model flags cannot change on resume")
        if unknown := sorted(wanted - set(self.args) - {"all"}):
            raise UserError(f"--resume_override: no flag named {', '.join(unknown)}")
        d = differ(self.schedule_keys)
        if refused := [x for x in d if "all" not in wanted and x[0] not in wanted]:
            keys = ",".join(k for k, _, _ in refused)
            raise UserError(f"cannot resume from {path}: flags changed since its run ({show(refused)}); pass "
                            f"--resume_override {keys} (or all) to take the new values, or resume with the old ones")
        sd, ck = model.state_dict(), ckpt["model"]
        missing = [k for k in sd if k not in ck]
        unexpected = [k for k in ck if k not in sd]
        shapes = [k for k in sd if k in ck and tuple(getattr(ck[k], "shape", ())) != tuple(sd[k].shape)]
        if missing or unexpected or shapes:
            raise UserError(f"{path}: model does not match the checkpoint (missing {missing[:3]}, unexpected "
                            f"{unexpected[:3]}, other shape {shapes[:3]})")
        groups = ckpt["optimizer"].get("param_groups", []) if isinstance(ckpt["optimizer"], dict) else []
        if [len(g["params"]) for g in groups] != [len(g["params"]) for g in optimizer.param_groups]:
            hint = ("; a checkpoint from before --wd_rule (issue #24) resumes with --wd_rule uniform"
                    if "wd_rule" in self.args and "wd_rule" not in saved else "")
            raise UserError(f"{path}: its optimizer state has other parameter groups than this run's optimizer{hint}")
        if what := checkpoint_nonfinite(ckpt):
            raise UserError(f"cannot resume from {path}: it holds NaN/inf in {what}; resume from an earlier checkpoint")
        return {k: (old, new) for k, old, new in d}

    def claim(self, model: nn.Module, optimizer: torch.optim.Optimizer
              ) -> tuple[dict[str, Any] | None, Path | None, dict[str, tuple[Any, Any]]]:
        """Checks first (reading only), then the folder is this run's: lock, stale temporaries removed, old
        checkpoints set aside (``--overwrite``), ``args.json``, logs.  Returns the checkpoint to resume from (or None), its path and
        the overridden flags.  All ranks agree on a refusal."""
        cfg = self.cfg
        ckpt, path, overrides = None, None, {}
        err = None
        try:
            if cfg.overwrite and cfg.resume == "auto":
                raise UserError("--overwrite starts afresh, --resume auto continues: give one of them")
            if du.is_main() and (owner := self.lock.holder()):
                raise self.lock.busy_error(owner)
            path = self.resume_path()
            if path is not None:
                ckpt = load_file(path, map_location="cpu")
                overrides = self.check_resume(ckpt, path, model, optimizer)
            elif cfg.resume_override and not cfg.resume:
                raise UserError("--resume_override needs --resume")
            if du.is_main():
                self.check_fresh(path)
                self.lock.acquire()  # the first write into the folder
                self.check_fresh(path)  # again under the lock: a run that just ended may have saved
        except UserError as e:
            err = str(e)
        errs = [e for e in du.all_gather_object(err) if e]
        if errs:
            self.lock.release()
            raise UserError(errs[0])
        removed: list[tuple[str, int]] = []
        if du.is_main():
            if removed := remove_stale_temporaries(self.out):  # under the lock: no save of them is alive
                names = ", ".join(n for n, _ in removed[:3]) + (" …" if len(removed) > 3 else "")
                print(f"{self.out}: removed {len(removed)} temporary checkpoint file(s) of saves killed mid-write "
                      f"({sum(b for _, b in removed) / 2**20:.1f} MiB): {names}")
            if path is None:
                if cfg.overwrite and (moved := set_aside(self.out, [p.name for p in folder_checkpoints(self.out)] + ["args.json"])):
                    print(f"{self.out}: the earlier run's checkpoints and args.json moved to {moved.name}/ (--overwrite)")
                if (old := self.logger.set_aside()) is not None:
                    print(f"{self.logger.path} was from an earlier run: moved to {old.name}")
            (self.out / "args.json").write_text(json.dumps(self.args, indent=1, default=str))
            self.logger.open()
            if removed:
                self.logger.log("cleanup", 0, removed=[n for n, _ in removed], bytes=sum(b for _, b in removed))
        du.barrier()
        return ckpt, path, overrides

    def check_fresh(self, resume_path: Path | None) -> None:
        if resume_path is not None or self.cfg.overwrite:
            return
        if old := folder_checkpoints(self.out):
            raise UserError(f"{self.out} holds {', '.join(p.name for p in old[:3])}{' …' if len(old) > 3 else ''} from an "
                            "earlier run: --resume auto continues it, --overwrite starts afresh (the old files are set "
                            "aside, not deleted)")

    def release(self) -> None:
        self.lock.release()


def _jsonable(v: Any) -> Any:
    """A saved arg and a command-line one compare as they read in args.json (tuples are lists)."""
    return json.loads(json.dumps(v, default=str))


def show_value(v: Any) -> str:
    return " ".join(map(str, v)) if isinstance(v, (list, tuple)) else str(v)
