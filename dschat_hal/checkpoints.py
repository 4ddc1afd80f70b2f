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
from dschat_hal.faults import apply_umask, fault_point, remove_stale_temporaries, signals_deferred

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
    tmp.write_text(text)
    os.chmod(tmp, 0o666 & ~_umask())
    os.replace(tmp, path)


def _umask() -> int:
    from dschat_hal.faults import current_umask

    return current_umask()


def save_unit(root: str | os.PathLike, step: int, engines: dict, client_state: dict, setup: dict) -> Path:
    """Save `engines` (name -> DeepSpeed engine) as the unit `global_step{step}` and point `latest`
    at it. Collective: every rank calls it (each writes its own ZeRO shards)."""
    with signals_deferred():
        return _save_unit(Path(root), step, engines, client_state, setup)


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
        manifest = {"step": step, "engines": list(engines), "setup": setup}
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


def read_manifest(unit: Path) -> dict | None:
    try:
        return json.loads((unit / MANIFEST).read_text())
    except (OSError, ValueError):
        return None


def latest_unit(root: str | os.PathLike) -> Path | None:
    """The unit `latest` names, or None when there is no checkpoint yet."""
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
    return root / latest.read_text().strip()


def load_unit(root: str | os.PathLike | None, engines: dict, setup: dict) -> dict | None:
    """Load every engine from the latest unit; returns the saved client state (None: no checkpoint).

    Refuses, in one line, a unit that is incomplete, holds other engines, or was written by a
    different setup (model, batch size, ZeRO stage, ...)."""
    if not root:
        return None
    unit = latest_unit(root)
    if unit is None:
        return None
    manifest = read_manifest(unit)
    if manifest is None:
        raise UserError(f"checkpoint {unit} is incomplete (no {MANIFEST}); delete it and its 'latest' or drop --resume")
    if sorted(manifest["engines"]) != sorted(engines):
        raise UserError(
            f"checkpoint {unit} holds {', '.join(manifest['engines'])} but this run trains {', '.join(engines)}; "
            "resume with the same models and options (e.g. --enable_ema), or drop --resume"
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
        path, state = engine.load_checkpoint(str(unit), tag=name, load_module_strict=False)
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
