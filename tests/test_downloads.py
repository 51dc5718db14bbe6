"""engine.downloads and engine.catalog against a fake model host on loopback (tests/fake_model_host.py):
progress, cancel and resume with a Range request, the sha256 check, what a link may be, offline,
and which catalogue entries suit which machine."""
from __future__ import annotations

import hashlib
import json
import os
import time

import pytest

from engine.catalog import CATALOG_PATH, Catalog, Machine, advise
from engine.downloads import DownloadJob, Downloads, check_link
from engine.errors import CancelledError, EaselError, RequestError
from tests.browser_helpers import free_port
from tests.fake_model_host import LOOPBACK, FakeModelHost

PAYLOAD = os.urandom(3 * (1 << 20) + 1234)   # three 1 MiB chunks and a bit: progress comes per chunk
SHA = hashlib.sha256(PAYLOAD).hexdigest()
SAFETENSORS = (lambda header: len(header).to_bytes(8, "little") + header + os.urandom(2 << 20))(
    json.dumps({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}).encode())


def entry(name, **fields):
    base = {"name": name, "title": f"Test {name}", "kind": "checkpoint", "family": "sd1", "file": f"{name}.safetensors",
            "folder": "Stable-diffusion", "size": len(PAYLOAD), "sha256": SHA,
            "licence": {"name": "test", "url": "https://example.invalid/licence"}, "good_for": "tests",
            "gpu_gb": 1, "ram_gb": 1, "gpu": "ok", "why_gpu": "small", "cpu": "recommended", "why_cpu": "small"}
    return {**base, **fields}


def write_catalog(tmp_path, *entries):
    path = tmp_path / "catalog.json"
    path.write_text(json.dumps({"models": list(entries)}))
    return Catalog.load(path)


@pytest.fixture()
def host(tmp_path):
    server = FakeModelHost(tls_dir=tmp_path).start()
    yield server
    server.stop()


