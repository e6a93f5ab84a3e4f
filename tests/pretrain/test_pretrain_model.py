"""MAE model: the official computation, names and checkpoint variants."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from maecore.convert import infer_arch, load_weights
from maecore.errors import UserError
from maecore.models.pos_embed import get_2d_sincos_pos_embed
from pretrain.model import (
    MaskedAutoencoderViT,
    block_noise,
    build_mae,
    grid_noise,
    patchify,
    random_masking,
    unpatchify,
)


def tiny(**kw) -> MaskedAutoencoderViT:
    cfg = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4, decoder_embed_dim=32,
               decoder_depth=2, decoder_num_heads=4)
    cfg.update(kw)
    torch.manual_seed(0)
    return MaskedAutoencoderViT(**cfg)


def test_sincos_matches_formula():
    d, gh, gw = 16, 3, 5
    emb = get_2d_sincos_pos_embed(d, (gh, gw), cls_token=True)
    assert emb.shape == (1 + gh * gw, d)
    assert np.all(emb[0] == 0)
    q = d // 4
    omega = [1.0 / 10000 ** (k / q) for k in range(q)]
    for i in range(gh):
        for j in range(gw):
            row = emb[1 + i * gw + j]
            want_w = [math.sin(j * o) for o in omega] + [math.cos(j * o) for o in omega]
            want_h = [math.sin(i * o) for o in omega] + [math.cos(i * o) for o in omega]
            np.testing.assert_allclose(row[: d // 2], want_w, atol=1e-12)  # first half: column (w)
            np.testing.assert_allclose(row[d // 2 :], want_h, atol=1e-12)


def test_model_tables_are_the_formula_and_frozen():
    m = tiny()
    want = torch.from_numpy(get_2d_sincos_pos_embed(64, 4, cls_token=True)).float()
    assert torch.equal(m.pos_embed[0], want)
    assert torch.equal(m.decoder_pos_embed[0], torch.from_numpy(get_2d_sincos_pos_embed(32, 4, True)).float())
    assert not m.pos_embed.requires_grad and not m.decoder_pos_embed.requires_grad


@pytest.mark.parametrize("hw", [(32, 32), (24, 40)])
def test_patchify_roundtrip_and_layout(hw):
    x = torch.randn(2, 3, *hw)
    p = patchify(x, 8)
    assert p.shape == (2, (hw[0] // 8) * (hw[1] // 8), 8 * 8 * 3)
    assert torch.equal(unpatchify(p, 8, (hw[0] // 8, hw[1] // 8)), x)
    # (h, w, p, q, c) layout: patch (0, 1), pixel row 2, col 3, channel 1
    assert p[0, 1, (2 * 8 + 3) * 3 + 1] == x[0, 1, 2, 8 + 3]


def test_random_masking_semantics():
    x = torch.arange(2 * 16 * 1, dtype=torch.float).view(2, 16, 1)
    noise = torch.rand(2, 16, generator=torch.Generator().manual_seed(1))
    kept, mask, ids_restore, ids_keep = random_masking(x, 0.75, noise)
    assert kept.shape == (2, 4, 1) and mask.sum().item() == 2 * 12
    for n in range(2):
        lowest = torch.argsort(noise[n])[:4]
        assert torch.equal(ids_keep[n], lowest)
        assert torch.equal(kept[n, :, 0], x[n, lowest, 0])
        assert set(torch.nonzero(mask[n] == 0).flatten().tolist()) == set(lowest.tolist())


def test_mask_generators_ratios():
    grid = (8, 8)
    g = grid_noise(3, grid)
    _, mask, _, ids_keep = random_masking(torch.zeros(3, 64, 1), 0.75, g)
    want = {i * 8 + j for i in range(0, 8, 2) for j in range(0, 8, 2)}
    for n in range(3):
        assert set(ids_keep[n].tolist()) == want
    b = block_noise(4, grid, 0.75, generator=np.random.default_rng(0))
    _, mask, _, _ = random_masking(torch.zeros(4, 64, 1), 0.75, b)
    assert torch.all(mask.sum(1) == 48)
    # block masks are made of rectangles: masked patches have masked neighbours
    blocky = (b >= 1).view(4, 8, 8)
    assert blocky.sum().item() >= 4 * 40
    m = tiny(mask_type="random")
    for mt in ("random", "block", "grid"):
        m.mask_type = mt
        assert m.make_noise(2, (4, 4), 0.75, torch.device("cpu")).shape == (2, 16)


def test_per_sample_independent_of_batch():
    m = tiny(norm_pix_loss=True).eval()
    g = torch.Generator().manual_seed(0)
    a, b, c = (torch.randn(1, 3, 32, 32, generator=g) for _ in range(3))
    na, nb, nc = (torch.rand(1, 16, generator=g) for _ in range(3))
    with torch.no_grad():
        _, p1, m1 = m(torch.cat([a, b]), noise=torch.cat([na, nb]))
        _, p2, m2 = m(torch.cat([c, a, b]), noise=torch.cat([nc, na, nb]))
    torch.testing.assert_close(p1[0], p2[1], rtol=0, atol=1e-5)
    assert torch.equal(m1[0], m2[1])


def test_loss_is_mse_on_masked_normalised_patches():
    m = tiny(norm_pix_loss=True).eval()
    x = torch.randn(2, 3, 32, 32)
    noise = torch.rand(2, 16)
    with torch.no_grad():
        loss, pred, mask = m(x, noise=noise)
    t = patchify(x, 8)
    t = (t - t.mean(-1, keepdim=True)) / (t.var(-1, unbiased=True, keepdim=True) + 1e-6) ** 0.5
    per_patch = ((pred - t) ** 2).mean(-1)
    torch.testing.assert_close(loss, (per_patch * mask).sum() / mask.sum())


def test_encoder_mask_tokens_variant_runs():
    m = tiny(encoder_mask_tokens=True)
    loss, pred, mask = m(torch.randn(2, 3, 32, 32))
    loss.backward()
    assert m.encoder_mask_token.grad is not None and pred.shape == (2, 16, 192)


def official_keys(depth: int, decoder_depth: int) -> set[str]:
    """The key set of the official MAE release, written out from its published structure."""
    block = ["norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight", "attn.proj.bias",
             "norm2.weight", "norm2.bias", "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias"]
    keys = {"cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias", "norm.weight", "norm.bias",
            "mask_token", "decoder_embed.weight", "decoder_embed.bias", "decoder_pos_embed", "decoder_norm.weight",
            "decoder_norm.bias", "decoder_pred.weight", "decoder_pred.bias"}
    keys |= {f"blocks.{i}.{b}" for i in range(depth) for b in block}
    keys |= {f"decoder_blocks.{j}.{b}" for j in range(decoder_depth) for b in block}
    return keys


def test_official_key_set_and_checkpoint_variants():
    m = tiny()
    assert set(m.state_dict()) == official_keys(2, 2)
    src = tiny()
    torch.nn.init.normal_(src.blocks[0].attn.qkv.weight)
    full = {k: v.clone() for k, v in src.state_dict().items()}
    # `_full` / `visualize` releases: everything, strictly
    dst = tiny()
    assert sorted(load_weights(dst, full, "mae").added) == []
    assert torch.equal(dst.blocks[0].attn.qkv.weight, src.blocks[0].attn.qkv.weight)
    dst.load_state_dict(full, strict=True)
    # encoder-only release: no decoder, no mask token; the rest loads, decoder keys reported
    enc = {k: v for k, v in full.items() if not k.startswith(("decoder_", "mask_token"))}
    left = sorted(load_weights(tiny(), enc, "mae").added)
    assert left and all(k.startswith(("decoder_", "mask_token")) for k in left)
    with pytest.raises(UserError, match="unknown keys"):
        load_weights(tiny(), {**full, "head.weight": torch.zeros(3)}, "mae")
    with pytest.raises(UserError, match="lacks encoder keys"):
        load_weights(tiny(), {k: v for k, v in full.items() if k != "norm.weight"}, "mae")
    with pytest.raises(UserError, match="shape mismatch"):
        load_weights(tiny(), {**full, "norm.weight": torch.zeros(3)}, "mae")


def test_infer_config_and_pos_resampling():
    m = tiny()
    cfg = infer_arch(m.state_dict()).mae_kwargs()
    assert cfg["embed_dim"] == 64 and cfg["depth"] == 2 and cfg["patch_size"] == 8 and cfg["img_size"] == 32
    assert cfg["decoder_depth"] == 2 and cfg["decoder_embed_dim"] == 32
    big = MaskedAutoencoderViT(**{**cfg, "img_size": 48, "num_heads": 4, "decoder_num_heads": 4})
    load_weights(big, m.state_dict(), "mae")  # 4x4 tables resampled to 6x6
    assert big.pos_embed.shape == (1, 37, 64)


def test_builders_and_sizes():
    with torch.device("meta"):
        for name, dim, depth, patch in [("mae_vit_base_patch16", 768, 12, 16), ("mae_vit_large_patch16", 1024, 24, 16),
                                        ("mae_vit_huge_patch14", 1280, 32, 14)]:
            m = build_mae(name)
            assert (m.embed_dim, m.depth, m.patch_size) == (dim, depth, patch)
            assert m.decoder_embed.out_features == 512 and len(m.decoder_blocks) == 8
    with pytest.raises(ValueError):
        build_mae("mae_vit_giant")


def test_wrong_image_size_is_a_clear_error():
    m = tiny()
    with pytest.raises(ValueError, match="multiple of the patch size"):
        m(torch.randn(1, 3, 30, 32))
