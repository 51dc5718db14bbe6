"""The manager owns recovery and the in-use scope (engine/manager.py), tested on it directly:
the fallback loop with a simulated out-of-memory error, the fp32 VAE switch, and use()."""
from __future__ import annotations

import threading
import time
from dataclasses import replace

import pytest
import torch

from engine.devices import DevicePlan
from tests.conftest import loaded_engine
from engine.errors import EaselError
from engine.manager import OUT_OF_MEMORY_ON_CPU


@pytest.fixture
def engine(tiny_models_dir, tmp_path, plain_cpu):
    return loaded_engine(tiny_models_dir, tmp_path, plain_cpu)


@pytest.fixture
def on_cuda(engine, monkeypatch):
    """A plan that says CUDA (so the ladder has all its rungs) while tensors stay on the CPU."""
    monkeypatch.setattr(DevicePlan, "torch_device", property(lambda plan: torch.device("cpu")))
    monkeypatch.setattr(engine.manager, "hardware", replace(engine.manager.hardware, cuda=True))
    loaded = engine.manager.current
    engine.manager.replan(loaded, replace(loaded.plan, device="cuda"))
    return engine


def failing(times: int, error: BaseException):
    calls = {"n": 0}

    def attempt():
        calls["n"] += 1
        if calls["n"] <= times:
            raise error
        return f"done after {calls['n']} attempts"

    return attempt, calls


def test_fallback_steps_down_once_per_out_of_memory_and_returns_the_result(on_cuda):
    manager, loaded = on_cuda.manager, on_cuda.manager.current
    assert loaded.plan.rung == "full"
    attempt, calls = failing(2, torch.OutOfMemoryError("CUDA out of memory (simulated)"))
    notes: list[str] = []
    assert manager.with_fallback(loaded, attempt, notes) == "done after 3 attempts"
    assert loaded.plan.rung == "offload" and len(notes) == 2
    assert notes == [n for n in loaded.plan.notes[-2:]]  # each note says which step was taken


def test_fallback_counts_the_cpu_allocators_failure_as_out_of_memory(on_cuda):
    manager, loaded = on_cuda.manager, on_cuda.manager.current
    attempt, _ = failing(1, RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory"))
    notes: list[str] = []
    manager.with_fallback(loaded, attempt, notes)
    assert len(notes) == 1


def test_fallback_leaves_other_errors_alone(on_cuda):
    manager, loaded = on_cuda.manager, on_cuda.manager.current
    before = loaded.plan
    attempt, _ = failing(1, RuntimeError("shape mismatch"))
    with pytest.raises(RuntimeError, match="shape mismatch"):
        manager.with_fallback(loaded, attempt, [])
    assert loaded.plan == before


def test_fallback_on_the_cpu_ends_in_one_clear_error(engine):
    manager, loaded = engine.manager, engine.manager.current
    attempt, calls = failing(99, torch.OutOfMemoryError("out of memory (simulated)"))
    with pytest.raises(EaselError, match=OUT_OF_MEMORY_ON_CPU):
        manager.with_fallback(loaded, attempt, [])
    assert calls["n"] == 1  # the CPU plan has no rung below it: no retry


def test_use_fp32_vae_switches_the_vae_and_says_so(engine):
    manager, loaded = engine.manager, engine.manager.current
    manager.replan(loaded, replace(loaded.plan, vae_dtype=torch.bfloat16))
    assert loaded.pipe.vae.dtype == torch.bfloat16
    note = manager.use_fp32_vae(loaded)
    assert loaded.pipe.vae.dtype == torch.float32 and loaded.plan.vae_dtype == torch.float32
    assert "fp32" in note


def test_nothing_unloads_the_model_while_a_job_uses_it(engine):
    manager = engine.manager
    events = []

    def other_thread():
        manager.unload()  # e.g. a precision change from the Models tab
        events.append("unloaded")

    with manager.use("tiny-sd1") as loaded:
        thread = threading.Thread(target=other_thread)
        thread.start()
        time.sleep(0.3)  # give it every chance to run; it must wait for the job
        events.append("job done")
        assert manager.current is loaded
    thread.join(timeout=10)
    assert events == ["job done", "unloaded"]
