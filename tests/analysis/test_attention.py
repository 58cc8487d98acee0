"""Attention distance and entropy against hand computations on constructed attention maps."""
from __future__ import annotations

import math

import pytest
import torch

from fastvit_pt.analysis.attention import (AttentionStats, attention_distance, attention_entropy, encoder_attention,
                                           patch_attention, patch_distances)
from fastvit_pt.models import create_model


def test_patch_distances_are_pixel_distances_between_centres():
    d = patch_distances(2, 16)  # patches (0,0) (0,1) (1,0) (1,1), row-major
    torch.testing.assert_close(d[0], torch.tensor([0.0, 16.0, 16.0, 16 * math.sqrt(2)], dtype=torch.float64))
    assert torch.equal(d, d.T)


def test_uniform_identity_and_local_attention_by_hand():
    grid, p = 3, 4
    L = grid * grid
    d = patch_distances(grid, p)
    uniform = torch.full((1, 1, L, L), 1.0 / L, dtype=torch.float64)
    # uniform: every query's distance is the mean of its row of distances; entropy log L
    by_hand = sum(sum(math.dist(divmod(q, grid), divmod(k, grid)) * p for k in range(L)) / L for q in range(L)) / L
    assert attention_distance(uniform, d).item() == pytest.approx(by_hand)
    assert attention_entropy(uniform).item() == pytest.approx(math.log(L))
    identity = torch.eye(L, dtype=torch.float64)[None, None]
    assert attention_distance(identity, d).item() == 0.0 and attention_entropy(identity).item() == 0.0
    # local: each query splits its attention between itself and its right neighbour (itself alone in the last
    # column): distance 0.5 * p for the 6 queries with a neighbour, 0 for 3; entropy log 2 for those 6
    local = torch.zeros(1, 1, L, L, dtype=torch.float64)
    for q in range(L):
        if q % grid < grid - 1:
            local[0, 0, q, q] = local[0, 0, q, q + 1] = 0.5
        else:
            local[0, 0, q, q] = 1.0
    assert attention_distance(local, d).item() == pytest.approx(6 * 0.5 * p / 9)
    assert attention_entropy(local).item() == pytest.approx(6 * math.log(2) / 9)


def test_cls_is_excluded_and_the_patch_block_renormalised():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 5, 5, generator=g)
    logits[..., 0] = 50.0  # every query would attend to CLS alone
    a = patch_attention(logits)
    assert a.shape == (2, 3, 4, 4)
    torch.testing.assert_close(a.sum(-1), torch.ones(2, 3, 4, dtype=torch.float64))
    torch.testing.assert_close(a, logits[:, :, 1:, 1:].double().softmax(-1))


def test_stats_of_an_encoder_average_its_images():
    torch.manual_seed(0)
    vit = create_model("vit_test", img_size=28, patch_size=4, num_classes=0).eval()
    x = torch.randn(6, 3, 28, 28)
    stats = AttentionStats(vit.depth, vit.num_heads, 7, 4)
    stats.update(encoder_attention(vit, x[:4]))
    stats.update(encoder_attention(vit, x[4:]))
    res = stats.result()
    logits = encoder_attention(vit, x)
    assert sorted(logits) == [0, 1] and logits[0].shape == (6, 2, 50, 50)
    for i in range(vit.depth):
        a = patch_attention(logits[i])
        torch.testing.assert_close(torch.tensor(res["distance_px"][i], dtype=torch.float64),
                                   attention_distance(a, patch_distances(7, 4)).mean(0))
        torch.testing.assert_close(torch.tensor(res["entropy"][i], dtype=torch.float64), attention_entropy(a).mean(0))
    assert all(0 < e < math.log(49) + 1e-9 for row in res["entropy"] for e in row)
