"""The design card's layering: engine/ never imports Gradio, ui/ never imports torch."""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("folder,forbidden", [
    ("engine", {"gradio", "fastapi", "ui"}),
    ("ui", {"torch", "diffusers", "transformers", "safetensors"}),
])
def test_layer_does_not_import(folder, forbidden):
    files = sorted((ROOT / folder).rglob("*.py"))
    assert files, f"no Python files in {folder}/"
    offenders = {f.relative_to(ROOT).as_posix(): sorted(imported_modules(f) & forbidden) for f in files}
    assert {k: v for k, v in offenders.items() if v} == {}


HEAVY = ("torch", "diffusers", "transformers", "safetensors")


def test_importing_every_ui_module_loads_no_torch():
    """Transitively: ui/ reaches the engine only through its torch-free modules (errors, jobs,
    request, images, infotext). Run in a fresh interpreter, since this test process has torch."""
    import subprocess
    import sys

    code = ("import importlib, pkgutil, sys, ui\n"
            "for m in pkgutil.walk_packages(ui.__path__, 'ui.'): importlib.import_module(m.name)\n"
            f"print(sorted(k for k in {HEAVY!r} if k in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_the_request_and_job_modules_load_no_torch():
    import subprocess
    import sys

    code = ("import sys, engine.request, engine.jobs, engine.errors, engine.images, engine.infotext\n"
            f"print(sorted(k for k in {HEAVY!r} if k in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
