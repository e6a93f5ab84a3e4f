"""Named presets: the official fine-tuning / linear-probe recipes (FINETUNE.md, LINPROBE.md, paper
App. A.1 and §4.3) and small ``demo*`` presets for the synthetic world.

Effective batch = batch_size × accum_iter × GPUs; the official runs used 32 GPUs for B/L
fine-tuning (32 × 32 = 1024), 64 for H (16 × 64), and 32 for the probe (512 × 32 = 16384).  The
lr follows the effective batch (lr = blr × eff_batch / 256), so fewer GPUs still run the recipe.
"""

from __future__ import annotations

# the protocol defaults: what `--protocol X` means with no recipe (official scripts' choices, with
# the fine-tuning augmentations of FINETUNE.md switched on)
PROTOCOL_DEFAULTS: dict[str, dict] = {
    "finetune": dict(
        blr=1e-3, layer_decay=0.75, weight_decay=0.05, min_lr=1e-6, warmup_epochs=5, epochs=50, batch_size=64,
        drop_path=0.1, global_pool=True, smoothing=0.1, aa="rand-m9-mstd0.5-inc1", reprob=0.25,
        mixup=0.8, cutmix=1.0,
    ),
    "linprobe": dict(
        blr=0.1, layer_decay=1.0, weight_decay=0.0, min_lr=0.0, warmup_epochs=10, epochs=90, batch_size=512,
        drop_path=0.0, global_pool=False, smoothing=0.0, aa=None, reprob=0.0, mixup=0.0, cutmix=0.0,
    ),
}
PROTOCOL_DEFAULTS["partial"] = dict(PROTOCOL_DEFAULTS["finetune"])

_FT = dict(protocol="finetune", weight_decay=0.05, min_lr=1e-6, warmup_epochs=5, mixup=0.8, cutmix=1.0, smoothing=0.1,
           reprob=0.25, aa="rand-m9-mstd0.5-inc1", input_size=224, global_pool=True)

RECIPES: dict[str, dict] = {
    # FINETUNE.md; reported 83.6 / 85.9 / 86.9 top-1 (REFERENCE.md)
    "finetune_vit_base": dict(_FT, model="vit_base_patch16", blr=5e-4, layer_decay=0.65, drop_path=0.1, epochs=100, batch_size=32),
    "finetune_vit_large": dict(_FT, model="vit_large_patch16", blr=1e-3, layer_decay=0.75, drop_path=0.2, epochs=50, batch_size=32),
    "finetune_vit_huge": dict(_FT, model="vit_huge_patch14", blr=1e-3, layer_decay=0.75, drop_path=0.3, epochs=50, batch_size=16),
    # LINPROBE.md: cls token, BN + linear head, LARS, blr 0.1, wd 0, 10 warm-up, 90 epochs (50 suffice for L/H)
    "linprobe": dict(protocol="linprobe", blr=0.1, weight_decay=0.0, min_lr=0.0, warmup_epochs=10, epochs=90, batch_size=512,
                     global_pool=False, input_size=224),
    # §4.3 / Fig. 9 (no public code): ViT-L, the fine-tuning recipe, last block tuned; the paper took
    # the best of 50/100/200 epochs per point (`--tune_blocks` 0 / 0.5 / 1 / 2 / 4 / 6 / 24)
    "partial": dict(_FT, protocol="partial", model="vit_large_patch16", blr=1e-3, layer_decay=0.75, drop_path=0.2, epochs=100,
                    batch_size=32, tune_blocks=1.0),
    # synthetic world: ViT-tiny/8 on 64-px shapes (what `python -m pretrain --recipe demo` makes).  A few hundred
    # CPU steps on 5,600 images: the model underfits, so no RandAugment / random erasing / label smoothing / mixing
    # and no drop path (each slows the first epochs; they pay off only over many: drop path 0.1 cost 2.3 points at
    # 875 steps) and 8 epochs.  docs/demo_study.md has the measured curves.
    "demo": dict(protocol="finetune", model="vit_tiny_patch16", patch_size=8, depth=4, input_size=64, blr=2e-3, layer_decay=0.75,
                 drop_path=0.0, epochs=8, warmup_epochs=1, batch_size=32, mixup=0.0, cutmix=0.0, smoothing=0.0,
                 reprob=0.0, aa=None, num_workers=1, log_every=5, keep_every=0),
    # LARS moves a weight by lr x 0.001 of its norm per step whatever the batch: blr 25 at batch 64 gives the
    # official per-step lr (0.1 x 16384 / 256 = 6.4); blr 0.1 would barely move the head in a demo's few steps
    # mean-pooled patch tokens (the official --global_pool option): a short MAE run's cls token is barely trained
    "demo_linprobe": dict(protocol="linprobe", model="vit_tiny_patch16", patch_size=8, depth=4, input_size=64, global_pool=True,
                          blr=25.0, epochs=20, warmup_epochs=2, batch_size=64, num_workers=1, log_every=5, keep_every=0),
    # only the last block and the head learn: 4x the fine-tune's blr (docs/demo_study.md, session 2: 33.1 vs 25.3
    # top-1 at 350 steps; 2e-2 gave 31.3)
    "demo_partial": dict(protocol="partial", model="vit_tiny_patch16", patch_size=8, depth=4, input_size=64, blr=8e-3, layer_decay=0.75,
                         drop_path=0.1, epochs=8, warmup_epochs=1, batch_size=32, mixup=0.0, cutmix=0.0, smoothing=0.0,
                         reprob=0.0, aa=None, tune_blocks=1.0, num_workers=1, log_every=5, keep_every=0),
}
