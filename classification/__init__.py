"""Image classification transfer of MAE encoders: end-to-end fine-tuning, linear probing and
partial fine-tuning (``python -m classification --protocol {finetune,linprobe,partial}``)."""

import maecore.models  # noqa: F401, E402  (before timm: timm without its eager wandb import, maecore/models/_timm.py)
