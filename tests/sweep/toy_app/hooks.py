"""Sweeper hooks for the toy app: a custom search space and a callback that logs events.

Referenced from the command line by tests/sweep/test_sweeper.py, e.g.
    hydra.sweeper.custom_search_space=hooks.conditional_y
    'hydra.sweeper.callbacks=[{_target_: hooks.EventLog, path: /tmp/events.jsonl}]'
(`hooks` imports because the app's folder is first on sys.path.)
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import optuna
from omegaconf import DictConfig


def conditional_y(cfg: DictConfig, trial: optuna.Trial) -> None:
    """y is searched in a range that depends on the sampled kind."""
    high = 1.0 if trial.params["kind"] == "a" else 5.0
    trial.suggest_float("y", -high, high)


class EventLog:
    """Appends one JSON line per sweeper callback to `path`."""

    def __init__(self, path: str) -> None:
        self.path = Path(path)

    def _write(self, **event: object) -> None:
        with self.path.open("a") as out:
            out.write(json.dumps(event) + "\n")

    def on_sweep_start(self, study: optuna.Study) -> None:
        self._write(event="on_sweep_start", study=study.study_name, pid=os.getpid())

    def on_trial_end(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        self._write(event="on_trial_end", number=trial.number, state=trial.state.name)

    def on_sweep_end(self, study: optuna.Study) -> None:
        self._write(event="on_sweep_end", n_trials=len(study.trials))
