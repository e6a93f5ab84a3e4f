"""ViTDet Mask R-CNN, ViT-L, 100 epochs (the ViT-B recipe with a larger trunk).

    python tools/convert.py mae_pretrain_vit_large.pth -o checkpoints/mae_vit_large_detectron2.pth --to detectron2

Published (ViTDet, MAE init): 55.5 box AP / 49.2 mask AP on COCO val2017.
"""

from functools import partial

from detectron2.modeling.backbone.vit import get_vit_lr_decay_rate

from .mask_rcnn_vitdet_b_100ep import dataloader, lr_multiplier, model, optimizer, train

__all__ = ["dataloader", "lr_multiplier", "model", "optimizer", "train"]

train.init_checkpoint = "checkpoints/mae_vit_large_detectron2.pth"

model.backbone.net.embed_dim = 1024
model.backbone.net.depth = 24
model.backbone.net.num_heads = 16
model.backbone.net.drop_path_rate = 0.4
# global attention in blocks 5, 11, 17, 23; windows everywhere else
model.backbone.net.window_block_indexes = [i for i in range(24) if i not in (5, 11, 17, 23)]

optimizer.params.lr_factor_func = partial(get_vit_lr_decay_rate, num_layers=24, lr_decay_rate=0.8)
