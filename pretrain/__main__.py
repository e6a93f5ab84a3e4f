"""``python -m pretrain [flags]``: pretrain (pretrain/train.py);
``python -m pretrain predict CKPT IMG… -o OUT.png``: the reconstruction figure (pretrain/predict.py)."""

import sys

if len(sys.argv) > 1 and sys.argv[1] == "predict":
    from pretrain.predict import cli

    cli(sys.argv[2:])
else:
    from pretrain.train import cli

    cli()
