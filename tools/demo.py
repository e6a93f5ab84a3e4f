#!/usr/bin/env python
"""The main job (what ``make demo`` runs): pretraining, conversion and every transfer task, each from
MAE and from random initialisation, with a report: ``pipeline.demo`` (``python -m pipeline.demo`` is
the same; ``--help`` lists the stages and flags).

    python tools/demo.py --output runs/demo [--preset demo|smoke] [--config FILE.json] [--from-stage STAGE]
"""

from pipeline.demo import cli

cli()
