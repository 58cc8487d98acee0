"""`make setup` installs the whole stack, also the parts later issues build on; CI must find them."""
import importlib

import pytest


@pytest.mark.parametrize("module", ["torch", "torchvision", "timm", "nvidia.dali", "ffcv", "deepspeed", "numpy", "click"])
def test_stack_imports(module):
    importlib.import_module(module)
