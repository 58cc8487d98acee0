"""Resident memory of N ranks on one node reading the same .beton (issue 14, item 5).

Each rank is its own process (as under torchrun) building the ffcv backend for (rank, world) and reading
--epochs epochs; it then reports its memory from /proc/self/smaps_rollup: RSS (what `top` shows, shared pages
counted in full by every process), PSS (shared pages split between the processes that map them: summed over
ranks, the node's real cost), and their file-backed / anonymous parts. The .beton is dropped from the page
cache first (POSIX_FADV_DONTNEED), so the file pages counted are the ones this run brought in.

    python benchmarks/loader_memory.py /tmp/prof/tree500.beton --ranks 1 2 --json out.json
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

FIELDS = ("Rss", "Pss", "Anonymous", "beton_Rss", "beton_Pss")


def smaps(beton: str) -> dict:
    """The process's Rss, Pss and anonymous memory, and the Rss / Pss of its mappings of the .beton, in MiB."""
    out = {}
    for line in Path("/proc/self/smaps_rollup").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in FIELDS:
            out[key] = int(rest.split()[0]) / 1024  # kB -> MiB
    out["beton_Rss"] = out["beton_Pss"] = 0.0
    target, inside = os.path.realpath(beton), False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()
        if head and "-" in head[0] and len(head) >= 5 and ":" not in head[0]:  # a mapping's header line
            inside = len(head) >= 6 and os.path.realpath(head[-1]) == target
        elif inside and head and head[0] in ("Rss:", "Pss:"):
            out["beton_" + head[0][:-1]] += int(head[1]) / 1024
    return out


def _rank(beton: str, rank: int, world: int, epochs: int, os_cache: bool, barrier, queue) -> None:
    import torch

    from pipelines import PipelineConfig, build_loader

    torch.set_num_threads(1)
    cfg = PipelineConfig(backend="ffcv", path=beton, workers=1, ffcv_os_cache=os_cache)
    loader = build_loader(cfg, img_size=224, batch_size=64, rank=rank, world_size=world, seed=0,
                          dtype=torch.bfloat16)
    base = smaps(beton)
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        for _ in loader:
            pass
    barrier.wait()  # every rank has mapped and read its shard before anyone measures
    queue.put({"rank": rank, "before_reading": base, "after": smaps(beton)})
    barrier.wait()  # and nobody exits (unmapping its pages) before everyone has measured


def run(beton: str, world: int, epochs: int, os_cache: bool) -> dict:
    fd = os.open(beton, os.O_RDONLY)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    os.close(fd)
    ctx = mp.get_context("spawn")
    barrier, queue = ctx.Barrier(world), ctx.Queue()
    procs = [ctx.Process(target=_rank, args=(beton, r, world, epochs, os_cache, barrier, queue)) for r in range(world)]
    for p in procs:
        p.start()
    ranks = sorted((queue.get() for _ in procs), key=lambda r: r["rank"])
    for p in procs:
        p.join()
    total = {k: round(sum(r["after"][k] for r in ranks), 1) for k in FIELDS}
    return {"ranks": world, "os_cache": os_cache, "per_rank": ranks, "sum_over_ranks_mib": total}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("beton")
    ap.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    size = Path(a.beton).stat().st_size / 2**20
    results = []
    for os_cache in (True, False):
        for world in a.ranks:
            r = run(a.beton, world, a.epochs, os_cache)
            results.append(r)
            t = r["sum_over_ranks_mib"]
            print(f"os_cache={os_cache!s:5s} ranks={world}: summed over ranks RSS {t['Rss']:7.1f} MiB, PSS "
                  f"{t['Pss']:7.1f}, anonymous {t['Anonymous']:7.1f}; the .beton's mapping RSS {t['beton_Rss']:6.1f}, "
                  f"PSS {t['beton_Pss']:6.1f} (file {size:.1f} MiB)", flush=True)
    out = {"beton": a.beton, "beton_mib": round(size, 1), "epochs": a.epochs, "results": results,
           "cpu": platform.processor() or platform.machine(), "python": platform.python_version()}
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
