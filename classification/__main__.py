"""``python -m classification [flags]``: train or evaluate (classification/train.py);
``python -m classification predict CKPT INPUT… -o OUT``: predict (classification/predict.py)."""

import sys

if len(sys.argv) > 1 and sys.argv[1] == "predict":
    from classification.predict import cli

    cli(sys.argv[2:])
else:
    from classification.train import cli

    cli()
