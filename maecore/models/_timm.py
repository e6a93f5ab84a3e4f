"""timm, imported once without its eager ``import wandb``.

timm's ``timm/utils/summary.py`` imports Weights & Biases at import time whenever it is installed (for the logging of
timm's own training script, which the toolkit never calls), and ``import timm`` runs it.  With the ``wandb`` extra
installed that cost 0.9-1.4 s of CPU in every process that imports a model (``python -c "import pretrain.train"``
with and without ``import wandb`` first, 3 runs each, 2-core Xeon at load 5), every process the test suite starts
included.  So timm is imported here with ``wandb`` hidden; a run
with ``--loggers wandb`` imports wandb itself when it opens its run (:mod:`maecore.engine.loggers.wandb`).  Where
wandb or timm is already imported, or timm is missing (an image that has torch only), this does nothing.
"""

import sys

if "timm" not in sys.modules and "wandb" not in sys.modules:
    sys.modules["wandb"] = None  # type: ignore[assignment]  # ``import wandb`` raises ImportError, which timm expects
    try:
        import timm  # noqa: F401
    except ImportError:
        pass
    finally:
        del sys.modules["wandb"]
