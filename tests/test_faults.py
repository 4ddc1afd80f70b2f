"""Faults: leftovers of killed runs, stale op-build locks, file modes, checkpoint units, pruning,
and exact resume with gradient accumulation."""

from __future__ import annotations

import json
import os
import subprocess
import time

import pytest
import torch
from conftest import tiny_step1_argv
from safetensors.torch import load_file

from dschat_hal.faults import clear_stale_build_locks, remove_stale_temporaries
from training.step1_supervised_finetuning.main import main as step1


def dead_pid() -> int:
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


def test_leftovers_of_a_dead_save_are_removed_and_a_moved_aside_copy_restored(tmp_path):
    pid = dead_pid()
    (tmp_path / f".out.tmp-{pid}-abc").mkdir()
    (tmp_path / f".model.old-{pid}").mkdir()  # killed between moving model aside and publishing
    (tmp_path / f".other.tmp-{os.getpid()}-x").mkdir()  # a live save of this process: kept
    removed = remove_stale_temporaries(tmp_path)
    assert [p.name for p in removed] == [f".out.tmp-{pid}-abc"]
    assert (tmp_path / "model").is_dir() and (tmp_path / f".other.tmp-{os.getpid()}-x").is_dir()


def test_a_stale_op_build_lock_is_removed_and_a_live_one_reported(tmp_path, caplog):
    stale, live = tmp_path / "py_cpu" / "cpu_adam", tmp_path / "py_cpu" / "shm_comm"
    for build in (stale, live):
        build.mkdir(parents=True)
        (build / "lock").touch()
        os.utime(build / "lock", (time.time() - 600, time.time() - 600))
    ninja = subprocess.Popen(["sleep", "30"], cwd=live)  # a build still running in its directory
    try:
        removed = clear_stale_build_locks(tmp_path)
    finally:
        ninja.kill()
        ninja.wait()
    assert removed == [stale / "lock"] and (live / "lock").exists()
    assert "removed a stale op-build lock" in caplog.text and "another process is building" in caplog.text


def test_a_lock_no_process_holds_is_stale_at_any_age_and_one_held_open_is_live(tmp_path, caplog):
    """torch's FileBaton keeps the lock's descriptor open for the whole build: that tells a live
    build (another process, just started) from a killed one, with no age to wait out."""
    import sys

    killed, building = tmp_path / "killed_build", tmp_path / "live_build"
    for build in (killed, building):
        build.mkdir()
    (killed / "lock").touch()  # created a moment ago, by a build that is gone
    holder = subprocess.Popen(
        [sys.executable, "-c", "import os, sys, time; os.open(sys.argv[1], os.O_CREAT | os.O_EXCL); "
         "print('held', flush=True); time.sleep(30)", str(building / "lock")],
        stdout=subprocess.PIPE, text=True, cwd=tmp_path,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        removed = clear_stale_build_locks(tmp_path)
    finally:
        holder.kill()
        holder.wait()
    assert removed == [killed / "lock"] and (building / "lock").exists()
    assert f"waiting: process {holder.pid} is building the op in {building}" in caplog.text


def test_a_library_caller_is_not_held_by_a_stale_lock_of_the_comm_op(tmp_path):
    """A program that uses the library directly (no step main): `init_distributed` loads DeepSpeed's
    comm op, whose load waits forever, silently, on the lock a killed build left in its build
    directory; the layer removes it first and says so in one line. On a copy of the built op."""
    import shutil
    import sys

    from conftest import ROOT

    from accel._op_builds import extensions_dir

    built = extensions_dir() / "deepspeed_shm_comm"
    op = tmp_path / "deepspeed_shm_comm"
    if built.is_dir():
        shutil.copytree(built, op, ignore=shutil.ignore_patterns("lock"))  # mtimes kept: no rebuild
    else:
        op.mkdir()  # not built yet: the load builds it here
    (op / "lock").touch()
    os.utime(op / "lock", (time.time() - 3600, time.time() - 3600))
    code = "import accel; accel.get('cpu').init_distributed(); print('initialised')"
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp_path), "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240
    )
    assert result.returncode == 0 and "initialised" in result.stdout, result.stderr[-2000:]
    said = [line for line in result.stderr.splitlines() if "stale op-build lock" in line]
    assert len(said) == 1 and str(op / "lock") in said[0] and not (op / "lock").exists(), result.stderr[-2000:]


