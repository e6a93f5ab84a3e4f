"""The tests, in folders that mirror the packages: tests/engine/ for maecore/engine/, tests/detection/ for detection/, …;
tests/core/ for maecore's own modules, tests/tasks/ for what every task package must do alike."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]  # the repository: its packages, tools/ and README.md
