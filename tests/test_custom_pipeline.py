"""examples/custom_pipeline.py: step 3 built from typed configs in Python, no command line (issue #31):
the engine and trainer come from a `Step3Config`, and `generate_experience` + `train_rlhf` train."""

from __future__ import annotations

import importlib.util
import math

import torch
from conftest import ROOT


def _example():
    spec = importlib.util.spec_from_file_location("custom_pipeline", ROOT / "examples" / "custom_pipeline.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_custom_pipeline_trains_from_configs_alone(tmp_path, capsys):
    example = _example()
    trainer, loader = example.build(example.tiny_config("cpu"), total_steps=2, cache_dir=str(tmp_path / "cache"))
    actor, critic = trainer.rlhf.actor.module, trainer.rlhf.critic.module
    before = {
        "actor": [p.detach().clone() for p in actor.parameters()],
        "critic": [p.detach().clone() for p in critic.parameters()],
    }
    history = example.train(trainer, loader, steps=2)
    assert len(history) == 2
    assert all(math.isfinite(v) for record in history for v in record.values())
    for name, model in (("actor", actor), ("critic", critic)):
        changed = any(not torch.equal(a, b) for a, b in zip(before[name], model.parameters(), strict=True))
        assert changed, f"the {name} did not train"
    assert (trainer.rlhf.actor.global_steps, trainer.rlhf.critic.global_steps) == (2, 2)
    assert "step 2: reward" in capsys.readouterr().out