def test_under_several_processes_only_rank_0_logs_and_errors_name_their_rank(monkeypatch, capsys):
    """Every rank configures logging; step 3's lines printed once per rank under torchrun x2 are
    cut to rank 0's, except errors (named with their rank), in the logs and in `error:` lines."""
    import io
    import logging

    from dschat_hal import runtime
    from dschat_hal.args import step1_parser
    from dschat_hal.errors import UserError, cli_entry

    root, seen = logging.getLogger(), io.StringIO()
    handler = logging.StreamHandler(seen)
    root.addHandler(handler)
    monkeypatch.setattr(runtime, "rank", lambda: 1)
    try:
        runtime.setup(step1_parser().parse_args(["--device", "cpu"]))
        seen.seek(0)
        seen.truncate()  # what setup logged before its filter was in place
        log = logging.getLogger("dschat_hal.rlhf.engine")
        monkeypatch.setattr(log, "level", logging.INFO)
        log.info("step 3: actor ready")
        log.warning("warning: most rewards are clipped")
        log.error("the critic diverged")
        log.info("rank 1: building the data cache here", extra={"all_ranks": True})
    finally:
        root.removeHandler(handler)
        runtime.log_from_rank0(0)
    assert seen.getvalue().splitlines() == ["rank 1: the critic diverged", "rank 1: building the data cache here"]

    @cli_entry
    def refuses(argv: list[str]) -> None:
        raise UserError("--data_path x does not exist")

    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SystemExit):
        refuses([])
    assert capsys.readouterr().err == "error: rank 1: --data_path x does not exist\n"


def test_deepspeeds_op_load_note_is_not_printed_by_every_rank(tmp_path):
    """DeepSpeed prints "DeepSpeed ... built successfully" each time a rank loads its CPU communication
    op (built now or long ago): once per rank under a launcher, before a step's own first line. Dropped;
    a real build is announced by the layer's own line (`announce_comm_op_build`)."""
    import sys

    from conftest import ROOT

    code = "import accel; print('before'); accel.get('cpu').init_distributed(); print('initialised')"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.splitlines() == ["before", "initialised"], result.stdout


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_saved_models_follow_the_umask(tmp_path, umask):
    from dschat_hal.models import create_lm, load_tokenizer, save_lm

    tokenizer = load_tokenizer("tiny-opt")
    old = os.umask(umask)
    try:
        save_lm(create_lm("tiny-opt", tokenizer), tokenizer, tmp_path / "m")
    finally:
        os.umask(old)
    assert (tmp_path / "m").stat().st_mode & 0o777 == 0o777 & ~umask
    assert (tmp_path / "m" / "model.safetensors").stat().st_mode & 0o777 == 0o666 & ~umask


def base(tmp_path) -> list[str]:
    return tiny_step1_argv(tmp_path, "--seed", "3")


def test_resume_with_gradient_accumulation_repeats_the_run_exactly(tmp_path):
    """Accumulation 2 and a checkpoint every optimizer step: a run stopped after 3 steps and resumed
    gives the uninterrupted run's losses (every micro-batch) and final weights."""
    args = [*base(tmp_path), "--gradient_accumulation_steps", "2", "--print_loss", "--learning_rate", "2e-3"]
    full = step1([*args, "--output_dir", str(tmp_path / "full")])["losses"]
    first = step1([*args, "--output_dir", str(tmp_path / "run"), "--save_interval", "1", "--max_steps", "3"])
    resumed = step1([*args, "--output_dir", str(tmp_path / "run"), "--resume", "--save_interval", "1"])["losses"]
    assert len(first["losses"]) == 6 and len(full) == 6 + len(resumed)
    assert first["losses"] + resumed == pytest.approx(full, abs=1e-5)
    a, b = load_file(tmp_path / "full" / "model.safetensors"), load_file(tmp_path / "run" / "model.safetensors")
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_save_total_limit_keeps_the_newest_units(tmp_path):
    step1([*base(tmp_path), "--output_dir", str(tmp_path / "o"), "--max_steps", "4", "--save_interval", "1",
           "--save_total_limit", "2"])  # fmt: skip
    root = tmp_path / "o_checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["global_step3", "global_step4", "latest"]
    manifest = json.loads((root / "global_step4" / "manifest.json").read_text())
    assert manifest["step"] == 4 and manifest["engines"] == ["step1"]


