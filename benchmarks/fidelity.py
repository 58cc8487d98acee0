"""The loss of one fixed batch under the code on PYTHONPATH, for issue 17's three fidelity changes; run it on the
tree before the change and after it, then `--table` the two JSON files:

    git worktree add /tmp/before <commit before>
    PYTHONPATH=/tmp/before python benchmarks/fidelity.py --mae runs/analysis/mae --teacher runs/analysis/teacher \
        --data data/fmnist/test --json runs/analysis/fidelity_before.json
    python benchmarks/fidelity.py ... --json runs/analysis/fidelity_after.json
    python benchmarks/fidelity.py --table runs/analysis/fidelity_before.json runs/analysis/fidelity_after.json

The batch: the first 64 evaluation crops of --data in file order (`data.workers=0`), each masked by its own key
(keyed_shuffle), so both trees see the same images and the same patch order.
1. visible patches: the trained MAE's loss at mask ratios 0.6, 0.7, 0.75 and 0.9 (49 patches).
2. hidden distillation: D-MAE's loss_hidden for the representations after 6 and 12 blocks (the old code's block
   indices 5 and 11: the raw block output through a Linear with bias; the new: through the LayerNorm mae-lite
   reads, a Linear without bias), adapters drawn from seed 0.
3. the attention adapter's start: D-MAE's loss_attn with the adapter as initialised (seed 0): the old code's
   identity, the new (Conv2d's own, mae-lite's); the new tree reports both (the identity set by hand).
"""
from __future__ import annotations

import argparse
import json
import sys


def measure(args) -> dict:
    import torch

    import fastvit_pt
    import pipelines
    from fastvit_pt.config import config_from_dict
    from fastvit_pt.engine.backbone import load_backbone
    from fastvit_pt.engine.checkpoint import load_checkpoint, method_state_dict, resolve_checkpoint
    from fastvit_pt.methods.dmae import DMAE
    from fastvit_pt.models import create_model
    from fastvit_pt.models.mae import keyed_shuffle, num_visible

    torch.set_num_threads(max(1, torch.get_num_threads()))
    path = resolve_checkpoint(args.mae)
    state = load_checkpoint(path)
    cfg = config_from_dict(state["config"])
    m = cfg.model

    def student():
        mae = create_model(m.name, img_size=m.img_size, patch_size=m.patch_size, attn_impl="math")
        mae.load_state_dict({k.removeprefix("model."): v.float() for k, v in method_state_dict(path, state).items()})
        return mae.eval()

    cfg.data.path, cfg.data.backend, cfg.data.workers = args.data, "torchvision", 0
    loader = pipelines.build_loader(cfg.data, img_size=m.img_size, batch_size=64, train=False, drop_last=False)
    batch = next(iter(loader))
    imgs = batch.images.float()
    L = (m.img_size // m.patch_size) ** 2
    ids = keyed_shuffle(batch.keys, L)
    out = {"code": fastvit_pt.__file__, "images": int(imgs.shape[0]), "patches": L, "mae": {}}
    mae = student()
    with torch.no_grad():
        for r in (0.6, 0.7, 0.75, 0.9):
            loss, _, mask = mae(imgs, r, ids)
            out["mae"][str(r)] = {"visible": num_visible(L, r), "loss": round(loss.item(), 5)}

    teacher = create_model(args.teacher_model, img_size=m.img_size, patch_size=m.patch_size, num_classes=0,
                           attn_impl="math")
    load_backbone(teacher, args.teacher)
    new = hasattr(teacher, "hidden_norm")  # the tree after the change
    hidden = [6, 12] if new else [5, 11]  # the same representations: after 6 and 12 blocks

    def dmae(identity: bool = False):
        torch.manual_seed(0)
        method = DMAE(student(), teacher, 0.75, hidden_layers=hidden).eval()
        with torch.no_grad():
            if identity:  # the old start, head to head
                h = method.adapter.weight.shape[0]
                method.adapter.weight.copy_(torch.eye(h).view(h, h, 1, 1))
            res = method(batch)
        return {k: round(v.item(), 5) for k, v in res.items()}

    out["hidden_layers"] = hidden
    out["dmae"] = {"identity": dmae(identity=True), "default": dmae()} if new else {"identity": dmae()}
    return out


def table(before: dict, after: dict) -> str:
    lines = ["| change | quantity | before | after |", "|---|---|---:|---:|"]
    for r, a in after["mae"].items():
        b = before["mae"][r]
        lines.append(f"| visible patches, mask {r} | kept of {after['patches']} / MAE loss | {b['visible']} / {b['loss']:.4f} "
                     f"| {a['visible']} / {a['loss']:.4f} |")
    b, a = before["dmae"]["identity"], after["dmae"]["default"]
    lines.append(f"| hidden distillation (after 6 and 12 blocks) | loss_hidden | {b['loss_hidden']:.4f} | "
                 f"{after['dmae']['identity']['loss_hidden']:.4f} |")
    lines.append(f"| attention adapter init (identity -> Conv2d default) | loss_attn | {b['loss_attn']:.4f} | "
                 f"{a['loss_attn']:.4f} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mae", help="A trained MAE run (the student, and the MAE loss).")
    p.add_argument("--teacher", help="The MAE teacher run.")
    p.add_argument("--teacher-model", default="vit_small_patch16")
    p.add_argument("--data", help="Images for the fixed batch (class-folder tree).")
    p.add_argument("--json", help="Write the measurements here.")
    p.add_argument("--table", nargs=2, metavar=("BEFORE", "AFTER"), help="Print the markdown table of two JSONs.")
    args = p.parse_args()
    if args.table:
        before, after = (json.load(open(f)) for f in args.table)
        print(table(before, after))
        return
    res = measure(args)
    text = json.dumps(res, indent=1)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text)
    print(text, file=sys.stdout)


if __name__ == "__main__":
    main()
