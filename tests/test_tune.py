"""`fastvit tune`: measures the recipe's loader over its knobs and writes a recipe that loads."""
import time
from pathlib import Path

import yaml
from click.testing import CliRunner

from fastvit_pt.cli import main
from fastvit_pt.config import load_config


def test_tune_writes_a_recipe_based_on_the_original(photo_tree, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"base: {Path(__file__).resolve().parents[1] / 'recipes' / 'mae_tiny_400ep.yaml'}\n"
                      "data:\n  workers: 3\n")
    res = CliRunner().invoke(main, ["tune", str(recipe), "data.backend=turbo", f"data.path={photo_tree}",
                                    "train.micro_batch=8", "model.img_size=64", "engine.device=cpu",
                                    "engine.precision=fp32", "--budget-s", "8"])
    assert res.exit_code == 0, res.output
    tuned = tmp_path / "r.tuned.yaml"
    text = tuned.read_text()
    assert "data.workers=1:" in text and "data.prefetch_factor=4:" in text and "img/s" in text
    body = yaml.safe_load(text)
    assert body["base"] == "r.yaml" and body["data"]["backend"] == "turbo"
    cfg = load_config(tuned)
    assert cfg.data.workers == body["data"]["workers"] and cfg.data.prefetch_factor == body["data"]["prefetch_factor"]
    assert cfg.model.img_size == 64 and cfg.model.name == load_config(recipe).model.name  # the rest from the base
    assert "chosen: data.workers=" in res.output and f"wrote {tuned}" in res.output


def test_tune_answers_a_missing_data_path_at_once(tmp_path):
    t0 = time.perf_counter()
    res = CliRunner().invoke(main, ["tune", "recipes/mae_tiny_400ep.yaml", f"data.path={tmp_path / 'absent'}"])
    assert res.exit_code != 0 and "absent" in res.output
    assert time.perf_counter() - t0 < 2