class FakeEngine:
    def __init__(self, dtype: str, skipped: int = 0) -> None:
        self.dtype, self.skipped_steps = dtype, skipped

    def fp16_enabled(self) -> bool:
        return self.dtype == "fp16"

    def bfloat16_enabled(self) -> bool:
        return self.dtype == "bf16"


def test_the_health_guard_counts_a_bad_step_once_and_suggests_only_another_dtype():
    from dschat_hal.errors import UserError
    from dschat_hal.loop import HealthGuard

    nan = float("nan")
    guard = HealthGuard(max_bad_steps=10)
    guard.check([[1.0, nan, nan, nan, 0.1]] * 1, 4, FakeEngine("bf16"))  # step 3: five numbers, one step
    assert guard.bad_steps == 1
    guard.check([nan, 1.0, nan], 5, FakeEngine("fp16", skipped=2))  # fp16: the NaN steps are the skipped ones
    assert guard.bad_steps == 3
    with pytest.raises(UserError) as bf16:
        HealthGuard(0).check([nan], 1, FakeEngine("bf16"))
    assert "1 bad steps" in str(bf16.value) and "bf16" not in str(bf16.value) and "--dtype fp32" in str(bf16.value)
    with pytest.raises(UserError) as fp16:
        HealthGuard(0).check([nan], 1, FakeEngine("fp16"))
    assert "--dtype bf16 or fp32" in str(fp16.value)
    with pytest.raises(UserError) as fp32:
        HealthGuard(0).check([nan], 1, FakeEngine("fp32"))
    assert "--dtype" not in str(fp32.value)


def test_a_data_cache_build_killed_midway_is_removed_by_the_next_run(tmp_path):
    """SIGTERM/SIGKILL skip the build's own cleanup: its directory names the process, so a rerun
    removes it (and keeps the live build of a process that still runs, or of another machine)."""
    import signal
    import sys

    from conftest import ROOT

    from dschat_hal.data import DataSpec, load_or_build
    from dschat_hal.models import load_tokenizer

    code = (
        "import sys; from dschat_hal.data import DataSpec, load_or_build; from dschat_hal.models import "
        "load_tokenizer; load_or_build(DataSpec(['local/jsonfile'], max_seq_len=32), load_tokenizer('tiny-opt'), sys.argv[1])"
    )
    env = {**os.environ, "DSCHAT_HAL_KILL_AT": "data_cache_building"}
    killed = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], cwd=ROOT, env=env, stderr=subprocess.PIPE)
    assert killed.wait(timeout=120) == -signal.SIGKILL, killed.stderr.read()[-2000:]
    (leftover,) = tmp_path.glob(".step1_*.tmp-*")
    assert f".tmp-{killed.pid}-on-" in leftover.name
    live = tmp_path / f".step1_x.tmp-{os.getpid()}-on-{leftover.name.split('-on-')[1]}"
    foreign = tmp_path / f".step1_y.tmp-{dead_pid()}-on-othermachine-abc"
    live.mkdir()
    foreign.mkdir()
    train, _, _ = load_or_build(DataSpec(["local/jsonfile"], max_seq_len=32), load_tokenizer("tiny-opt"), str(tmp_path))
    assert len(train) > 0 and not leftover.exists()
    assert live.is_dir() and foreign.is_dir()


