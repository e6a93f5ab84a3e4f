"""Named detection recipes.

``vitdet_{b,l,h}`` are ViTDet's COCO Mask R-CNN recipes (Li et al. 2022, detectron2
``projects/ViTDet/configs/COCO/mask_rcnn_vitdet_{b,l}_100ep.py``, ``_h_75ep.py``), number for number
(tests/tasks/test_official_recipes.py): LSJ at 1024, AdamW lr 1e-4 (0.9, 0.999), wd 0.1, layer decay 0.7/0.8/0.9,
drop path 0.1/0.4/0.5, 184,375 iterations at batch 64 ("100 epochs"; H: 138,281, "75 epochs") whatever the
dataset's size, 250-iteration warm-up from 0.001 (H: 187.4966, the same fraction of its run), x0.1 at
iterations 163,889 and 177,546 (H: 122,916 and 133,159).  Weight decay as detectron2 gives it: B/L exempt
only ``pos_embed`` and the trunk's LayerNorms, H exempts nothing (``--wd_rule``).  Batch 64 = ``batch_size`` x
``accum_iter`` x 8 GPUs here.
``vitfpn_{b,l}`` swap in the MAE paper's ViT-FPN backbone on ViTDet-B/L's optimizer and schedule.
``demo`` trains a ViT-tiny/8 detector on the 64-px synthetic COCO world (LSJ at 64) in CPU minutes; its trunk
matches ``pretrain``'s ``demo`` (ViT-tiny/8 at 64 px), so ``--finetune`` takes that MAE checkpoint as is.

Choices where we differ from, or add to, the official code (all opt-in):

* ``--wd_rule uniform``: no weight decay on any 1-D parameter (biases, norms) nor on ``pos_embed`` and
  ``rel_pos_h/w`` (the BEiT/timm convention; detectron2 decays the biases, the relative-position tables and the
  pyramid's and heads' LayerNorms, which are detectron2's own ``LayerNorm`` rather than a torch norm type).
* ``--epochs`` without ``--max_iters`` (the ``demo``): the run is whole epochs, the milestones the same fractions
  of its steps.
"""

from __future__ import annotations

# ViTDet's x0.1 milestones as fractions of its 184,375 iterations; rounded down to a step they give back 163,889
# and 177,546, and H's 122,916 and 133,159 (detectron2: milestone * 3 // 4) of its 138,281
VITDET_MILESTONES = (163_889 / 184_375, 177_546 / 184_375)

_VITDET = dict(
    backbone="vitdet", input_size=1024, pretrain_img_size=224, window_size=14, lr=1e-4, weight_decay=0.1, wd_rule="official",
    warmup_iters=250, milestones=list(VITDET_MILESTONES), max_iters=184_375, epochs=100, out_channels=256, num_workers=8,
    keep_every=10, eval_every=10, log_every=20, best_key="bbox/AP",
)

RECIPES: dict[str, dict] = {
    "vitdet_b": dict(_VITDET, model="vit_base_patch16", layer_decay=0.7, drop_path=0.1, batch_size=2, accum_iter=4),
    "vitdet_l": dict(_VITDET, model="vit_large_patch16", layer_decay=0.8, drop_path=0.4, batch_size=1, accum_iter=8,
                     grad_checkpointing=True),
    # ViTDet-H: patch 16 (the MAE-H/14 patch kernel is resized to 16 when converting), 75 epochs
    # detectron2's H config: max_iter * 3 // 4 and milestones * 3 // 4, but B's warm-up *fraction* (250 / 184,375) of
    # the shorter run, i.e. 187.4966 iterations; overrides {} and weight_decay_norm None (every parameter decays)
    "vitdet_h": dict(_VITDET, model="vit_huge_patch14", patch_size=16, layer_decay=0.9, drop_path=0.5, epochs=75,
                     max_iters=184_375 * 3 // 4, warmup_iters=250 * (184_375 * 3 // 4) / 184_375, wd_rule="decay_all",
                     batch_size=1, accum_iter=8, grad_checkpointing=True),
    "vitfpn_b": dict(_VITDET, backbone="vitfpn", model="vit_base_patch16", layer_decay=0.7, drop_path=0.1, batch_size=2, accum_iter=4),
    "vitfpn_l": dict(_VITDET, backbone="vitfpn", model="vit_large_patch16", layer_decay=0.8, drop_path=0.4, batch_size=1,
                     accum_iter=8, grad_checkpointing=True),
    # CPU minutes on the synthetic world (synthetic/, 64 px): ViT-tiny/8, 4 blocks (pretrain's demo) at
    # 64 px (8x8 tokens, 4x4 windows in blocks 0 and 2, global attention in 1 and 3; /16 gives 4x4 tokens, too coarse for
    # the masks), pyramid strides 2-32, a 64-channel pyramid and heads,
    # small RPN / RoI samples; a higher lr and short warm-up since it starts from scratch; LSJ scale 0.5-2
    # (at a 64-px target, 0.1 would leave 6-px images with objects of a pixel or two).
    "demo": dict(
        backbone="vitdet", model="vit_tiny_patch16", patch_size=8, depth=4, global_blocks=[1, 3], input_size=64, pretrain_img_size=64,
        window_size=4,
        out_channels=64, fc_dim=256, anchor_sizes=[8, 16, 32, 64, 128], rpn_batch_size_per_image=64,
        box_batch_size_per_image=32, rpn_pre_nms_top_n_train=300, rpn_post_nms_top_n_train=150,
        rpn_pre_nms_top_n_test=300, rpn_post_nms_top_n_test=150, detections_per_img=30,
        lr=4e-4, weight_decay=0.1, layer_decay=0.9, drop_path=0.0, warmup_iters=20, milestones=list(VITDET_MILESTONES), max_iters=0,
        lsj_scale=[0.5, 2.0],
        epochs=3, batch_size=4, accum_iter=1, num_workers=1, log_every=20, keep_every=0, eval_every=1,
        vis_images=4, best_key="bbox/AP",
    ),
}
