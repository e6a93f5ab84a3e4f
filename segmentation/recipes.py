"""Named ADE20K UperNet recipes.

``base`` is the MAE paper's ViT-B setting as mmsegmentation reproduces it (48.13 mIoU single scale,
``mae-base_upernet_8xb2-amp-160k_ade20k-512x512``), number for number (tests/tasks/test_official_recipes.py):
AdamW lr 1e-4 (0.9, 0.999), wd 0.05, layer decay 0.65, 8 processes x batch 2 = 16, crop 512, drop path 0.1,
UperNet channels 768, auxiliary FCN 256 channels weight 0.4; weight decay as mmseg's
``LayerDecayOptimizerConstructor`` gives it (1-D parameters and biases exempt; ``pos_embed``, ``cls_token`` and
the relative-position tables decay, since its bare-name exemption never matches the ``backbone.`` names);
poly (power 1) to 0 over all 160k iterations with a 1500-iteration linear warm-up from 1e-6 multiplied in:
mmseg 0.x's ``lr_config``, which the published 48.13 was trained with (its checkpoint and log are dated
2022-04-26, mmseg v0.24's code; the mmseg-1.x config in segmentation/configs/mmseg/ is a port whose ``LinearLR`` +
``PolyLR`` restarts the decay after the warm-up: ``--poly_after_warmup``).  ``batch_size`` is per process, as
everywhere in the toolkit: on one GPU use ``--batch_size 16`` (or ``--accum_iter 8``).

``large`` scales the same setup to ViT-L (blocks 7/11/15/23, channels 1024); no ViT-L UperNet recipe is
published with the MAE code, so its layer decay (0.75, the MAE ViT-L fine-tuning value) and drop path (0.2)
are our choices, not reproduced numbers.

``demo`` trains a small ViT/8 from scratch on 64-px crops of the synthetic ADE world (CPU minutes).

Choices where we differ from, or add to, the official code (all opt-in):

* ``--wd_rule uniform``: no weight decay on ``pos_embed``, ``cls_token`` and the relative-position tables either
  (what mmseg's constructor means to do, and the BEiT/timm convention).
* ``--poly_after_warmup``: the mmseg-1.x schedule of the shipped config (up to 1 % higher lr than 0.x's).
"""

from __future__ import annotations

RECIPES: dict[str, dict] = {
    "base": dict(
        model="vit_base_patch16", input_size=512, scale=[2048, 512], ratio_range=[0.5, 2.0], cat_max_ratio=0.75,
        num_classes=150, channels=768, aux_channels=256, aux_weight=0.4, drop_path=0.1,
        lr=1e-4, weight_decay=0.05, layer_decay=0.65, warmup_iters=1500, max_iters=160_000,
        batch_size=2, accum_iter=1, eval_iters=16_000, num_workers=4, log_every=50, keep_every=0,
    ),
    "large": dict(
        model="vit_large_patch16", input_size=512, scale=[2048, 512], ratio_range=[0.5, 2.0], cat_max_ratio=0.75,
        num_classes=150, channels=1024, aux_channels=256, aux_weight=0.4, drop_path=0.2,
        lr=1e-4, weight_decay=0.05, layer_decay=0.75, warmup_iters=1500, max_iters=160_000,
        batch_size=2, accum_iter=1, eval_iters=16_000, num_workers=4, log_every=50, keep_every=0,
    ),
    # a 4-block, 96-wide ViT/8 on 64-px crops of 64-px synthetic scenes (8x8 tokens), trained from scratch:
    # no layer decay or drop path (nothing pretrained to protect), lr 5e-4.  To fine-tune the pretraining
    # demo's checkpoint instead: --finetune CKPT --embed_dim 192 --num_heads 3 --layer_decay 0.65.
    "demo": dict(
        model="vit_tiny_patch16", embed_dim=96, depth=4, num_heads=3, patch_size=8, input_size=64, scale=[256, 64],
        ratio_range=[0.75, 1.5], cat_max_ratio=0.75, num_classes=7, channels=32, aux_channels=16, aux_weight=0.4,
        drop_path=0.0, lr=5e-4, weight_decay=0.05, layer_decay=1.0, warmup_iters=250, max_iters=2500,
        batch_size=8, accum_iter=1, eval_iters=500, num_workers=1, log_every=25, keep_every=0, num_vis=4,
    ),
}
