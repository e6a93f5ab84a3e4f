#!/usr/bin/env python
"""Convert MAE / ViT weights between formats: ``python tools/convert.py SRC -o DST --to …`` is
``python -m pipeline.convert SRC -o DST --to …`` (see pipeline/convert.py for the options)."""

from pipeline.convert import build_parser, cli, main

__all__ = ["build_parser", "cli", "main"]

if __name__ == "__main__":
    cli()
