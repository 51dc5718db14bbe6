"""Hostile model files: none runs code, none takes a listing down, each is named unusable and why.

Each pickle payload, if unpickled the ordinary way, runs `touch MARKER` (the control test shows it
does); every other test asserts the marker never appears. The files go through the real paths: the
library listing (`Engine.models()`, `app.py models`), identification and `Engine.load_model`.
"""
from __future__ import annotations

import builtins
import io
import json
import os
import pickle
import re
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import app
from engine.checkpoints import identify_model, read_state_dict
from engine.engine import Engine, EngineConfig
from engine.errors import ModelNotFoundError, UnknownCheckpointError, UnsafeCheckpointError
from engine.library import EXTRA_KINDS
from engine.safe_files import inspect_weights

ROOT = Path(__file__).resolve().parent.parent
UNSAFE, UNKNOWN = UnsafeCheckpointError, UnknownCheckpointError


class _Call:
    """Unpickles as func(*args)."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def _torch_bytes(obj, **kwargs) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer, **kwargs)
    return buffer.getvalue()


def _safetensors(header: dict, data: bytes = b"") -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


def _pickles(marker: Path) -> dict[str, tuple[bytes, type, str]]:
    """name -> (file bytes, the error it must raise, what the reason must say). Each runs `touch marker`."""
    touch = f"touch {marker}"
    system = _Call(os.system, touch)
    m = str(marker).encode()
    # Protocol 4 strings fetched back from the memo, so STACK_GLOBAL's names are not next to it.
    memo_stack_global = (b"\x80\x04\x8c\x02os\x94\x8c\x06system\x940" b"0h\x00h\x01\x93"
                         + b"\x8c" + bytes([len(touch)]) + touch.encode() + b"\x85R.")
    return {
        "system-p0.ckpt": (pickle.dumps(system, protocol=0), UNSAFE, "would call os.system"),
        "system-p2.pt": (pickle.dumps(system, protocol=2), UNSAFE, "would call os.system"),
        "system-p4.pth": (pickle.dumps(system, protocol=4), UNSAFE, "would call os.system"),
        "system-memo-p4.ckpt": (memo_stack_global, UNSAFE, "would call os.system"),
        "exec.bin": (pickle.dumps(_Call(builtins.exec, f"open({str(marker)!r}, 'w')"), protocol=2), UNSAFE,
                     "would call builtins.exec"),
        "eval.ckpt": (pickle.dumps(_Call(builtins.eval, f"open({str(marker)!r}, 'w')"), protocol=2), UNSAFE,
                      "would call builtins.eval"),
        "popen.pt": (pickle.dumps(_Call(subprocess.Popen, ["touch", str(marker)]), protocol=2), UNSAFE,
                     "would call subprocess.Popen"),
        # builtins.getattr(builtins.__import__('os'), 'system')('touch MARKER'), written by hand.
        "getattr-chain.ckpt": (b"cbuiltins\ngetattr\n(cbuiltins\n__import__\n(S'os'\ntRS'system'\ntR(S'touch "
                               + m + b"'\ntR.", UNSAFE, "would call builtins.getattr"),
        "posix-system.ckpt": (b"cposix\nsystem\n(S'touch " + m + b"'\ntR.", UNSAFE, "would call os.system"),
        "nested-zip.ckpt": (_torch_bytes({"state_dict": {"w": torch.zeros(2), "extra": {"x": [system]}}}), UNSAFE,
                            "would call os.system"),
        "legacy.ckpt": (_torch_bytes({"w": torch.zeros(2), "p": system}, _use_new_zipfile_serialization=False),
                        UNSAFE, "would call os.system"),
        "pickle-named.safetensors": (pickle.dumps(system, protocol=2), UNKNOWN, "pickle with a .safetensors name"),
        "zip-named.safetensors": (_torch_bytes({"p": system}), UNKNOWN, "zip (PyTorch) archive"),
    }


def _broken() -> dict[str, tuple[bytes, type, str]]:
    return {
        "huge-header.safetensors": (struct.pack("<Q", 2**60) + b"{}", UNKNOWN, f"header claims {2**60} bytes"),
        "truncated-header.safetensors": (struct.pack("<Q", 1000) + b'{"w": {"dt', UNKNOWN, "truncated"),
        "invalid-json.safetensors": (struct.pack("<Q", 10) + b"{not json}", UNKNOWN, "header is not valid JSON"),
        "huge-tensor.safetensors": (_safetensors({"w": {"dtype": "F32", "shape": [100000, 100000, 100],
                                                        "data_offsets": [0, 4 * 10**12]}}, b"\0" * 16),
                                    UNKNOWN, f"its tensors claim {4 * 10**12} bytes but the file holds 16"),
        "empty.safetensors": (b"", UNKNOWN, "0 bytes"),
        "empty.ckpt": (b"", UNKNOWN, "empty"),
        "random.pt": (bytes(range(256)) * 4, UNKNOWN, "cannot be read"),
        "huge-string.ckpt": (b"\x80\x04\x8d" + struct.pack("<Q", 2**60) + b"x", UNKNOWN, f"claims {2**60} bytes"),
    }


@pytest.fixture(scope="module")
def marker(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("marker") / "MARKER"


@pytest.fixture(scope="module")
def cases(marker) -> dict[str, tuple[bytes, type, str]]:
    return {**_pickles(marker), **_broken()}


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory, cases) -> Path:
    root = tmp_path_factory.mktemp("hostile-models")
    sd = root / "Stable-diffusion"
    sd.mkdir()
    for name, (data, _, _) in cases.items():
        (sd / name).write_bytes(data)
    (sd / "folder.safetensors").mkdir()  # a directory named like a checkpoint
    return root


@pytest.fixture(scope="module")
def hostile_engine(models_dir, tmp_path_factory) -> Engine:
    data = tmp_path_factory.mktemp("hostile-data")
    return Engine(EngineConfig(models_dir, data / "outputs", data / "data"))


PICKLE_NAMES = list(_pickles(Path("/m")))
ALL_NAMES = PICKLE_NAMES + list(_broken())


# --- the payloads are live: the ordinary unpickler runs them ----------------------------------

@pytest.mark.parametrize("name", [n for n in PICKLE_NAMES if not n.endswith(".safetensors")])
def test_control_each_pickle_payload_runs_when_loaded_unsafely(tmp_path, name):
    marker = tmp_path / "MARKER"
    path = tmp_path / name
    path.write_bytes(_pickles(marker)[name][0])
    try:
        torch.load(path, weights_only=False)
    except Exception:  # noqa: BLE001 - the payload's return value is not a checkpoint; only the side effect matters
        pass
    deadline = time.monotonic() + 10  # Popen runs `touch` in the background
    while not marker.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert marker.exists()


# --- identification ----------------------------------------------------------------------------

@pytest.mark.parametrize("name", ALL_NAMES)
def test_identify_raises_the_engine_error_and_runs_nothing(models_dir, cases, marker, name):
    _, error, _ = cases[name]
    with pytest.raises(error) as caught:
        identify_model(models_dir / "Stable-diffusion" / name)
    assert str(caught.value).startswith(f"{name}: ") and "\n" not in str(caught.value)
    assert not marker.exists()


@pytest.mark.parametrize("name", ALL_NAMES)
def test_reason_says_why(models_dir, cases, name):
    _, _, why = cases[name]
    with pytest.raises((UNSAFE, UNKNOWN), match=re.escape(why)):
        read_state_dict(models_dir / "Stable-diffusion" / name)


def test_a_folder_named_like_a_checkpoint_is_refused_by_name(models_dir):
    with pytest.raises(UNKNOWN, match=r"folder\.safetensors: is a folder"):
        identify_model(models_dir / "Stable-diffusion" / "folder.safetensors")


# --- the listing and loading -------------------------------------------------------------------

def test_listing_names_every_hostile_file_as_unusable(hostile_engine, marker):
    statuses = {s.name: s for s in hostile_engine.models()}
    assert set(statuses) == set(ALL_NAMES) | {"folder.safetensors"}
    assert all(s.family is None and s.error and s.error.startswith(f"{n}: ") and "\n" not in s.error
               for n, s in statuses.items())
    assert not marker.exists()


def test_cli_models_prints_each_file_with_why_it_cannot_be_used(models_dir, tmp_path, capsys, marker):
    code = app.main(["models", "--models-dir", str(models_dir), "--data-dir", str(tmp_path / "data")])
    out = capsys.readouterr().out
    assert code == 0
    lines = out.splitlines()
    for name in ALL_NAMES:
        assert lines[lines.index(name) + 1].startswith(f"    cannot be used: {name}: ")
    assert "    cannot be used: os.system" not in out and not marker.exists()


@pytest.mark.parametrize("name", ALL_NAMES)
def test_load_model_raises_the_engine_error(hostile_engine, cases, marker, name):
    _, error, _ = cases[name]
    with pytest.raises(error, match=f"^{name.replace('.', '[.]')}: "):
        hostile_engine.load_model(name)
    assert not marker.exists()


# --- memory stays bounded ------------------------------------------------------------------------

_MEASURE = """
import json, resource, struct, sys, time, torch
from engine.errors import EaselError
from engine.safe_files import read_tensors
results = {}
for path in sys.argv[1:]:
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    try:
        read_tensors(path)
        outcome = "loaded"
    except EaselError as e:
        outcome = type(e).__name__
    results[path] = [outcome, (time.perf_counter() - start) * 1000,
                     (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024]
print(json.dumps(results))
"""


def _legacy_claiming_8_gb() -> bytes:
    data = _torch_bytes({"w": torch.zeros(3)}, _use_new_zipfile_serialization=False)
    at = data.index(b"K\x03", data.index(b"cpu"))  # the storage's element count, 3
    return data[:at] + b"J" + struct.pack("<i", 2**31 - 1) + data[at + 2:]  # 2**31-1 floats: 8 GB


def test_huge_claims_are_refused_without_memory_growth(tmp_path):
    files = {"huge-header.safetensors": _broken()["huge-header.safetensors"][0],
             "huge-tensor.safetensors": _broken()["huge-tensor.safetensors"][0],
             "huge-string.ckpt": _broken()["huge-string.ckpt"][0],
             "legacy-8gb.ckpt": _legacy_claiming_8_gb()}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    run = subprocess.run([sys.executable, "-c", _MEASURE, *[str(tmp_path / n) for n in files]],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    results = json.loads(run.stdout.splitlines()[-1])
    assert {Path(p).name: r[0] for p, r in results.items()} == dict.fromkeys(files, "UnknownCheckpointError")
    assert max(r[2] for r in results.values()) < 64, results  # MB of peak RSS growth


def test_a_huge_safetensors_header_never_reaches_the_safetensors_reader(tmp_path, monkeypatch):
    import safetensors

    def must_not_be_called(*args, **kwargs):
        raise AssertionError("safe_open called on a header that claims 2**60 bytes")

    monkeypatch.setattr(safetensors, "safe_open", must_not_be_called)
    path = tmp_path / "huge.safetensors"
    path.write_bytes(struct.pack("<Q", 2**60) + b"{}")
    with pytest.raises(UNKNOWN, match="header claims"):
        identify_model(path)


# --- plain files still load ----------------------------------------------------------------------

def test_a_legacy_format_plain_tensor_file_loads(tmp_path):
    path = tmp_path / "legacy-plain.ckpt"
    path.write_bytes(_torch_bytes({"state_dict": {"w": torch.arange(3.0)}}, _use_new_zipfile_serialization=False))
    assert torch.equal(read_state_dict(path)["w"], torch.arange(3.0))


# --- the other model folders ---------------------------------------------------------------------

FOLDERS = [(kind, sub) for kind, subs in EXTRA_KINDS.items() for sub in subs]


@pytest.fixture(scope="module")
def extras_engine(tmp_path_factory, marker) -> Engine:
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("extra-models")
    payload = pickle.dumps(_Call(os.system, f"touch {marker}"), protocol=2)
    for _, sub in FOLDERS:
        (root / sub).mkdir()
        (root / sub / "evil.pt").write_bytes(payload)
        save_file({"a.weight": torch.zeros(2, 3), "b.weight": torch.zeros(4)}, root / sub / "good.safetensors")
    (root / "embeddings" / "plain.pt").write_bytes(_torch_bytes({"string_to_param": {"*": torch.zeros(2, 8)},
                                                                  "name": "plain"}))
    return Engine(EngineConfig(root, root / "outputs", root / "data"))


@pytest.mark.parametrize("kind,sub", FOLDERS)
def test_a_hostile_pickle_in_each_model_folder_is_listed_as_refused(extras_engine, marker, kind, sub):
    listed = {s.name: s for s in extras_engine.extra_models()[kind]}
    assert listed[f"{sub}/evil.pt"].error.startswith("evil.pt: refused: this pickle would call os.system")
    assert listed[f"{sub}/evil.pt"].tensors is None
    assert not marker.exists()


@pytest.mark.parametrize("kind,sub", FOLDERS)
def test_a_safetensors_file_in_each_model_folder_is_listed_with_its_tensor_count(extras_engine, kind, sub):
    listed = {s.name: s for s in extras_engine.extra_models()[kind]}
    assert (listed[f"{sub}/good.safetensors"].tensors, listed[f"{sub}/good.safetensors"].error) == (2, None)


def test_cli_models_prints_the_other_folders_under_headings(extras_engine, tmp_path, capsys):
    app.main(["models", "--models-dir", str(extras_engine.config.models_dir), "--data-dir", str(tmp_path)])
    lines = capsys.readouterr().out.splitlines()
    assert lines.index("LoRA") < lines.index("Lora/evil.pt") < lines.index("LyCORIS/good.safetensors")
    assert lines[lines.index("LyCORIS/good.safetensors") + 1] == "    ok: 2 tensors"
    assert lines[lines.index("VAE/evil.pt") + 1].startswith("    cannot be used: evil.pt: refused: this pickle would call os.system")


def test_inspect_gives_dotted_keys_and_shapes_of_a_nested_plain_pickle(extras_engine):
    info = inspect_weights(extras_engine.config.models_dir / "embeddings" / "plain.pt")
    assert info.shapes == {"string_to_param.*": (2, 8)}


def test_inspect_gives_key_names_and_shapes_of_a_safetensors_file(extras_engine):
    info = inspect_weights(extras_engine.config.models_dir / "Lora" / "good.safetensors")
    assert info.shapes == {"a.weight": (2, 3), "b.weight": (4,)}


# --- a file deleted after it was listed ----------------------------------------------------------

@pytest.fixture()
def vanishing(tmp_path):
    from tests.ldm_export import export_single_file
    from tests.tiny_models import tiny_pipeline
    from engine.families import Family

    sd = tmp_path / "models" / "Stable-diffusion"
    sd.mkdir(parents=True)
    export_single_file(tiny_pipeline(Family.SD1), Family.SD1, sd / "gone.safetensors")
    engine = Engine(EngineConfig(tmp_path / "models", tmp_path / "outputs", tmp_path / "data"))
    assert [s.name for s in engine.models()] == ["gone.safetensors"]
    (sd / "gone.safetensors").unlink()
    return engine


def test_loading_a_deleted_model_names_it_in_one_line(vanishing):
    with pytest.raises(ModelNotFoundError, match=r"^model: gone\.safetensors is no longer in .*\(deleted or moved\)$"):
        vanishing.load_model("gone.safetensors")


def test_listing_a_deleted_model_before_refresh_says_it_is_gone(vanishing):
    [status] = vanishing.models()
    assert re.search(r"gone\.safetensors.* no longer .*refresh", status.error) and "\n" not in status.error


def test_refresh_drops_a_deleted_model(vanishing):
    assert vanishing.refresh_models() == []
