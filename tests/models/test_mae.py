"""Masking, patchify, position embedding and the loss, checked against their definitions."""
import math

import numpy as np
import pytest
import torch

from fastvit_pt.models import create_model, num_visible, patchify, random_masking, unpatchify
from fastvit_pt.models.mae import mae_loss
from fastvit_pt.models.vit import sincos_pos_embed_2d


# (L, r, kept): facebookresearch/mae's and mae-lite's `len_keep = int(L * (1 - mask_ratio))` worked by hand;
# rounding instead would keep one patch more in the rows marked *
@pytest.mark.parametrize("L,r,kept", [(196, 0.75, 49), (49, 0.75, 12), (196, 0.9, 19), (196, 0.7, 58),
                                      (49, 0.6, 19), (49, 0.7, 14), (49, 0.9, 4), (64, 0.9, 6), (10, 0.33, 6),
                                      (4, 0.5, 2)])
def test_masking_keeps_the_reference_count_and_restore_inverts(L, r, kept):
    torch.manual_seed(0)
    x = torch.randn(3, L, 8)
    vis, mask, ids_restore, ids_shuffle = random_masking(x, r)
    keep = kept
    assert num_visible(L, r) == keep
    assert vis.shape == (3, keep, 8)
    assert (mask.sum(1) == L - keep).all()
    assert torch.equal(torch.gather(ids_shuffle, 1, ids_restore), torch.arange(L).expand(3, L))
    # the visible tokens are x at ids_shuffle[:keep], in that order, and exactly the unmasked positions
    for n in range(3):
        kept = ids_shuffle[n, :keep]
        torch.testing.assert_close(vis[n], x[n, kept])
        assert set(kept.tolist()) == set(torch.nonzero(mask[n] == 0).flatten().tolist())


def test_external_ids_shuffle_is_reused():
    torch.manual_seed(0)
    m = create_model("mae_vit_test", img_size=32, patch_size=8)
    imgs = torch.randn(2, 3, 32, 32)
    a = m.forward_encoder(imgs, 0.75)
    b = m.forward_encoder(imgs, 0.75, ids_shuffle=a.ids_shuffle)
    assert torch.equal(a.ids_shuffle, b.ids_shuffle) and torch.equal(a.mask, b.mask)
    torch.testing.assert_close(a.latent, b.latent)
    with pytest.raises(ValueError, match="ids_shuffle has shape"):
        m.forward_encoder(imgs, 0.75, ids_shuffle=a.ids_shuffle[:, :5])


def test_patchify_round_trip_and_layout():
    imgs = torch.randn(2, 3, 32, 32)
    p = patchify(imgs, 8)
    assert p.shape == (2, 16, 8 * 8 * 3)
    torch.testing.assert_close(unpatchify(p, 8, 3), imgs)
    # patch 5 is grid row 1, column 1; its first entry is pixel (8, 8), channels last
    torch.testing.assert_close(p[0, 5, :3], imgs[0, :, 8, 8])


def test_loss_ignores_visible_patches():
    torch.manual_seed(0)
    pred, target = torch.randn(2, 16, 12), torch.randn(2, 16, 12)
    mask = torch.zeros(2, 16)
    mask[:, ::2] = 1
    base = mae_loss(pred, target, mask, norm_pix=True)
    changed_visible = pred.clone()
    changed_visible[:, 1::2] += 100.0
    assert mae_loss(changed_visible, target, mask, norm_pix=True) == base
    changed_masked = pred.clone()
    changed_masked[:, ::2] += 1.0
    assert mae_loss(changed_masked, target, mask, norm_pix=True) != base


def test_norm_pix_as_defined():
    torch.manual_seed(0)
    pred, target = torch.randn(1, 3, 5), torch.randn(1, 3, 5) * 4 + 2
    mask = torch.tensor([[1.0, 0.0, 1.0]])
    got = mae_loss(pred, target, mask, norm_pix=True)
    want = 0.0
    for i in (0, 2):
        t = target[0, i].numpy().astype(np.float64)
        tn = (t - t.mean()) / math.sqrt(t.var(ddof=1) + 1e-6)  # torch.var is unbiased, as in MAE
        want += ((pred[0, i].numpy() - tn) ** 2).mean()
    assert got.item() == pytest.approx(want / 2, rel=1e-5)
    raw = mae_loss(pred, target, mask, norm_pix=False)
    assert raw.item() == pytest.approx(((pred - target) ** 2).mean(-1)[0, [0, 2]].mean().item(), rel=1e-6)


def test_sincos_pos_embed_matches_mae_formula():
    dim, grid = 16, 4
    emb = sincos_pos_embed_2d(dim, grid)
    assert emb.shape == (1 + grid * grid, dim) and torch.all(emb[0] == 0)
    # token at row h=1, column w=2 (index 1 + 1*4 + 2): first half encodes w, second half h
    omega = 1.0 / 10000 ** (np.arange(dim // 4) / (dim / 4))
    w, h = 2.0, 1.0
    want = np.concatenate([np.sin(w * omega), np.cos(w * omega), np.sin(h * omega), np.cos(h * omega)])
    np.testing.assert_allclose(emb[1 + 1 * grid + 2].numpy(), want, rtol=1e-6, atol=1e-7)
    m = create_model("mae_vit_test", img_size=32, patch_size=8)
    assert not m.encoder.pos_embed.requires_grad and not m.decoder_pos_embed.requires_grad


def test_keyed_shuffle_is_a_uniform_permutation_fixed_by_the_key():
    from fastvit_pt.models.mae import keyed_shuffle

    keys = torch.arange(20000, dtype=torch.int64) * 0x9E3779B97F4A7C1 % (2**63 - 1)
    p = keyed_shuffle(keys, 49)
    assert torch.equal(p.sort(dim=1).values, torch.arange(49).expand(20000, -1))  # each row a permutation
    assert torch.equal(keyed_shuffle(keys[7:9], 49), p[7:9])  # a row depends on its key alone, not the batch
    assert not torch.equal(p[0], p[1])
    # each patch is kept (among the first 12 of 49) with probability 12/49, within 4 standard errors
    kept = torch.zeros(20000, 49).scatter_(1, p[:, :12], 1.0).mean(0)
    se = (12 / 49 * (1 - 12 / 49) / 20000) ** 0.5
    assert (kept - 12 / 49).abs().max() < 4 * se
