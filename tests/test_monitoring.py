"""Monitoring (issue #30): per-step throughput, learning rate and ETA in the log and in the scalars,
log lines that leave tqdm's bar intact, `--report_to`, plots of every scalar, and the line before
DeepSpeed compiles its CPU communication op."""

from __future__ import annotations

import importlib.util
import io
import json
import sys
from pathlib import Path

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
    def define_metric(self, name, step_metric=None):
        _record("define_metric", name=name, step_metric=step_metric)
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
    fake = importlib.util.spec_from_file_location("wandb", stub / "wandb.py")
    monkeypatch.setitem(sys.modules, "wandb", importlib.util.module_from_spec(fake))  # gone again after the test
    fake.loader.exec_module(sys.modules["wandb"])
    argv = ["--max_steps", "1", "--report_to", "wandb", "--tensorboard_path", str(tmp_path / "runs")]
    step1(tiny_step1_argv(tmp_path, *argv, "--output_dir", ""))
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    assert calls[0]["call"] == "init" and calls[0]["name"] == "step1" and calls[-1]["call"] == "finish"
    logged = {key for c in calls if c["call"] == "log" for key in c["values"]}
    assert {"step1/loss", "step1/eval_perplexity", *NEW_TAGS} <= logged
    assert not (tmp_path / "runs" / "step1").exists()  # no TensorBoard files beside


def wandb_records(path: Path) -> list:
    """The records of an offline wandb run file (`run-ID.wandb`): a 7-byte header, then LevelDB-log
    records (32 KiB blocks; 7-byte record headers: checksum, length, type) of wandb's protobuf `Record`."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", path
    position, block, payload, records = 7, 32768, b"", []
    while position + 7 <= len(data):
        if block - position % block < 7:  # a block's tail too short for a header is padding
            position += block - position % block
            continue
        length, kind = int.from_bytes(data[position + 4 : position + 6], "little"), data[position + 6]
        payload += data[position + 7 : position + 7 + length]
        position += 7 + length
        if kind in (1, 4):  # a full record, or the last fragment of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(payload)
            records.append(record)
            payload = b""
    return records


def offline_runs(root: Path) -> dict[str, dict]:
    """Offline runs under `root` by name: their config and history rows."""
    runs = {}
    for path in root.glob("**/offline-run-*/run-*.wandb"):
        name, config, rows = None, {}, []
        for record in wandb_records(path):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                name = record.run.display_name
                items = record.run.config.update
                config = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in items}
            elif kind == "history":
                items = record.history.item  # a key with "/" comes as nested_key
                rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in items})
        runs[name] = {"config": config, "rows": rows}
    return runs


REAL_WANDB_RUNS = """
import sys
from dschat_hal.monitor import WandbWriter
from training.step1_supervised_finetuning.main import main as step1
from training.step2_dpo_finetuning.main import main as dpo

tmp = sys.argv[1]
tiny = ["--device", "cpu", "--max_seq_len", "64", "--per_device_train_batch_size", "8",
        "--per_device_eval_batch_size", "8", "--max_steps", "1", "--report_to", "wandb", "--output_dir", ""]
step1([*tiny, "--data_output_path", tmp + "/cache1"])
dpo([*tiny, "--data_output_path", tmp + "/cache2", "--dtype", "fp32", "--eval_iters", "2"])
writer = WandbWriter("order", None)
writer.log({"x/eval": 1.0}, 3)  # as step 3 does: an evaluation at step 3 before the records of steps 1-3
for step in (1, 2, 3):
    writer.log({"x/loss": float(step)}, step)
writer.close()
"""


@pytest.mark.skipif(not monitor.installed("wandb"), reason="the wandb package is not importable (pip install wandb)")
def test_report_to_wandb_with_the_real_package_writes_offline_runs(tmp_path):
    """The real wandb, offline: step 1 and DPO (which logged nothing but TensorBoard) write a run each
    with their scalars against `global_step` and the flags as config; rows logged after a later step
    are kept (wandb's own step drops them); without an account or offline mode, one error line."""
    import os
    import subprocess

    from conftest import ROOT

    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path / "wandb"), "WANDB_SILENT": "true"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    run = subprocess.run(
        [sys.executable, "-c", REAL_WANDB_RUNS, str(tmp_path)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    runs = offline_runs(tmp_path / "wandb")
    assert set(runs) == {"step1", "step2_dpo", "order"}, runs
    logged = {key for row in runs["step1"]["rows"] for key in row}
    assert {"step1/loss", "step1/eval_perplexity", *NEW_TAGS, "global_step"} <= logged
    assert runs["step1"]["config"]["max_steps"] == 1 and runs["step1"]["config"]["report_to"] == "wandb"
    dpo_keys = {key for row in runs["step2_dpo"]["rows"] for key in row}
    assert {"step2_dpo/loss", "step2_dpo/eval_reward_margin"} <= dpo_keys, dpo_keys
    losses = [(row["global_step"], row["x/loss"]) for row in runs["order"]["rows"] if "x/loss" in row]
    assert losses == [(1, 1.0), (2, 2.0), (3, 3.0)]
    no_account = {k: v for k, v in env.items() if not k.startswith("WANDB_")} | {"HOME": str(tmp_path / "home")}
    code = "from dschat_hal.errors import cli_entry; from dschat_hal.monitor import WandbWriter\n"
    result = subprocess.run(
        [sys.executable, "-c", code + "cli_entry(lambda argv: WandbWriter('x', None))()"],
        cwd=tmp_path,
        env=no_account | {"WANDB_DIR": str(tmp_path / "none")},
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        timeout=120,
    )
    lines = result.stderr.strip().splitlines()
    assert result.returncode != 0 and lines[-1].startswith("error: --report_to wandb: wandb could not start a run")
    assert "Traceback" not in result.stderr and "WANDB_MODE=offline" in lines[-1]


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


def test_a_logging_config_built_in_python_reports_as_the_command_line_resolves_it(tmp_path):
    """`LoggingConfig(report_to="tensorboard")` without `enable_tensorboard` (which only the command line's
    validation used to set): DeepSpeed's monitor and the scalar writer both write TensorBoard files."""
    from dschat_hal.configs import LoggingConfig
    from dschat_hal.monitor import resolve_report_to
    from dschat_hal.runtime import ScalarWriter, _tensorboard

    config = LoggingConfig(report_to="tensorboard", tensorboard_path=str(tmp_path / "tb"))
    assert _tensorboard(config) and not config.enable_tensorboard  # resolved, the config left as given
    assert resolve_report_to(resolve_report_to(config)) == resolve_report_to(config)
    writer = ScalarWriter.for_run(config, "step1", {})
    writer.add({"loss": 1.0}, 1)
    writer.close()
    assert list((tmp_path / "tb").rglob("events.out.tfevents.*"))
    assert not _tensorboard(LoggingConfig()) and _tensorboard(LoggingConfig(enable_tensorboard=True))
