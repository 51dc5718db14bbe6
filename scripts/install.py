"""Install Easel into the virtual environment that runs this script.

The launchers (launch.sh, launch.bat) and scripts/run_tests.sh create ./venv and then run
`venv/bin/python scripts/install.py`; all install logic lives here so they share it.

What it does, in order:
1. picks the torch build for this machine: CUDA when `nvidia-smi` answers, the CPU build
   otherwise, and PyPI's default build on macOS (which has MPS);
2. installs that torch (plus torchvision) first, then Easel itself with `-c constraints.txt`;
3. installs invisible-watermark with --no-deps (its metadata asks for opencv-python, which needs the
   system's libGL; pyproject lists opencv-python-headless, which gives the same cv2);
4. fails loudly if CUDA wheels (`nvidia-*`) appeared on a machine without an NVIDIA GPU;
5. writes a stamp into the venv, so the next launch skips all of this while pyproject.toml,
   constraints.txt and this file are unchanged.

Usage: python scripts/install.py [--test] [--force] [--dry-run]
"""
from __future__ import annotations

import argparse
import hashlib
import json
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STAMP_NAME = "easel-install.json"
# Files whose content decides what gets installed; a change in any of them means reinstall.
STAMPED_FILES = ("pyproject.toml", "constraints.txt", "scripts/install.py")
WATERMARK = "invisible-watermark==0.2.0"
# PyPI's torch 2.13.0 for Linux is built for CUDA 13.0, so that is the index we use for NVIDIA
# machines (it also has the Windows CUDA builds, which PyPI lacks). Drivers must be >= 580.
CUDA_INDEX = "https://download.pytorch.org/whl/cu130"
CPU_INDEX = "https://download.pytorch.org/whl/cpu"
# pip older than this cannot do editable installs of a pyproject-only project (PEP 660).
MIN_PIP = "pip>=23.1"


class InstallError(Exception):
    """A failed step, with a message meant for the person who ran the launcher."""


@dataclass(frozen=True)
class TorchSource:
    """Where the torch wheel comes from. `local_label` is PEP 440's `+cu130`/`+cpu` suffix:
    pinning it keeps pip from swapping in a different build from another index."""

    name: str  # "cuda", "cpu" or "default"
    index_url: str | None
    local_label: str | None
    description: str


def choose_torch_source(system: str, nvidia_smi_answers: bool) -> TorchSource:
    """The torch build for a machine. `system` is platform.system()."""
    if system == "Darwin":
        # macOS wheels on PyPI carry MPS (Apple GPU) support; there is no CUDA there.
        return TorchSource("default", None, None, "PyTorch for macOS (Apple GPU via MPS)")
    if nvidia_smi_answers:
        return TorchSource("cuda", CUDA_INDEX, "cu130", "PyTorch with CUDA (NVIDIA GPU found)")
    # PyPI's Linux torch is the CUDA build with ~15 nvidia-* wheels (several GB): a machine
    # without an NVIDIA GPU gets the CPU build instead.
    return TorchSource("cpu", CPU_INDEX, "cpu", "PyTorch for CPU (no NVIDIA GPU found)")


def nvidia_smi_answers() -> bool:
    """True when `nvidia-smi -L` runs and lists a GPU: the driver is installed and working."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return False
    try:
        result = subprocess.run([exe, "-L"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return False
    return result.returncode == 0 and "GPU" in result.stdout


def pinned_versions(constraints: Path) -> dict[str, str]:
    """`name==version` lines of constraints.txt, as {name: version}."""
    pins = {}
    for line in constraints.read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if "==" in line:
            name, version = line.split("==", 1)
            pins[name.strip().lower()] = version.strip()
    return pins


def input_hash(root: Path) -> str:
    digest = hashlib.sha256()
    for name in STAMPED_FILES:
        digest.update(name.encode() + b"\0" + (root / name).read_bytes() + b"\0")
    return digest.hexdigest()


def wanted_stamp(root: Path, extras: list[str], torch_source: str) -> dict:
    return {"inputs": input_hash(root), "extras": sorted(extras), "torch": torch_source}


def read_stamp(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def needs_install(stamp: dict | None, wanted: dict) -> bool:
    """Reinstall unless the venv was installed from the same files, for the same torch build,
    with at least the wanted extras (a venv installed for the tests also serves the app)."""
    if not isinstance(stamp, dict):
        return True
    return (
        stamp.get("inputs") != wanted["inputs"]
        or stamp.get("torch") != wanted["torch"]
        or not set(wanted["extras"]) <= set(stamp.get("extras", []))
    )


def pip(*args: str) -> list[str]:
    return [sys.executable, "-m", "pip", *args]


def pip_offers(requirement: str) -> bool:
    """Whether pip's own configuration (its indexes and find-links) can supply `requirement`;
    asking costs one resolve, no download."""
    result = subprocess.run(
        pip("install", "--dry-run", "--no-deps", "--ignore-installed", "--quiet", requirement),
        capture_output=True, text=True,
    )
    return result.returncode == 0


def torch_requirement(root: Path, source: TorchSource) -> str:
    """torch pinned to constraints.txt's version and, where the source has one, to its build."""
    version = pinned_versions(root / "constraints.txt")["torch"]
    return f"torch=={version}" + (f"+{source.local_label}" if source.local_label else "")


