"""Named pretraining recipes.  ``paper`` is He et al. App. A.1; ``demo`` fits a few CPU minutes.

Both train with ``main_pretrain.py``'s parameter groups (timm 0.3.2 ``add_weight_decay`` with no skip list: only
1-D parameters and biases skip weight decay, ``cls_token`` and ``mask_token`` decay) and its per-iteration
warm-up + cosine, tested per parameter against a transcription of the official code
(tests/tasks/test_official_recipes.py).

Choices where we differ from, or add to, the official code (all opt-in):

* ``--wd_rule uniform``: no weight decay on the cls and mask tokens either (timm's later convention,
  ``model.no_weight_decay()``).
* ``--mask_type``, ``--encoder_mask_tokens`` and the decoder sizes: the paper's ablations (Table 1).
"""

from __future__ import annotations

RECIPES: dict[str, dict] = {
    # AdamW (0.9, 0.95), wd 0.05, blr 1.5e-4, eff. batch 4096, 40 warm-up epochs, cosine, 800 epochs,
    # RandomResizedCrop(0.2-1) + flip, mask 75 %, normalised-pixel target
    "paper": dict(
        model="mae_vit_large_patch16", input_size=224, blr=1.5e-4, weight_decay=0.05, warmup_epochs=40,
        epochs=800, batch_size=64, accum_iter=1, mask_ratio=0.75, norm_pix_loss=True,
    ),
    # ViT-tiny width on 64-px synthetic scenes, 8-px patches (64 tokens, 16 visible), a light decoder;
    # 4 blocks instead of 12: on a CPU budget, 3x the steps beat depth (the linear probe plateaus by ~500
    # steps either way, and the shallow encoder makes every downstream stage 3x cheaper too)
    "demo": dict(
        model="mae_vit_tiny_patch16", patch_size=8, depth=4, input_size=64, decoder_embed_dim=128, decoder_depth=2,
        decoder_num_heads=4, blr=1.5e-3, weight_decay=0.05, warmup_epochs=2, epochs=20, batch_size=64,
        mask_ratio=0.75, norm_pix_loss=True, num_workers=1, log_every=5, keep_every=0, vis_every=5,
    ),
}