def test_resume_skips_a_damaged_unit_naming_it_and_an_empty_latest(tmp_path, capsys):
    """The newest unit truncated: resume names it and goes on from the newest unit that verifies;
    an empty `latest` is only a hint that names nothing."""
    args = [*base(tmp_path), "--output_dir", str(tmp_path / "o"), "--save_interval", "1"]
    step1([*args, "--max_steps", "2"])
    root = tmp_path / "o_checkpoints"
    states = root / "global_step2" / "step1" / "mp_rank_00_model_states.pt"
    size = states.stat().st_size
    states.write_bytes(states.read_bytes()[: size // 2])
    capsys.readouterr()
    step1([*args, "--max_steps", "3", "--resume"])
    out = capsys.readouterr().out
    damaged = f"{root / 'global_step2'} is damaged (step1/mp_rank_00_model_states.pt is {size // 2} bytes, {size} when"
    assert damaged in out
    assert "resuming from global_step1, the newest checkpoint unit that verifies" in out
    assert f"resumed from {root / 'global_step1'} at" in out
    assert (root / "latest").read_text().strip() == "global_step3" and states.stat().st_size == size  # saved again
    (root / "latest").write_text("")
    step1([*args, "--max_steps", "3", "--resume"])
    out = capsys.readouterr().out
    assert "'latest' names no unit; resuming from global_step3" in out and "is damaged" not in out


def test_a_unit_missing_a_part_is_named(tmp_path):
    """A step-3 unit whose critic/ is gone (DeepSpeed itself ends in a bare AssertionError)."""
    from dschat_hal.checkpoints import choose_unit, unit_problem

    for step in (1, 2):
        unit = tmp_path / f"global_step{step}"
        (unit / "actor").mkdir(parents=True)
        (unit / "actor" / "mp_rank_00_model_states.pt").write_bytes(b"x" * 10)
        (unit / "critic").mkdir()
        (unit / "critic" / "mp_rank_00_model_states.pt").write_bytes(b"y" * 10)
        files = {"actor/mp_rank_00_model_states.pt": 10, "critic/mp_rank_00_model_states.pt": 10}
        manifest = {"step": step, "engines": ["actor", "critic"], "setup": {}, "files": files}
        (unit / "manifest.json").write_text(json.dumps(manifest))
    (tmp_path / "latest").write_text("global_step2\n")
    import shutil

    shutil.rmtree(tmp_path / "global_step2" / "critic")
    assert unit_problem(tmp_path / "global_step2") == "its critic/ part is missing"
    unit, notes = choose_unit(tmp_path)
    assert unit == tmp_path / "global_step1"
    assert (
        notes[0]
        == f"warning: checkpoint unit {tmp_path / 'global_step2'} is damaged (its critic/ part is missing); skipping it"
    )


def write_unit(root, step: int, manifest: object) -> None:
    unit = root / f"global_step{step}"
    (unit / "actor").mkdir(parents=True)
    (unit / "actor" / "mp_rank_00_model_states.pt").write_bytes(b"x" * 10)
    (unit / "manifest.json").write_text(json.dumps(manifest))


GOOD_MANIFEST = {"step": 1, "engines": ["actor"], "setup": {}, "files": {"actor/mp_rank_00_model_states.pt": 10}}


@pytest.mark.parametrize(
    "manifest",
    [
        ["actor"],
        "global_step2",
        None,
        {"step": 2, "engines": ["actor"]},  # no setup
        {"step": 2, "setup": {}},  # no engines
        {"step": 2, "engines": "actor", "setup": {}},
        {"step": 2, "engines": [{"name": "actor"}], "setup": {}},
        {"step": 2, "engines": ["actor"], "setup": []},
        {"step": "2", "engines": ["actor"], "setup": {}},
        {"step": 2, "engines": ["actor"], "setup": {}, "files": ["actor/mp_rank_00_model_states.pt"]},
        {"step": 2, "engines": ["actor"], "setup": {}, "files": {"actor/mp_rank_00_model_states.pt": "10"}},
        {"step": 2, "engines": ["../actor"], "setup": {}},
    ],
    ids=lambda manifest: json.dumps(manifest)[:40],
)
def test_a_manifest_of_the_wrong_shape_is_a_damaged_unit(tmp_path, manifest):
    """Valid JSON that is not a manifest: the unit is named in one line and the older one resumed."""
    from dschat_hal.checkpoints import choose_unit

    write_unit(tmp_path, 1, GOOD_MANIFEST)
    write_unit(tmp_path, 2, manifest)
    (tmp_path / "latest").write_text("global_step2\n")
    unit, notes = choose_unit(tmp_path)
    assert unit == tmp_path / "global_step1"
    assert notes[0].startswith(f"warning: checkpoint unit {tmp_path / 'global_step2'} is damaged (its manifest.json ")
    assert notes[0].endswith("damaged or not written by this program); skipping it") and "\n" not in notes[0]


def no_space(*args, **kwargs):
    raise OSError(28, "No space left on device")


def test_disk_full_during_the_final_save_keeps_the_previous_output(tmp_path, capsys, monkeypatch):
    """safetensors' ENOSPC: one line naming the output; the previous model intact, no temporary left."""
    import transformers.modeling_utils

    out = tmp_path / "o"
    step1([*base(tmp_path), "--output_dir", str(out), "--max_steps", "1"])
    before = (out / "model.safetensors").read_bytes()
    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", no_space)
    with pytest.raises(SystemExit) as stop:
        step1([*base(tmp_path), "--output_dir", str(out), "--max_steps", "1", "--seed", "4"])
    err = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 2 and err[-1].startswith(f"error: no space left on the device holding {out} while"), err
    assert "the previous" in err[-1] and not any("Traceback" in line for line in err)
    assert (out / "model.safetensors").read_bytes() == before
    assert not list(tmp_path.glob(".o.*"))


def test_disk_full_during_a_checkpoint_keeps_the_last_unit(tmp_path, capsys, monkeypatch):
    """torch's writer reports a full disk as `unexpected pos` (no errno): the staging directory goes,
    `latest` still names the last good unit."""
    from dschat_hal import faults

    args = [*base(tmp_path), "--output_dir", str(tmp_path / "o"), "--save_interval", "1"]
    step1([*args, "--max_steps", "1"])
    real_save = torch.save

    def short_write(obj, f, *a, **k):
        real_save(obj, f, *a, **k)
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 1613504 vs 1613396")

    monkeypatch.setattr(torch, "save", short_write)
    monkeypatch.setattr(faults, "free_bytes", lambda path: 0)  # what the full file system reports
    with pytest.raises(SystemExit) as stop:
        step1([*args, "--max_steps", "2", "--resume"])
    root = tmp_path / "o_checkpoints"
    err = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 2, err[-5:]
    assert f"no space left on the device holding {root} while writing checkpoint global_step2" in err[-1]
    assert "the last unit (global_step1) is intact: rerun with --resume" in err[-1]
    assert sorted(p.name for p in root.iterdir()) == ["global_step1", "latest"]
    assert (root / "latest").read_text().strip() == "global_step1"


def test_disk_full_while_caching_data_names_the_cache_not_the_data(tmp_path, capsys, monkeypatch):
    import datasets

    def full(*args, **kwargs):
        try:
            raise OSError(28, "No space left on device")
        except OSError as err:
            raise datasets.exceptions.DatasetGenerationError("An error occurred while generating the dataset") from err

    monkeypatch.setattr(datasets, "load_dataset", full)  # datasets writing its Arrow copy of the raw files
    with pytest.raises(SystemExit) as stop:
        step1(["--device", "cpu", "--data_output_path", str(tmp_path / "c"), "--max_steps", "1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert (
        stop.value.code == 2
        and f"no space left on the device holding {tmp_path / 'c'} while writing the data cache" in err[-1]
    )
    assert "assets/data" not in err[-1] and not list((tmp_path / "c").glob("*step1_*"))
