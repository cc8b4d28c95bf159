"""Toy Hydra app that the finqa_optuna sweeper tests drive: a quadratic in x and y plus a
categorical offset, reporting a falling value at each step so pruners have something to judge.

    PYTHONPATH=. python tests/sweep/toy_app/app.py -m hydra.sweeper.n_trials=4

Config knobs fail, NaN, or stall chosen trial numbers, so each sweeper path can be hit on
purpose. Each job writes trial.json into its own output folder.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from pathlib import Path

import hydra
import optuna
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from finqa_exp.sweep import current_trial, resume

OFFSET = {"a": 0.0, "b": 1.0, "c": 2.0}


def objective(cfg: DictConfig) -> float | tuple[float, float]:
    """(x - 2)^2 + (y + 1)^2 + offset[kind]; a second objective |x| when objectives=2."""
    trial = current_trial()
    number = trial.number if trial is not None else -1
    loss = (cfg.x - 2) ** 2 + (cfg.y + 1) ** 2 + OFFSET[cfg.kind]
    loss += cfg.seed_noise * ((cfg.seed * 7919 + 13) % 101) / 101
    record = {
        "number": number, "x": cfg.x, "y": cfg.y, "kind": cfg.kind, "seed": cfg.seed,
        "pid": os.getpid(),
    }  # fmt: skip
    Path(HydraConfig.get().runtime.output_dir, "trial.json").write_text(json.dumps(record))
    if trial is not None:
        trial.set_user_attr("job_pid", os.getpid())
    folder = None
    if cfg.checkpoint and trial is not None:  # what a job that resumes records
        folder = Path(HydraConfig.get().sweep.dir, f"ckpt-{resume.retry_chain(trial).root}")
        folder.mkdir(exist_ok=True)
        resume.record_checkpoint(trial, folder)
    if number in cfg.fail_on:
        raise RuntimeError(f"planned failure of trial {number}")
    died = Path(HydraConfig.get().sweep.dir, f"died-{number}")
    if number in cfg.die_on and not died.exists():
        died.touch()
        os._exit(1)  # no exception, no JobReturn: the launcher loses the job
    termed = Path(HydraConfig.get().sweep.dir, f"termed-{number}")
    if number in cfg.term_on and not termed.exists():
        termed.touch()
        os.kill(os.getpid(), signal.SIGTERM)  # preempted, as Slurm would
        time.sleep(30)  # the sweeper's handler stops the job before this ends
    if cfg.fail_seed is not None and cfg.seed == cfg.fail_seed:
        raise RuntimeError(f"planned failure of seed {cfg.seed}")
    time.sleep(cfg.sleep_s)
    if number in cfg.hang_on:
        time.sleep(cfg.hang_s)  # long enough for a test to kill or interrupt the sweep
    marker = Path(HydraConfig.get().sweep.dir, f"hung-seed-{cfg.seed}")
    if cfg.hang_seed is not None and cfg.seed == cfg.hang_seed and not marker.exists():
        marker.touch()
        time.sleep(cfg.hang_s)
    # Optuna prunes single-objective studies only; reporting is refused with two objectives.
    for step in range(cfg.steps if cfg.objectives == 1 else 0):
        # Falls towards the loss, so a worse trial is worse at every step.
        value = loss + (cfg.steps - step)
        if trial is not None:
            trial.report(value, step)
            if trial.should_prune():
                raise optuna.TrialPruned(f"pruned at step {step}")
    if folder is not None:
        shutil.rmtree(folder)  # the trial ended: nothing to resume
    if number in cfg.nan_on:
        return float("nan")
    if cfg.objectives == 2:
        return loss, abs(cfg.x)
    return loss


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float | tuple[float, float]:
    return objective(cfg)


if __name__ == "__main__":
    main()
