#!/usr/bin/env python
"""Convert MAE / ViT weights between formats: ``python tools/convert.py SRC -o DST --to …`` is
``python -m maecore.convert SRC -o DST --to …`` (see maecore/convert/__main__.py for the options)."""

from maecore.convert.__main__ import build_parser, cli, main

__all__ = ["build_parser", "cli", "main"]

if __name__ == "__main__":
    cli()
