"""A pipeline run's state (``Context``: its folder, config, results and the commands it ran) and how it calls
the toolkit's command lines: ``ENTRIES`` maps each command a stage shows to the ``main(argv)`` that runs it."""

from __future__ import annotations

import shlex
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from maecore.engine import Preempted
from maecore.errors import UserError

ROOT = Path(__file__).resolve().parents[1]

Main = Callable[[list[str]], object]


# Each stage's ``main`` is imported on first use: a task package takes seconds to import, and ``--help``, the
# report and the study's aggregate need none of them.
def _make_synthetic_main() -> Main:
    from synthetic.__main__ import main

    return main


def _visualize_main() -> Main:
    from pretrain.visualize import main

    return main


def _convert_main() -> Main:
    from pipeline.convert import main

    return main


def _pretrain_main() -> Main:
    from pretrain.train import main

    return main


def _classification_main() -> Main:
    from classification.train import main

    return main


def _detection_main() -> Main:
    from detection.train import main

    return main


def _segmentation_main() -> Main:
    from segmentation.train import main

    return main


# The command line each stage shows (``python <entry> ARGS``) -> the ``main(argv)`` that runs it.
ENTRIES: dict[str, Callable[[], Main]] = {
    "tools/make_synthetic.py": _make_synthetic_main,
    "tools/visualize.py": _visualize_main,
    "tools/convert.py": _convert_main,
    "-m pretrain": _pretrain_main,
    "-m classification": _classification_main,
    "-m detection": _detection_main,
    "-m segmentation": _segmentation_main,
}


def entry_main(entry: str) -> Main:
    """``main`` of the module behind a stage's command line (imported on first use)."""
    return ENTRIES[entry]()


def entry_argv(entry: str) -> list[str]:
    """What follows ``python`` for a stage's command line: ``-m pkg`` as is, a script by its path here."""
    return entry.split() if entry.startswith("-m ") else [str(ROOT / entry)]


@dataclass
class Context:
    """One pipeline run: its folder, its config, the results so far, and every command shown (the report lists
    them)."""

    out: Path
    cfg: dict
    results: dict = field(default_factory=dict)
    commands: list[tuple[str, str]] = field(default_factory=list)

    @property
    def world(self) -> Path:
        return Path(self.cfg["data_root"]) if self.cfg.get("data_root") else self.out / "world"

    def show(self, stage: str, entry: str, args: list[str], threads: int | None = None) -> None:
        """Print a stage's command line and record it for the report (``threads``: the ``OMP_NUM_THREADS=N``
        prefix of a run in its own process)."""
        shown = (f"OMP_NUM_THREADS={threads} " if threads is not None else "") + " ".join(
            shlex.quote(a) for a in ["python", *entry.split(), *args])
        print(f"\n[{stage}] $ {shown}", flush=True)
        self.commands.append((stage, shown))

    def run(self, stage: str, entry: str, args: list[str]) -> dict:
        """Call one of the toolkit's command lines in-process; record it; a failure names the stage."""
        self.show(stage, entry, args)
        t0 = time.time()
        try:
            res = entry_main(entry)(args)
        except Preempted:  # the stage checkpointed on SIGTERM/SIGUSR1/SIGINT: so does the pipeline
            print(f"[{stage}] stopped by a signal; rerun with --from-stage {stage}", flush=True)
            raise
        except SystemExit as e:  # argparse rejected the stage's arguments
            raise UserError(f"bad arguments (exit {e.code})") from None
        res = dict(res) if isinstance(res, dict) else {}
        res["wall_s"] = time.time() - t0
        return res


def common(ctx: Context) -> list[str]:
    # --overwrite: a rerun of a stage (`--from-stage`, `make demo` again) starts it afresh; earlier checkpoints
    # are set aside
    return ["--no_progress", "--seed", str(ctx.cfg.get("seed", 0)), "--overwrite"]


def dense_inits(ctx: Context) -> list[str]:
    """Detection and segmentation may compare fewer inits than the classification rows (budget)."""
    return ctx.cfg.get("dense_inits", ctx.cfg["inits"])
