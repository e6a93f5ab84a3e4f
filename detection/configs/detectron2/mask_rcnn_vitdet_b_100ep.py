"""ViTDet Mask R-CNN, ViT-B, 100 epochs, LSJ 1024, for detectron2's ``tools/lazyconfig_train_net.py``.

The trunk starts from an MAE checkpoint converted with exact detectron2 names (so no
``?matching_heuristics=True``: every key is loaded by name and nothing is matched by guesswork):

    python tools/convert.py mae_pretrain_vit_base.pth -o checkpoints/mae_vit_base_detectron2.pth --to detectron2
    python $DETECTRON2/tools/lazyconfig_train_net.py --num-gpus 8 \\
        --config-file detection/configs/detectron2/mask_rcnn_vitdet_b_100ep.py

Needs detectron2.  This folder is not a Python package: nothing in the toolkit imports it.
Published (ViTDet, MAE init): 51.6 box AP / 45.9 mask AP on COCO val2017.
"""

from functools import partial

import detectron2.data.transforms as T
from detectron2 import model_zoo
from detectron2.config import LazyCall as L
from detectron2.modeling.backbone.fpn import LastLevelMaxPool
from detectron2.modeling.backbone.vit import get_vit_lr_decay_rate
from detectron2.solver import WarmupParamScheduler
from fvcore.common.param_scheduler import MultiStepParamScheduler

# detectron2's ViTDet Mask R-CNN: ViT-B in a SimpleFeaturePyramid, 14x14 windows with global attention
# in blocks 2, 5, 8, 11, decomposed relative position (zero-init), LN in the box/mask heads
model = model_zoo.get_config("common/models/mask_rcnn_vitdet.py").model
model.backbone.net.drop_path_rate = 0.1


def last_level_max_pool(in_feature: str = "p5") -> LastLevelMaxPool:
    """detectron2's top block (p6 = max-pool of the last level) with that level as an argument.

    ``LastLevelMaxPool`` takes none and always reads ``p5``, the last level for patch 16 only: patch 8 gives
    p1-p4.  ``python -m pipeline.convert CKPT --to detectron2`` records ``model.backbone.top_block.in_feature``
    (and the RPN's and RoI heads' levels) for such a checkpoint."""
    block = LastLevelMaxPool()
    block.in_feature = in_feature
    return block


model.backbone.top_block = L(last_level_max_pool)(in_feature="p5")

# large-scale jitter: flip, resize by 0.1-2.0, fixed 1024 crop
image_size = 1024
dataloader = model_zoo.get_config("common/data/coco.py").dataloader
dataloader.train.mapper.augmentations = [
    L(T.RandomFlip)(horizontal=True),
    L(T.ResizeScale)(min_scale=0.1, max_scale=2.0, target_height=image_size, target_width=image_size),
    L(T.FixedSizeCrop)(crop_size=(image_size, image_size), pad=False),
]
dataloader.train.mapper.image_format = "RGB"
dataloader.train.mapper.recompute_boxes = True  # boxes change with the crop
dataloader.train.total_batch_size = 64
dataloader.test.mapper.augmentations = [L(T.ResizeShortestEdge)(short_edge_length=image_size, max_size=image_size)]

train = model_zoo.get_config("common/train.py").train
train.amp.enabled = True
train.ddp.fp16_compression = True
train.init_checkpoint = "checkpoints/mae_vit_base_detectron2.pth"  # written by tools/convert.py --to detectron2
train.max_iter = 184375  # 100 epochs = 184375 iterations x 64 images / 118k images

# step decay at ~89% and ~96% of training after a 250-iteration warm-up
lr_multiplier = L(WarmupParamScheduler)(
    scheduler=L(MultiStepParamScheduler)(
        values=[1.0, 0.1, 0.01],
        milestones=[163889, 177546],
        num_updates=train.max_iter,
    ),
    warmup_length=250 / train.max_iter,
    warmup_factor=0.001,
)

# AdamW lr 1e-4, wd 0.1, layer-wise lr decay 0.7 over 12 blocks, no decay on the position table nor (common/optim.py:
# weight_decay_norm=0.0) the trunk's nn.LayerNorms; biases, rel_pos and the pyramid's and heads' LN decay (as python -m detection)
optimizer = model_zoo.get_config("common/optim.py").AdamW
optimizer.lr = 1e-4
optimizer.weight_decay = 0.1
optimizer.params.lr_factor_func = partial(get_vit_lr_decay_rate, num_layers=12, lr_decay_rate=0.7)
optimizer.params.overrides = {"pos_embed": {"weight_decay": 0.0}}
