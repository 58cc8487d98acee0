from pathlib import Path

import pytest

from fastvit_pt.config import Config, ConfigError, apply_overrides, load_config, parse_overrides, to_yaml

REPO = Path(__file__).resolve().parents[1]
RECIPES = sorted((REPO / "recipes").rglob("*.yaml"))


def test_recipes_exist():
    names = {p.relative_to(REPO / "recipes").as_posix() for p in RECIPES}
    assert {"mae_tiny_400ep.yaml", "mae_tiny_1600ep.yaml", "demo/mae_fmnist.yaml"} <= names


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.relative_to(REPO / "recipes").as_posix())
def test_every_recipe_loads_and_validates(recipe):
    cfg = load_config(recipe)
    assert isinstance(cfg, Config)
    assert cfg.train.out_dir == f"runs/{recipe.stem}"


def test_mae_lite_values():
    cfg = load_config(REPO / "recipes/mae_tiny_400ep.yaml")
    assert (cfg.train.global_batch, cfg.optim.blr, cfg.optim.warmup_epochs) == (4096, 1.5e-4, 40)
    assert (cfg.optim.weight_decay, cfg.method.mask_ratio, cfg.method.norm_pix_loss) == (0.05, 0.75, True)
    assert cfg.optim.betas == (0.9, 0.95)
    assert cfg.peak_lr == pytest.approx(1.5e-4 * 4096 / 256)
    long = load_config(REPO / "recipes/mae_tiny_1600ep.yaml")
    assert long.train.epochs == 1600 and long.optim == cfg.optim and long.model == cfg.model


