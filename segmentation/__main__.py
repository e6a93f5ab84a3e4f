"""``python -m segmentation [flags]``: train or evaluate (segmentation/train.py);
``python -m segmentation predict CKPT INPUT… -o OUT``: predict (segmentation/predict.py)."""

import sys

if len(sys.argv) > 1 and sys.argv[1] == "predict":
    from segmentation.predict import cli

    cli(sys.argv[2:])
else:
    from segmentation.train import cli

    cli()
