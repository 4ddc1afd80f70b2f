"""Every output directory records how it was made: the resolved flags (`args.json`) and the command,
versions and source revision (`made_by.json`), published with the output."""

from __future__ import annotations

import argparse
import json
from importlib import metadata

import torch

from dschat_hal.provenance import ARGS_FILE, MADE_BY_FILE, project_version, write_record


def check_record(directory, program: str) -> dict:
    flags = json.loads((directory / ARGS_FILE).read_text())
    made_by = json.loads((directory / MADE_BY_FILE).read_text())
    assert made_by["program"] == program
    versions = made_by["versions"]
    assert versions["dschat_hal"] == project_version() != "unknown"
    for name in ("torch", "deepspeed", "transformers"):
        assert versions[name] == metadata.version(name), name
    assert made_by["command"] and made_by["finished"]
    return flags


def test_each_step_output_of_the_demo_records_its_flags_and_versions(e2e_output):
    actor = check_record(e2e_output / "actor", "step1")
    reward = check_record(e2e_output / "reward", "step2")
    rlhf = check_record(e2e_output / "rlhf", "step3")
    e2e = check_record(e2e_output, "e2e")
    # resolved: the flags given and every default
    assert actor["output_dir"] == str(e2e_output / "actor") and "seed" in actor and "lora_dim" in actor
    assert reward["output_dir"] == str(e2e_output / "reward") and "per_device_train_batch_size" in reward
    assert rlhf["critic_model_name_or_path"] == str(e2e_output / "reward") and "actor_learning_rate" in rlhf
    assert rlhf["reference_placement"].startswith("Placement(stage=") and rlhf["critic_graph_kept"] in (True, False)
    assert e2e["output_dir"] and e2e["step"] == [1, 2, 3]


def test_values_json_cannot_hold_are_written_as_text(tmp_path):
    flags = vars(argparse.Namespace(dtype_resolved=torch.bfloat16, path=tmp_path, steps=[1, 2], flag=None))
    write_record(tmp_path, flags, "step1")
    flags = check_record(tmp_path, "step1")
    assert flags == {"dtype_resolved": "torch.bfloat16", "path": str(tmp_path), "steps": [1, 2], "flag": None}
    assert sorted(p.name for p in tmp_path.iterdir()) == [ARGS_FILE, MADE_BY_FILE]  # no temporaries left
