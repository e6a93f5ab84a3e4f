"""ViTDet Mask R-CNN, ViT-H, 75 epochs (the ViT-B recipe with a larger trunk, 3/4 of the schedule).

ViTDet-H runs the MAE ViT-H/14 weights with 16x16 patches; convert with the patch embedding resampled:

    python tools/convert.py mae_pretrain_vit_huge.pth -o checkpoints/mae_vit_huge_p16_detectron2.pth \\
        --to detectron2 --patch-size 16

Published (ViTDet, MAE init): 56.7 box AP / 50.2 mask AP on COCO val2017.
"""

from functools import partial

from detectron2.modeling.backbone.vit import get_vit_lr_decay_rate

from .mask_rcnn_vitdet_b_100ep import dataloader, lr_multiplier, model, optimizer, train

__all__ = ["dataloader", "lr_multiplier", "model", "optimizer", "train"]

train.init_checkpoint = "checkpoints/mae_vit_huge_p16_detectron2.pth"

model.backbone.net.embed_dim = 1280
model.backbone.net.depth = 32
model.backbone.net.num_heads = 16
model.backbone.net.drop_path_rate = 0.5
# global attention in blocks 7, 15, 23, 31; windows everywhere else
model.backbone.net.window_block_indexes = [i for i in range(32) if i not in (7, 15, 23, 31)]

optimizer.params.lr_factor_func = partial(get_vit_lr_decay_rate, num_layers=32, lr_decay_rate=0.9)
optimizer.params.overrides = {}
optimizer.params.weight_decay_norm = None

train.max_iter = train.max_iter * 3 // 4  # 100 -> 75 epochs
lr_multiplier.scheduler.milestones = [m * 3 // 4 for m in lr_multiplier.scheduler.milestones]
lr_multiplier.scheduler.num_updates = train.max_iter
