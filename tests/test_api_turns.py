"""The device's one queue (engine/turns.py): jobs from any door run in arrival order, a cancelled
waiter leaves the line, and the engine's own jobs take their turn in it."""
from __future__ import annotations

import threading

import pytest

from engine.errors import CancelledError
from engine.jobs import Job
from engine.turns import TurnQueue


def wait_until(condition, what: str) -> None:
    """Poll (no timing asserted): fails only if `condition` never holds within a minute."""
    event = threading.Event()
    for _ in range(6000):
        if condition():
            return
        event.wait(0.01)
    pytest.fail(f"never happened: {what}")


def queue_up(queue: TurnQueue, name: str, order: list[str], errors: list) -> tuple[threading.Thread, Job]:
    job = Job()

    def run():
        try:
            with queue.turn(job):
                order.append(name)
        except CancelledError as e:
            errors.append((name, e))

    before = queue.waiting()
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    wait_until(lambda: queue.waiting() == before + 1, f"{name} waits")
    return thread, job


def test_waiting_jobs_run_in_the_order_they_arrived():
    queue, order, errors = TurnQueue(), [], []
    holder = Job()
    with queue.turn(holder):
        # Alternating doors, as a stream of API calls and a page's job would arrive.
        threads = [queue_up(queue, name, order, errors)[0] for name in ("api-1", "page-1", "api-2", "page-2", "api-3")]
    for thread in threads:
        thread.join(60)
    assert order == ["api-1", "page-1", "api-2", "page-2", "api-3"] and not errors


def test_a_job_cancelled_while_waiting_leaves_the_line_and_the_rest_still_run():
    queue, order, errors = TurnQueue(), [], []
    with queue.turn(Job()):
        first, _ = queue_up(queue, "first", order, errors)
        cancelled, job = queue_up(queue, "cancelled", order, errors)
        last, _ = queue_up(queue, "last", order, errors)
        job.cancel()
        cancelled.join(60)
        assert [name for name, _ in errors] == ["cancelled"]
        assert queue.waiting() == 2
    first.join(60)
    last.join(60)
    assert order == ["first", "last"]


def test_the_running_job_and_its_progress_are_known_while_it_holds_the_device():
    from engine.jobs import ProgressUpdate

    queue, seen = TurnQueue(), []
    job = Job(on_progress=seen.append)
    assert queue.running() == (None, None)
    with queue.turn(job):
        update = ProgressUpdate(3, 10, 0, 1, 1.0)
        job.on_progress(update)
        assert queue.running() == (job, update) and seen == [update]  # the owner still gets its updates
    assert queue.running() == (None, None) and job.on_progress == seen.append


def test_engine_generate_takes_a_turn(sd_engine):
    seen = []
    job = Job(on_progress=lambda update: seen.append(sd_engine.turns.running()[0]))
    request = sd_engine.make_request({"prompt": "a cat", "width": 64, "height": 64, "steps": 2, "seed": 1,
                                      "save_images": False})
    sd_engine.generate(request, job)
    assert seen and all(running is job for running in seen)
    assert sd_engine.turns.running() == (None, None)


def test_api_jobs_beyond_the_queue_size_are_refused_with_503():
    from ui.api import ApiJobs, Refusal

    jobs = ApiJobs(limit=2)
    first, second = jobs.open(20), jobs.open(20)
    with pytest.raises(Refusal) as refused:
        jobs.open(20)
    assert refused.value.response.status_code == 503
    jobs.close(first)
    assert jobs.owns(jobs.open(20)) and jobs.owns(second) and not jobs.owns(first)
