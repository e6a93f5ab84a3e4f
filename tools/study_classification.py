#!/usr/bin/env python
"""Slow study (not a test): linear probe / partial / full fine-tuning on the synthetic world, from an
MAE demo checkpoint and from random init: ``pipeline.study_classification`` (``python -m
pipeline.study_classification`` is the same; ``--help`` lists the flags).

    python tools/study_classification.py --out runs/cls_study [--pretrained OUT/checkpoint-last.pth]
"""

from pipeline.study_classification import main

main()
