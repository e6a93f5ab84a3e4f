"""maecore.models.vit encoder API: forward_features / forward_intermediates, the frozen leading part, and
no_weight_decay() of every task model (the names param_groups keeps out of weight decay)."""

from __future__ import annotations

import pytest
import torch

from classification.model import build_classifier
from detection.model import build_detector
from maecore.models import VisionTransformer
from maecore.optim import param_groups
from pretrain.model import build_mae
from segmentation.model import build_segmentor

VIT = dict(img_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=2)


def _vit(**kw) -> VisionTransformer:
    torch.manual_seed(0)
    return VisionTransformer(**VIT, **kw).eval()


def test_forward_features_is_tokens_and_intermediates_follow_the_indices():
    m = _vit(out_indices=(2,))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        tokens = m.forward_features(x)
        assert tokens.shape == (2, 1 + 16, 32)  # tokens even when the encoder has out_indices
        t, grid, pre = m.embed(x)
        last, ref = m.run_blocks(m.add_prefix(t, pre), grid, (0, 1, 2))
        torch.testing.assert_close(tokens, m.norm(last), rtol=0, atol=0)
        # the order asked, a block listed twice twice
        maps = m.forward_intermediates(x, (2, 0, 0), intermediates_only=True)
        assert [tuple(f.shape) for f in maps] == [(2, 32, 4, 4)] * 3
        for got, want in zip(maps, (ref[2], ref[0], ref[0])):
            torch.testing.assert_close(got, want, rtol=0, atol=0)
        final, maps = m.forward_intermediates(x, (1,))  # with the final tokens
        torch.testing.assert_close(final, tokens, rtol=0, atol=0)
        torch.testing.assert_close(maps[0], ref[1], rtol=0, atol=0)
        # defaults: the encoder's out_indices, which calling a trunk returns; stopping early changes nothing
        torch.testing.assert_close(m(x)[0], ref[2], rtol=0, atol=0)
        torch.testing.assert_close(m.forward_intermediates(x, intermediates_only=True)[0], ref[2], rtol=0, atol=0)
        torch.testing.assert_close(m.forward_intermediates(x, (0,), intermediates_only=True, stop_early=True)[0], ref[0])
        # NLC: patch tokens without the prefix; norm: the final norm on each tap
        nlc = m.forward_intermediates(x, (1,), output_fmt="NLC", norm=True, intermediates_only=True)[0]
        torch.testing.assert_close(nlc, m.norm(ref[1].flatten(2).transpose(1, 2)))
        assert len(_vit().forward_intermediates(x, intermediates_only=True)) == 3  # no out_indices: every block
    for bad in ((3,), (-1,), (0, 5)):
        with pytest.raises(ValueError, match=r"out of range: this encoder has blocks 0\.\.2"):
            m.forward_intermediates(x, bad)
    with pytest.raises(ValueError, match="output_fmt"):
        m.forward_intermediates(x, (0,), output_fmt="NHWC")  # type: ignore[arg-type]


@pytest.mark.parametrize("checkpointing", [False, True])
def test_frozen_leading_blocks_run_fixed_and_checkpointing_keeps_numbers(checkpointing):
    ref = _vit(drop_path_rate=0.2)
    m = _vit(drop_path_rate=0.2, grad_checkpointing=checkpointing)
    m.freeze_leading(2)
    m.train()
    assert m.frozen_stem and m.frozen_blocks == 2
    assert not m.patch_embed.training and not m.blocks[1].training and m.blocks[2].training
    assert {n for n, p in m.named_parameters() if p.requires_grad} == {n for n, _ in m.named_parameters()
                                                                        if n.startswith(("blocks.2.", "norm."))}
    x = torch.randn(2, 3, 32, 32)
    torch.manual_seed(1)
    out = m.forward_features(x)
    out.sum().backward()
    assert all(p.grad is None for n, p in m.named_parameters() if not p.requires_grad)
    # reference: the frozen part run by hand in eval mode without a graph, the last block trained
    ref.blocks[2].train()
    torch.manual_seed(1)
    with torch.no_grad():
        t, grid, pre = ref.embed(x)
        h = ref.add_prefix(t, pre)
        for blk in ref.blocks[:2]:
            h = blk(h, grid, 1)
    want = ref.norm(ref.blocks[2](h, grid, 1))
    want.sum().backward()
    torch.testing.assert_close(out, want, rtol=0, atol=0)
    for (n, p), q in zip(m.named_parameters(), ref.parameters()):
        if p.requires_grad:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-6, atol=1e-7, msg=n)
    with pytest.raises(ValueError, match="cannot freeze 4 blocks"):
        m.freeze_leading(4)


# --------------------------------------------------------------------------------------------------
# no_weight_decay(): each task model names what the old per-script lists excluded, and nothing else
# --------------------------------------------------------------------------------------------------
def _no_decay(model: torch.nn.Module, names) -> set[str]:
    return {n for g in param_groups(model, 0.05, no_weight_decay=names) if g["weight_decay"] == 0.0 for n in g["names"]}


def _check(model: torch.nn.Module, old: tuple[str, ...], expect_2d: set[str]) -> None:
    got = _no_decay(model, model.no_weight_decay())
    assert got == _no_decay(model, old)  # the lists the training scripts carried before
    params = dict(model.named_parameters())
    assert {n for n in got if params[n].ndim > 1} == expect_2d
    assert got == expect_2d | {n for n, p in params.items() if p.requires_grad and p.ndim <= 1}


def test_no_weight_decay_of_each_task_model():
    cls = build_classifier("vit_tiny_patch16", 5, img_size=32, patch_size=8, depth=2, embed_dim=32, num_heads=2)
    _check(cls, ("pos_embed", "cls_token"), {"cls_token", "pos_embed"})

    mae = build_mae("mae_vit_tiny_patch16", img_size=32, patch_size=8, depth=2, embed_dim=32, num_heads=2, decoder_depth=1,
                    decoder_embed_dim=16, decoder_num_heads=2, encoder_mask_tokens=True)
    old_mae = ("pos_embed", "cls_token", "mask_token", "decoder_pos_embed", "encoder_mask_token")
    assert {"pos_embed", "decoder_pos_embed"} <= mae.no_weight_decay()  # frozen sin-cos tables: not in any group
    _check(mae, old_mae, {"cls_token", "mask_token", "encoder_mask_token"})
    plain = build_mae("mae_vit_tiny_patch16", img_size=32, patch_size=8, depth=1, embed_dim=32, num_heads=2, decoder_depth=1,
                      decoder_embed_dim=16, decoder_num_heads=2)
    assert "encoder_mask_token" not in plain.no_weight_decay()
    _check(plain, old_mae, {"cls_token", "mask_token"})

    for backbone in ("vitdet", "vitfpn"):
        det = build_detector(3, backbone=backbone, arch="tiny", embed_dim=32, depth=4, num_heads=2, patch_size=16,
                             image_size=64, pretrain_img_size=64, window_size=2, global_blocks=(3,))
        rel = {f"backbone.net.blocks.{i}.attn.rel_pos_{a}" for i in range(4) for a in "hw"}
        _check(det, ("pos_embed", "rel_pos_h", "rel_pos_w"), {"backbone.net.pos_embed"} | rel)

    seg = build_segmentor("tiny", 5, 32, 8, 0.0, 16, 8, embed_dim=32, depth=4, num_heads=2)
    tables = {f"backbone.blocks.{i}.attn.relative_position_bias_table" for i in range(4)}
    _check(seg, ("pos_embed", "cls_token", "relative_position_bias_table"), {"backbone.pos_embed", "backbone.cls_token"} | tables)
