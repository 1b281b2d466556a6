"""Equal-budget comparison (``budget.trainable_params=N``): each method's size knob (its
``traits.size_knob``) is set to the value whose trainable count, counted as the dry-run planner
counts it, is closest to N. Reference counts by formula for tiny-llama (2 layers, hidden 64,
q_proj 64->64, v_proj 64->32, MLP 128)."""

from __future__ import annotations

import json

import pytest
from tiny_runs import cli, compose, one_thread, train_run

from ftlab import cli as ftlab_cli
from ftlab.planning.budget import choose, fit_budget
from ftlab.settings import settings_from_config

_one_thread = pytest.fixture(autouse=True, scope="module")(one_thread)

# Trainable parameters of tiny-llama as a function of each method's size knob.
FORMULAS = {
    "lora": ("r", lambda r: 2 * (r * (64 + 64) + r * (64 + 32))),            # sum r (in + out)
    "vera": ("r", lambda r: 2 * ((64 + r) + (32 + r))),                       # sum (out + r)
    "prompt_tuning": ("num_virtual_tokens", lambda k: 64 * k),                # k d_model
    "adapter": ("bottleneck", lambda m: 2 * 2 * (2 * 64 * m + m + 64)),       # 2 L (2 d m + m + d)
}


def closest(formula, target: int) -> int:
    return min(range(1, 5000), key=lambda k: (abs(formula(k) - target), k))


def settings(method: str, budget: int | None, *extra: str):
    return settings_from_config(compose("model=tiny-llama", f"method={method}",
                                        f"budget.trainable_params={budget}", *extra), "/tmp/unused")


@pytest.mark.parametrize("method", FORMULAS)
@pytest.mark.parametrize("budget", [4000, 10_000])
def test_chosen_size_is_the_closest_by_formula(method, budget):
    knob, formula = FORMULAS[method]
    s, chosen = fit_budget(*(lambda s: (s, s.budget))(settings(method, budget)))
    expected = closest(formula, budget)
    assert (chosen.knob, chosen.value, chosen.trainable_params) == (knob, expected, formula(expected))
    assert s.method[knob] == expected


def test_fixed_size_methods_report_their_count():
    s0 = settings("ia3", 4000)
    s, chosen = fit_budget(s0, s0.budget)
    # IA3 on llama: k_proj and v_proj outputs (32 each) and down_proj's input (128), 2 layers.
    assert chosen.knob is None and chosen.value is None and chosen.trainable_params == 2 * (32 + 32 + 128)
    assert s.method == s0.method and chosen.as_dict()["fixed_size"] is True
    assert "fixed size" in chosen.line("ia3")
    assert fit_budget(s0, None) == (s0, None)  # off: nothing changes


def test_search_handles_plateaus_and_nonlinear_counts():
    calls = []

    def linear(k):
        calls.append(k)
        return 448 * k

    assert choose(linear, 4000) == 9 and len(set(calls)) <= 5  # a linear count takes a few counts
    assert choose(lambda k: 100 * min(k, 10), 5000) == 10      # plateau: the smallest value at the top
    assert choose(lambda k: 100 * k, 450) == 4                  # tie: the smaller size
    assert choose(lambda k: 3 * k * k, 300) == 10
    assert choose(lambda k: 1000 + k, 10) == 1                  # below the smallest size


def test_run_records_the_chosen_size_and_its_count(tmp_path):
    from ftlab.eval import evaluate_run

    run = tmp_path / "run"
    m = train_run(run, "method=lora", "method.backend=native", "budget.trainable_params=4000",
                  "trainer.max_steps=1", "eval.generate=false")
    assert m["r"] == 9 and m["trainable_params"] == 448 * 9  # the run's own count equals the planner's
    assert m["budget"] == {"target": 4000, "knob": "r", "value": 9, "trainable_params": 4032,
                           "fixed_size": False, "difference": 32}
    # config.yaml still says r=8: scoring the run rebuilds the method at the size it trained.
    assert evaluate_run(run)["val_loss"] == pytest.approx(m["val_loss"], rel=1e-5)


def test_works_in_a_sweep(tmp_path):
    proc = cli("-m", "model=tiny-llama", "method=lora,vera,ia3", "budget.trainable_params=4000",
               "dry_run=true", f"hydra.sweep.dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout + proc.stderr
    assert "Budget 4,000 trainable parameters: method.r=9 gives 4,032 trainable (+32, +0.8%)" in out
    assert "Budget 4,000 trainable parameters: method.r=952 gives 4,000 trainable (+0, +0.0%)" in out
    assert "method ia3 has no size setting (fixed size), 384 trainable (-3,616)" in out
    plans = {json.loads(p.read_text())["method"]: json.loads(p.read_text())["trainable_params"]
             for p in tmp_path.rglob("plan.json")}
    assert plans == {"lora": 4032, "vera": 4000, "ia3": 384}


def test_bad_budget_is_refused_with_status_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        ftlab_cli.main(["model=tiny-llama", "budget.trainable_params=0", f"hydra.run.dir={tmp_path / 'run'}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and err == ["ftlab: error: budget.trainable_params must be a positive "
                                             "integer, got 0"]
