"""The `auto` step policy: resolved from measured figures, deterministically; cached by device and shape; a
probe on a real (tiny) model; compile decided by the stated payback rule."""
import json

import pytest
import torch

from fastvit_pt.config import load_config
from fastvit_pt.engine import policy as P

CPU = torch.device("cpu")


def tiny_cfg(**over):
    base = {"model.name": "mae_vit_test", "model.img_size": 28, "model.patch_size": 4, "train.global_batch": 8,
            "train.micro_batch": 8, "engine.device": "cpu"}
    return load_config(None, [f"{k}={v}" for k, v in {**base, **over}.items()])


def test_candidates_are_the_grid_of_the_automatic_switches():
    combos = P.candidates("auto", "auto", "auto", CPU)
    assert len(combos) == 8 and len(set(combos)) == 8
    assert P.candidates("fp32", "auto", False, CPU) == [P.Combo("fp32", "sdpa", False), P.Combo("fp32", "math", False)]
    assert P.candidates("bf16", "math", None, CPU) == [P.Combo("bf16", "math", False)]  # None: foreach off CUDA


def test_choice_is_the_fastest_and_a_given_probe_always_resolves_the_same():
    combos = P.candidates("auto", "auto", "auto", CPU)
    # the avx512_bf16 CPU's pattern: bf16 wins with math attention, SDPA's bf16 backward loses it
    rates = {c: 40.0 for c in combos}
    rates[P.Combo("bf16", "math", False)] = 71.0
    rates[P.Combo("bf16", "math", True)] = 70.5
    rates[P.Combo("bf16", "sdpa", True)] = 41.0
    picks = {P.choose(dict(rates), list(combos)) for _ in range(5)}
    assert picks == {P.Combo("bf16", "math", False)}
    # ties go to the earlier candidate, whatever order the dict holds them in
    tie = {c: 50.0 for c in reversed(combos)}
    assert P.choose(tie, combos) == combos[0]
    # an AVX2-only CPU: fp32 wins
    rates = {c: (45.0 if c.precision == "fp32" else 5.0) + (1.0 if c.attn_impl == "sdpa" else 0.0) for c in combos}
    assert P.choose(rates, combos) == P.Combo("fp32", "sdpa", True)  # tied with foreach: the earlier


def test_compile_payback_rule():
    # 0.5 s saved per step over 1,000 steps = 500 s, against 2 x 60 s of compilation: on
    assert P.compile_pays(1000, eager_s=1.0, compiled_s=0.5, compile_s=60.0)
    # 100 steps save 50 s < 120 s: off; and a slower compiled step never pays
    assert not P.compile_pays(100, eager_s=1.0, compiled_s=0.5, compile_s=60.0)
    assert not P.compile_pays(10**6, eager_s=1.0, compiled_s=1.1, compile_s=1.0)


