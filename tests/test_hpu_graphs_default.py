"""HPU graphs for step-3 generation: on by default in HPU lazy mode (`--disable_hpu_graphs` turns them off),
off by default elsewhere (issue #28 item 1). The captures themselves, on the real optimum-habana, are in
tests/test_optimum_habana.py."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
import torch

import accel
from dschat_hal.args import step1_parser, step3_parser
from dschat_hal.inert_flags import inert_flag_notes
from dschat_hal.rlhf.generation.hf_generate import PlainGenerator
from dschat_hal.rlhf.generation.sampling import GenerationConfig

STEP3 = ["--actor_model_name_or_path", "a", "--critic_model_name_or_path", "c"]


def generation_graphs(args, backend) -> bool:
    """The backend's rule (`runtime.generation_graphs`, what `start_backend` sets) for these flags."""
    from dschat_hal.configs import HardwareConfig, to_config
    from dschat_hal.runtime import generation_graphs as rule

    return rule(backend, to_config(args, HardwareConfig), getattr(args, "enable_device_graphs", False))


def step3_args(*flags: str):
    return step3_parser().parse_args([*STEP3, *flags])


def test_hpu_lazy_mode_generates_in_graphs_unless_disabled(fake_hpu):
    hpu = accel.get("hpu")
    assert hpu.lazy_mode and hpu.graphs_by_default
    assert generation_graphs(step3_args(), hpu)
    assert generation_graphs(step3_args("--enable_hpu_graphs"), hpu)  # the fork's flag: still accepted
    assert not generation_graphs(step3_args("--disable_hpu_graphs"), hpu)
    assert not generation_graphs(step3_args("--disable_hpu_graphs", "--enable_hybrid_engine"), hpu)
    hpu.lazy_mode = False  # eager mode (PT_HPU_LAZY_MODE=0): no HPU graphs unless asked (then refused, said once)
    assert not hpu.graphs_by_default and not generation_graphs(step3_args(), hpu)


def test_other_devices_capture_only_when_asked():
    cpu = accel.get("cpu")
    assert not cpu.graphs_by_default
    assert not generation_graphs(step3_args(), cpu)
    assert not generation_graphs(step1_parser().parse_args([]), cpu)
    assert generation_graphs(step3_args("--enable_device_graphs"), cpu)
    assert generation_graphs(step3_args("--enable_device_graphs", "--disable_hpu_graphs"), cpu)


def test_enable_and_disable_hpu_graphs_exclude_each_other(capsys):
    with pytest.raises(SystemExit):
        step3_args("--enable_hpu_graphs", "--disable_hpu_graphs")
    assert "--disable_hpu_graphs: not allowed with argument --enable_hpu_graphs" in capsys.readouterr().err


def test_disable_hpu_graphs_where_it_does_nothing_is_a_note(fake_hpu):
    def notes(args, backend) -> str:
        return "\n".join(inert_flag_notes(args, backend, 1))

    assert notes(step3_args("--disable_hpu_graphs"), accel.get("hpu")) == ""
    assert "--disable_hpu_graphs does nothing on cpu" in notes(step3_args("--disable_hpu_graphs"), accel.get("cpu"))
    assert "does nothing in this step" in notes(step1_parser().parse_args(["--disable_hpu_graphs"]), accel.get("cpu"))
    both = step3_args("--disable_hpu_graphs", "--enable_device_graphs")
    assert "--disable_hpu_graphs does nothing with --enable_device_graphs" in notes(both, accel.get("hpu"))


class RecordingBackend(SimpleNamespace):
    def capture_generate_forward(self, model):
        self.asked.append(model)
        return self.captured


@pytest.mark.parametrize("partitioned", [False, True], ids=["zero0", "zero3"])
def test_plain_path_takes_the_captured_forward_unless_zero3(partitioned, caplog):
    """Not partitioned: the backend's captured forward, asked for once and kept across phases; ZeRO-3
    (synced ranks through DeepSpeed's hooks): never captured, said once."""
    module = torch.nn.Linear(2, 2)
    if partitioned:
        module.weight.ds_id = 0  # what ZeRO-3 gives its parameters
    backend = RecordingBackend(use_graphs=True, asked=[], captured=lambda *a, **k: None)
    generator = PlainGenerator(SimpleNamespace(module=module), backend, GenerationConfig(4, 0, 1))
    with caplog.at_level(logging.INFO, logger="dschat_hal.rlhf.generation.hf_generate"):
        forwards = [generator._graphed_forward(module) for _ in range(3)]
    if partitioned:
        assert backend.asked == [] and forwards == [None] * 3
        assert [r.message for r in caplog.records] == [
            "generation: the ZeRO-3 actor generates with synced ranks through DeepSpeed's hooks, not in device "
            "graphs; --enable_hybrid_engine captures its generation"
        ]
    else:
        assert backend.asked == [module] and forwards == [backend.captured] * 3
        assert caplog.records == []
