"""The demo's presets: ``demo`` (every stage in CPU minutes), ``smoke`` (the same code path at the smallest size:
what the test suite runs) and ``study`` (the demo over three training seeds)."""

from __future__ import annotations

import json

# The demo: a ViT-tiny/8 on the 64-px synthetic world, every stage in CPU minutes.  Each task's list is
# appended to its recipe's command line; "inits" says which initialisations to compare.
PRESETS: dict[str, dict] = {
    "demo": {
        # coco/ade: n_train/n_val images per split; imagenet: imagenet_n_train/_n_val images per class, in the
        # "plain" style (one flat-coloured object per image: docs/demo_study.md, design (d): the cluttered
        # world's shapes were too hard for a few hundred ViT steps).  5,600 images: the transfer runs see new
        # images rather than repeats, for the same steps.
        # coco/ade in the "plain" style too: 1-3 flat-coloured objects of 6-28 % of the frame (the cluttered scenes'
        # 1-5 % distractors cover a patch or two, too few to read a shape from in a few hundred steps)
        "world": {"size": 64, "n_train": 400, "n_val": 50, "imagenet_n_train": 800, "imagenet_n_val": 100,
                  "imagenet_style": "plain", "scene_style": "plain", "seed": 0},
        "data_root": None,  # None: generate the synthetic world under <output>/world
        "inits": ["mae", "random"],
        # the transfer runs two at a time, each its own process on half the cores: 1.37x the throughput of one
        # 2-thread run after another on 2 cores (docs/demo_study.md, session 3)
        "parallel": 2,
        # detection and segmentation from MAE only: their random-init runs would cost ~3.5 min that 15 minutes
        # do not have (the study preset runs both)
        "dense_inits": ["mae"],
        # precision: every stage's --amp auto (bf16 where the CPU has native bf16, ~1.35x a tiny-ViT step; fp32
        # elsewhere, where emulated bf16 would be slower) and --attn auto (under bf16 on CPU the explicit softmax:
        # ~1.4x faster pretraining and fine-tuning steps); the report names both
        # 870 steps (87 an epoch).  --monitor (#26): weighted kNN, the online linear classifier and RankMe at step 0 (the
        # random network) and every 2 epochs (where the study keeps its checkpoints), on 500 training / 250 val images:
        # 6 x 750 unmasked forwards, ~2.6 % of the pretraining (an unmasked forward of a batch costs 0.32 of a training
        # step, bf16, measured interleaved under load); the defaults' 1,000 / 500 would cost 5 %
        "pretrain": ["--recipe", "demo", "--epochs", "10", "--monitor", "--monitor_every", "174", "--monitor_bank", "500",
                     "--monitor_queries", "250"],
        "linprobe": ["--recipe", "demo_linprobe", "--cache_features", "--epochs", "30"],
        # one block (the row; the last-MLP variant would cost two more runs)
        "partial": ["--recipe", "demo_partial", "--epochs", "3"],  # 525 steps
        "partial_blocks": [1.0],
        "finetune": ["--recipe", "demo", "--epochs", "6"],  # 1,050 steps (docs/demo_study.md: the curves)
        # short schedules want mild scale jitter: LSJ 0.8-1.25 instead of the recipe's 0.5-2 (box AP 12.8 vs 4.4 at
        # 600 steps; mask AP 8.7 there, 6.3 at 500), ratio 0.9-1.1 instead of 0.75-1.5 (mIoU 20.0 vs 16.4 at 900
        # iterations): docs/demo_study.md
        "detection": ["--recipe", "demo", "--epochs", "7", "--lsj_scale", "0.8", "1.25"],  # 700 steps
        "segmentation": ["--recipe", "demo", "--embed_dim", "192", "--num_heads", "3", "--ratio_range", "0.9", "1.1",
                         "--max_iters", "1000", "--eval_iters", "1000", "--warmup_iters", "30"],
        "segmentation_mae": ["--layer_decay", "0.65"],
    },
    # the same code path at the smallest size: what the test suite runs
    "smoke": {
        "world": {"size": 64, "n_train": 3, "n_val": 1, "seed": 0},
        "data_root": None,
        "inits": ["mae", "random"],
        "parallel": 2,
        "pretrain": ["--recipe", "demo", "--epochs", "1", "--batch_size", "8", "--num_workers", "0", "--log_every", "1",
                     "--monitor", "--monitor_every", "2", "--monitor_bank", "16", "--keep_every", "1"],
        # the study's checkpoint probes (pipeline.checkpoint_jobs): the one kept checkpoint is the final one here
        "checkpoint_study": {"finetune_epochs": [1]},
        "linprobe": ["--recipe", "demo_linprobe", "--cache_features", "--epochs", "1", "--batch_size", "8",
                     "--num_workers", "0"],
        "partial": ["--recipe", "demo_partial", "--epochs", "1", "--batch_size", "8", "--num_workers", "0"],
        "partial_blocks": [0.5],
        "finetune": ["--recipe", "demo", "--epochs", "1", "--batch_size", "8", "--num_workers", "0", "--max_steps", "1"],
        "detection": ["--recipe", "demo", "--epochs", "1", "--batch_size", "2", "--num_workers", "0", "--max_steps", "1",
                      "--max_eval_images", "2", "--vis_images", "1"],
        "segmentation": ["--recipe", "demo", "--embed_dim", "192", "--num_heads", "3", "--max_iters", "1",
                         "--eval_iters", "1", "--warmup_iters", "1", "--batch_size", "2", "--num_workers", "0",
                         "--num_vis", "1"],
        "segmentation_mae": [],
    },
}

# the study: the demo's pipeline, every row from both inits, three training seeds on the same world (seed 0);
# `<output>/seed<N>/` holds each seed's whole demo run, `<output>/results.md` the mean ± std and curves
PRESETS["study"] = {**json.loads(json.dumps(PRESETS["demo"])), "dense_inits": ["mae", "random"], "seeds": [0, 1, 2]}
# issue #26 item 6: do the monitors predict the transfer rows?  Pretraining keeps a checkpoint every 2 epochs (where the
# monitor measures); each gets the demo's linear probe (~30 s), the one after 4 epochs also its fine-tune (~6 min):
# with the final checkpoint's own rows, 5 linear-probe and 2 fine-tune points per seed (pipeline.checkpoint_jobs)
PRESETS["study"]["pretrain"] += ["--keep_every", "2"]
PRESETS["study"]["checkpoint_study"] = {"finetune_epochs": [4]}
