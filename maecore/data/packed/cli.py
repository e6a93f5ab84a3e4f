"""``python -m maecore.data.packed SRC DST [options]`` (= ``python tools/pack_dataset.py``) packs a folder;
``python -m maecore.data.packed --verify DST`` checks a packed one (:mod:`maecore.data.packed`)."""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable
from pathlib import Path

from maecore.cli import OneLineParser, byte_size, run_cli
from maecore.data import jpegroi
from maecore.data.packed.verify import verify
from maecore.data.packed.writer import DEFAULT_QUALITY, DEFAULT_SHARD_SIZE, SUBSAMPLING_CHOICES, pack


def _int_in(lo: int, hi: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            v = lo - 1
        if not lo <= v <= hi:
            raise argparse.ArgumentTypeError(f"expected an integer in [{lo}, {hi}], got {text!r}")
        return v

    return parse


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="pack_dataset.py", description="Pack an image folder into tar shards with an index (see maecore/data/packed/); "
                                                          "or check a packed one (--verify DST).")
    p.add_argument("src", type=Path, nargs="?", help="image folder: class sub-folders or loose images, or a root with train/ and val/")
    p.add_argument("dst", type=Path, nargs="?", help="output folder (must not exist, unless --force)")
    p.add_argument("--verify", type=Path, metavar="DST", default=None,
                   help="only check the packed dataset DST (every record's CRC-32, shard sizes and tar structure, restart "
                        "tables): a summary, exit 0 when clean, else one error line and exit 2")
    cap = p.add_mutually_exclusive_group()
    cap.add_argument("--max_side", type=_int_in(16, 1 << 16), default=None,
                     help="re-encode images whose long side exceeds N as JPEG with that long side (default: keep originals)")
    cap.add_argument("--short_side", type=_int_in(16, 1 << 16), default=None,
                     help="re-encode images whose short side exceeds N as JPEG with that short side, e.g. 448 for 224-px "
                          "training (default: keep originals)")
    p.add_argument("--quality", type=_int_in(1, 100), default=DEFAULT_QUALITY,
                   help=f"JPEG quality of re-encoded images (default {DEFAULT_QUALITY})")
    p.add_argument("--roi", action="store_true",
                   help="re-encode every image as JPEG at --quality with restart markers, so that the fast decoder decodes only "
                        "the crop box (lossy: one more JPEG generation; see maecore/data/packed/)")
    p.add_argument("--roi_restart", choices=jpegroi.RESTARTS, default="mcu",
                   help="with --roi: a restart marker after every MCU (default; boxes cut both ways) or every MCU row")
    p.add_argument("--subsampling", choices=SUBSAMPLING_CHOICES, default="keep",
                   help="chroma subsampling of re-encoded colour images: keep (default) = a JPEG's own (4:4:0, 4:1:1 and "
                        "other formats: 4:4:4, nothing thrown away), or one for all")
    p.add_argument("--shard_size", type=byte_size, default=DEFAULT_SHARD_SIZE, help="bytes per shard, e.g. 500M (default 1G)")
    p.add_argument("--workers", type=_int_in(0, 256), default=min(8, os.cpu_count() or 1),
                   help="decoding processes (default min(8, CPUs); 0 = in this process)")
    p.add_argument("--force", action="store_true", help="replace DST when it is a packed dataset")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.verify is not None:
        if args.src is not None:
            parser.error("--verify DST checks a packed dataset: give no SRC/DST to pack")
        verify(args.verify)
        return 0
    if args.dst is None:
        parser.error("give SRC and DST to pack (or --verify DST to check a packed dataset)")
    t0 = time.perf_counter()
    out = pack(args.src, args.dst, force=args.force, max_side=args.max_side, short_side=args.short_side,
               quality=args.quality, shard_size=args.shard_size, workers=args.workers, roi=args.roi_restart if args.roi else None,
               subsampling=args.subsampling)
    print(f"packed {args.src} -> {', '.join(map(str, out))} in {time.perf_counter() - t0:.1f}s")
    return 0


def cli(argv: list[str] | None = None) -> None:
    run_cli(main, argv)
