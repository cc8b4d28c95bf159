"""Trial jobs in flight: up to ``n_jobs`` at a time through the Hydra launcher, each handed
back as soon as it ends, so that a free worker takes the next trial at once.

    python -m finqa_exp -m hydra/launcher=joblib hydra.launcher.n_jobs=2   # 2 in flight
    python -m finqa_exp -m hydra.sweeper.schedule=batch ...                # rounds, to compare

``schedule: async`` (the default) starts a trial whenever one ends. ``schedule: batch``
starts a round of ``n_jobs`` trials only once the whole last round has ended, as Hydra's
own Optuna sweeper does; a round waits for its slowest trial, and with pruning most trials
are short, so workers sit idle. :class:`WorkerTime` measures how idle.

Each job is its own ``launcher.launch([overrides], initial_job_idx=number)`` call in a
thread of its own: launchers that run jobs elsewhere (joblib's processes, submitit's Slurm
or local jobs, Ray tasks) block in that call until the job ends, so N calls keep N jobs
running, and the job's Hydra number is its trial number. Hydra's basic launcher runs the
job in this very process, so with it jobs run one at a time in the calling thread (Ctrl-C
and other signals then reach the job, as they would without a sweeper).
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from dataclasses import dataclass
from typing import Any

from optuna.trial import TrialState

from finqa_exp.sweep.resume import TrialPreempted
from finqa_exp.sweep.study_book import Outcome, describe, job_outcome

SCHEDULES = ("async", "batch")

_RAY_LAUNCHER = "hydra_plugins.hydra_ray_launcher.ray_launcher.RayLauncher"
_RAY_OBJECT_STORE = 78643200  # hydra-ray-launcher's object store for a Ray it starts itself


def _bookkeeper(process: Any) -> bool:
    """joblib's resource tracker: it runs no job, and it cleans up after the killed ones."""
    try:
        return any("resource_tracker" in part for part in process.cmdline())
    except Exception:  # gone meanwhile, or not ours to read
        return False


def launcher_name(launcher: Any) -> str:
    # By name: Hydra's plugin scan re-executes plugin modules, so a class object imported
    # here may not be the one Hydra instantiated.
    return f"{type(launcher).__module__}.{type(launcher).__name__}"


def prepare_launcher(launcher: Any) -> None:
    """Do once, before jobs are launched concurrently, what a launcher would otherwise do
    on every ``launch`` call and so race on.

    hydra-ray-launcher (1.2.2) connects to Ray in each call unless connected: two calls at
    once both call ``ray.init`` and one fails ("called ray.init twice"). It also always
    passes ``object_store_memory``, which Ray refuses when connecting to a running cluster
    (``hydra.launcher.ray.init.address``); it is only for a Ray it starts itself.
    """
    if launcher_name(launcher) != _RAY_LAUNCHER:
        return
    import ray
    from omegaconf import OmegaConf

    if ray.is_initialized():
        return
    init = OmegaConf.to_container(launcher.ray_cfg.init, resolve=True) or {}
    if init.get("address"):
        init.pop("object_store_memory", None)
    else:
        init.setdefault("object_store_memory", _RAY_OBJECT_STORE)
    ray.init(**init)


@dataclass(frozen=True)
class WorkerTime:
    """How busy the workers were: ``slots`` jobs at most, over ``wall_s`` seconds."""

    slots: int
    wall_s: float
    busy_s: float
    jobs: int

    @property
    def idle_share(self) -> float:
        """The share of worker time with no job: 1 - busy / (slots x wall). A job is busy
        from its launch to its end, so time a job waits for a worker (a Slurm queue, a
        launcher with fewer workers than ``n_jobs``) counts as busy."""
        if self.wall_s <= 0:
            return 0.0
        return max(0.0, 1.0 - self.busy_s / (self.slots * self.wall_s))

    def as_dict(self) -> dict[str, Any]:
        return {
            "slots": self.slots,
            "jobs": self.jobs,
            "wall_s": round(self.wall_s, 3),
            "busy_s": round(self.busy_s, 3),
            "idle_share": round(self.idle_share, 4),
        }


