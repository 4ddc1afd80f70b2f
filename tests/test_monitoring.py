"""Monitoring (issue #30): per-step throughput, learning rate and ETA in the log and in the scalars,
log lines that leave tqdm's bar intact, `--report_to`, plots of every scalar, and the line before
DeepSpeed compiles its CPU communication op."""

from __future__ import annotations

import io
import json
import sys

import pytest
from conftest import tiny_step1_argv
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from accel import _op_builds
from dschat_hal import monitor
from dschat_hal.args import step1_parser, validate
from dschat_hal.errors import UserError
from dschat_hal.runtime import print_rank0
from training import plot_metrics
from training.step1_supervised_finetuning.main import main as step1

NEW_TAGS = ("step1/lr", "step1/samples_per_s", "step1/tokens_per_s", "step1/eta_s")


def test_log_lines_go_through_tqdm_while_a_bar_is_shown(monkeypatch, capsys):
    import tqdm

    written: list[str] = []
    monkeypatch.setattr(tqdm.tqdm, "write", classmethod(lambda cls, text, file=None, **kw: written.append(text)))
    bar = tqdm.tqdm(range(3), file=io.StringIO())
    try:
        print_rank0("[step1] step", 1)
    finally:
        bar.close()
    assert written == ["[step1] step 1"]
    print_rank0("after the bar")  # no bar: a plain print
    assert capsys.readouterr().out == "after the bar\n" and written == ["[step1] step 1"]


def test_step1_logs_speed_lr_eta_and_plot_draws_every_scalar(tmp_path, capsys):
    tb = tmp_path / "tb"
    argv = ["--max_steps", "2", "--log_interval", "1", "--enable_tensorboard", "--tensorboard_path", str(tb)]
    step1(tiny_step1_argv(tmp_path, *argv, "--output_dir", str(tmp_path / "out")))
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[step1] epoch")]
    assert len(lines) == 2
    for line in lines:
        assert " lr " in line and " samples/s, " in line and " tokens/s " in line and "| ETA " in line
    events = EventAccumulator(str(tb / "step1"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"step1/loss", "step1/eval_perplexity", *NEW_TAGS} <= tags
    assert all(e.value > 0 for e in events.Scalars("step1/samples_per_s"))
    assert events.Scalars("step1/eta_s")[-1].value == 0  # the last step: nothing left

    png = tmp_path / "metrics.png"
    assert plot_metrics.main(["--logdir", str(tb), "--out", str(png)]) == 0
    drawn = capsys.readouterr().out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    every = set(plot_metrics.read_scalars(tb))
    assert every >= tags and all(tag in drawn for tag in every)  # DeepSpeed's own scalars too

    png2 = tmp_path / "summary.png"
    assert plot_metrics.main(["--summary", str(tmp_path / "out" / "training_summary.json"), "--out", str(png2)]) == 0
    assert png2.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and "loss (per report)" in capsys.readouterr().out


def test_report_to_resolves_and_enable_tensorboard_still_works(monkeypatch):
    def parsed(*flags: str):
        return validate(step1_parser().parse_args(["--device", "cpu", "--output_dir", "", *flags]))

    assert parsed("--enable_tensorboard").report_to == "tensorboard"
    args = parsed("--report_to", "tensorboard")
    assert args.enable_tensorboard  # DeepSpeed's own monitor follows
    assert parsed().report_to == "none" and not parsed().enable_tensorboard
    monkeypatch.setattr(monitor, "installed", lambda package: False)
    with pytest.raises(UserError, match="pip install wandb"):
        parsed("--report_to", "wandb")


FAKE_WANDB = """
import json, os
LOG = os.environ["FAKE_WANDB_LOG"]
def _record(call, **kw):
    with open(LOG, "a") as f:
        f.write(json.dumps({"call": call, **kw}, default=str) + "\\n")
class _Run:
    def log(self, values, step=None):
        _record("log", values=values, step=step)
    def finish(self):
        _record("finish")
def init(**kw):
    _record("init", **kw)
    return _Run()
"""


def test_report_to_wandb_logs_through_wandb(tmp_path, monkeypatch):
    stub = tmp_path / "stub"
    stub.mkdir()
    (stub / "wandb.py").write_text(FAKE_WANDB)
    log = tmp_path / "wandb.jsonl"
    monkeypatch.setenv("FAKE_WANDB_LOG", str(log))
    monkeypatch.syspath_prepend(str(stub))
    monkeypatch.delitem(sys.modules, "wandb", raising=False)
    argv = ["--max_steps", "1", "--report_to", "wandb", "--tensorboard_path", str(tmp_path / "runs")]
    step1(tiny_step1_argv(tmp_path, *argv, "--output_dir", ""))
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    assert calls[0]["call"] == "init" and calls[0]["name"] == "step1" and calls[-1]["call"] == "finish"
    logged = {key for c in calls if c["call"] == "log" for key in c["values"]}
    assert {"step1/loss", "step1/eval_perplexity", *NEW_TAGS} <= logged
    assert not (tmp_path / "runs" / "step1").exists()  # no TensorBoard files beside


def test_comm_op_build_is_announced_only_when_a_build_is_due(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    from torch.utils.cpp_extension import _get_build_directory

    build = _op_builds.op_build_dir(_op_builds.SHM_COMM_OP)
    assert build == tmp_path / _op_builds.SHM_COMM_OP == type(build)(_get_build_directory(build.name, False))
    assert _op_builds.build_reason(build) == "not built yet"
    out = io.StringIO()
    line = _op_builds.announce_comm_op_build(stream=out)
    assert out.getvalue() == line + "\n"
    assert line.startswith(f"building DeepSpeed's CPU communication op once, ~1 min; cache: {tmp_path}")
    (build / f"{_op_builds.SHM_COMM_OP}.so").write_bytes(b"")
    assert _op_builds.build_reason(build) is None  # built, by an unknown ninja: loads as is
    assert _op_builds.announce_comm_op_build(stream=out) is None
    _op_builds.record_comm_op_build()
    assert _op_builds.build_reason(build) is None  # the same ninja
    reason = _op_builds.build_reason(build, ninja="/elsewhere/bin/ninja")
    assert reason and "now /elsewhere/bin/ninja is on PATH" in reason
