"""Step 3's --max_seconds (issue #29, quality and cost): a wall-time budget that stops the run at the first
PPO step boundary past it, for PPO and the critic-free estimators alike; the summary says how long the
training loop took (bench_quality.py --budget_s compares methods with it)."""

from __future__ import annotations

import pytest
from test_critic_free import ESTIMATORS, STEPS, argv, models  # noqa: F401 (models: the fixture)

from training.step3_rlhf_finetuning.main import main as step3


@pytest.mark.parametrize("estimator", ["gae", "grpo"])
def test_max_seconds_stops_at_the_first_step_boundary_past_the_budget(estimator, models, tmp_path):  # noqa: F811
    flags = ESTIMATORS.get(estimator, [])
    spent = step3([*argv(models, tmp_path, *flags), "--max_seconds", "1e-6", "--output_dir", str(tmp_path / "a")])
    assert len(spent["history"]) == 1, "the budget is spent during the first step: stop after it, not before"
    assert (tmp_path / "a" / "actor").is_dir()  # the trained actor is saved as at any other stop
    roomy = step3([*argv(models, tmp_path, *flags), "--max_seconds", "1e6", "--output_dir", str(tmp_path / "b")])
    assert len(roomy["history"]) == STEPS  # a budget not reached leaves the run as planned
    assert spent["train_seconds"] > 0 and roomy["train_seconds"] > 0  # (their order is the load's, not ours)
