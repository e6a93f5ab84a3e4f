"""Pipeline-level tools above the task packages: the staged demo (``python -m pipeline.demo``), the
benchmark command line (``python -m pipeline.benchmark``), the transfer studies
(``python -m pipeline.study_{classification,detection,segmentation}``) and the converter's command line
(``python -m pipeline.convert``: each task's ``export`` and ``predict`` behind :mod:`maecore.convert`).  ``tools/`` holds thin entry
points to these.  This package may import every task package; ``maecore`` and the tasks never import it.
"""
