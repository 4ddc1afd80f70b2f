"""One build of DeepSpeed's CPU communication op per environment (`accel/_op_builds.py`, issue #30)."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT

from accel import _op_builds

# A stand-in for the compiler: a build command (one with `-o`) only touches what it would write and is
# noted in $CXX_CALLS; anything else (torch's version and ABI probes) goes to the real compiler.
FAKE_CXX = """#!/bin/sh
case " $* " in *" -o "*) ;; *) exec {real} "$@" ;; esac
echo "$*" >> "$CXX_CALLS"
out=""; dep=""
while [ $# -gt 0 ]; do
  case "$1" in -o) out="$2"; shift ;; -MF) dep="$2"; shift ;; esac
  shift
done
touch "$out"
if [ -n "$dep" ]; then echo "$out:" > "$dep"; fi
"""


def _version(ninja: str) -> str:
    return subprocess.run([ninja, "--version"], capture_output=True, text=True, check=True).stdout.strip()


def test_the_comm_op_builds_once_whichever_ninja_path_finds_first(tmp_path):
    """`.venv/bin/python` run plain (the system's ninja first on PATH) and with the venv activated (the
    venv's ninja first) rebuilt the op each time for minutes: ninja 1.12 changed the hash it keeps of
    each command in `.ninja_log`, so each ninja took the other's build for a changed command line. Now
    every process of the environment builds with the environment's ninja: the second run builds
    nothing. On a copy of the built op, with a stand-in compiler that only touches its outputs
    (what is checked is ninja's decision to rebuild, in seconds, the shared cache untouched)."""
    env_ninja = _op_builds.environment_ninja()
    venv_bin = str(Path(sys.prefix) / "bin")
    plain_path = os.pathsep.join(p for p in os.environ["PATH"].split(os.pathsep) if p and p != venv_bin)
    other = shutil.which("ninja", path=plain_path)
    real_cxx = shutil.which("c++")
    if env_ninja is None or other is None or real_cxx is None or _version(other) == _version(str(env_ninja)):
        pytest.skip("needs an environment with its own ninja and another ninja version on PATH, and a c++")
    built = _op_builds.extensions_dir() / _op_builds.SHM_COMM_OP
    if not (built / f"{_op_builds.SHM_COMM_OP}.so").is_file():
        pytest.skip(f"needs the built op in {built} (TORCH_EXTENSIONS_DIR)")
    op = tmp_path / "ext" / _op_builds.SHM_COMM_OP
    shutil.copytree(built, op, ignore=shutil.ignore_patterns("lock"))  # mtimes kept
    fake = tmp_path / "fakebin"
    fake.mkdir()
    (fake / "c++").write_text(FAKE_CXX.format(real=real_cxx))
    (fake / "c++").chmod(stat.S_IRWXU)
    code = "import accel; accel.get('cpu').init_distributed(); print('initialised')"
    # the copy as the other ninja leaves it (its build log, and the marker naming it), as a run without the fix did
    fake_env = {**os.environ, "PATH": os.pathsep.join([str(fake), plain_path]), "CXX_CALLS": str(tmp_path / "o")}
    subprocess.run([other, "-C", str(op)], env=fake_env, capture_output=True, check=True, timeout=120)
    (op / _op_builds.NINJA_MARKER).write_text(os.path.realpath(other))

    def run(path: str, calls: Path) -> subprocess.CompletedProcess:
        env = {
            **os.environ,
            "PATH": path,
            "CXX_CALLS": str(calls),
            "TORCH_EXTENSIONS_DIR": str(op.parent),
            "PYTHONPATH": str(ROOT),
        }
        env.pop("CXX", None)
        result = subprocess.run(
            [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240
        )
        assert result.returncode == 0 and "initialised" in result.stdout, result.stderr[-2000:]
        return result

    activated = run(os.pathsep.join([venv_bin, str(fake), plain_path]), tmp_path / "activated.calls")
    plain = run(os.pathsep.join([str(fake), plain_path]), tmp_path / "plain.calls")
    assert not (tmp_path / "plain.calls").exists(), (tmp_path / "plain.calls").read_text()
    assert "building DeepSpeed's CPU communication op" not in plain.stderr, plain.stderr[-2000:]
    again = run(os.pathsep.join([venv_bin, str(fake), plain_path]), tmp_path / "again.calls")
    assert not (tmp_path / "again.calls").exists() and "building DeepSpeed" not in again.stderr
    assert (op / _op_builds.NINJA_MARKER).read_text().strip() == os.path.realpath(env_ninja)
    assert (tmp_path / "activated.calls").exists()  # last built by the other ninja: rebuilt once, said so
    said = [line for line in activated.stderr.splitlines() if "building DeepSpeed's CPU communication op" in line]
    assert len(said) == 1 and f"cache: {op.parent}" in said[0] and os.path.realpath(env_ninja) in said[0], (
        activated.stderr
    )


def _fake_environment(monkeypatch, tmp_path: Path, venv: bool = True) -> Path:
    prefix = tmp_path / "venv"
    (prefix / "bin").mkdir(parents=True)
    monkeypatch.setattr(sys, "prefix", str(prefix))
    monkeypatch.setattr(sys, "base_prefix", str(tmp_path / "base") if venv else str(prefix))
    monkeypatch.delenv("CONDA_PREFIX", raising=False)
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR", raising=False)
    return prefix


def test_the_op_cache_defaults_to_the_environments_own(tmp_path, monkeypatch):
    """TORCH_EXTENSIONS_DIR unset: the environment's sys.prefix/torch_extensions, not torch's
    ~/.cache/torch_extensions/pyXY_cpu that every environment of that Python shares; set: kept."""
    prefix = _fake_environment(monkeypatch, tmp_path)
    assert _op_builds.use_environment_extensions_dir() == prefix / "torch_extensions"
    assert os.environ["TORCH_EXTENSIONS_DIR"] == str(prefix / "torch_extensions")
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "mine"))
    assert _op_builds.use_environment_extensions_dir() == tmp_path / "mine"
    _fake_environment(monkeypatch, tmp_path / "system", venv=False)  # the system's Python: torch's default
    assert _op_builds.use_environment_extensions_dir() != tmp_path / "system" / "venv" / "torch_extensions"
    assert "TORCH_EXTENSIONS_DIR" not in os.environ


def test_the_environments_ninja_goes_first_on_path(tmp_path, monkeypatch):
    prefix = _fake_environment(monkeypatch, tmp_path)
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    assert _op_builds.use_environment_ninja() is None and os.environ["PATH"] == "/usr/bin:/bin"  # it has none
    ninja = prefix / "bin" / "ninja"
    ninja.write_text("#!/bin/sh\n")
    ninja.chmod(stat.S_IRWXU)
    assert _op_builds.use_environment_ninja() == str(ninja)
    assert os.environ["PATH"] == f"{prefix / 'bin'}:/usr/bin:/bin"
    _op_builds.use_environment_ninja()  # already first: PATH unchanged
    assert os.environ["PATH"] == f"{prefix / 'bin'}:/usr/bin:/bin" and shutil.which("ninja") == str(ninja)
