"""``--monitor`` and its flags, and the hook they build: what a training CLI adds is two calls,
:func:`add_monitor_args` on its parser and ``hooks=[build_monitor(...)]`` (``None`` when the flag is off)."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import torch
import torch.nn as nn

from maecore import distributed as du
from maecore.cli import non_negative_int, positive_int
from maecore.monitor.hook import POOLS, Monitor
from maecore.monitor.subset import MonitorSubset

# Defaults within the 5 % budget at the CLI's defaults (64 images a step, one process): 1,500 unmasked forwards
# every 1,000 steps.  Measured on the demo's model (ViT-tiny/8, 64 px, CPU fp32, under load): an unmasked forward
# costs ~0.5 of a training image (4x the tokens, but no backward and no decoder), so ~1.1 %, plus ~0.15 % for the
# online classifier's steps; W processes share the forwards (1/W each).  Step 0 and the last step are measured too
# (a short run pays them: ~2.6 % of the 870-step demo).  The bank is small for 1,000 classes: raise
# --monitor_bank on large, many-GPU runs, where it is cheap.
EVERY, BANK, QUERIES = 1000, 1000, 500


def add_monitor_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("monitor (kNN, online linear classifier and RankMe while training)")
    g.add_argument("--monitor", "--monitoring", action="store_true",
                   help="every --monitor_every steps, the encoder's unmasked features on a labelled subset: weighted kNN "
                        "top-1, an online linear classifier's top-1, RankMe (log.jsonl 'monitor' records, TensorBoard); "
                        "under torchrun write --monitoring (Python 3.11's torchrun refuses --monitor as an ambiguous "
                        "abbreviation of its own --monitor-interval)")
    g.add_argument("--monitor_every", type=positive_int, default=EVERY, help="steps between measurements (also at step 0 and the last)")
    g.add_argument("--monitor_data", default="", metavar="PATH",
                   help="labelled folder (class sub-folders; train/ and val/ if present), a packed copy or its URL, to measure on "
                        "(default: --data_path)")
    g.add_argument("--monitor_bank", type=positive_int, default=BANK, help="training images in the kNN bank (and RankMe)")
    g.add_argument("--monitor_queries", type=non_negative_int, default=QUERIES,
                   help="validation images (else other training images) the kNN and the linear classifier are scored on")
    g.add_argument("--monitor_pool", choices=POOLS, default="mean",
                   help="features: mean of the patch tokens after the final norm (the demo's linear probe) or the cls token")


def build_monitor(args: argparse.Namespace, model: nn.Module, train_classes: Sequence[str], device: torch.device,
                  data_path: str | None = None) -> Monitor | None:
    """The :class:`Monitor` the flags ask for (``None`` without ``--monitor``); ``train_classes``: the training
    set's classes (the online classifier learns from the training batches' labels only when they are the
    subset's classes)."""
    if not args.monitor:
        return None
    root = args.monitor_data or data_path or args.data_path
    subset = MonitorSubset(root, args.input_size, args.monitor_bank, args.monitor_queries)
    online = subset.labelled and list(train_classes) == subset.classes
    if du.is_main():
        print(f"monitor: every {args.monitor_every} steps, {len(subset.bank)} bank / {len(subset.queries)} query images "
              f"of {root} ({args.monitor_pool}-pooled, unmasked)")
        if not subset.labelled:
            print(f"monitor: {root} has no class folders: RankMe only (kNN and the linear classifier need labels)")
        elif not online:
            print("monitor: the training images' classes are not the monitor data's: kNN and RankMe, no online linear classifier")
    return Monitor(subset, args.monitor_every, model.embed_dim, device, online=online, pool=args.monitor_pool)
