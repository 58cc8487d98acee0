"""Linear CKA against its definition: the unbiased HSIC equals Song et al.'s U-statistic summed by brute force,
CKA is 1 for a representation against itself and invariant to what it should be invariant to (an orthogonal
transform, an isotropic scaling) but not to an anisotropic scaling; the representations read are mae-lite's."""
from __future__ import annotations

import itertools

import pytest
import torch

from fastvit_pt.analysis.cka import MinibatchCKA, gram, hsic_unbiased, layer_representations, linear_cka
from fastvit_pt.models import create_model


def _hsic_by_quadruples(K: torch.Tensor, L: torch.Tensor) -> float:
    """Song et al. 2012, eq. 4: the mean over ordered distinct quadruples (i, j, q, r) of
    h = 1/4! sum over their permutations (s, t, u, v) of k_st l_st + k_st l_uv - 2 k_st l_su."""
    n = K.shape[0]
    total, count = 0.0, 0
    for quad in itertools.permutations(range(n), 4):
        h = 0.0
        for s, t, u, v in itertools.permutations(quad):
            h += K[s, t] * L[s, t] + K[s, t] * L[u, v] - 2 * K[s, t] * L[s, u]
        total += h / 24
        count += 1
    return float(total / count)


def test_unbiased_hsic_equals_the_u_statistic_by_brute_force():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(6, 5, generator=g, dtype=torch.float64), torch.randn(6, 3, generator=g, dtype=torch.float64)
    y = y + x[:, :3]  # dependent, so HSIC is clearly non-zero
    K, L = gram(x), gram(y)
    got = hsic_unbiased(K[None], L[None])[0, 0].item()
    assert got == pytest.approx(_hsic_by_quadruples(K, L), rel=1e-9)
    assert got > 0.1


def test_cka_is_one_against_itself_and_invariant_to_rotation_and_isotropic_scale():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(40, 7, 6, generator=g)  # 40 images, 7 tokens, 6 channels
    q, _ = torch.linalg.qr(torch.randn(6, 6, generator=g, dtype=torch.float64))
    rotated = (x.double() @ q).float()
    assert linear_cka(x, x) == pytest.approx(1.0, abs=1e-9)
    assert linear_cka(x, rotated) == pytest.approx(1.0, abs=1e-6)
    y = torch.randn(40, 7, 4, generator=g) + x[..., :4]
    assert linear_cka(x, 3.7 * y) == pytest.approx(linear_cka(x, y), abs=1e-6)
    assert linear_cka(rotated, y) == pytest.approx(linear_cka(x, y), abs=1e-6)
    # not invariant to an anisotropic scaling (the test can fail)
    squash = x * torch.tensor([10.0, 1, 1, 1, 1, 0.1])
    assert abs(linear_cka(x, squash) - 1.0) > 0.05


def test_minibatch_cka_averages_hsic_over_batches_for_every_layer_pair():
    g = torch.Generator().manual_seed(2)
    a = [torch.randn(24, 5, generator=g) for _ in range(3)]
    b = [torch.randn(24, 4, generator=g) + a[1][:, :4] for _ in range(2)]
    acc = MinibatchCKA(3, 2)
    halves = [slice(0, 12), slice(12, 24)]
    for s in halves:
        acc.update([f[s] for f in a], [f[s] for f in b])
    got = acc.value()
    for i, j in itertools.product(range(3), range(2)):
        h = lambda u, v: sum(hsic_unbiased(gram(u[s])[None], gram(v[s])[None])[0, 0] for s in halves)  # noqa: E731
        assert got[i, j].item() == pytest.approx((h(a[i], b[j]) / (h(a[i], a[i]) * h(b[j], b[j])).sqrt()).item())
    assert got[1, 0] > got[0, 0] + 0.2  # b shares a[1]'s channels
    with pytest.raises(ValueError, match="at least 4 images"):
        hsic_unbiased(gram(a[0][:3])[None], gram(a[0][:3])[None])


def test_layer_representations_are_what_mae_lites_repcatcher_hooks():
    """RepCatcher hooks block i's norm1 for i < depth and reads the final norm after the last block, CLS dropped."""
    torch.manual_seed(0)
    vit = create_model("vit_test", img_size=28, patch_size=4, num_classes=0).eval()
    caught = {}
    for i, blk in enumerate(vit.blocks):
        blk.norm1.register_forward_hook(lambda m, inp, out, i=i: caught.__setitem__(i, out))
    vit.norm.register_forward_hook(lambda m, inp, out: caught.__setitem__(vit.depth, out))
    x = torch.randn(3, 3, 28, 28)
    reps = layer_representations(vit, x)
    assert len(reps) == vit.depth + 1
    for i, r in enumerate(reps):
        torch.testing.assert_close(r, caught[i][:, 1:])
        assert r.shape == (3, 49, 32)