def install_commands(root: Path, source: TorchSource, extras: list[str], use_index: bool) -> list[list[str]]:
    """The pip commands, in order. Torch goes first, pinned to its build, so that the main
    install finds it already satisfied and does not pull a different one."""
    pins = pinned_versions(root / "constraints.txt")
    constraints = ["-c", str(root / "constraints.txt")]
    torch = torch_requirement(root, source)
    index = ["--extra-index-url", source.index_url] if use_index and source.index_url else []
    # torchvision unpinned to a build: from the PyTorch index pip prefers its matching `+label`
    # build (it sorts above PyPI's), elsewhere it takes PyPI's.
    torch_step = pip("install", *constraints, *index, torch, f"torchvision=={pins['torchvision']}")
    project = "." + (f"[{','.join(sorted(extras))}]" if extras else "")
    return [
        pip("install", MIN_PIP),
        torch_step,
        pip("install", *constraints, "-e", project),
        pip("install", "--no-deps", WATERMARK),
    ]


def unexpected_cuda_packages() -> list[str]:
    """CUDA runtime wheels found in the venv (names as pip lists them)."""
    out = subprocess.run(pip("list", "--format=json"), capture_output=True, text=True, check=True)
    names = [entry["name"] for entry in json.loads(out.stdout)]
    return sorted(name for name in names if name.lower().startswith(("nvidia-", "cuda-toolkit")))


def run_step(number: int, total: int, command: list[str], root: Path) -> None:
    what = "pip " + " ".join(command[3:])
    print(f"\n[{number}/{total}] {what}", flush=True)
    started = time.monotonic()
    if subprocess.run(command, cwd=root).returncode != 0:
        raise InstallError(
            f"Installing failed at step {number} of {total} ({what}). "
            "The messages above say why; check the internet connection and run the launcher again."
        )
    print(f"[{number}/{total}] done in {time.monotonic() - started:.0f} s", flush=True)


def install(root: Path, extras: list[str], force: bool, dry_run: bool) -> None:
    venv = Path(sys.prefix)
    if sys.prefix == sys.base_prefix:
        raise InstallError(
            f"{Path(sys.executable)} is not inside a virtual environment; run launch.sh or "
            "launch.bat, which create one in the Easel folder."
        )
    has_nvidia = nvidia_smi_answers()
    source = choose_torch_source(platform.system(), has_nvidia)
    stamp_path = venv / STAMP_NAME
    old_stamp = read_stamp(stamp_path)
    wanted = wanted_stamp(root, extras, source.name)
    if not force and not needs_install(old_stamp, wanted):
        return
    # Extras installed before stay up to date too (the app's launcher updating a test venv).
    if isinstance(old_stamp, dict) and isinstance(old_stamp.get("extras"), list):
        wanted = wanted_stamp(root, sorted(set(extras) | set(old_stamp["extras"])), source.name)
    extras = wanted["extras"]
    if not dry_run:
        print(f"Setting up Easel in {venv} (first run or update: this takes several minutes).")
    print(f"Torch build: {source.description}.", flush=True)
    # A machine whose pip already offers the build (a local wheel mirror) needs no extra index.
    use_index = source.index_url is not None and not pip_offers(torch_requirement(root, source))
    commands = install_commands(root, source, extras, use_index)
    if dry_run:
        for command in commands:
            print(" ".join(command))
        return
    started = time.monotonic()
    stamp_path.unlink(missing_ok=True)  # a half-finished install must not look finished
    for number, command in enumerate(commands, 1):
        run_step(number, len(commands), command, root)
    if not has_nvidia:
        found = unexpected_cuda_packages()
        if found:
            raise InstallError(
                "This machine has no NVIDIA GPU, but the install pulled in CUDA packages "
                f"({', '.join(found)}): a torch build for CUDA replaced the CPU one. "
                "Delete the venv folder and report this as a bug."
            )
    stamp_path.write_text(json.dumps(wanted, indent=1) + "\n", encoding="utf-8")
    print(f"\nEasel is installed ({time.monotonic() - started:.0f} s).", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Install Easel into the running virtual environment.")
    parser.add_argument("--test", action="store_true", help="also install the test tools (pytest, playwright)")
    parser.add_argument("--force", action="store_true", help="reinstall even when nothing changed")
    parser.add_argument("--dry-run", action="store_true", help="print the pip commands instead of running them")
    args = parser.parse_args(argv)
    try:
        install(ROOT, ["test"] if args.test else [], args.force, args.dry_run)
    except InstallError as error:
        print(f"\nERROR: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
