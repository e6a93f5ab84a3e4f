#!/usr/bin/env python
"""CPU study: the ``demo`` detector trained from scratch on the synthetic COCO world, AP every few
epochs: ``pipeline.study_detection`` (``python -m pipeline.study_detection`` is the same; ``--help``
lists the flags and the measured numbers).

    python tools/study_detection.py --output_dir runs/study_detection [-- --finetune MAE.pth]
"""

from pipeline.study_detection import main

main()