def test_precedence_defaults_recipe_overrides(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("optim:\n  blr: 2.0e-4\ntrain:\n  epochs: 7\n")
    cfg = load_config(recipe, ["train.epochs=9", "optim.lr=1e-3", "data.crop_scale=[0.2, 1]"])
    assert cfg.optim.blr == 2.0e-4  # recipe over default
    assert cfg.train.epochs == 9  # override over recipe
    assert cfg.optim.lr == 1e-3 and cfg.peak_lr == 1e-3  # "1e-3" (YAML reads a string) coerced to float
    assert cfg.data.crop_scale == (0.2, 1.0)
    assert cfg.train.micro_batch == Config().train.micro_batch  # untouched default


def test_unknown_key_names_it_and_suggests(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown config key 'optim.blrr'; did you mean 'optim.blr'"):
        load_config(None, ["optim.blrr=1"])
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("trian:\n  epochs: 3\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'trian'; did you mean 'train'"):
        load_config(recipe)


def test_wrong_types_are_errors():
    with pytest.raises(ConfigError, match=r"train.epochs: expected int, got 'ten'"):
        load_config(None, ["train.epochs=ten"])
    with pytest.raises(ConfigError, match=r"method.norm_pix_loss: expected bool"):
        load_config(None, ["method.norm_pix_loss=maybe"])
    with pytest.raises(ConfigError, match=r"data.crop_scale: expected a list of 2 values"):
        load_config(None, ["data.crop_scale=0.5"])
    with pytest.raises(ConfigError, match=r"not KEY=VALUE"):
        parse_overrides(["train.epochs"])


def test_cross_field_checks():
    with pytest.raises(ConfigError, match=r"multiple of train.micro_batch"):
        load_config(None, ["train.global_batch=100", "train.micro_batch=64"])
    with pytest.raises(ConfigError, match=r"img_size \(30\) must be a multiple of model.patch_size \(4\)"):
        load_config(None, ["model.img_size=30", "model.patch_size=4"])
    with pytest.raises(ConfigError, match=r"data.backend: unknown backend 'pil'"):
        load_config(None, ["data.backend=pil"])
    with pytest.raises(ConfigError, match=r"engine.precision"):
        load_config(None, ["engine.precision=fp8"])


def test_missing_recipe_and_base_chain(tmp_path):
    with pytest.raises(ConfigError, match=r"recipe not found: .*nope.yaml"):
        load_config(tmp_path / "nope.yaml")
    (tmp_path / "a.yaml").write_text("base: b.yaml\ntrain:\n  epochs: 2\n")
    (tmp_path / "b.yaml").write_text("train:\n  epochs: 5\n  seed: 3\n")
    cfg = load_config(tmp_path / "a.yaml")
    assert (cfg.train.epochs, cfg.train.seed) == (2, 3)
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(ConfigError, match="loops back"):
        load_config(tmp_path / "a.yaml")


def test_yaml_round_trip(tmp_path):
    cfg = load_config(REPO / "recipes/demo/mae_fmnist.yaml", ["train.seed=5"])
    path = tmp_path / "resolved.yaml"
    path.write_text(to_yaml(cfg))
    assert load_config(path) == cfg


def test_each_method_owns_its_section_and_switching_keeps_what_is_shared():
    from fastvit_pt.methods.configs import D2MAEConfig, FinetuneConfig, MoCoV3Config

    cfg = load_config(None, ["method.mask_ratio=0.6", "method.name=d2mae", "method.teacher=t.pt", "method.decoder_block=4"])
    assert isinstance(cfg.method, D2MAEConfig) and (cfg.method.mask_ratio, cfg.method.teacher) == (0.6, "t.pt")
    cfg = load_config(None, ["method.name=mocov3", "method.temperature=0.1", "method.blur=[0.5,0.5]"])
    assert isinstance(cfg.method, MoCoV3Config) and cfg.method.blur == (0.5, 0.5)
    assert [v.blur for v in cfg.method.views()] == [0.5, 0.5] and len(cfg.method.views()) == 2
    assert isinstance(load_config(None, ["method.name=finetune"]).method, FinetuneConfig)
    # a setting of the old method that the new one lacks is refused, not dropped
    with pytest.raises(ConfigError, match="method.mask_ratio=0.6 is a setting of method 'mae'"):
        apply_overrides(load_config(None, ["method.mask_ratio=0.6"]), ["method.name=mocov3"])
    with pytest.raises(ConfigError, match="method 'mocov3' has no setting 'mask_ratio'"):
        load_config(None, ["method.name=mocov3", "method.mask_ratio=0.5"])
    with pytest.raises(ConfigError, match="unknown method 'mocov4'; did you mean 'mocov3'"):
        load_config(None, ["method.name=mocov4"])
    with pytest.raises(ConfigError, match="method.temperature must be > 0"):
        load_config(None, ["method.name=mocov3", "method.temperature=0"])


def test_the_old_sections_are_named_in_recipes_and_read_from_stored_runs(tmp_path):
    from fastvit_pt.config import config_from_dict, to_dict

    old = tmp_path / "old.yaml"
    old.write_text("method:\n  name: dmae\ndistill:\n  teacher: runs/t\n")
    with pytest.raises(ConfigError, match=r"'distill:' section is now part of 'method:' \(e.g. distill.teacher is "
                                          r"method.teacher\)"):
        load_config(old)
    # what every run before method sections wrote: MAE's method keys whatever the method, and both old sections
    stored = to_dict(load_config(None))
    stored["method"] = {"name": "finetune", "mask_ratio": 0.75, "norm_pix_loss": True}
    stored["finetune"] = {"init": "runs/mae", "global_pool": "avg", "layer_decay": 0.75, "mixup": 0.0}
    stored["distill"] = {"teacher": None, "teacher_model": "vit_base_patch16", "decoder_block": 8}
    cfg = config_from_dict(stored)
    assert (cfg.method.init, cfg.method.layer_decay, cfg.method.mixup) == ("runs/mae", 0.75, 0.0)
    stored["method"] = {"name": "d2mae", "mask_ratio": 0.6, "norm_pix_loss": True}
    stored["distill"] = {"teacher": "runs/t", "teacher_model": "vit_small_patch16", "decoder_block": 6}
    cfg = config_from_dict(stored)
    assert (cfg.method.mask_ratio, cfg.method.teacher, cfg.method.decoder_block) == (0.6, "runs/t", 6)
    # a run directory's config.yaml in the old layout is read as a stored config, not refused as a recipe
    import yaml

    from fastvit_pt.engine.backbone import run_config

    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text(yaml.safe_dump(stored))
    assert run_config(tmp_path / "run").method.decoder_block == 6
