"""k-NN on a case worked by hand, and on real Fashion-MNIST features."""
import torch

from fastvit_pt.eval.knn import knn_predict, topk_accuracy


def test_knn_votes_by_hand():
    bank = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]])
    labels = torch.tensor([0, 0, 1])
    scores = knn_predict(bank, labels, torch.tensor([[1.0, 0.05], [0.1, 1.0]]), num_classes=2, k=2, temperature=1.0)
    assert scores.argmax(1).tolist() == [0, 1]
    # second query: neighbours 2 (cos ~0.995, class 1) and 1 (cos ~0.21, class 0), weighted by exp(cos / T)
    q = torch.nn.functional.normalize(torch.tensor([0.1, 1.0]), dim=0)
    b = torch.nn.functional.normalize(bank, dim=1)
    torch.testing.assert_close(scores[1], torch.stack([(q @ b[1]).exp(), (q @ b[2]).exp()]))
    assert topk_accuracy(scores, torch.tensor([0, 0]), ks=(1, 2)) == {"top1": 50.0, "top2": 100.0}


def test_knn_on_real_fashion_mnist_beats_chance_by_far(fmnist_untrained_features):
    """Even an untrained ViT's features separate Fashion-MNIST classes: 10 classes, chance 10%."""
    (xtr, ytr), (xte, yte) = fmnist_untrained_features
    assert xtr.shape == (1000, 32) and xte.shape == (1000, 32)
    acc = topk_accuracy(knn_predict(xtr, ytr, xte, num_classes=10), yte)
    assert acc["top1"] > 35.0 and acc["top5"] > 75.0, acc  # measured 48.3 / 91.3 at seed 0


def test_knn_command_reads_a_run_and_its_exported_backbone(fmnist_small, tmp_path):
    import json
    import subprocess
    import sys

    from conftest import REPO, tiny_mae_overrides
    from fastvit_pt.config import load_config
    from fastvit_pt.engine.loop import train

    fmnist = {"data.mean": "[0.286,0.286,0.286]", "data.std": "[0.353,0.353,0.353]"}
    train(load_config(None, tiny_mae_overrides(fmnist_small / "train", tmp_path / "run", **{"train.epochs": 1}, **fmnist)))

    def cli(*args):
        r = subprocess.run([sys.executable, "-m", "fastvit_pt.cli", *args], capture_output=True, text=True, cwd=REPO)
        assert r.returncode == 0, r.stderr
        return r

    data = ["--train", str(fmnist_small / "train"), "--test", str(fmnist_small / "test")]
    results = []
    for source in (tmp_path / "run", tmp_path / "run" / "model-0001.pt"):
        out = tmp_path / f"{source.name}.json"
        r = cli("knn", str(source), *data, "data.workers=0", "--json", str(out))
        assert "k-NN (k=20, T=0.07) on 1000 images, bank of 1000: top-1" in r.stdout
        assert "vit_test at 28 px (patch 4), normalised with mean [0.286, 0.286, 0.286] std [0.353, 0.353, 0.353]; " \
               "from the run's config" in r.stdout
        results.append(json.loads(out.read_text()))
    # model, geometry and normalisation come from the run's config, as it was trained
    assert results[0]["model"] == "vit_test" and results[0]["img_size"] == 28 and results[0]["mean"] == [0.286] * 3
    assert results[0]["top1"] == results[1]["top1"] > 35.0  # the same backbone either way
    # an override is applied on top (here: the ImageNet statistics the run never saw, and another k)
    out = tmp_path / "imagenet.json"
    cli("knn", str(tmp_path / "run"), *data, "data.workers=0", "knn.k=5", "data.mean=[0.485,0.456,0.406]",
        "data.std=[0.229,0.224,0.225]", "--json", str(out))
    other = json.loads(out.read_text())
    assert other["k"] == 5 and other["mean"] == [0.485, 0.456, 0.406] and "data.mean=" in other["config"]
    # scratch has no run: its geometry and statistics come from a recipe
    out = tmp_path / "scratch.json"
    cli("knn", "scratch", *data, "--recipe", "recipes/demo/mae_fmnist.yaml", "model.name=vit_test", "--json", str(out))
    scratch = json.loads(out.read_text())
    assert scratch["mean"] == [0.286] * 3 and scratch["img_size"] == 28 and "random initialisation" in scratch["import"]
    r = cli("linprobe", str(tmp_path / "run"), *data, "data.workers=0", "linprobe.epochs=10", "linprobe.batch=100",
            "linprobe.optimizer=sgd")
    assert "linear probe (sgd, 10 epochs, lr 0.0390625) on 1000 images: top-1" in r.stdout
    assert "normalised with mean [0.286, 0.286, 0.286]" in r.stdout


def test_knn_bad_input_names_the_problem(fmnist_small, tmp_path):
    import subprocess
    import sys

    from conftest import REPO

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "fastvit_pt.cli", *args], capture_output=True, text=True, cwd=REPO)

    data = ["--train", str(fmnist_small / "train"), "--test", str(fmnist_small / "test")]
    r = cli("knn", str(tmp_path / "none.pt"), *data)
    assert r.returncode == 1 and "checkpoint not found" in r.stderr and "Traceback" not in r.stderr
    r = cli("knn", "scratch", "--train", str(tmp_path / "nope"), "--test", str(fmnist_small / "test"))
    assert r.returncode == 2 and "nope" in r.stderr and "does not exist" in r.stderr
    r = cli("linprobe", "scratch", *data, "linprobe.optimizer=adam")
    assert r.returncode == 2 and "linprobe.optimizer: expected lars or sgd" in r.stderr
    r = cli("knn", "scratch", *data, "knn.kk=3")
    assert r.returncode == 2 and "did you mean 'knn.k'" in r.stderr
