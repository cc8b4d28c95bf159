"""The benchmark's measurements that run our commands as a user does: the default sweep
with and without its pruner, the objective's noise between two training seeds, the idle
share of two workers batched and asynchronous, a cold single trial. Each runs
``python -m finqa_exp`` in a fresh process and reads what the study and the job folder
recorded."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from finqa_exp import tiny
from finqa_exp.config import ModelConfig
from finqa_exp.tracking import names


def finqa_command(root: Path, cache_dir: Path, *args: str) -> list[str]:
    """``python -m finqa_exp`` rooted in ``root`` (stores, outputs) with a shared cache."""
    return [
        sys.executable,
        "-m",
        "finqa_exp",
        *args,
        f"paths.root_dir={root}",
        f"paths.cache_dir={cache_dir}",
    ]


def _run(cmd: list[str], cwd: Path) -> float:
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[2:4])} failed:\n{proc.stderr[-3000:]}")
    return seconds


def work_seconds(timings: dict[str, float]) -> float:
    """Training and generation time of one trial, from its ``timings``."""
    from finqa_exp.tracking.trial_run import WORK_PHASES

    return sum(timings.get(f"time_{name}_s", 0.0) for name in WORK_PHASES)


def sweep_run(
    root: Path, cache_dir: Path, name: str, seed: int, n_trials: int, pruner: bool, extra: list[str]
) -> dict[str, Any]:
    """One sweep command; its trials as the study recorded them."""
    import optuna

    cmd = finqa_command(
        root,
        cache_dir,
        "-m",
        f"hydra.sweeper.study_name={name}",
        f"hydra.sweeper.n_trials={n_trials}",
        "hydra.sweeper.confirm.top_k=0",  # unless extra confirms (confirm_overrides)
        f"hydra.sweeper.sampler.seed={seed}",
        f"hydra.sweep.dir={root}/multirun/{name}",
        *([] if pruner else ["hydra/sweeper/pruner=none"]),
        *extra,
    )
    wall = _run(cmd, root)
    study = optuna.load_study(study_name=name, storage=f"sqlite:///{root}/studies/{name}.db")
    trials = []
    for t in study.trials:
        timings = t.user_attrs.get(names.TIMINGS_ATTR, {})
        work = work_seconds(timings)
        trials.append(
            {
                "number": t.number,
                "state": t.state.name,
                "value": t.value,
                "params": t.params,
                "seconds": (t.datetime_complete - t.datetime_start).total_seconds(),
                "work_seconds": work,
                # What pruning can save: a trial's training and its tuned answers. The base
                # model's score is once per study (then cached), whichever arm runs first.
                "compute_seconds": work - timings.get("time_generate_base_s", 0.0),
                "train_seconds": timings.get("time_train_s", 0.0),
            }
        )
    done = [t for t in trials if t["value"] is not None]
    return {
        "confirmed": confirmed_configs(study),
        "seed": seed,
        "pruner": pruner,
        "n_trials": n_trials,
        "command_seconds": wall,
        "trial_seconds": sum(t["seconds"] for t in trials),
        "compute_seconds": sum(t["compute_seconds"] for t in trials),
        "train_seconds": sum(t["train_seconds"] for t in trials),
        "best": max(t["value"] for t in done) if done else None,
        "states": {
            s: sum(t["state"] == s for t in trials)
            for s in (names.COMPLETE, names.PRUNED, names.FAIL)
        },
        "trials": trials,
    }


def confirm_overrides(top_k: int, seeds: list[int]) -> list[str]:
    """A sweep's confirmation of its top ``top_k`` with ``seeds``, as command-line overrides."""
    return [
        f"hydra.sweeper.confirm.top_k={top_k}",
        f"hydra.sweeper.confirm.seeds=[{','.join(str(s) for s in seeds)}]",
    ]


def confirmed_configs(study: Any) -> list[dict[str, Any]]:
    """The study's confirmed configurations, best mean first, as the bench records them."""
    from finqa_exp.sweep.confirm import confirmed

    return [
        {
            "number": c.trial.number,
            "params": c.trial.params,
            "values": list(c.values),
            "mean": c.mean,
            "std": c.std,
        }
        for c in confirmed(study)
    ]


