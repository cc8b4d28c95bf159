"""JobSlots (finqa_exp/sweep/launches.py) with a stand-in launcher whose jobs end when the
test says so: asynchronous and batched scheduling, in-process launchers, broken launchers,
and the worker time they measure."""

from __future__ import annotations

import threading

import pytest
from hydra.core.utils import JobReturn, JobStatus
from optuna.trial import TrialState

from finqa_exp.sweep.launches import JobSlots, WorkerTime


class HeldLauncher:
    """launch() blocks until the test releases that job; its value is the job number."""

    def __init__(self) -> None:
        self.release: dict[int, threading.Event] = {}
        self.started: list[int] = []
        self.lock = threading.Lock()

    def gate(self, number: int) -> threading.Event:
        with self.lock:
            return self.release.setdefault(number, threading.Event())

    def launch(self, job_overrides, initial_job_idx):
        assert len(job_overrides) == 1  # one job per call: the slots keep several in flight
        with self.lock:
            self.started.append(initial_job_idx)
        if initial_job_idx < 0:
            raise RuntimeError("the launcher lost its worker")
        assert self.gate(initial_job_idx).wait(10)
        ret = JobReturn()
        ret.status = JobStatus.COMPLETED
        ret.return_value = float(initial_job_idx)
        return [ret]


def ended(slots: JobSlots) -> list[int]:
    return [number for number, _ in slots.wait(timeout=10)]


@pytest.mark.parametrize("schedule", ["async", "batch"])
def test_a_free_slot_takes_the_next_trial_at_once_only_when_async(schedule):
    launcher = HeldLauncher()
    slots = JobSlots(launcher, n_jobs=2, n_values=1, schedule=schedule)
    assert slots.free() == 2
    slots.start(0, ["x=0"])
    slots.start(1, ["x=1"])
    assert slots.free() == 0 and slots.running == [0, 1]
    launcher.gate(1).set()  # the short trial ends; the long one runs on
    assert ended(slots) == [1]
    # async: its worker is free now; batch: the round waits for trial 0.
    assert slots.free() == (1 if schedule == "async" else 0)
    launcher.gate(0).set()
    assert ended(slots) == [0]
    assert slots.free() == 2 and slots.running == []


def test_outcomes_come_back_with_their_trial_numbers():
    launcher = HeldLauncher()
    slots = JobSlots(launcher, n_jobs=3, n_values=1)
    for number in (4, 5, -1):
        slots.start(number, [])
    launcher.gate(5).set()
    launcher.gate(4).set()
    outcomes = {}
    while slots.running:
        outcomes.update(slots.wait(timeout=10))
    assert outcomes[4].state == TrialState.COMPLETE and outcomes[4].values == [4.0]
    assert outcomes[5].values == [5.0]
    # A launcher that raises fails its trial only, with its reason, as a lost job.
    assert outcomes[-1].state == TrialState.FAIL and outcomes[-1].lost
    assert outcomes[-1].reason == "job lost: RuntimeError: the launcher lost its worker"
    assert not outcomes[4].lost


def test_an_in_process_launcher_runs_one_job_at_a_time_in_the_calling_thread():
    seen = []

    class InProcess(HeldLauncher):
        def launch(self, job_overrides, initial_job_idx):
            seen.append(threading.current_thread() is threading.main_thread())
            self.gate(initial_job_idx).set()
            return super().launch(job_overrides, initial_job_idx)

    slots = JobSlots(InProcess(), n_jobs=4, n_values=1, in_process=True)
    assert slots.free() == 1
    slots.start(0, [])  # returns once the job has run
    assert slots.free() == 0 and ended(slots) == [0] and seen == [True]


def test_worker_time_is_the_share_of_slot_time_without_a_job():
    assert WorkerTime(slots=2, wall_s=10.0, busy_s=15.0, jobs=3).idle_share == 0.25
    assert WorkerTime(slots=1, wall_s=0.0, busy_s=0.0, jobs=0).idle_share == 0.0


def test_busy_time_is_each_job_from_its_start_to_its_end(monkeypatch):
    from finqa_exp.sweep import launches

    clock = {"now": 0.0}
    monkeypatch.setattr(launches.time, "perf_counter", lambda: clock["now"])
    launcher = HeldLauncher()
    slots = JobSlots(launcher, n_jobs=2, n_values=1)
    slots.start(0, [])  # both start at 0
    slots.start(1, [])
    clock["now"] = 4.0
    launcher.gate(0).set()  # job 0 ends at 4
    assert ended(slots) == [0]
    clock["now"] = 10.0
    launcher.gate(1).set()  # job 1 ends at 10
    assert ended(slots) == [1]
    measured = slots.worker_time()
    assert (measured.busy_s, measured.wall_s, measured.jobs) == (14.0, 10.0, 2)
    assert measured.idle_share == pytest.approx(0.3)  # slot 0 idle from 4 to 10 of 2 x 10


def test_a_job_that_ends_the_launch_thread_still_fails_its_trial():
    class Exiting(HeldLauncher):
        def launch(self, job_overrides, initial_job_idx):
            raise SystemExit(3)  # joblib re-raises a job's sys.exit in the launch thread

    slots = JobSlots(Exiting(), n_jobs=2, n_values=1)
    slots.start(7, [])
    [(number, outcome)] = slots.wait(timeout=10)
    assert number == 7 and outcome.state == TrialState.FAIL and not outcome.lost
    assert outcome.reason == "SystemExit: 3" and slots.running == []


def test_an_unknown_schedule_is_refused():
    with pytest.raises(ValueError, match="schedule must be one of"):
        JobSlots(HeldLauncher(), n_jobs=2, n_values=1, schedule="eager")


@pytest.mark.parametrize(
    ("init", "expected"),
    [
        # Connecting to a running cluster: Ray refuses object_store_memory.
        ({"address": "127.0.0.1:6379", "object_store_memory": 5}, {"address": "127.0.0.1:6379"}),
        # Starting a Ray of its own: the plugin's object store, unless one is given.
        ({"address": None}, {"address": None, "object_store_memory": 78643200}),
        ({"object_store_memory": 10**9}, {"object_store_memory": 10**9}),
    ],
)
def test_the_ray_launcher_is_connected_once_before_concurrent_launches(monkeypatch, init, expected):
    import sys
    import types

    from omegaconf import OmegaConf

    from finqa_exp.sweep.launches import prepare_launcher

    calls = []
    fake_ray = types.SimpleNamespace(
        is_initialized=lambda: bool(calls), init=lambda **kw: calls.append(kw)
    )
    monkeypatch.setitem(sys.modules, "ray", fake_ray)
    RayLauncher = type(
        "RayLauncher", (), {"__module__": "hydra_plugins.hydra_ray_launcher.ray_launcher"}
    )
    launcher = RayLauncher()
    launcher.ray_cfg = OmegaConf.create({"init": init, "remote": {}})
    prepare_launcher(launcher)
    prepare_launcher(launcher)  # already connected: once only
    assert calls == [expected]
    prepare_launcher(HeldLauncher())  # any other launcher: nothing to do
    assert len(calls) == 1
