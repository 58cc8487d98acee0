"""`engine.precision: auto` follows the device and the CPU's bf16 support; both kinds of CPU are tested here,
whichever this machine is."""
import pytest
import torch

from fastvit_pt.distributed import env


@pytest.mark.parametrize("native_bf16,expect", [(True, "bf16"), (False, "fp32")])
def test_auto_precision_follows_the_cpu(monkeypatch, native_bf16, expect):
    monkeypatch.setattr(env, "cpu_has_native_bf16", lambda: native_bf16)
    assert env.resolve_precision("auto", torch.device("cpu")) == expect
    assert env.resolve_precision("auto", torch.device("cuda")) == "bf16"  # no CUDA call is made to decide
    for pinned in ("fp32", "bf16"):
        assert env.resolve_precision(pinned, torch.device("cpu")) == pinned

