"""The app's imports run one way: leaves <- infers / trainers / scoring / activelearning <- configs <- main.py.

Leaves are the modules directly in ``apps/medsegx/lib/`` (settings, labels, modality, frames,
compat, background, labelled_slices, model_store, ...); they import no task folder and no
``configs``. A task folder imports leaves and its own modules only; ``configs/`` is the one
composition root, and only ``main.py`` imports it.
"""

import ast
from pathlib import Path

import pytest

APP_DIR = Path(__file__).resolve().parents[2] / "apps" / "medsegx"
TASK_FOLDERS = ("infers", "trainers", "scoring", "activelearning")


def _layer(module: str) -> str:
    """``lib.infers.medsegx`` -> ``infers``; ``lib.settings`` -> ``leaf``; ``main`` -> ``main``."""
    parts = module.split(".")
    if parts[0] != "lib":
        return "main"
    if len(parts) >= 3 or (len(parts) == 2 and (APP_DIR / "lib" / parts[1]).is_dir()):
        return parts[1]
    return "leaf"


def _app_imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text())
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "lib":
                found.extend(f"lib.{alias.name}" for alias in node.names)
            elif node.module.startswith("lib."):
                found.append(node.module)
        elif isinstance(node, ast.Import):
            found.extend(alias.name for alias in node.names if alias.name.startswith("lib."))
    return found


def _modules() -> list[tuple[str, Path]]:
    modules = [("main", APP_DIR / "main.py")]
    for path in sorted((APP_DIR / "lib").rglob("*.py")):
        dotted = ".".join(path.relative_to(APP_DIR).with_suffix("").parts)
        modules.append((dotted.removesuffix(".__init__"), path))
    return modules


@pytest.mark.parametrize("module, path", _modules(), ids=[name for name, _ in _modules()])
def test_imports_run_one_way(module, path):
    layer = _layer(module)
    allowed = {
        "main": None,  # the top: anything
        "configs": {"leaf", "configs", *TASK_FOLDERS},
        "leaf": {"leaf"},
    }.get(layer, {"leaf", layer})
    if allowed is None:
        return
    upward = [target for target in _app_imports(path) if _layer(target) not in allowed]
    assert not upward, f"{module} ({layer}) imports up the house: {upward}"