def first_trials(run: dict[str, Any], n: int) -> dict[str, Any]:
    """The sweep as if it had stopped after ``n`` trials: with a seeded sampler, sequential
    trials, the first n trials of a longer sweep are exactly an n-trial sweep."""
    trials = run["trials"][:n]
    done = [t for t in trials if t["value"] is not None]
    return {
        **run,
        "n_trials": n,
        "trial_seconds": sum(t["seconds"] for t in trials),
        "compute_seconds": sum(t["compute_seconds"] for t in trials),
        "best": max(t["value"] for t in done) if done else None,
        "best_params": max(done, key=lambda t: t["value"])["params"] if done else None,
        "trials": trials,
    }


def seed_noise(root: Path, cache_dir: Path, run: dict[str, Any], extra: list[str]) -> dict:
    """The objective's own noise: the sweep's best params trained again with another
    ``train.seed`` (a fresh process), against the value the sweep recorded."""
    from finqa_exp.config import TrainConfig

    done = [t for t in run["trials"] if t["value"] is not None]
    best = max(done, key=lambda t: t["value"])
    seed = TrainConfig().seed + 1
    out = root / f"noise_seed{run['seed']}_n{run['n_trials']}"
    params = [f"{k}={v}" for k, v in sorted(best["params"].items())]
    cmd = finqa_command(
        root, cache_dir, f"hydra.run.dir={out}", "tracking=none", f"train.seed={seed}",
        *params, *extra,
    )  # fmt: skip
    _run(cmd, root)
    again = json.loads((out / names.METRICS_FILE).read_text())["rougeL"]
    return {
        "sweep_seed": run["seed"],
        "params": best["params"],
        "value": best["value"],
        "train_seed": seed,
        "value_other_seed": again,
        "noise": abs(again - best["value"]),
    }


def workers_run(
    root: Path, cache_dir: Path, schedule: str, n_trials: int, workers: int, extra: list[str]
) -> dict[str, Any]:
    """The default study (pruner on, sampler seed 0, no confirmation) with ``workers``
    joblib workers, scheduled ``schedule`` (async or batch): the idle share its sweeper
    measured, and how its trials ended."""
    import yaml

    name = f"bench_workers_{schedule}"
    parallel = [
        "hydra/launcher=joblib",
        f"hydra.launcher.n_jobs={workers}",
        f"hydra.sweeper.n_jobs={workers}",
        f"hydra.sweeper.schedule={schedule}",
    ]
    run = sweep_run(root, cache_dir, name, 0, n_trials, True, [*parallel, *extra])
    results = root / "multirun" / name / "optimization_results.yaml"
    measured = yaml.safe_load(results.read_text())["workers"]
    return {**measured, "command_seconds": run["command_seconds"], "states": run["states"]}


def overhead_of_sweep(run: dict[str, Any]) -> dict[str, Any]:
    """Share of each trial's wall time (as the study saw it) outside training and generation."""
    shares = [
        1 - t["work_seconds"] / t["seconds"] for t in run["trials"] if t["state"] == names.COMPLETE
    ]
    work = sum(t["work_seconds"] for t in run["trials"])
    return {
        "first_trial": shares[0] if shares else None,
        "later_trials_median": statistics.median(shares[1:]) if len(shares) > 1 else None,
        "whole_command": 1 - work / run["command_seconds"],
    }


def cold_trial(root: Path, cache_dir: Path, extra: list[str]) -> dict[str, Any]:
    """``python -m finqa_exp`` once, as a user runs it: a new process, imports and all."""
    out = root / "cold"
    wall = _run(finqa_command(root, cache_dir, f"hydra.run.dir={out}", *extra), root)
    metrics = json.loads((out / names.METRICS_FILE).read_text())
    work = work_seconds(metrics)
    return {
        "command_seconds": wall,
        "trial_seconds": metrics["trial_time_s"],
        "work_seconds": work,
        "overhead_share_in_trial": metrics["overhead_share"],
        "overhead_share_of_command": 1 - work / wall,
    }


def tiny_setup(cache_dir: Path) -> tuple[Path, Any]:
    """The default trial's tiny base (built if needed) and the bundled data's splits."""
    from finqa_exp.config import DataConfig
    from finqa_exp.data import load_splits

    splits = load_splits(DataConfig())
    return tiny.build_tiny_base(ModelConfig().tiny, splits.train, cache_dir), splits
