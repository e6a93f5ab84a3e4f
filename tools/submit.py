#!/usr/bin/env python
"""Submit a training task to SLURM (submitit), requeued on the time limit: ``python tools/submit.py --task pretrain
--nodes 2 --gpus_per_node 8 --partition P -- <task flags>`` is ``python -m pipeline.submit …`` (see pipeline/submit.py)."""

from pipeline.submit import cli, main

__all__ = ["cli", "main"]

if __name__ == "__main__":
    cli()
