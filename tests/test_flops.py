"""The one FLOP count every MFU uses, checked against the ViT arithmetic done by hand."""
import pytest
import torch

from fastvit_pt.config import Config
from fastvit_pt.flops import mfu, train_flops_per_image
from fastvit_pt.methods import build_standalone
from fastvit_pt.models import create_model
from pipelines.base import Batch, sample_seeds


def vit_macs(tokens: int, dim: int, depth: int) -> int:
    """Multiply-adds of `depth` pre-norm blocks on `tokens` tokens: qkv + proj + 4x MLP, plus QK^T and AV."""
    return depth * (12 * dim * dim * tokens + 2 * tokens * tokens * dim)


def _batch(n=4, size=224):
    return Batch(torch.randn(n, 3, size, size), torch.zeros(n, dtype=torch.long), sample_seeds(0, 0, range(n)))


def test_mae_tiny_flops_match_the_hand_count():
    method = build_standalone(Config())  # mae_vit_tiny_patch16, mask 0.75, decoder 96 x 1 (mae-lite)
    visible, patches, p3 = 49, 196, 16 * 16 * 3
    fwd = (patches * p3 * 192  # patch embedding, on every patch (before masking)
           + vit_macs(1 + visible, 192, 12)  # encoder on cls + visible patches
           + (1 + visible) * 192 * 96  # decoder embedding
           + vit_macs(1 + patches, 96, 1)  # decoder on all patches
           + (1 + patches) * 96 * p3)  # pixel prediction
    # training = forward + backward (2x); the image itself needs no gradient (no input-grad of the embedding)
    want = 2 * (3 * fwd - patches * p3 * 192)
    got = train_flops_per_image(method, _batch())
    assert abs(got - want) / want < 0.01, (got, want)


def test_vit_tiny_flops_match_the_hand_count_with_fused_attention():
    class Classify(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.vit = create_model("vit_tiny_patch16", num_classes=1000)  # sdpa: must still be counted

        def forward(self, b):
            return {"loss": self.vit(b.images).logsumexp(-1).mean()}

    fwd = 196 * 768 * 192 + vit_macs(197, 192, 12) + 192 * 1000
    want = 2 * (3 * fwd - 196 * 768 * 192)
    got = train_flops_per_image(Classify(), _batch())
    assert abs(got - want) / want < 0.01, (got, want)
    assert 7.3e9 < got < 7.6e9  # the usual "1.26 GMACs forward" ViT-Ti/16 figure, x3 for training


def test_mfu_arithmetic():
    assert mfu(1000.0, 2e9, 4e12) == 0.5
    assert mfu(None, 2e9, 4e12) is None and mfu(1000.0, 2e9, None) is None


@pytest.mark.parametrize("name,key", [
    ("NVIDIA H200", "H200"), ("NVIDIA H200 NVL", None), ("NVIDIA H100 80GB HBM3", "H100"),
    ("NVIDIA H100 PCIe", "H100 PCIe"), ("NVIDIA H100 NVL", None), ("NVIDIA A100-SXM4-80GB", "A100"),
    ("NVIDIA A100 80GB PCIe", "A100"), ("NVIDIA A10", None), ("NVIDIA GH200 480GB", None)])
def test_gpu_peaks_match_the_exact_part(name, key):
    """An H200 NVL (or H100 NVL, A10, GH200) is not the part whose datasheet peak the table holds."""
    from fastvit_pt.flops import gpu_peak_key

    assert gpu_peak_key(name) == key
