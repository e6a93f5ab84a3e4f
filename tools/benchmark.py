#!/usr/bin/env python
"""Speed benchmarks (pretraining step vs the official recipe, mask tokens, data pipeline, task steps):
the command line of ``pipeline.benchmark`` (``python -m pipeline.benchmark`` is the same; ``--help``
and docs/benchmarks.md list the flags).

Example: python tools/benchmark.py --model mae_vit_base_patch16 --batch_size 8 --baseline --json runs/bench.json
"""

from pipeline.benchmark import cli

cli()
