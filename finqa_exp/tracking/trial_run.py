"""A trial's run, from start to how it ended: the bookkeeping around finqa_exp/trial.py.

    with TrialRun(tracker, "trial-3", tags, optuna_trial, output_dir, start) as run:
        with run.phase("train"):
            ...
        return run.complete(metrics)

It starts the trial's MLflow run (a child of the study's run inside a sweep, and named in
the Optuna trial's ``mlflow_run_id``), times the phases, and on the way out records how
the trial ended: its timings (a pruned or failed trial's too), the state and error tags
and the run's status. The names it writes are in tracking.names.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from finqa_exp.config import FinqaConfig
from finqa_exp.tracking import names
from finqa_exp.tracking.environment import environment_tags
from finqa_exp.tracking.runs import FAILED, FINISHED, KILLED, Tracker

log = logging.getLogger(__name__)

# Training and generation are the work; everything else in a trial is overhead.
WORK_PHASES = ("train", "generate_base", "generate_tuned")


def phase_metrics(seconds: dict[str, float], total: float) -> dict[str, float]:
    """``time_<phase>_s`` per phase, ``trial_time_s``, and ``overhead_share``: the share of
    the trial's wall time spent outside training and generation."""
    work = sum(seconds.get(name, 0.0) for name in WORK_PHASES)
    return {
        **{f"time_{name}_s": value for name, value in sorted(seconds.items())},
        "trial_time_s": total,
        "overhead_share": (total - work) / total if total > 0 else 0.0,
    }


def confirmation_of(trial: Any | None) -> tuple[int, int] | None:
    """(the trial it confirms, its seed) for a confirmation trial, else None."""
    if trial is None:
        return None
    from finqa_exp.sweep.confirm import CONFIRMS_ATTR, SEED_ATTR

    attrs = trial.user_attrs
    return (int(attrs[CONFIRMS_ATTR]), int(attrs[SEED_ATTR])) if CONFIRMS_ATTR in attrs else None


def trial_run_name(conf: FinqaConfig, trial: Any | None) -> str:
    """``tracking.run_name``, else ``trial-<n>`` in a sweep (``trial-<n>-seed-<s>`` for the
    confirmation of trial n with seed s), else ``<model>-<data>``."""
    if conf.tracking.run_name:
        return conf.tracking.run_name
    if trial is None:
        return f"{conf.model.name}-{conf.data.name}"
    confirms = confirmation_of(trial)
    return f"trial-{confirms[0]}-seed-{confirms[1]}" if confirms else f"trial-{trial.number}"


def trial_run_tags(conf: FinqaConfig, device: str) -> dict[str, str]:
    """The tags a trial's run starts with: environment, device, model, data, experiment."""
    return {
        **environment_tags(device),
        names.MODEL_TAG: conf.model.name,
        names.DATA_TAG: conf.data.name,
        names.EXPERIMENT_TAG: conf.experiment or "default",
    }


class TrialRun:
    """The MLflow run and Optuna records of one trial (``trial`` is None outside a sweep)."""

    def __init__(
        self,
        tracker: Tracker,
        run_name: str,
        tags: dict[str, str],
        trial: Any | None,
        output_dir: str | Path,
        start: float,
        on_failure: Callable[[], None] | None = None,
    ) -> None:
        self.tracker = tracker
        self.trial = trial
        self.output_dir = Path(output_dir)
        self.start = start
        self.on_failure = on_failure
        self.seconds: dict[str, float] = {}
        self.status = FAILED
        self.tags = dict(tags)
        self.run_name = run_name
        self.run_id: str | None = None

    def __enter__(self) -> TrialRun:
        parent = None
        if self.trial is not None:
            from finqa_exp.sweep.confirm import CONFIRMED_STUDY_ATTR

            study = self.trial.study
            # A confirmation run belongs to the study it confirms, under its parent run.
            self.tags[names.STUDY_TAG] = study.user_attrs.get(
                CONFIRMED_STUDY_ATTR, study.study_name
            )
            self.tags[names.TRIAL_NUMBER_TAG] = str(self.trial.number)
            confirms = confirmation_of(self.trial)
            if confirms is not None:
                self.tags[names.TRIAL_NUMBER_TAG] = str(confirms[0])
                self.tags[names.CONFIRMS_TAG], self.tags[names.SEED_TAG] = map(str, confirms)
            parent = study.user_attrs.get(names.PARENT_RUN_ATTR)
        self.run_id = self.tracker.start_run(self.run_name, self.tags, parent_run_id=parent)
        if self.trial is not None and self.run_id:
            self.trial.set_user_attr(names.RUN_ID_ATTR, self.run_id)
        log.info("MLflow run %s", self.run_id or "(tracking off)")
        return self

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Time a phase of the trial (summed by name) into ``time_<name>_s``."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start

    def timings(self) -> dict[str, float]:
        return phase_metrics(self.seconds, time.perf_counter() - self.start)

    def log_config(self, params: dict[str, Any], config_yaml: str) -> None:
        self.tracker.log_params(params)
        self.tracker.log_text(config_yaml, names.CONFIG_ARTIFACT)

    def complete(self, metrics: dict[str, float]) -> dict[str, float]:
        """Record a finished trial: its timings join ``metrics``, which are also written to
        ``metrics.json`` in the job folder (for scripts and the bench); returns them."""
        timings = self.timings()
        metrics.update(timings)
        self.tracker.log_metrics(timings)
        (self.output_dir / names.METRICS_FILE).write_text(
            json.dumps(metrics, indent=1, sort_keys=True)
        )
        if self.trial is not None:
            self.trial.set_user_attr(names.TIMINGS_ATTR, timings)
        self.status = FINISHED
        if self.trial is not None:
            self.tracker.set_tags({names.STATE_TAG: names.COMPLETE})
        return metrics

    def __exit__(self, exc_type: Any, err: BaseException | None, tb: Any) -> bool:
        try:
            if err is not None:
                self._record_failure(err)
        finally:
            self.tracker.end_run(self.status)
        return False

    def _record_failure(self, err: BaseException) -> None:
        import optuna

        if self.on_failure is not None:
            try:
                self.on_failure()
            except Exception as cleanup_err:  # the trial's own error is the one to report
                log.warning("could not clean up after the ended trial: %s", cleanup_err)
        from finqa_exp.sweep.resume import TrialPreempted

        pruned = isinstance(err, optuna.TrialPruned)
        if pruned or isinstance(err, (TrialPreempted, KeyboardInterrupt)):
            self.status = KILLED  # stopped from outside: its retry resumes it
        # A pruned or failed trial's time counts too (the benchmark sums compute by state).
        timings = self.timings()
        try:
            if self.trial is not None:
                self.trial.set_user_attr(names.TIMINGS_ATTR, timings)
            self.tracker.log_metrics(timings)
        except Exception as record_err:  # the trial's own error is the one to report
            log.warning("could not record the timings of the ended trial: %s", record_err)
        self.tracker.set_tags(
            {
                names.STATE_TAG: names.PRUNED if pruned else names.FAIL,
                names.ERROR_TAG: f"{type(err).__name__}: {err}"[:5000],
            }
        )
