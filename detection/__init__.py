"""COCO Mask R-CNN with a plain ViT backbone (ViTDet's simple feature pyramid or the MAE paper's ViT-FPN).

``python -m detection --recipe demo --data_path WORLD/coco --output_dir OUT`` trains and evaluates
(pycocotools COCOeval, bbox and segm); see :mod:`detection.train` for the flags.
"""

import maecore.models  # noqa: F401, E402  (before timm: timm without its eager wandb import, maecore/models/_timm.py)
