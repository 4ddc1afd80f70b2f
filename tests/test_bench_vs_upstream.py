"""benchmarks/bench_vs_upstream.py: the reward model it hands upstream, and its flag checks."""

from __future__ import annotations

import sys

import pytest
import torch
from conftest import ROOT
from safetensors.torch import load_file

sys.path.insert(0, str(ROOT / "benchmarks"))
import bench_vs_upstream  # noqa: E402


def test_upstream_reward_model_is_our_reward_model_in_upstreams_state_dict_layout(tmp_path):
    args = bench_vs_upstream.argparse.Namespace(model="tiny")
    actor, reward, upstream_reward = bench_vs_upstream.prepare_models(args, tmp_path)
    state = torch.load(upstream_reward / "pytorch_model.bin", weights_only=True)
    assert "v_head.weight" in state and all(k.startswith(("rwtransformer.", "v_head.")) for k in state)
    ours = load_file(str(reward / "model.safetensors"))  # OPTForSequenceClassification: model.*, score.weight
    assert torch.equal(state["v_head.weight"], ours.pop("score.weight"))
    assert len(ours) == sum(k.startswith("rwtransformer.") for k in state) > 0
    for key, value in ours.items():
        assert torch.equal(state[f"rwtransformer.{key.removeprefix('model.')}"], value), key
    assert (upstream_reward / "config.json").is_file() and not list(upstream_reward.glob("*.safetensors"))
    assert (actor / "config.json").is_file()


def test_a_path_that_is_not_deepspeed_chat_is_one_clear_error(tmp_path, capsys):
    with pytest.raises(SystemExit):
        bench_vs_upstream.parse_args(["--upstream", str(tmp_path)])
    assert "has no training/step3_rlhf_finetuning/main.py" in capsys.readouterr().err
