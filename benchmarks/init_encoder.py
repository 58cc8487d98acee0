"""Export the encoder a recipe's method starts from (its own initialisation, the run's seed) as a backbone file,
so `fastvit knn` can score the starting point of a pre-training run.
    python benchmarks/init_encoder.py recipes/demo/dino_fmnist.yaml runs/init_dino.pt"""
from __future__ import annotations

import sys

import torch

from fastvit_pt.config import load_config
from fastvit_pt.engine.loop import seed_everything
from fastvit_pt.methods import build_standalone


def main() -> None:
    recipe, out = sys.argv[1], sys.argv[2]
    cfg = load_config(recipe, [])
    seed_everything(cfg.train.seed)  # rank 0's seed, as a run seeds itself before building its method
    method = build_standalone(cfg, num_classes=10)
    torch.save({k: v.detach().float() for k, v in method.encoder().state_dict().items()}, out)
    print(f"{cfg.method.name}'s initial encoder ({cfg.model.name}): {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
