"""launch.sh and scripts/install.py, without a real install.

Launcher tests run a copy of launch.sh in a temp folder: a fake `python3` on PATH for the
"which Python" checks, or a real but empty venv, pre-stamped so the installer skips, beside a fake
app.py that prints its arguments.
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FAKE_APP = "import json, sys\nprint(json.dumps(sys.argv[1:]))\n"


@pytest.fixture(scope="session")
def installer():
    """scripts/install.py as a module (it is a script, not part of a package)."""
    spec = importlib.util.spec_from_file_location("easel_install", ROOT / "scripts" / "install.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    return module


def make_project(folder: Path) -> Path:
    """The files launch.sh and the installer read, copied into `folder`, and a fake app.py."""
    (folder / "scripts").mkdir(parents=True)
    for name in ("launch.sh", "pyproject.toml", "constraints.txt", "scripts/install.py"):
        shutil.copy(ROOT / name, folder / name)
    (folder / "app.py").write_text(FAKE_APP)
    return folder


def fake_command(bin_dir: Path, name: str, script: str) -> None:
    bin_dir.mkdir(exist_ok=True)
    path = bin_dir / name
    path.write_text("#!/bin/sh\n" + script + "\n")
    path.chmod(0o755)


def run_launcher(project: Path, args: list[str], path: str) -> subprocess.CompletedProcess:
    env = {key: value for key, value in os.environ.items() if key != "VIRTUAL_ENV"}
    env["PATH"] = path
    return subprocess.run(
        ["/bin/bash", str(project / "launch.sh"), *args],
        cwd=project.parent, env=env, capture_output=True, text=True, timeout=120,
    )


def test_launch_refuses_python_older_than_3_10(tmp_path):
    project = make_project(tmp_path / "easel")
    # Answers the launcher's version probe the way a Python 3.8 would.
    fake_command(tmp_path / "bin", "python3", 'echo 3.8')

    result = run_launcher(project, [], path=str(tmp_path / "bin"))

    assert result.returncode == 1
    assert "needs Python 3.10 or newer" in result.stderr
    assert "3.8 (python3)" in result.stderr
    assert not (project / "venv").exists()


def test_launch_says_when_no_python_is_found(tmp_path):
    project = make_project(tmp_path / "easel")
    (tmp_path / "empty").mkdir()

    result = run_launcher(project, [], path=str(tmp_path / "empty"))

    assert result.returncode == 1
    assert "no Python was found" in result.stderr


def test_launch_skips_a_python_stub_that_does_not_run(tmp_path):
    # macOS's /usr/bin/python3 without developer tools only asks to install them.
    project = make_project(tmp_path / "easel")
    fake_command(tmp_path / "bin", "python3", "exit 1")
    fake_command(tmp_path / "bin", "python3.10", "echo 3.9")

    result = run_launcher(project, [], path=str(tmp_path / "bin"))

    assert "3.9 (python3.10)" in result.stderr


def test_launch_reports_a_venv_whose_python_is_gone(tmp_path):
    project = make_project(tmp_path / "easel")
    (project / "venv").mkdir()
    (project / "venv" / "pyvenv.cfg").write_text("home = /nonexistent\n")

    result = run_launcher(project, [], path=os.environ["PATH"])

    assert result.returncode == 1
    assert "Delete the venv folder" in result.stderr


# Spaces in the install path break no step on Linux/macOS (venv, editable install, the pip and
# console-script shebangs all quote it), so the launcher accepts them.
@pytest.mark.parametrize("folder", ["easel", "My Easel folder"])
def test_launch_passes_arguments_to_app_py(tmp_path, installer, folder):
    project = make_project(tmp_path / folder)
    venv.create(project / "venv", with_pip=False, symlinks=True)
    source = installer.choose_torch_source(installer.platform.system(), installer.nvidia_smi_answers())
    stamp = installer.wanted_stamp(project, [], source.name)
    (project / "venv" / installer.STAMP_NAME).write_text(json.dumps(stamp))
    args = ["--port", "7861", "a prompt with spaces", "--flag=x*"]

    result = run_launcher(project, args, path=os.environ["PATH"])

    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == args


@pytest.mark.parametrize(
    "system, nvidia, name, index",
    [
        ("Linux", True, "cuda", "https://download.pytorch.org/whl/cu130"),
        ("Linux", False, "cpu", "https://download.pytorch.org/whl/cpu"),
        ("Windows", True, "cuda", "https://download.pytorch.org/whl/cu130"),
        ("Windows", False, "cpu", "https://download.pytorch.org/whl/cpu"),
        ("Darwin", False, "default", None),
    ],
)
def test_torch_source_follows_hardware(installer, system, nvidia, name, index):
    source = installer.choose_torch_source(system, nvidia)

    assert (source.name, source.index_url) == (name, index)


@pytest.mark.parametrize(
    "system, nvidia, requirement",
    [("Linux", True, "torch==2.13.0+cu130"), ("Linux", False, "torch==2.13.0+cpu"), ("Darwin", False, "torch==2.13.0")],
)
def test_torch_requirement_pins_the_build(installer, system, nvidia, requirement):
    source = installer.choose_torch_source(system, nvidia)

    assert installer.torch_requirement(ROOT, source) == requirement


@pytest.mark.parametrize(
    "script, expected",
    [
        ('echo "GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-1234)"', True),
        # Installed but the driver is not loaded.
        ('echo "NVIDIA-SMI has failed because it could not communicate with the NVIDIA driver."; exit 9', False),
        (None, False),
    ],
)
def test_nvidia_smi_detection(installer, tmp_path, monkeypatch, script, expected):
    (tmp_path / "bin").mkdir()
    if script is not None:
        fake_command(tmp_path / "bin", "nvidia-smi", script)
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))

    assert installer.nvidia_smi_answers() is expected


def test_cpu_install_pins_torch_before_the_project(installer):
    source = installer.choose_torch_source("Linux", False)

    commands = installer.install_commands(ROOT, source, ["test"], use_index=True)

    torch_step, project_step = commands[1], commands[2]
    assert "torch==2.13.0+cpu" in torch_step
    assert torch_step[torch_step.index("--extra-index-url") + 1] == "https://download.pytorch.org/whl/cpu"
    assert project_step[-2:] == ["-e", ".[test]"]
    assert "--extra-index-url" not in project_step


def test_watermark_is_installed_without_its_dependencies(installer):
    commands = installer.install_commands(ROOT, installer.choose_torch_source("Linux", False), [], use_index=False)

    assert commands[-1][-2:] == ["--no-deps", "invisible-watermark==0.2.0"]


def test_local_wheels_need_no_extra_index(installer):
    commands = installer.install_commands(ROOT, installer.choose_torch_source("Linux", False), [], use_index=False)

    assert not any("--extra-index-url" in command for command in commands)


def stamp_project(tmp_path: Path) -> Path:
    (tmp_path / "scripts").mkdir()
    for name in ("pyproject.toml", "constraints.txt", "scripts/install.py"):
        shutil.copy(ROOT / name, tmp_path / name)
    return tmp_path


def test_unchanged_files_skip_the_install(installer, tmp_path):
    project = stamp_project(tmp_path)
    stamp = installer.wanted_stamp(project, [], "cpu")

    assert not installer.needs_install(stamp, installer.wanted_stamp(project, [], "cpu"))


@pytest.mark.parametrize("name", ["pyproject.toml", "constraints.txt"])
def test_changed_file_triggers_a_reinstall(installer, tmp_path, name):
    project = stamp_project(tmp_path)
    stamp = installer.wanted_stamp(project, [], "cpu")
    with open(project / name, "a") as file:
        file.write("\n# changed\n")

    assert installer.needs_install(stamp, installer.wanted_stamp(project, [], "cpu"))


def test_changed_torch_build_triggers_a_reinstall(installer, tmp_path):
    # A GPU driver installed after the first run: the CPU torch is replaced.
    project = stamp_project(tmp_path)
    stamp = installer.wanted_stamp(project, [], "cpu")

    assert installer.needs_install(stamp, installer.wanted_stamp(project, [], "cuda"))


def test_test_extra_install_also_serves_the_app(installer, tmp_path):
    project = stamp_project(tmp_path)
    stamp = installer.wanted_stamp(project, ["test"], "cpu")

    assert not installer.needs_install(stamp, installer.wanted_stamp(project, [], "cpu"))


def test_app_install_lacks_the_test_extra(installer, tmp_path):
    project = stamp_project(tmp_path)
    stamp = installer.wanted_stamp(project, [], "cpu")

    assert installer.needs_install(stamp, installer.wanted_stamp(project, ["test"], "cpu"))


def test_broken_stamp_means_install(installer, tmp_path):
    # e.g. a run interrupted while writing it
    (tmp_path / "stamp.json").write_text('{"inputs": "ab')
    wanted = installer.wanted_stamp(stamp_project(tmp_path), [], "cpu")

    assert installer.needs_install(installer.read_stamp(tmp_path / "stamp.json"), wanted)


def test_installer_refuses_to_run_outside_a_venv(installer, monkeypatch):
    monkeypatch.setattr(sys, "base_prefix", sys.prefix)

    with pytest.raises(installer.InstallError, match="not inside a virtual environment"):
        installer.install(ROOT, [], force=False, dry_run=True)


@pytest.fixture
def fake_venv(installer, tmp_path, monkeypatch):
    """install() pointed at an empty venv folder on a CPU machine whose pip has the CPU wheel."""
    monkeypatch.setattr(sys, "prefix", str(tmp_path / "venv"))
    monkeypatch.setattr(installer, "nvidia_smi_answers", lambda: False)
    monkeypatch.setattr(installer, "pip_offers", lambda requirement: True)
    (tmp_path / "venv").mkdir()
    return tmp_path / "venv"


def test_install_with_current_stamp_does_nothing(installer, fake_venv, capsys):
    stamp = installer.wanted_stamp(ROOT, [], installer.choose_torch_source(installer.platform.system(), False).name)
    (fake_venv / installer.STAMP_NAME).write_text(json.dumps(stamp))

    installer.install(ROOT, [], force=False, dry_run=True)

    assert capsys.readouterr().out == ""


def test_update_keeps_the_test_extra_installed_earlier(installer, fake_venv, capsys):
    old = {"inputs": "from an older pyproject", "extras": ["test"], "torch": "cpu"}
    (fake_venv / installer.STAMP_NAME).write_text(json.dumps(old))

    installer.install(ROOT, [], force=False, dry_run=True)

    assert " -e .[test]\n" in capsys.readouterr().out
