#!/usr/bin/env python
"""Short CPU study: UperNet on a small ViT learns the synthetic ADE20K world (mIoU well above chance):
``pipeline.study_segmentation`` (``python -m pipeline.study_segmentation`` is the same; ``--help``
lists the flags and the measured numbers).

    OMP_NUM_THREADS=1 python tools/study_segmentation.py --output runs/study_seg --threads 1 [--iters 2500]
"""

from pipeline.study_segmentation import main

main()
