"""bench/gpu_check.sh --dry-run: the GPU check's code on the tiny models, on the CPU, so the script
that runs on a lent GPU machine (issue 21) cannot rot between GPU runs."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SECTIONS = ("env", "sd15", "sdxl", "ladder-8gb", "ladder-4gb", "lora", "hires", "esrgan", "inpaint")


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-check-out")
    work = tmp_path_factory.mktemp("gpu-check-work")
    env = {**os.environ, "OUT": str(out), "GPU_CHECK_WORK": str(work), "PYTHON": sys.executable}
    proc = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), "--dry-run"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=400)
    assert (out / "report.json").is_file(), proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads((out / "report.json").read_text())
    data["_stdout"], data["_rc"], data["_md"] = proc.stdout, proc.returncode, (out / "report.md").read_text()
    data["_work"] = work
    return data


def test_every_section_ran_ok_with_positive_seconds(report):
    sections = report["sections"]
    assert tuple(sections) == SECTIONS
    failed = {name: rec.get("error") for name, rec in sections.items() if rec["status"] != "ok"}
    assert not failed, failed
    for name, rec in sections.items():
        assert rec["dry_run"] is True and rec["device"] == "cpu", name
        assert rec["seconds"] > 0 and rec["wall_s"] > 0, name
    assert report["ok"] == report["total"] == len(SECTIONS)
    assert report["_rc"] == 0, report["_stdout"][-2000:]


def test_easel_and_stock_are_both_measured_alternating(report):
    for name in ("sd15", "sdxl"):
        rec = report["sections"][name]
        assert len(rec["easel"]) == len(rec["stock"]) == rec["rounds"] >= 2
        for run in rec["easel"] + rec["stock"]:
            assert run["s_per_image"] > 0 and run["it_s"] > 0
            assert run["unet_calls"] == rec["steps"]  # CFG batched: one UNet call a step
            assert run["image"] == [rec["size"], rec["size"]]
        assert rec["easel_s_per_image"] > 0 and rec["stock_s_per_image"] > 0 and rec["speedup_vs_stock"] > 0


def test_the_sdxl_vae_is_planned_fp32_and_a_nan_decode_is_retried_in_fp32(report):
    rec = report["sections"]["sdxl"]
    assert rec["planned_vae"] == "float32"
    retry = rec["nan_retry"]
    assert retry["nan_injected"] and retry["retried_in_fp32"] and retry["vae_after"] == "float32"
    assert any("NaN" in note for note in retry["notes"])


def test_ladders_finish_and_name_their_rung(report):
    for name, gb in (("ladder-8gb", 8.0), ("ladder-4gb", 4.0)):
        rec = report["sections"][name]
        assert rec["finished"] is True and rec["simulated_gb"] == gb
        assert rec["rung"] in ("full", "sliced", "offload", "cpu")


def test_lora_hires_esrgan_and_inpaint_produce_their_sizes(report):
    s = report["sections"]
    assert s["hires"]["image"] == [128, 128]  # 64 x2
    assert s["esrgan"]["input"] == 64 and s["esrgan"]["output"] == [256, 256]
    assert s["inpaint"]["image"] == [64, 64]
    assert s["lora"]["lora"] == "gpu-check" and s["lora"]["without_lora_s"] > 0


def test_env_reports_versions_and_no_missing_torch_apis_here(report):
    env = report["sections"]["env"]
    assert env["torch"] and env["diffusers"] and env["spandrel"][0].isdigit()
    assert env["missing_torch_apis"] == []


def test_the_markdown_report_and_the_printed_lines_name_every_section(report):
    assert "9 of 9 sections ok." in report["_md"]
    for name in SECTIONS:
        assert f"| {name} | ok |" in report["_md"]
        assert f"[{name}] ok" in report["_stdout"]


def test_a_section_that_timed_out_is_reported_failed_beside_the_others(report, tmp_path):
    import shutil

    work = tmp_path / "work"
    work.mkdir()
    for path in Path(report["_work"]).glob("sec-*.json"):
        shutil.copy(path, work / path.name)
    (work / "sec-sdxl.json").unlink()
    (work / "sec-sdxl.status").write_text("timed out after 120 s\n")
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--report", "--work", str(work),
                           "--out", str(tmp_path / "out")], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    data = json.loads((tmp_path / "out" / "report.json").read_text())
    assert data["sections"]["sdxl"] == {"section": "sdxl", "status": "failed",
                                        "error": "no result (timed out after 120 s)"}
    assert data["ok"] == len(SECTIONS) - 1
    assert "| sdxl | failed |" in (tmp_path / "out" / "report.md").read_text()


def test_a_section_that_raises_is_recorded_with_its_error(monkeypatch, tmp_path):
    sys.path.insert(0, str(ROOT / "bench"))
    import gpu_check

    def broken(ctx):
        raise ValueError("planted")

    monkeypatch.setattr(gpu_check, "sec_lora", broken)
    rec = gpu_check.run_section("lora", gpu_check.Ctx(tmp_path, dry=True))
    assert rec["status"] == "failed" and rec["error"] == "ValueError: planted" and "planted" in rec["traceback"]
