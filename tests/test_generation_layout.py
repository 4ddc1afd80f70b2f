"""The generation package's shape: one concern per module, imports in one direction (a module imports
only those before it in ORDER, never the trainer or the RLHF engine above it), one door, `make_hybrid_engine`,
the only name step 3 imports."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "dschat_hal" / "rlhf" / "generation"
PREFIX = "dschat_hal.rlhf.generation"
ORDER = ["sampling", "decode", "inference_copy", "hf_generate", "engine", "tensor_parallel"]
ABOVE = {"dschat_hal.rlhf.trainer", "dschat_hal.rlhf.engine"}


def imported_modules(path: Path) -> set[str]:
    """Every dschat_hal module `path` imports, at any depth (lazy imports included)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return {name for name in names if name.startswith("dschat_hal")}


def test_the_package_holds_exactly_the_ordered_modules():
    assert sorted(p.stem for p in PACKAGE.glob("*.py")) == sorted([*ORDER, "__init__"])


def test_each_module_imports_only_those_before_it():
    for index, name in enumerate(ORDER):
        imported = imported_modules(PACKAGE / f"{name}.py")
        inside = {module.removeprefix(f"{PREFIX}.") for module in imported if module.startswith(f"{PREFIX}.")}
        assert inside <= set(ORDER[:index]), (name, inside - set(ORDER[:index]))
        assert PREFIX not in imported, name  # never the package's door from inside
        assert not imported & ABOVE, (name, imported & ABOVE)


DOOR = ["make_hybrid_engine"]


def test_the_door_is_make_hybrid_engine_alone():
    tree = ast.parse((PACKAGE / "__init__.py").read_text())
    exported = [
        ast.literal_eval(node.value)
        for node in tree.body
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "__all__" for t in node.targets)
    ]
    bound = [
        alias.asname or alias.name for node in tree.body if isinstance(node, ast.ImportFrom) for alias in node.names
    ]
    assert exported == [DOOR] and bound == DOOR


def test_step_3_goes_through_the_door_alone():
    main = ROOT / "training" / "step3_rlhf_finetuning" / "main.py"
    used = {module for module in imported_modules(main) if module.startswith(PREFIX)}
    assert used == {PREFIX}, used
