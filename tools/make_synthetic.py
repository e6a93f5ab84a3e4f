#!/usr/bin/env python
"""Generate the synthetic shapes world (ImageNet / COCO / ADE20K layouts): the command line of the
``synthetic`` package (``python -m synthetic`` is the same).

Example: python tools/make_synthetic.py data/synth --size 64 --n-train 40 --n-val 10
"""

from synthetic.__main__ import main

raise SystemExit(main())
