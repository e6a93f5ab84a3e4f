"""``python -m detection [flags]``: train or evaluate (detection/train.py);
``python -m detection predict CKPT INPUT… -o OUT``: predict (detection/predict.py)."""

import sys

if len(sys.argv) > 1 and sys.argv[1] == "predict":
    from detection.predict import cli

    cli(sys.argv[2:])
else:
    from detection.train import cli

    cli()