@pytest.fixture()
def hub(monkeypatch):
    """The hub side over plain http (HF_ENDPOINT-style endpoint), offline mode off for this test."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    server = FakeModelHost().start()
    yield server
    server.stop()


def downloads(tmp_path, catalog, host=None, hub=None):
    return Downloads(tmp_path / "models", tmp_path / "data" / "downloads", catalog, Machine("cpu", 16),
                     hub_endpoint=hub.url if hub else None, verify=str(host.ca_file) if host else True,
                     progress_every=0)


def model_files(tmp_path):
    models = tmp_path / "models"
    return sorted(p.relative_to(models).as_posix() for p in models.rglob("*")) if models.exists() else []


def recording_job():
    seen = []
    return DownloadJob(on_progress=seen.append), seen


# --- catalogue entries -----------------------------------------------------------------------------
def test_a_hub_entry_lands_in_its_folder_with_progress_and_nothing_else(tmp_path, hub):
    hub.add_hub_file("test/tiny", "tiny.safetensors", PAYLOAD)
    catalog = write_catalog(tmp_path, entry("tiny", repo_id="test/tiny"))
    job, seen = recording_job()
    path = downloads(tmp_path, catalog, hub=hub).fetch("tiny", job)

    assert path == tmp_path / "models" / "Stable-diffusion" / "tiny.safetensors"
    assert path.read_bytes() == PAYLOAD
    assert model_files(tmp_path) == ["Stable-diffusion", "Stable-diffusion/tiny.safetensors"]  # no .cache, no lock
    assert list((tmp_path / "data" / "downloads").iterdir()) == []
    middle = [p for p in seen if p.phase == "downloading" and 0 < p.done < p.total]
    assert middle and all(p.total == len(PAYLOAD) and p.speed > 0 for p in middle)
    assert seen[-1].phase == "verifying" and seen[-1].done == len(PAYLOAD)
    assert ("GET", f"/cdn/{SHA}", None) in hub.requests


def test_an_entry_already_on_disk_is_not_fetched_again(tmp_path, hub):
    hub.add_hub_file("test/tiny", "tiny.safetensors", PAYLOAD)
    catalog = write_catalog(tmp_path, entry("tiny", repo_id="test/tiny"))
    dest = tmp_path / "models" / "Stable-diffusion" / "tiny.safetensors"
    dest.parent.mkdir(parents=True)
    dest.write_bytes(b"mine")
    assert downloads(tmp_path, catalog, hub=hub).fetch("tiny") == dest
    assert dest.read_bytes() == b"mine" and hub.requests == []


def test_a_wrong_checksum_leaves_nothing_in_models(tmp_path, host):
    url = host.add_file("tiny.safetensors", PAYLOAD)
    catalog = write_catalog(tmp_path, entry("tiny", url=url, sha256="0" * 64))
    with pytest.raises(EaselError, match="wrong sha256.*nothing was added"):
        downloads(tmp_path, catalog, host).fetch("tiny")
    assert model_files(tmp_path) == []
    assert list((tmp_path / "data" / "downloads").iterdir()) == []  # the bad bytes are gone too


def test_a_hub_file_that_is_not_the_catalogues_is_refused_before_download(tmp_path, hub):
    hub.add_hub_file("test/tiny", "tiny.safetensors", PAYLOAD)
    catalog = write_catalog(tmp_path, entry("tiny", repo_id="test/tiny", sha256="1" * 64))
    with pytest.raises(EaselError, match="not the catalogue's"):
        downloads(tmp_path, catalog, hub=hub).fetch("tiny")
    assert not any(method == "GET" and path.startswith("/cdn/") for method, path, _ in hub.requests)
    assert model_files(tmp_path) == []


def test_a_hub_entry_without_a_pinned_sha256_is_checked_against_the_hubs(tmp_path, hub):
    hub.add_hub_file("test/tiny", "tiny.safetensors", PAYLOAD)
    hub.files[f"/cdn/{SHA}"].data = PAYLOAD[:-1] + b"X"  # the bytes served differ from the LFS sha256
    catalog = write_catalog(tmp_path, entry("tiny", repo_id="test/tiny", sha256=None))
    with pytest.raises(EaselError, match="wrong sha256"):
        downloads(tmp_path, catalog, hub=hub).fetch("tiny")
    assert model_files(tmp_path) == []


def test_a_cancelled_download_resumes_with_a_range_request(tmp_path, host):
    url = host.add_file("tiny.safetensors", PAYLOAD)
    catalog = write_catalog(tmp_path, entry("tiny", url=url))
    fetcher = downloads(tmp_path, catalog, host)
    job = DownloadJob()
    job.on_progress = lambda p: job.cancel() if p.phase == "downloading" else None
    with pytest.raises(CancelledError, match="resumes from there"):
        fetcher.fetch("tiny", job)
    part = tmp_path / "data" / "downloads" / f"sha256-{SHA}.part"
    kept = part.stat().st_size
    assert 0 < kept < len(PAYLOAD) and model_files(tmp_path) == []

    job, seen = recording_job()
    path = fetcher.fetch("tiny", job)
    assert path.read_bytes() == PAYLOAD
    assert host.ranges_seen() == [f"bytes={kept}-"]
    assert seen[0].phase == "checking"   # the kept part is hashed before more is added
    assert not part.exists()


def test_a_broken_connection_keeps_the_part_and_the_next_try_resumes(tmp_path, host):
    url = host.add_file("tiny.safetensors", PAYLOAD)
    catalog = write_catalog(tmp_path, entry("tiny", url=url))
    host.pause_after = 1 << 20
    host.release.set()  # the server stops sending after 1 MiB and closes the connection at once
    with pytest.raises(EaselError, match="run it again to resume"):
        downloads(tmp_path, catalog, host).fetch("tiny")
    assert model_files(tmp_path) == []
    path = downloads(tmp_path, catalog, host).fetch("tiny")
    assert path.read_bytes() == PAYLOAD and host.ranges_seen() == [f"bytes={1 << 20}-"]


def test_a_part_of_a_changed_file_is_started_over(tmp_path, host):
    url = host.add_file("tiny.safetensors", PAYLOAD)
    catalog = write_catalog(tmp_path, entry("tiny", url=url))
    part = tmp_path / "data" / "downloads" / f"sha256-{SHA}.part"
    part.parent.mkdir(parents=True)
    part.write_bytes(b"x" * 1000)  # a part with no record of what it belongs to
    path = downloads(tmp_path, catalog, host).fetch("tiny")
    assert path.read_bytes() == PAYLOAD and host.ranges_seen() == []


# --- links -----------------------------------------------------------------------------------------
def test_an_https_link_to_a_safetensors_file_is_added(tmp_path, host):
    url = host.add_file("my%20model.safetensors", SAFETENSORS)
    job, seen = recording_job()
    path = downloads(tmp_path, Catalog([]), host).fetch(url, job)
    assert path == tmp_path / "models" / "Stable-diffusion" / "my model.safetensors"
    assert path.read_bytes() == SAFETENSORS and seen


def test_a_link_takes_its_name_from_content_disposition_and_refuses_a_pickle(tmp_path, host):
    url = host.add_file("12345", PAYLOAD, **{"Content-Disposition": 'attachment; filename="model.ckpt"'})
    with pytest.raises(RequestError, match="model.ckpt.*not a .safetensors file"):
        downloads(tmp_path, Catalog([]), host).fetch(url)
    assert model_files(tmp_path) == []


@pytest.mark.parametrize("url,message", [
    ("http://127.0.0.1:9/model.safetensors", "must be an https:// link"),
    ("ftp://example.invalid/model.safetensors", "must be an https:// link"),
    ("https://example.invalid/model.ckpt", "not a .safetensors file"),
    ("https://example.invalid/model.pt?download=true", "not a .safetensors file"),
])
def test_a_link_that_is_not_https_or_not_safetensors_is_refused_before_any_network(url, message):
    with pytest.raises(RequestError, match=message) as error:
        check_link(url)
    assert str(error.value).startswith("url: ") and "\n" not in str(error.value)


def test_a_hub_page_link_becomes_its_file_link():
    assert check_link("https://huggingface.co/a/b/blob/main/m.safetensors") == \
        "https://huggingface.co/a/b/resolve/main/m.safetensors"


def test_a_redirect_to_http_is_refused(tmp_path, host):
    host.redirects["/files/away.safetensors"] = f"http://{LOOPBACK}:{free_port()}/model.safetensors"
    with pytest.raises(RequestError, match="redirects to a non-https address"):
        downloads(tmp_path, Catalog([]), host).fetch(f"{host.url}/files/away.safetensors")
    assert model_files(tmp_path) == []


def test_a_link_larger_than_the_free_disk_space_is_refused_before_writing(tmp_path, host):
    url = host.add_file("huge.safetensors", b"")
    host.files["/files/huge.safetensors"].claimed_size = 1 << 60   # an exbibyte
    with pytest.raises(EaselError, match="needs .* but .* free"):
        downloads(tmp_path, Catalog([]), host).fetch(url)
    assert model_files(tmp_path) == [] and not list((tmp_path / "data" / "downloads").glob("*.part"))


def test_a_link_that_serves_no_safetensors_file_is_deleted(tmp_path, host):
    url = host.add_file("fake.safetensors", b"<html>login first</html>" * 100)
    with pytest.raises(EaselError, match="not a safetensors file"):
        downloads(tmp_path, Catalog([]), host).fetch(url)
    assert model_files(tmp_path) == []


def test_a_hub_link_is_checked_against_the_sha256_its_redirect_names(tmp_path, host):
    host.add_hub_file("test/tiny", "tiny.safetensors", SAFETENSORS)
    host.files[f"/cdn/{hashlib.sha256(SAFETENSORS).hexdigest()}"].data = SAFETENSORS[:-1] + b"X"
    with pytest.raises(EaselError, match="wrong sha256"):
        downloads(tmp_path, Catalog([]), host).fetch(f"{host.url}/test/tiny/resolve/main/tiny.safetensors")
    assert model_files(tmp_path) == []


# --- offline ---------------------------------------------------------------------------------------
def test_offline_a_hub_entry_fails_with_one_line_at_once(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    catalog = write_catalog(tmp_path, entry("tiny", repo_id="test/tiny"))
    with pytest.raises(EaselError, match="needs the internet") as error:
        downloads(tmp_path, catalog).fetch("tiny")
    assert "\n" not in str(error.value) and model_files(tmp_path) == []


def test_an_unreachable_host_fails_with_one_line(tmp_path):
    started = time.monotonic()
    with pytest.raises(EaselError, match="cannot reach .*are you online") as error:
        downloads(tmp_path, Catalog([])).fetch(f"https://{LOOPBACK}:{free_port()}/m.safetensors")
    assert "\n" not in str(error.value) and model_files(tmp_path) == []
    assert time.monotonic() - started < 30  # a bound for "nothing hangs", not a speed figure


def test_offline_the_catalogue_still_lists_every_entry_as_needing_the_internet(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    rows = downloads(tmp_path, Catalog.load()).rows()
    assert rows and all("needs the internet (offline now)" in r.status(Downloads.offline()) for r in rows)


# --- the catalogue and its advice ----------------------------------------------------------------
def test_the_bundled_catalogue_has_the_promised_models_and_pins_every_pickle():
    catalog = Catalog.load(CATALOG_PATH)
    families = {e.family for e in catalog.entries}
    assert {"sd1", "sd2", "sd2-v", "sdxl", "esrgan", "sd-x4-upscaler", "gfpgan", "codeformer", "yunet"} <= families
    for e in catalog.entries:
        assert e.size > 0 and e.licence and e.licence_url.startswith("https://")
        assert e.file.endswith(".safetensors") or e.sha256, e.name


def test_a_catalogue_pickle_without_a_sha256_is_refused_at_load(tmp_path):
    with pytest.raises(EaselError, match="needs its sha256 pinned"):
        write_catalog(tmp_path, entry("p", repo_id="a/b", file="p.pth", sha256=None))


FACES = ("gfpgan-1.4", "yunet-face-detector")  # restore faces: small, fine anywhere (CodeFormer: "ok", its licence)


@pytest.mark.parametrize("machine,recommended,not_recommended", [
    (Machine("cpu", 16), {"sd-turbo", "realesrgan-x4plus", *FACES}, {"sdxl-base", "sd21-768", "sd-x4-upscaler"}),
    (Machine("cuda", 12), {"sd15", "sdxl-base", "realesrgan-x4plus", *FACES}, set()),
    (Machine("cuda", 4), {"sd15", "realesrgan-x4plus", *FACES}, {"sdxl-base", "sd21-768", "sd-x4-upscaler"}),
])
def test_advice_follows_the_machine(machine, recommended, not_recommended):
    advice = {e.name: advise(e, machine) for e in Catalog.load().entries}
    assert {n for n, a in advice.items() if a.verdict == "recommended"} == recommended
    assert {n for n, a in advice.items() if a.verdict == "no"} == not_recommended
    assert all(a.why for a in advice.values())


def test_too_little_gpu_memory_is_the_reason_given():
    sdxl = Catalog.load().get("sdxl-base")
    assert advise(sdxl, Machine("cuda", 6)).why == "needs 8 GB of GPU memory; this cuda has 6 GB"


def test_with_no_name_the_first_recommended_checkpoint_is_chosen():
    catalog = Catalog.load()
    assert catalog.first_choice(Machine("cpu", 16)).name == "sd-turbo"
    assert catalog.first_choice(Machine("cuda", 12)).name == "sd15"
    assert catalog.first_choice(Machine("cpu", 2)).name == "sd15"  # nothing fits: the default


def test_an_unknown_name_is_refused_with_the_choices(tmp_path):
    with pytest.raises(RequestError, match="'nope' is not in the catalogue; one of sd15"):
        downloads(tmp_path, Catalog.load()).fetch("nope")
