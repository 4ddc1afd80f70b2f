"""Resumable checkpoints as units: every engine of a step saved in full, then published at once.

Layout under the checkpoint directory::

    latest                      the tag of the newest complete unit (replaced atomically)
    global_step12/manifest.json step, engine names and the run setup, written last
    global_step12/actor/...     DeepSpeed's files for each engine (tag = engine name)
    global_step12/critic/...

A unit is written under `.global_stepN.tmp-PID`, renamed into place when every engine (and the
manifest) is on disk, and only then does `latest` point at it. A kill at any moment leaves the
previous unit as the latest one; the leftovers are removed by the next run.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path

from dschat_hal.errors import UserError
from dschat_hal.faults import (
    apply_umask,
    disk_full_is_one_line,
    fault_point,
    remove_stale_temporaries,
    signals_deferred,
)

log = logging.getLogger("dschat_hal")

LATEST = "latest"
MANIFEST = "manifest.json"
UNIT_NAME = re.compile(r"^global_step(\d+)$")


def _dist():
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def _rank0() -> bool:
    dist = _dist()
    return dist is None or dist.get_rank() == 0


def _barrier() -> None:
    dist = _dist()
    if dist is not None:
        dist.barrier()


def _rank0_pid() -> int:
    dist = _dist()
    if dist is None or dist.get_world_size() == 1:
        return os.getpid()
    box = [os.getpid()]
    dist.broadcast_object_list(box, src=0)
    return int(box[0])


def write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _umask() -> int:
    from dschat_hal.faults import current_umask

    return current_umask()


# What DeepSpeed and torch say when a unit's optimizer groups differ from the engine's (`ds_config.split_for_step`)
GROUP_LAYOUT_ERRORS = ("parameter-alignment layout", "different number of parameter groups")


def save_unit(root: str | os.PathLike, step: int, engines: dict, client_state: dict, setup: dict) -> Path:
    """Save `engines` (name -> DeepSpeed engine) as the unit `global_step{step}` and point `latest`
    at it. Collective: every rank calls it (each writes its own ZeRO shards)."""
    root = Path(root)
    latest = latest_unit(root) if (root / LATEST).exists() else None
    kept = (
        f"and the last unit ({latest.name}) is intact: rerun with --resume" if latest else "and no unit was published"
    )
    with signals_deferred(), disk_full_is_one_line(root, f"checkpoint global_step{step}", kept):
        try:
            return _save_unit(root, step, engines, client_state, setup)
        except Exception:
            shutil.rmtree(root / f".global_step{step}.tmp-{os.getpid()}", ignore_errors=True)  # this rank's staging
            raise


def _save_unit(root: Path, step: int, engines: dict, client_state: dict, setup: dict) -> Path:
    tag = f"global_step{step}"
    staging = root / f".{tag}.tmp-{_rank0_pid()}"
    if _rank0():
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
    _barrier()
    for name, engine in engines.items():
        engine.save_checkpoint(str(staging), tag=name, client_state={**client_state, "unit": tag}, save_latest=False)
        fault_point("checkpoint_engine_saved")
    _barrier()
    if _rank0():
        manifest = {"step": step, "engines": list(engines), "setup": setup, "files": file_sizes(staging)}
        from dschat_hal.ds_config import step_chunks  # deferred: ds_config imports torch

        manifest["step_chunks"] = step_chunks()  # the optimizer-group layout: told, not compared, on resume
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=1, default=str) + "\n")
        apply_umask(staging)
        fault_point("checkpoint_before_publish")
        final = root / tag
        if final.exists():  # the same step saved again (after a resume from an older unit)
            final.rename(root / f".{tag}.old-{os.getpid()}")
        staging.rename(final)
        fault_point("checkpoint_before_latest")
        write_text_atomic(root / LATEST, tag + "\n")
        shutil.rmtree(root / f".{tag}.old-{os.getpid()}", ignore_errors=True)
    _barrier()
    return root / tag


def file_sizes(unit: Path) -> dict[str, int]:
    """Every file of a unit (but its manifest) with its size: what a resume checks before loading."""
    return {
        str(path.relative_to(unit)): path.stat().st_size
        for path in sorted(unit.rglob("*"))
        if path.is_file() and path.name != MANIFEST
    }


def read_manifest(unit: Path) -> dict | None:
    try:
        return json.loads((unit / MANIFEST).read_text())
    except (OSError, ValueError):
        return None


def latest_unit(root: str | os.PathLike) -> Path | None:
    """The unit `latest` names, or None when there is no checkpoint yet (or `latest` names nothing)."""
    root = Path(root)
    latest = root / LATEST
    if not latest.exists():
        legacy = [p.parent for p in root.glob(f"*/{LATEST}")]
        if legacy:
            raise UserError(
                f"{root} holds checkpoints of an older layout ({', '.join(p.name for p in legacy)}); "
                "they cannot be resumed as one unit: delete the directory or drop --resume"
            )
        return None
    try:
        tag = latest.read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None
    return root / tag if UNIT_NAME.match(tag) else None


def manifest_shape_problem(manifest: object) -> str | None:
    """What makes parsed `manifest` JSON not a unit's manifest (None: the shape `_save_unit` writes):
    an object with an int `step`, a non-empty list of engine names, a `setup` object and, when
    present, `files` mapping relative paths to sizes."""
    if not isinstance(manifest, dict):
        return f"its {MANIFEST} holds a JSON {_json_type(manifest)}, not an object"
    step, engines, setup = manifest.get("step"), manifest.get("engines"), manifest.get("setup")
    if type(step) is not int:
        return f"its {MANIFEST} has no integer 'step'"
    if not isinstance(engines, list) or not engines or not all(_plain_name(name) for name in engines):
        return f"its {MANIFEST} has no list of engine names under 'engines'"
    if not isinstance(setup, dict):
        return f"its {MANIFEST} has no 'setup' object"
    files = manifest.get("files")
    if files is not None and not (
        isinstance(files, dict)
        and all(_relative(path) and type(size) is int and size >= 0 for path, size in files.items())
    ):
        return f"its {MANIFEST} 'files' is not a map of relative paths to sizes"
    return None


def _json_type(value: object) -> str:
    names = {list: "array", str: "string", bool: "boolean", int: "number", float: "number", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def _plain_name(name: object) -> bool:
    return isinstance(name, str) and bool(name) and name not in (".", "..") and "/" not in name


def _relative(path: str) -> bool:
    parts = Path(path).parts
    return bool(parts) and not Path(path).is_absolute() and ".." not in parts


def unit_problem(unit: Path) -> str | None:
    """Why `unit` cannot be resumed from (None: every part is present at the size it was saved with)."""
    try:
        manifest = json.loads((unit / MANIFEST).read_text())
    except (OSError, ValueError):
        return f"no readable {MANIFEST} (an interrupted save)"
    shape = manifest_shape_problem(manifest)
    if shape is not None:
        return f"{shape}: damaged or not written by this program"
    for name in manifest["engines"]:
        if not (unit / name).is_dir():
            return f"its {name}/ part is missing"
    sizes = manifest.get("files")
    if sizes is None:  # saved before manifests listed their files: at least each engine's model states
        for name in manifest["engines"]:
            if not any(p.stat().st_size for p in (unit / name).glob("*model_states.pt")):
                return f"{name}/ holds no model states"
        return None
    for relative, size in sizes.items():
        path = unit / relative
        if not path.is_file():
            return f"{relative} is missing"
        if path.stat().st_size != size:
            return f"{relative} is {path.stat().st_size} bytes, {size} when saved (truncated or overwritten)"
    return None


def units_newest_first(root: Path) -> list[Path]:
    units = [p for p in root.iterdir() if UNIT_NAME.match(p.name) and p.is_dir()] if root.is_dir() else []
    return sorted(units, key=lambda p: int(UNIT_NAME.match(p.name)[1]), reverse=True)


def choose_unit(root: Path) -> tuple[Path | None, list[str]]:
    """The unit `latest` names when it verifies, else the newest unit that does (None: no unit at
    all), and one line per damaged unit skipped. Raises when units exist but none verifies."""
    named = latest_unit(root)  # refuses an older layout
    skipped, notes = [], []
    candidates = units_newest_first(root)
    if named in candidates:  # the commit point of the last save
        candidates.remove(named)
        candidates.insert(0, named)
    for unit in candidates:
        problem = unit_problem(unit)
        if problem is None:
            if skipped or (named is not None and named != unit) or (named is None and (root / LATEST).exists()):
                said = f"'{LATEST}' names {named.name}" if named is not None else f"'{LATEST}' names no unit"
                notes.append(f"--resume: {said}; resuming from {unit.name}, the newest checkpoint unit that verifies")
            return unit, notes
        skipped.append(f"{unit.name}: {problem}")
        notes.append(f"warning: checkpoint unit {unit} is damaged ({problem}); skipping it")
    if skipped:
        raise UserError(
            f"no checkpoint unit under {root} can be resumed ({'; '.join(skipped)}); delete the damaged units "
            "(or the directory) to start fresh, or drop --resume"
        )
    return None, notes


def _chosen_on_rank0(root: Path) -> tuple[Path | None, list[str]]:
    """`choose_unit` decided by rank 0 (the writer of the manifests) and shared with every rank."""
    result: dict = {"unit": None, "notes": [], "error": None}
    if _rank0():
        try:
            unit, result["notes"] = choose_unit(root)
            result["unit"] = unit.name if unit else None
        except UserError as err:
            result["error"] = str(err)
    dist = _dist()
    if dist is not None and dist.get_world_size() > 1:
        box = [result]
        dist.broadcast_object_list(box, src=0)
        result = box[0]
    if result["error"]:
        raise UserError(result["error"])
    if _rank0():
        for note in result["notes"]:
            print(note, flush=True)
    return (root / result["unit"] if result["unit"] else None), result["notes"]


def load_unit(root: str | os.PathLike | None, engines: dict, setup: dict) -> dict | None:
    """Load every engine from the newest unit that verifies (`unit_problem`: a damaged unit is named
    and skipped); returns the saved client state (None: no checkpoint).

    Refuses, in one line, a unit that holds other engines, was written by a different setup (model,
    batch size, ZeRO stage, ...) or whose files cannot be loaded."""
    if not root:
        return None
    unit, _ = _chosen_on_rank0(Path(root))
    if unit is None:
        return None
    manifest = read_manifest(unit)
    if sorted(manifest["engines"]) != sorted(engines):
        raise UserError(
            f"checkpoint {unit} holds {', '.join(manifest['engines'])} but this run trains {', '.join(engines)}; "
            "resume with the same models and options (e.g. --enable_ema, --advantage_estimator), or drop --resume"
        )
    changed = [
        f"{key} {manifest['setup'].get(key)!r} -> {value!r}"
        for key, value in setup.items()
        if str(manifest["setup"].get(key)) != str(value)
    ]
    if changed:
        raise UserError(
            f"cannot resume from {unit}: the run changed ({'; '.join(changed)}); "
            "resume with the original flags, or start fresh without --resume"
        )
    client = None
    for name, engine in engines.items():
        try:
            path, state = engine.load_checkpoint(str(unit), tag=name, load_module_strict=False)
        except (RuntimeError, OSError, EOFError, AssertionError, ValueError, KeyError) as err:
            if any(sign in str(err) for sign in GROUP_LAYOUT_ERRORS):
                from dschat_hal.ds_config import STEP_CHUNKS_ENV, step_chunks

                written = manifest.get("step_chunks", 1)  # units from before the split hold whole groups
                raise UserError(
                    f"checkpoint unit {unit}: its {name} part holds other optimizer groups than this run builds "
                    f"(it was written with {STEP_CHUNKS_ENV}={written}, this run uses {step_chunks()}); resume "
                    f"with {STEP_CHUNKS_ENV}={written}, or start fresh without --resume"
                ) from None
            first = (str(err).strip().splitlines() or [type(err).__name__])[0][:160]
            raise UserError(
                f"checkpoint unit {unit}: its {name} part cannot be loaded ({first}); delete {unit} to resume "
                "from an older unit, or drop --resume"
            ) from None
        if path is None or state.get("unit") != unit.name:
            raise UserError(f"checkpoint {unit} has no complete {name} (mixed or torn checkpoint); delete it")
        client = client or state
    return client


def clean_root(root: str | os.PathLike | None) -> None:
    """Remove what killed saves left: staging directories of dead runs and units without a manifest
    (never the one `latest` names, which is complete by construction)."""
    if not root or not Path(root).is_dir():
        return
    root = Path(root)
    remove_stale_temporaries(root)
    try:
        keep = latest_unit(root)
    except UserError:
        return  # an old layout: leave it alone, resume will say what to do
    for unit in root.iterdir():
        if UNIT_NAME.match(unit.name) and unit != keep and read_manifest(unit) is None:
            shutil.rmtree(unit, ignore_errors=True) if unit.is_dir() else unit.unlink(missing_ok=True)
            log.warning("removed incomplete checkpoint %s (left by an interrupted save)", unit)


def prune(root: str | os.PathLike, keep: int) -> list[Path]:
    """Keep the newest `keep` complete units (and always the latest); returns what was removed."""
    root = Path(root)
    latest = latest_unit(root)
    units = sorted(
        (p for p in root.iterdir() if UNIT_NAME.match(p.name) and p.is_dir()),
        key=lambda p: int(UNIT_NAME.match(p.name)[1]),
    )
    removed = [p for p in units[:-keep] if p != latest] if keep > 0 else []
    for unit in removed:
        shutil.rmtree(unit, ignore_errors=True)
    return removed
