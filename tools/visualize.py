#!/usr/bin/env python
"""Reconstruction figure of an MAE checkpoint: ``python tools/visualize.py CKPT IMG [IMG ...] -o out.png``
is ``python -m pretrain.visualize …`` (see pretrain/visualize.py for the options)."""

from pretrain.visualize import cli, main

__all__ = ["cli", "main"]

if __name__ == "__main__":
    cli()