class JobSlots:
    """Runs trial jobs through ``launcher``, ``n_jobs`` at a time; see the module docstring."""

    def __init__(
        self,
        launcher: Any,
        n_jobs: int,
        n_values: int,
        schedule: str = "async",
        in_process: bool = False,
    ) -> None:
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
        self.launcher = launcher
        self.slots = 1 if in_process else n_jobs
        self.n_values = n_values
        self.schedule = schedule
        self.in_process = in_process
        self._running: dict[int, float] = {}  # trial number -> when its job started
        # queue.Queue, not SimpleQueue: its timed get can be interrupted by Ctrl-C.
        self._ended: queue.Queue[tuple[int, Outcome, float]] = queue.Queue()
        self._first: float | None = None
        self._last: float | None = None
        self._busy = 0.0
        self._jobs = 0

    @property
    def running(self) -> list[int]:
        """The trial numbers whose jobs have not been handed back yet."""
        return sorted(self._running)

    def free(self) -> int:
        """How many jobs may start now."""
        if self.schedule == "batch" and self._running:
            return 0  # a round starts only once the last one has ended
        return self.slots - len(self._running)

    def start(self, number: int, overrides: list[str]) -> None:
        """Start trial ``number``'s job (in-process: run it to its end here)."""
        now = time.perf_counter()
        self._running[number] = now
        self._first = now if self._first is None else self._first
        if self.in_process:
            self._ended.put(self._launch(number, overrides))
            return
        threading.Thread(
            target=self._run,
            args=(number, overrides),
            name=f"finqa-optuna-trial-{number}",
            daemon=True,  # a sweep stopped by Ctrl-C does not wait for its jobs' threads
        ).start()

    def _run(self, number: int, overrides: list[str]) -> None:
        # Whatever comes back, an outcome is queued: a thread that died silently (a job's
        # SystemExit re-raised by joblib) would leave its trial running forever.
        try:
            ended = self._launch(number, overrides)
        except BaseException as err:
            failed = Outcome(TrialState.FAIL, reason=describe(err), error=err)
            ended = (number, failed, time.perf_counter())
        self._ended.put(ended)

    def wait(self, timeout: float | None = None) -> list[tuple[int, Outcome]]:
        """Block until a job ends (at most ``timeout`` s); every job ended so far, in order."""
        if not self._running:
            return []
        try:
            ended = [self._ended.get(timeout=timeout)]
        except queue.Empty:
            return []
        while not self._ended.empty():
            ended.append(self._ended.get_nowait())
        for number, _, end in ended:
            self._busy += end - self._running.pop(number)
            self._last = end if self._last is None else max(self._last, end)
            self._jobs += 1
        return [(number, outcome) for number, outcome, _ in sorted(ended, key=lambda e: e[0])]

    def stop(self, grace_s: float = 0.0) -> list[tuple[int, Outcome]]:
        """Stop the jobs still running on this machine (the sweep was interrupted): the
        launcher's processes (joblib's workers, submitit_local's jobs) are killed, as joblib
        kills its workers when a batch of its own is interrupted. With ``grace_s`` (the
        sweep was preempted) they first get SIGTERM and that long to save a checkpoint and
        stop; the jobs that end meanwhile are returned. Jobs on other machines (Slurm,
        Ray) run on; their trials are failed and queued again all the same."""
        if not self._running or self.in_process:
            return []
        import psutil

        children = [p for p in psutil.Process().children(recursive=True) if not _bookkeeper(p)]
        ended: list[tuple[int, Outcome]] = []
        if grace_s > 0:
            for child in children:
                with contextlib.suppress(psutil.NoSuchProcess):
                    child.terminate()
            deadline = time.monotonic() + grace_s
            while self._running and (left := deadline - time.monotonic()) > 0:
                ended += self.wait(timeout=left)
        for child in children:
            with contextlib.suppress(psutil.NoSuchProcess):
                child.kill()
        psutil.wait_procs(children, timeout=10)
        return ended

    def worker_time(self) -> WorkerTime:
        """Worker time from the first job's start to the last job's end."""
        wall = (self._last - self._first) if self._first is not None and self._last else 0.0
        return WorkerTime(self.slots, wall, self._busy, self._jobs)

    def _launch(self, number: int, overrides: list[str]) -> tuple[int, Outcome, float]:
        try:
            (ret,) = self.launcher.launch([overrides], initial_job_idx=number)
            outcome = job_outcome(ret, self.n_values)
        except TrialPreempted as err:
            if self.in_process:
                raise  # this process was told to stop: the sweep stops (SweepRun.execute)
            # A worker was (a Slurm job preempted, a spot node reclaimed): retry its trial.
            outcome = Outcome(TrialState.FAIL, reason=f"preempted: {err}", error=err, lost=True)
        except Exception as err:  # the launcher itself broke, e.g. a dead node
            outcome = Outcome(
                TrialState.FAIL, reason=f"job lost: {describe(err)}", error=err, lost=True
            )
        return number, outcome, time.perf_counter()
