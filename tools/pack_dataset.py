#!/usr/bin/env python
"""Pack an image folder into WebDataset-style tar shards with a random-access index: ``python
tools/pack_dataset.py SRC DST …`` is ``python -m maecore.data.packed SRC DST …`` (options and format: maecore/data/packed/).

Example: python tools/pack_dataset.py /data/imagenet /data/imagenet-packed --short_side 448
"""

from maecore.data.packed.cli import build_parser, cli, main

__all__ = ["build_parser", "cli", "main"]

if __name__ == "__main__":
    cli()