def test_cached_figures_resolve_without_measuring(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTVIT_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("FASTVIT_PROBE", "0")
    cfg = tiny_cfg()
    combos = [c for c in P.candidates("auto", "auto", cfg.optim.fused, CPU)]
    key = P.policy_key(cfg, CPU, combos)
    rates = {c.label: 10.0 for c in combos}
    rates[P.Combo("fp32", "math", False).label] = 99.0
    P.cache_put(key, {"rates": rates})
    pol = P.resolve_step_policy(cfg, CPU)
    assert (pol.precision, pol.attn_impl, pol.fused, pol.source) == ("fp32", "math", False, "cache")
    assert any("99.0 img/s" in line for line in pol.describe())
    # another shape is another key: the fallback, said so
    pol = P.resolve_step_policy(tiny_cfg(**{"train.micro_batch": 4, "train.global_batch": 4}), CPU)
    assert pol.source == "fallback" and "FASTVIT_PROBE=0" in pol.notes[0]
    assert json.loads((tmp_path / "policy.json").read_text())  # one readable table


def test_probe_times_every_combination_and_caches_it(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTVIT_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("FASTVIT_PROBE", "1")
    cfg = tiny_cfg(**{"engine.precision": "fp32"})  # 2 x 2 combinations, bf16 left out (emulated on some CPUs)
    pol = P.resolve_step_policy(cfg, CPU)
    assert pol.source == "probe" and len(pol.rates) == 4 and all(r > 0 for r in pol.rates.values())
    best = max(pol.rates, key=pol.rates.get)
    assert P.Combo(pol.precision, pol.attn_impl, pol.fused).label == best
    again = P.resolve_step_policy(cfg, CPU)
    assert again.source == "cache" and again.rates == pol.rates


def test_fixed_switches_are_not_measured(monkeypatch):
    monkeypatch.setenv("FASTVIT_PROBE", "1")
    pol = P.resolve_step_policy(tiny_cfg(**{"engine.precision": "fp32", "model.attn_impl": "math",
                                            "optim.fused": "false"}), CPU)
    assert (pol.precision, pol.attn_impl, pol.fused, pol.source) == ("fp32", "math", False, "fixed")


def test_compile_auto_is_off_for_a_short_run_without_compiling(monkeypatch):
    monkeypatch.setenv("FASTVIT_PROBE", "1")
    pol = P.StepPolicy("fp32", "math", False, source="probe", rates={"x": 100.0})
    out = P.decide_compile(pol, tiny_cfg(**{"engine.compile": "auto"}), CPU, total_steps=50)
    assert out.compile is False and "too short" in out.notes[-1]
    assert P.decide_compile(P.StepPolicy("fp32", "math", False), tiny_cfg(**{"engine.compile": "true"}), CPU,
                            total_steps=1).compile is True


@pytest.mark.parametrize("value", ["sometimes", "2"])
def test_a_wrong_switch_value_is_a_clear_error(value):
    from fastvit_pt.config import ConfigError

    with pytest.raises(ConfigError, match="engine.compile"):
        tiny_cfg(**{"engine.compile": value})


def test_the_run_plan_and_the_engine_follow_the_policy(tmp_path, monkeypatch):
    """What the figures pick is what the run builds: the plan's precision and attention, the optimizer's kernel."""
    from fastvit_pt.distributed.env import DistEnv
    from fastvit_pt.engine.plan import make_plan

    monkeypatch.setenv("FASTVIT_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("FASTVIT_PROBE", "0")
    cfg = tiny_cfg()
    combos = P.candidates("auto", "auto", "auto", CPU)
    P.cache_put(P.policy_key(cfg, CPU, combos), {"rates": {c.label: (9.0 if c == P.Combo("fp32", "math", True)
                                                                      else 1.0) for c in combos}})
    plan = make_plan(cfg, DistEnv(0, 1, 0, CPU))
    assert (plan.precision, plan.attn_impl, plan.fused, plan.policy.source) == ("fp32", "math", True, "cache")
    from fastvit_pt.engines import engine_class
    from fastvit_pt.methods import build_method

    plan.set_data(100, 10)
    plan.decide_compile(cfg)
    assert plan.compile is False  # FASTVIT_PROBE=0, nothing cached for compile
    method = build_method(cfg.method, cfg.model, plan)
    engine = engine_class("torch")(method, plan, cfg.engine, cfg.optim)
    assert engine.optimizer.defaults["fused"] is True
    assert all(b.attn.attn_impl == "math" for b in method.model.encoder.blocks)


def test_compile_is_weighed_against_the_cold_compile_and_picks_the_fastest_compiled(tmp_path, monkeypatch):
    """Two near-ties: the second one's compile was measured after the first's, from inductor's cache (0 s). The
    decision weighs the cold 52 s: 234 steps saving ~21 s stay eager; 5,000 steps compile, with the near-tie that
    runs fastest compiled."""
    monkeypatch.setenv("FASTVIT_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("FASTVIT_PROBE", "0")
    cfg = tiny_cfg(**{"engine.compile": "auto"})
    a, b = P.Combo("bf16", "math", False), P.Combo("bf16", "math", True)
    P.cache_put({**P.policy_key(cfg, CPU, [a]), "compile": True},
                {"compile": {"eager_s": 0.447, "compiled_s": 0.342, "compile_s": 52.0}})
    P.cache_put({**P.policy_key(cfg, CPU, [b]), "compile": True},
                {"compile": {"eager_s": 0.425, "compiled_s": 0.334, "compile_s": 0.0}})

    def decide(steps):
        pol = P.StepPolicy("bf16", "math", False, source="cache", rates={a.label: 1.0}, near=[a, b])  # slow: measured
        return P.decide_compile(pol, cfg, CPU, total_steps=steps)

    short = decide(234)
    assert short.compile is False and "against 52 s" in short.notes[-1]
    long = decide(5000)
    assert long.compile is True and (long.attn_impl, long.fused) == ("math", True)


def test_compile_auto_with_every_other_switch_fixed_times_eager_before_compiling(tmp_path, monkeypatch):
    """A short run whose precision, attention and AdamW are all set still gets no compile probe: one short eager
    timing shows the run cannot repay a compilation."""
    monkeypatch.setenv("FASTVIT_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("FASTVIT_PROBE", "1")
    cfg = tiny_cfg(**{"engine.precision": "fp32", "model.attn_impl": "math", "optim.fused": "false",
                      "engine.compile": "auto"})
    pol = P.resolve_step_policy(cfg, CPU)
    assert pol.source == "fixed" and not pol.rates
    out = P.decide_compile(pol, cfg, CPU, total_steps=10)
    assert out.compile is False and "too short" in out.notes[-1]
