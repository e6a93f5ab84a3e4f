#!/usr/bin/env python
"""Generate the synthetic shapes world (ImageNet / COCO / ADE20K layouts): the command line of
``maecore.synthetic`` (``python -m maecore.synthetic`` is the same).

Example: python tools/make_synthetic.py data/synth --size 64 --n-train 40 --n-val 10
"""

from maecore.synthetic import main

raise SystemExit(main())
