"""The k-NN monitor: DINO's weighted k-NN top-1 / top-5 of the backbone during pre-training, for any method (the
encoder's pooled pre-logit features; eval.path is scored against a fixed subset of the training images).

Each rank extracts its shard of the bank and of the queries; the shards are gathered so every rank scores the
whole set: the same numbers on 1 and W ranks where W divides the set sizes (shards are equal, `shard_indices`, so
the last n mod W query images are left out on W ranks; the count scored is logged). Training's RNG streams are put
back afterwards: a run with the monitor logs the same losses as one without, and resume stays exact. Its two
loaders live for the whole run (on DALI with a GPU: their pipelines' device memory too)."""
from __future__ import annotations

import contextlib
import time
from typing import Dict, Tuple

import torch

from ..config import Config
from ..distributed.env import DistEnv
from ..eval.knn import knn_predict, topk_accuracy
from .checkpoint import rng_state, set_rng_state
from .evaluate import build_eval_loader
from .metrics import Progress


@contextlib.contextmanager
def rng_untouched():
    """Put every global RNG a checkpoint records (python, numpy, torch CPU and CUDA) back after the block."""
    state = rng_state()
    try:
        yield
    finally:
        set_rng_state(state)


class KnnMonitor:
    """Built once before training (its two loaders, evaluation crops); `monitor(engine)` scores the backbone."""

    def __init__(self, cfg: Config, env: DistEnv, dtype: torch.dtype):
        e = cfg.eval
        self.env, self.k, self.temperature, self.micro_batch = env, cfg.knn.k, cfg.knn.temperature, e.micro_batch

        def loader(path: str, shuffle: bool):
            return build_eval_loader(cfg, env, dtype, path, shuffle)

        with rng_untouched():  # building a loader must not draw from training's streams either
            # the bank: epoch 0 of a shuffled read is a permutation of train.seed; rank r holds its entries r, r+W, ...
            self.bank = loader(e.knn_train or cfg.data.path, shuffle=True)
            self.queries = loader(e.path, shuffle=False)
        shard = self.bank.num_samples // env.world_size  # shard_indices: every rank's shard is this long
        n = e.knn_train_samples // env.world_size
        self.bank_per_rank = shard if e.knn_train_samples == 0 else min(shard, n)
        if self.bank_per_rank == 0:
            raise ValueError(f"eval.knn_train_samples={e.knn_train_samples} leaves no bank image on each of "
                             f"{env.world_size} ranks")
        bc, qc = list(self.bank.classes), list(self.queries.classes)
        if bc and qc and bc != qc:  # labels are class indices: the same folder names in the same order
            raise ValueError(f"k-NN monitor: the bank ({'eval.knn_train' if e.knn_train else 'data.path'}: {len(bc)} "
                             f"classes) and the queries (eval.path: {len(qc)} classes) name different classes, so "
                             "their labels would not match: "
                             f"{sorted(set(bc) ^ set(qc))[:5] or 'the same names in another order'}")
        self.num_classes = max(len(bc), len(qc))

    @torch.no_grad()
    def features(self, engine, desc: str = "knn") -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(bank [B, D], bank labels [B], queries [Q, D], query labels [Q]) over all ranks, float32 on the host,
        in the order one rank would read them."""
        bank_batches = -(-self.bank_per_rank // self.micro_batch)
        enc = engine.method.encoder()
        modes = [m.training for m in enc.modules()]
        enc.eval()
        bar = Progress(self.env.is_main, bank_batches + len(self.queries), desc)
        try:
            with rng_untouched():
                self.bank.set_epoch(0)  # the same subset at every score
                xb, yb = self._extract(engine, enc, self.bank, bank_batches, bar)
                xq, yq = self._extract(engine, enc, self.queries, len(self.queries), bar)
        finally:
            bar.close()
            for m, mode in zip(enc.modules(), modes):
                m.training = mode
        xb, yb = xb[:self.bank_per_rank], yb[:self.bank_per_rank]
        return (*self._gather(xb, yb), *self._gather(xq, yq))

    def _extract(self, engine, enc, loader, batches: int, bar: Progress):
        feats, labels = [], []
        for i, batch in enumerate(loader):
            if i >= batches:
                break
            with engine.autocast, engine.kernels():
                f = enc.forward_head(enc.forward_features(batch.images), pre_logits=True)
            feats.append(f.float())
            labels.append(batch.labels)
            bar.update(1)
        if not feats:
            raise ValueError("k-NN monitor: a loader yielded no images")
        return torch.cat(feats), torch.cat(labels)

    def _gather(self, x: torch.Tensor, y: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Every rank's shard (equally long), interleaved back into the one-rank order: rank r read entries
        r, r + W, r + 2W, ... of the set's order."""
        if self.env.distributed:
            w = self.env.world_size
            xs, ys = [torch.empty_like(x) for _ in range(w)], [torch.empty_like(y) for _ in range(w)]
            torch.distributed.all_gather(xs, x.contiguous())
            torch.distributed.all_gather(ys, y.contiguous())
            x, y = torch.stack(xs, dim=1).flatten(0, 1), torch.stack(ys, dim=1).flatten()
        return x.cpu(), y.cpu()

    def __call__(self, engine, desc: str = "knn") -> Dict[str, float]:
        """{"knn_top1": %, "knn_top5": %, "bank": images, "queries": images, "seconds": wall time}."""
        tic = time.perf_counter()
        xb, yb, xq, yq = self.features(engine, desc)
        n_classes = max(self.num_classes, int(yb.max()) + 1, int(yq.max()) + 1)
        acc = topk_accuracy(knn_predict(xb, yb, xq, n_classes, self.k, self.temperature), yq)
        return {"knn_top1": acc["top1"], "knn_top5": acc["top5"], "bank": len(yb), "queries": len(yq),
                "seconds": round(time.perf_counter() - tic, 2)}
