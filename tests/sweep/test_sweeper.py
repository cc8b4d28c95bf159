"""The finqa_optuna sweeper: grammar mapping and bookkeeping units, then the real CLI of a toy
Hydra app (tests/sweep/toy_app) run as `python tests/sweep/toy_app/app.py -m ...` in subprocesses.

    pytest tests/sweep/test_sweeper.py            # about a minute on 2 CPU cores
    pytest tests/sweep/test_sweeper.py -k search_space
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
import types
from pathlib import Path
from typing import Any

import optuna
import pytest
import yaml
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.utils import JobReturn, JobStatus
from hydra.utils import instantiate
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState, create_trial

import hydra_plugins.finqa_optuna_sweeper.finqa_optuna_sweeper  # noqa: F401  (registers configs)
from finqa_exp.sweep import job as sweep_job
from finqa_exp.sweep import rounds, study_setup
from finqa_exp.sweep import search_space as ss
from finqa_exp.sweep import study_book as book
from finqa_exp.sweep import sweeper as sw

REPO = Path(__file__).resolve().parents[2]
APP = REPO / "tests" / "sweep" / "toy_app" / "app.py"
TOY_CONF = REPO / "tests" / "sweep" / "toy_app" / "conf"
SAMPLER_CLASSES = {
    "tpe": "TPESampler",
    "random": "RandomSampler",
    "grid": "GridSampler",
    "cmaes": "CmaEsSampler",
    "nsgaii": "NSGAIISampler",
    "qmc": "QMCSampler",
    "gp": "GPSampler",
}
SAMPLERS = list(SAMPLER_CLASSES)
PRUNER_CLASSES = {
    "none": "NopPruner",
    "median": "MedianPruner",
    "successive_halving": "SuccessiveHalvingPruner",
    "hyperband": "HyperbandPruner",
}
# The toy app's search space, for trials the tests write into a study themselves.
TOY_SPACE = {
    "x": FloatDistribution(-5, 5),
    "y": FloatDistribution(-5, 5),
    "kind": CategoricalDistribution(["a", "b", "c"]),
}


# ---------------------------------------------------------------- helpers


def toy_command(tmp_path: Path, *overrides: str, journal: bool = True) -> list[str]:
    storage = [f"hydra.sweeper.storage=journal://{tmp_path / 'study.log'}"] if journal else []
    sweep_dir = f"hydra.sweep.dir={tmp_path / 'sweep'}"
    return [sys.executable, str(APP), "-m", sweep_dir, *storage, *overrides]


def toy_env() -> dict[str, str]:
    # The repo root must import (hydra_plugins, finqa_exp) without `pip install -e .`.
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONPATH": path}


def sweep(
    tmp_path: Path, *overrides: str, ok: bool = True, journal: bool = True
) -> subprocess.CompletedProcess:
    """Run one sweep of the toy app to its end; assert it exited 0 unless ok=False."""
    proc = subprocess.run(
        toy_command(tmp_path, *overrides, journal=journal),
        cwd=tmp_path,
        env=toy_env(),
        capture_output=True,
        text=True,
        timeout=180,
    )
    if ok:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def start_sweep(tmp_path: Path, *overrides: str) -> subprocess.Popen:
    return subprocess.Popen(
        toy_command(tmp_path, *overrides),
        cwd=tmp_path,
        env=toy_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        # pytest run as a shell's background job ignores SIGINT, and so would the sweep:
        # give it Python's Ctrl-C back.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )


def finish(proc: subprocess.Popen, timeout: float = 60) -> tuple[int, str]:
    """Wait for a started sweep: (exit code, output); on timeout kill it and fail."""
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        pytest.fail(f"the sweep did not end in {timeout} s:\n{out[-4000:]}")
    return proc.returncode, out


def journal_storage(tmp_path: Path) -> JournalStorage:
    return JournalStorage(JournalFileBackend(str(tmp_path / "study.log")))


def load(tmp_path: Path, name: str = "toy") -> optuna.Study:
    return optuna.load_study(study_name=name, storage=journal_storage(tmp_path))


def wait_until(condition, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.2)


def running(tmp_path: Path, number: int) -> bool:
    """Trial `number`'s job is RUNNING and past its writes to the study (it set job_pid).

    Signalling a sweep in the middle of a journal write can leave Optuna's journal lock
    behind, which the next writer only breaks after 30 s; the tests signal a sleeping job.
    """
    if not (tmp_path / "sweep" / str(number) / "trial.json").exists():
        return False
    trials = load(tmp_path).trials
    return trials[number].state == TrialState.RUNNING and "job_pid" in trials[number].user_attrs


def results(tmp_path: Path) -> dict[str, Any]:
    return yaml.safe_load((tmp_path / "sweep" / "optimization_results.yaml").read_text())


def states(study: optuna.Study) -> list[str]:
    return [t.state.name for t in study.trials]


def slots(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    return book.slot_trials(study.get_trials(deepcopy=False))


def frozen(number: int, state: TrialState = TrialState.COMPLETE, **attrs: Any):
    trial = create_trial(
        state=state,
        value=1.0 if state == TrialState.COMPLETE else None,
        params={"x": 0.0},
        distributions={"x": FloatDistribution(-5, 5)},
        system_attrs=attrs,
    )
    trial.number = number
    return trial


# ---------------------------------------------------------------- search space (units)


def space_of(*overrides: str) -> ss.SearchSpace:
    return ss.parse_search_space(list(overrides))


def test_search_space_maps_hydra_grammar_to_distributions():
    space = space_of(
        "a=choice(x, 'y z', 3, true)",
        "b=1,2,3",
        "c=range(1,4)",
        "d=range(0.0,1.0,0.25)",
        "e=range(10,0,-3)",
        "f=shuffle(range(1,4))",
        "g=interval(0,1)",
        "h=int(interval(1,10))",
        "i=tag(log, interval(1e-5, 1e-3))",
        "j=tag(log, int(interval(1, 64)))",
    )
    d = space.distributions
    assert d["a"] == CategoricalDistribution(["x", "y z", 3, True])
    assert d["b"] == CategoricalDistribution([1, 2, 3])
    # range's stop is exclusive, as in Hydra's basic sweeper
    assert d["c"] == IntDistribution(1, 3, step=1)
    assert d["d"] == FloatDistribution(0.0, 0.75, step=0.25)
    assert d["e"] == IntDistribution(1, 10, step=3)
    assert d["f"] == CategoricalDistribution([1, 2, 3])
    assert d["g"] == FloatDistribution(0.0, 1.0)
    assert d["h"] == IntDistribution(1, 10)
    assert d["i"] == FloatDistribution(1e-5, 1e-3, log=True)
    assert d["j"] == IntDistribution(1, 64, log=True)
    assert space.fixed == []


def test_search_space_keeps_fixed_overrides_and_later_wins():
    space = space_of("x=interval(0,1)", "y=choice(1,2)", "+extra=3", "~gone", "x=0.5", "z=7")
    assert set(space.distributions) == {"y"}
    assert space.fixed == ["+extra=3", "~gone", "x=0.5", "z=7"]
    assert ss.parse_search_space(["x=0.5", "x=interval(0,1)"]).distributions == {
        "x": FloatDistribution(0.0, 1.0)
    }


def test_search_space_writes_overrides_hydra_reads_back():
    space = space_of("+extra=choice(a,'b c')", "lst=choice([1,2],[3])", "lr=interval(0,1)", "k=1")
    lines = ss.trial_overrides({"extra": "b c", "lst": "[1,2]", "lr": 1e-05, "z": "it's"}, space)
    assert lines == ["+extra=b\\ c", "lst=[1,2]", "lr=1e-05", "z='it\\'s'", "k=1"]
    parsed = {o.key_or_group: o.value() for o in OverridesParser.create().parse_overrides(lines)}
    assert parsed == {"extra": "b c", "lst": [1, 2], "lr": 1e-05, "z": "it's", "k": 1}
    for text in ("1", "true", "null", "a b", "x=y", "[1]", "${x}"):
        override = OverridesParser.create().parse_override(f"k={ss.format_value(text)}")
        assert override.value() == text


def test_search_space_rejects_bad_ranges_and_grid_of_intervals():
    with pytest.raises(ValueError, match="empty"):
        space_of("x=range(5,1)")
    with pytest.raises(ValueError, match="low <= high"):
        space_of("x=interval(2,1)")
    space = space_of("x=choice(a,b)", "y=range(0,6,2)", "z=range(0.0,1.0,0.5)", "w=interval(0,1)")
    grid = {n: ss.grid_values(n, d) for n, d in space.distributions.items() if n != "w"}
    assert grid == {"x": ["a", "b"], "y": [0, 2, 4], "z": [0.0, 0.5]}
    assert ss.grid_size(grid) == 12
    with pytest.raises(ValueError, match="grid sampler needs discrete"):
        ss.grid_values("w", space.distributions["w"])


# ---------------------------------------------------------------- bookkeeping (units)


def test_slots_count_a_retry_in_its_originals_place_and_skip_surplus():
    trials = [
        frozen(0),
        frozen(1, TrialState.FAIL),  # killed, then retried as 4
        frozen(2, TrialState.PRUNED),
        frozen(3, TrialState.FAIL, **{book.SURPLUS_ATTR: True}),
        frozen(4, TrialState.WAITING, failed_trial=1, retry_history=[1]),
    ]
    assert [t.number for t in book.slot_trials(trials)] == [0, 4, 2]
    assert book.trials_to_ask(trials, 3) == 1  # only the waiting retry
    assert book.trials_to_ask(trials, 5) == 3  # the retry and two fresh trials
    assert book.trials_to_ask(trials, 2) == 1  # the retry keeps slot 1 of 2
    assert book.within_total(trials, 4, 2)
    assert not book.within_total(trials, 2, 2)
    assert book.running_in_total(trials, 3) == []


def test_stale_trials_go_by_heartbeat_and_runs_are_contiguous():
    now = time.time()
    old = frozen(0, TrialState.RUNNING, **{book.HEARTBEAT_ATTR: now - 100})
    fresh = frozen(1, TrialState.RUNNING, **{book.HEARTBEAT_ATTR: now - 1})
    done = frozen(2, TrialState.COMPLETE, **{book.HEARTBEAT_ATTR: now - 100})
    assert book.stale_trials([old, fresh, done], now, grace=10) == [old]
    assert book.contiguous_runs([3, 4, 5, 8, 10, 11]) == [[3, 4, 5], [8], [10, 11]]


def test_outcomes_never_complete_a_nan_and_read_job_returns():
    assert book.objective_outcome(0.5, 1) == book.Outcome(TrialState.COMPLETE, [0.5])
    assert book.objective_outcome((1, 2.5), 2) == book.Outcome(TrialState.COMPLETE, [1.0, 2.5])
    for value, n in [(math.nan, 1), (math.inf, 1), ((1.0, math.nan), 2), (None, 1), ("x", 1)]:
        assert book.objective_outcome(value, n).state == TrialState.FAIL
    assert "not a sequence of 2" in book.objective_outcome((1.0,), 2).reason

    pruned = JobReturn(status=JobStatus.FAILED, _return_value=optuna.TrialPruned("step 2"))
    oom = JobReturn(status=JobStatus.FAILED, _return_value=MemoryError("CUDA out of memory"))
    assert book.job_outcome(pruned, 1).state == TrialState.PRUNED
    assert book.job_outcome(oom, 1) == book.Outcome(
        TrialState.FAIL, reason="MemoryError: CUDA out of memory"
    )
    assert book.job_outcome(JobReturn(status=JobStatus.COMPLETED, _return_value=3), 1).values == [3]


@pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")
def test_each_trial_ends_in_one_log_line_with_the_best_so_far():
    study = optuna.create_study(direction="maximize")
    assert book.ending_line(frozen(0, TrialState.FAIL), study) == (
        "Trial 0 FAIL: unknown; no complete trial yet"
    )
    study.add_trial(
        create_trial(state=TrialState.COMPLETE, value=0.16734, params={}, distributions={})
    )
    pruned = create_trial(
        state=TrialState.PRUNED, intermediate_values={42: -4.5, 84: -4.2}, params={},
        distributions={},
    )  # fmt: skip
    pruned.number = 1
    assert book.ending_line(pruned, study) == (
        "Trial 1 PRUNED at step 84 (value there -4.2); best so far 0.1673 (trial 0)"
    )
    failed = create_trial(
        state=TrialState.FAIL, user_attrs={book.FAIL_REASON: "OutOfMemoryError: CUDA"},
        params={}, distributions={},
    )  # fmt: skip
    failed.number = 2
    assert book.ending_line(failed, study).startswith("Trial 2 FAIL: OutOfMemoryError: CUDA;")
    assert book.ending_line(study.trials[0], study) == (
        "Trial 0 COMPLETE: 0.1673; best so far 0.1673 (trial 0)"
    )


def test_retry_is_queued_once_with_the_same_params():
    study = optuna.create_study()
    study.add_trial(
        create_trial(
            state=TrialState.FAIL,
            params={"x": 1.5},
            distributions={"x": FloatDistribution(-5, 5)},
            user_attrs={book.FAIL_REASON: "stale", "keep": 1},
            system_attrs={book.HEARTBEAT_ATTR: 1.0},
        )
    )
    assert book.enqueue_retry(study, study.trials[0], max_retry=1)
    retry = study.trials[1]
    assert retry.state == TrialState.WAITING and retry.params == {"x": 1.5}
    assert retry.user_attrs == {"keep": 1} and book.HEARTBEAT_ATTR not in retry.system_attrs
    assert optuna.storages.RetryFailedTrialCallback.retried_trial_number(retry) == 0
    assert not book.enqueue_retry(study, retry, max_retry=1)  # the chain used its one retry


def test_a_trial_asked_after_the_last_slot_is_surplus_and_not_run(tmp_path):
    study = optuna.create_study(study_name="toy", storage=journal_storage(tmp_path))
    for x in (1.0, 2.0):
        study.add_trial(create_trial(value=x, params={"x": x}, distributions={"x": TOY_SPACE["x"]}))
    run = rounds.SweepRun(
        sw.StudySweep(sampler=None, pruner=None), study, None, space_of(), 2, persistent=True
    )
    # As if another worker took the last slot between this worker's count and its ask.
    with sweep_job.Heartbeat(study, interval=60) as heartbeat:
        assert run._ask(1, heartbeat) == []
    surplus = load(tmp_path).trials[2]
    assert surplus.state == TrialState.FAIL and surplus.system_attrs[book.SURPLUS_ATTR]
    assert surplus.user_attrs[book.FAIL_REASON].startswith("surplus")
    assert [t.number for t in slots(load(tmp_path))] == [0, 1]
    assert run.failures == []  # not a failure of the objective


def test_trial_job_binds_its_trial_only_while_it_runs(monkeypatch):
    study = optuna.create_study(study_name="bind", storage=optuna.storages.InMemoryStorage())
    study.ask()
    number = study.ask().number
    monkeypatch.setenv(sweep_job.TRIAL_ENV, str(number))

    def task(cfg):
        trial = sw.current_trial()
        trial.report(0.5, step=0)
        return trial.number, trial.study.study_name

    job = sweep_job.TrialJob(task, study._storage, "bind", study.sampler, study.pruner)
    assert sw.current_trial() is None
    assert job(None) == (number, "bind")
    assert sw.current_trial() is None
    assert study.trials[number].intermediate_values == {0: 0.5}


def test_release_memory_collects_and_empties_the_cuda_cache_only_on_a_gpu(monkeypatch):
    calls = []
    monkeypatch.setattr(sweep_job.gc, "collect", lambda: calls.append("collect"))

    def fake_torch(gpu: bool):
        cuda = types.SimpleNamespace(
            is_available=lambda: gpu,
            is_initialized=lambda: gpu,
            empty_cache=lambda: calls.append("empty_cache"),
        )
        return types.SimpleNamespace(cuda=cuda)

    monkeypatch.setitem(sys.modules, "torch", fake_torch(gpu=True))
    sweep_job.release_memory()
    assert calls == ["collect", "empty_cache"]
    calls.clear()
    monkeypatch.setitem(sys.modules, "torch", fake_torch(gpu=False))
    sweep_job.release_memory()
    assert calls == []  # a CPU run skips the full collection (seconds per sweep)
    monkeypatch.delitem(sys.modules, "torch")
    sweep_job.release_memory()
    assert "torch" not in sys.modules  # never imported just to clean up


def test_settings_are_checked(tmp_path):
    assert study_setup.study_directions("maximize") == ["maximize"]
    assert study_setup.study_directions(["minimize", "MAXIMIZE"]) == ["minimize", "maximize"]
    with pytest.raises(study_setup.SweepError):
        study_setup.study_directions("up")
    with pytest.raises(study_setup.SweepError, match="max_failure_rate"):
        sw.StudySweep(sampler=None, pruner=None, max_failure_rate=1.5)
    storage = study_setup.open_storage(f"journal://{tmp_path}/new/dir/study.log")
    assert isinstance(storage, JournalStorage) and (tmp_path / "new" / "dir").is_dir()


@pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")
@pytest.mark.parametrize("sampler", SAMPLERS)
@pytest.mark.parametrize("pruner", ["none", "median"])
def test_sampler_and_pruner_configs_compose_and_instantiate(sampler, pruner):
    overrides = [f"hydra/sweeper/sampler={sampler}", f"hydra/sweeper/pruner={pruner}"]
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(TOY_CONF), version_base="1.3"):
        cfg = compose("config", overrides=overrides, return_hydra_config=True)
    GlobalHydra.instance().clear()
    conf = cfg.hydra.sweeper
    assert conf._target_.endswith("FinqaOptunaSweeper") and conf.sampler.seed == 0
    if sampler == "cmaes":
        pytest.importorskip("cmaes")
    space = ss.parse_search_space(["x=choice(1,2)", "y=range(0,3)"])
    built, n_trials = study_setup.build_sampler(conf.sampler, space, 20)
    assert isinstance(built, optuna.samplers.BaseSampler)
    assert n_trials == (6 if sampler == "grid" else 20)
    assert isinstance(instantiate(conf.pruner), optuna.pruners.BasePruner)


# ---------------------------------------------------------------- the toy app's sweeps


def test_sweep_runs_trials_in_numbered_folders_and_writes_results(tmp_path):
    sweep(tmp_path, "hydra.sweeper.n_trials=4")
    study = load(tmp_path)
    assert states(study) == ["COMPLETE"] * 4
    for trial in study.trials:
        folder = tmp_path / "sweep" / str(trial.number)
        record = json.loads((folder / "trial.json").read_text())
        assert record["number"] == trial.number  # current_trial() is the job's own trial
        assert {k: record[k] for k in ("x", "y", "kind")} == trial.params
        assert sorted(trial.intermediate_values) == [0, 1, 2]
        assert trial.user_attrs["job_pid"] == record["pid"]
    best = min(study.trials, key=lambda t: t.value)
    written = results(tmp_path)
    workers = written.pop("workers")
    assert written == {
        "name": "optuna",
        "study_name": "toy",
        "best_params": best.params,
        "best_value": best.value,
    }
    # The basic launcher runs one job at a time, in the sweep's own process.
    assert (workers["schedule"], workers["slots"], workers["jobs"]) == ("async", 1, 4)
    assert 0 <= workers["idle_share"] < 1 and workers["busy_s"] <= workers["wall_s"]
    assert (tmp_path / "sweep" / "multirun.yaml").exists()


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_every_sampler_runs_a_few_trials(tmp_path, sampler):
    if sampler == "cmaes":
        pytest.importorskip("cmaes")
    space = ["x=choice(-1,2)", "y=range(-1,1)"] if sampler == "grid" else []
    proc = sweep(tmp_path, f"hydra/sweeper/sampler={sampler}", "hydra.sweeper.n_trials=3", *space)
    assert states(load(tmp_path)) == ["COMPLETE"] * 3
    assert f"sampler {SAMPLER_CLASSES[sampler]}," in proc.stdout


@pytest.mark.parametrize("pruner", list(PRUNER_CLASSES))
def test_every_pruner_runs_a_few_trials(tmp_path, pruner):
    proc = sweep(tmp_path, f"hydra/sweeper/pruner={pruner}", "hydra.sweeper.n_trials=3")
    assert set(states(load(tmp_path))) <= {"COMPLETE", "PRUNED"}
    assert len(load(tmp_path).trials) == 3
    assert f"pruner {PRUNER_CLASSES[pruner]}" in proc.stdout


def test_grid_sampler_caps_the_total_at_the_grid(tmp_path):
    grid = ["hydra/sweeper/sampler=grid", "x=choice(0,2)", "y=range(-1,1)", "kind=a"]
    sweep(tmp_path, *grid, "hydra.sweeper.n_trials=10")
    sweep(tmp_path, *grid, "hydra.sweeper.n_trials=10")  # the grid is done: nothing to re-run
    study = load(tmp_path)
    assert states(study) == ["COMPLETE"] * 4
    points = sorted((t.params["x"], t.params["y"]) for t in study.trials)
    assert points == [(0, -1), (0, 0), (2, -1), (2, 0)]


def test_params_from_the_command_line_override_the_config(tmp_path):
    sweep(tmp_path, "x=interval(0,1)", "kind=b", "hydra.sweeper.n_trials=3")
    study = load(tmp_path)
    assert all(0 <= t.params["x"] <= 1 and "kind" not in t.params for t in study.trials)
    kinds = {json.loads(p.read_text())["kind"] for p in (tmp_path / "sweep").glob("*/trial.json")}
    assert kinds == {"b"}


def test_multi_objective_writes_the_pareto_front(tmp_path):
    sweep(
        tmp_path,
        "objectives=2",
        "hydra.sweeper.direction=[minimize,minimize]",
        "hydra/sweeper/sampler=nsgaii",
        "hydra.sweeper.n_trials=6",
    )
    study = load(tmp_path)
    assert states(study) == ["COMPLETE"] * 6
    front = {t.number: t for t in study.best_trials}
    solutions = results(tmp_path)["solutions"]
    assert len(solutions) == len(front) >= 1
    by_values = {tuple(t.values): t.params for t in front.values()}
    assert {tuple(s["values"]): s["params"] for s in solutions} == by_values


def test_a_multi_objective_study_is_confirmed_on_its_first_objective(tmp_path):
    from finqa_exp.sweep.confirm import confirmed, top_trials

    two = ["objectives=2", "hydra.sweeper.direction=[minimize,minimize]"]
    sweep(tmp_path, *two, "hydra.sweeper.n_trials=4", *CONFIRM)
    study = load(tmp_path)
    top = top_trials(study, 2)
    assert [t.values[0] for t in top] == sorted(t.values[0] for t in study.trials)[:2]
    runs = confirmations(tmp_path)
    assert len(runs) == 4 and all(len(t.values) == 2 for t in runs)
    ranked = confirmed(study)
    assert {c.trial.number for c in ranked} == {t.number for t in top}
    for c in ranked:  # each run's first objective
        assert list(c.values) == [c.trial.values[0], *(t.values[0] for t in c.confirmations)]


def test_confirm_only_confirms_an_existing_study_with_no_new_trial(tmp_path):
    sweep(tmp_path, "hydra.sweeper.n_trials=3")
    assert len(load(tmp_path).trials) == 3
    # Even with a larger n_trials, confirm.only asks for no trial.
    sweep(tmp_path, "hydra.sweeper.n_trials=5", *CONFIRM, "hydra.sweeper.confirm.only=true")
    assert len(load(tmp_path).trials) == 3
    assert len(confirmations(tmp_path)) == 4


def test_failed_confirmations_count_against_the_failure_rate(tmp_path):
    rate = "hydra.sweeper.max_failure_rate=0.25"
    proc = sweep(tmp_path, "hydra.sweeper.n_trials=2", *CONFIRM, "fail_seed=2", rate, ok=False)
    assert proc.returncode != 0
    # 4 pairs queued, 0.25 x 4 = 1 failure allowed: the second failure stops the pass.
    message = (
        "2 confirmations failed in this sweep, more than max_failure_rate 0.25 x pairs queued 4"
    )
    assert message in proc.stderr
    runs = confirmations(tmp_path)
    failed = [t for t in runs if t.state == TrialState.FAIL]
    assert len(failed) == 2 and all(t.user_attrs["seed"] == 2 for t in failed)
    assert failed[0].user_attrs["fail_reason"] == "RuntimeError: planned failure of seed 2"


def test_failed_trials_are_recorded_and_the_sweep_goes_on_within_the_rate(tmp_path):
    sweep(
        tmp_path, "fail_on=[1,3]", "hydra.sweeper.max_failure_rate=0.34", "hydra.sweeper.n_trials=6"
    )
    study = load(tmp_path)
    assert states(study) == ["COMPLETE", "FAIL", "COMPLETE", "FAIL", "COMPLETE", "COMPLETE"]
    assert (
        study.trials[1].user_attrs[book.FAIL_REASON] == "RuntimeError: planned failure of trial 1"
    )


def test_too_many_failures_stop_the_sweep_with_a_clear_error(tmp_path):
    proc = sweep(
        tmp_path,
        "fail_on=[1,3,4]",
        "hydra.sweeper.max_failure_rate=0.25",
        "hydra.sweeper.n_trials=8",
        ok=False,
    )
    assert proc.returncode != 0
    assert "3 trials failed in this sweep, more than max_failure_rate 0.25" in proc.stderr
    study = load(tmp_path)
    assert states(study) == ["COMPLETE", "FAIL", "COMPLETE", "FAIL", "FAIL"]  # stopped at 4
    done = [t.value for t in study.trials if t.state == TrialState.COMPLETE]
    assert results(tmp_path)["best_value"] == min(done)


def test_a_nan_objective_is_a_failed_trial(tmp_path):
    sweep(tmp_path, "nan_on=[1]", "hydra.sweeper.max_failure_rate=0.5", "hydra.sweeper.n_trials=3")
    study = load(tmp_path)
    assert states(study) == ["COMPLETE", "FAIL", "COMPLETE"]
    assert "not finite" in study.trials[1].user_attrs[book.FAIL_REASON]


def test_a_bad_sampled_value_fails_its_trial_only(tmp_path):
    # kind=d is sampled but the toy objective has no offset for it: a KeyError in the job.
    sweep(
        tmp_path,
        "kind=choice(a,d)",
        "hydra.sweeper.max_failure_rate=0.5",
        "hydra.sweeper.enqueue_trials=[{kind: d}, {kind: a}]",
        "hydra.sweeper.n_trials=2",
    )
    study = load(tmp_path)
    assert states(study) == ["FAIL", "COMPLETE"]
    assert study.trials[0].user_attrs[book.FAIL_REASON] == "KeyError: 'd'"


def test_a_value_that_does_not_compose_fails_before_launch(tmp_path):
    # nokey is not in the toy config: the job cannot even be composed.
    sweep(
        tmp_path,
        "nokey=choice(1,2)",
        "hydra.sweeper.max_failure_rate=1.0",
        "hydra.sweeper.n_trials=2",
    )
    study = load(tmp_path)
    assert states(study) == ["FAIL", "FAIL"]
    assert "Could not override 'nokey'" in study.trials[0].user_attrs[book.FAIL_REASON]
    assert not list((tmp_path / "sweep").glob("[0-9]*"))  # no job ran
    assert results(tmp_path)["best_value"] is None


def test_rerun_resumes_to_the_total_and_keeps_job_folders(tmp_path):
    sqlite = f"hydra.sweeper.storage=sqlite:///{tmp_path / 'studies' / 'toy.db'}"
    sweep(tmp_path, sqlite, "hydra.sweeper.n_trials=4", journal=False)
    first = {p.parent.name: p.read_text() for p in (tmp_path / "sweep").glob("*/trial.json")}
    assert sorted(first) == ["0", "1", "2", "3"]

    sweep(tmp_path, sqlite, "hydra.sweeper.n_trials=6", journal=False)
    sweep(tmp_path, sqlite, "hydra.sweeper.n_trials=6", journal=False)  # nothing left to do
    storage = f"sqlite:///{tmp_path / 'studies' / 'toy.db'}"
    study = optuna.load_study(study_name="toy", storage=storage)
    assert [t.number for t in study.trials] == [0, 1, 2, 3, 4, 5]
    assert states(study) == ["COMPLETE"] * 6
    after = {p.parent.name: p.read_text() for p in (tmp_path / "sweep").glob("*/trial.json")}
    assert sorted(after) == ["0", "1", "2", "3", "4", "5"]
    assert {k: after[k] for k in first} == first  # the first run's folders are untouched
    assert json.loads(after["5"])["number"] == 5
    # The same seeded command goes on where it stopped instead of proposing trial 0's params.
    params = [t.params for t in study.trials]
    assert params[4] not in params[:4] and params[5] not in params[:4]


def test_enqueued_trial_runs_first_and_only_once(tmp_path):
    seed = "hydra.sweeper.enqueue_trials=[{x: 2.0, y: -1.0, kind: a}]"
    sweep(tmp_path, seed, "hydra.sweeper.n_trials=2")
    sweep(tmp_path, seed, "hydra.sweeper.n_trials=3")
    study = load(tmp_path)
    assert study.trials[0].params == {"x": 2.0, "y": -1.0, "kind": "a"}
    assert study.trials[0].value == 0.0
    assert [t.params for t in study.trials].count(study.trials[0].params) == 1
    assert states(study) == ["COMPLETE"] * 3


def test_a_trial_the_pruner_stops_is_recorded_pruned(tmp_path):
    good_then_bad = (
        "hydra.sweeper.enqueue_trials=[{x: 2.0, y: -1.0, kind: a}, {x: -5.0, y: 5.0, kind: c}]"
    )
    sweep(
        tmp_path,
        "hydra/sweeper/pruner=median",
        "hydra.sweeper.pruner.n_startup_trials=1",
        good_then_bad,
        "hydra.sweeper.n_trials=2",
    )
    study = load(tmp_path)
    assert states(study) == ["COMPLETE", "PRUNED"]
    assert list(study.trials[1].intermediate_values) == [0]  # stopped after its first report
    # Its intermediate value is the pruner's signal, not the objective: no value is stored
    # (Optuna's tell would store 11.0 here), so Optuna's tools show none.
    assert study.trials[1].value is None and study.trials[1].values is None
    frame = study.trials_dataframe()
    assert math.isnan(frame["value"][1]) and frame["value"][0] == study.trials[0].value


@pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")
def test_a_pruned_trial_has_no_value_and_the_sampler_still_hears_of_it():
    told: list[tuple[int, str, Any]] = []

    class Recording(optuna.samplers.RandomSampler):
        def after_trial(self, study, trial, state, values):
            told.append((trial.number, state.name, values))

    study = optuna.create_study(sampler=Recording(seed=0))
    trial = study.ask()
    trial.report(0.5, step=3)
    frozen = book.tell(study, trial.number, book.Outcome(TrialState.PRUNED))
    assert frozen.state == TrialState.PRUNED and frozen.value is None
    assert frozen.intermediate_values == {3: 0.5}
    assert told == [(0, "PRUNED", None)]
    with pytest.raises(ValueError, match="Cannot tell a PRUNED trial"):
        book.tell_pruned(study, trial.number)
    # TPE models a study of pruned trials (by their intermediate values) as it would with
    # Optuna's own tell.
    tpe = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=0, n_startup_trials=2))
    for i in range(4):
        t = tpe.ask({"x": FloatDistribution(0, 1)})
        t.report(float(i), step=1)
        book.tell(tpe, t.number, book.Outcome(TrialState.PRUNED))
    assert 0 <= tpe.ask({"x": FloatDistribution(0, 1)}).params["x"] <= 1


def test_the_study_names_its_values(tmp_path):
    sweep(tmp_path, "hydra.sweeper.n_trials=1", "hydra.sweeper.metric_names=loss")
    assert load(tmp_path).metric_names == ["loss"]
    proc = sweep(tmp_path, "hydra.sweeper.n_trials=1", "hydra.sweeper.metric_names=cost", ok=False)
    assert proc.returncode != 0
    assert "study toy has the values ['loss'], but hydra.sweeper.metric_names says ['cost']" in (
        proc.stderr
    )


@pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")
def test_workers_opening_one_study_at_once_agree_on_its_value_names(tmp_path, monkeypatch):
    # Another worker names the values just after this one read them (CI caught the race
    # with 4 workers on PostgreSQL): the names match, so the study opens.
    real = optuna.Study.metric_names
    reads = []

    def racing(study: optuna.Study) -> list[str] | None:
        if not reads:
            study._storage.set_study_system_attr(study._study_id, "study:metric_names", ["loss"])
            reads.append(None)
            return None
        return real.fget(study)

    monkeypatch.setattr(optuna.Study, "metric_names", property(racing))
    sweeper = sw.StudySweep(sampler=None, pruner=None, metric_names="loss")
    sweeper.study_name = "toy"
    study = sweeper._open_study(journal_storage(tmp_path), optuna.samplers.RandomSampler(), None)
    assert real.fget(study) == ["loss"]


def test_stale_running_trial_is_failed_and_retried_with_the_same_params(tmp_path):
    study = optuna.create_study(study_name="toy", storage=journal_storage(tmp_path))
    params = {"x": 1.0, "y": 0.0, "kind": "b"}
    study.add_trial(
        create_trial(
            state=TrialState.RUNNING,
            params=params,
            distributions=TOY_SPACE,
            system_attrs={book.HEARTBEAT_ATTR: time.time() - 3600},  # its sweep died an hour ago
        )
    )
    sweep(tmp_path, "hydra.sweeper.n_trials=3")
    study = load(tmp_path)
    assert states(study) == ["FAIL", "COMPLETE", "COMPLETE", "COMPLETE"]
    assert study.trials[0].user_attrs[book.FAIL_REASON].startswith("stale: no heartbeat")
    retry = study.trials[1]
    assert retry.params == params and retry.system_attrs["failed_trial"] == 0
    assert [t.number for t in slots(study)] == [1, 2, 3]  # exactly n_trials counted


def test_a_killed_sweep_is_resumed_and_its_trial_retried(tmp_path):
    live = ["hang_on=[1]", "hydra.sweeper.heartbeat_interval=1", "hydra.sweeper.grace_period=2"]
    proc = start_sweep(tmp_path, *live, "hydra.sweeper.n_trials=3")
    wait_until(lambda: running(tmp_path, 1))
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    killed = load(tmp_path).trials[1]
    assert killed.state == TrialState.RUNNING  # what kill -9 leaves behind

    sweep(tmp_path, *live[1:], "hydra.sweeper.n_trials=3")
    study = load(tmp_path)
    assert study.trials[1].state == TrialState.FAIL
    assert study.trials[1].user_attrs[book.FAIL_REASON].startswith("stale")
    retries = [t for t in study.trials if t.system_attrs.get("failed_trial") == 1]
    assert len(retries) == 1 and retries[0].params == killed.params
    assert [t.state.name for t in slots(study)] == ["COMPLETE"] * 3
    assert len(study.trials) == 4
    for trial in (killed, retries[0]):  # the retry ran in a folder of its own
        record = json.loads((tmp_path / "sweep" / str(trial.number) / "trial.json").read_text())
        assert record["number"] == trial.number


def test_a_live_workers_trial_is_not_failed(tmp_path):
    live = ["hydra.sweeper.heartbeat_interval=1", "hydra.sweeper.grace_period=2"]
    first = start_sweep(tmp_path, *live, "hang_on=[0]", "hang_s=5", "hydra.sweeper.n_trials=2")
    wait_until(lambda: running(tmp_path, 0))
    second = sweep(tmp_path, *live, "hydra.sweeper.n_trials=2")
    code, out = finish(first)
    assert code == 0, out[-4000:]
    study = load(tmp_path)
    assert states(study) == ["COMPLETE", "COMPLETE"]  # trial 0 outlived the grace period
    assert "Waiting for trials [0] of other workers" in second.stdout + second.stderr


def test_interrupted_sweep_fails_and_requeues_its_trial(tmp_path):
    proc = start_sweep(tmp_path, "hang_on=[1]", "hydra.sweeper.n_trials=3")
    wait_until(lambda: running(tmp_path, 1))
    proc.send_signal(signal.SIGINT)
    assert finish(proc)[0] != 0
    study = load(tmp_path)
    assert study.trials[1].state == TrialState.FAIL
    assert study.trials[1].user_attrs[book.FAIL_REASON].startswith("sweep interrupted")
    assert study.trials[2].state == TrialState.WAITING
    sweep(tmp_path, "hydra.sweeper.n_trials=3")
    study = load(tmp_path)
    assert study.trials[2].params == study.trials[1].params
    assert [t.number for t in slots(study)] == [0, 2, 3]


@pytest.mark.parametrize(
    ("sig", "reason"),
    # Under SIGTERM a job stops itself ("preempted"), or loky, seeing an idle worker
    # die of it, gives up on the jobs of the others ("job lost"): retried either way.
    [(signal.SIGINT, ("sweep interrupted",)), (signal.SIGTERM, ("preempted: ", "job lost: "))],
)
def test_an_interrupted_joblib_sweep_stops_its_workers_and_requeues_their_trials(
    tmp_path, sig, reason
):
    # Ctrl-C kills the workers at once; SIGTERM (preemption) is passed on to them first,
    # and each job stops by itself (a trainer would save a checkpoint first).
    proc = start_sweep(
        tmp_path,
        "hydra/launcher=joblib",
        "hydra.launcher.n_jobs=2",
        "hydra.sweeper.n_jobs=2",
        "hang_on=[0,1]",
        "hydra.sweeper.n_trials=3",
    )
    wait_until(lambda: running(tmp_path, 0) and running(tmp_path, 1))
    pids = [
        json.loads((tmp_path / "sweep" / str(n) / "trial.json").read_text())["pid"] for n in (0, 1)
    ]
    proc.send_signal(sig)
    code, _ = finish(proc, timeout=30)  # in seconds, not after the jobs' 60 s hang
    assert code == 128 + signal.SIGTERM if sig == signal.SIGTERM else code != 0
    study = load(tmp_path)
    for trial in study.trials[:2]:
        assert trial.state == TrialState.FAIL
        assert trial.user_attrs[book.FAIL_REASON].startswith(reason)
    assert [t.state for t in study.trials[2:]] == [TrialState.WAITING] * 2  # their retries
    wait_until(lambda: not any(alive(pid) for pid in pids), timeout=30)  # workers killed


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


# A PostgreSQL server to test against, e.g. postgresql://user:pw@127.0.0.1/optuna; each run
# uses its own study name, so the database may be shared.
POSTGRES_URL = os.environ.get("FINQA_TEST_POSTGRES_URL")


@pytest.mark.parametrize(
    "backend",
    [
        "journal",
        "sqlite",
        pytest.param(
            "postgresql",
            marks=pytest.mark.skipif(not POSTGRES_URL, reason="FINQA_TEST_POSTGRES_URL not set"),
        ),
    ],
)
def test_two_workers_share_one_study_with_the_exact_total(tmp_path, backend):
    url = f"sqlite:///{tmp_path / 'toy.db'}" if backend == "sqlite" else POSTGRES_URL
    study_name = "toy" if backend != "postgresql" else f"toy_{tmp_path.name}_{os.getpid()}"
    args = ["sleep_s=0.3", "hydra.sweeper.n_trials=8", f"hydra.sweeper.study_name={study_name}"]
    if backend != "journal":
        args.append(f"hydra.sweeper.storage={url}")  # after the journal default: it wins
    workers = [start_sweep(tmp_path, *args, f"hydra.sweeper.sampler.seed={i}") for i in (1, 2)]
    for code, out in [finish(worker) for worker in workers]:
        assert code == 0, out[-4000:]
    study = (
        load(tmp_path)
        if backend == "journal"
        else optuna.load_study(study_name=study_name, storage=url)
    )
    counted = slots(study)
    assert len(counted) == 8 and all(t.state == TrialState.COMPLETE for t in counted)
    extra = [t for t in study.trials if t not in counted]
    assert all(t.system_attrs.get(book.SURPLUS_ATTR) for t in extra)
    assert len({t.user_attrs["job_pid"] for t in counted}) == 2  # both workers ran trials
    for trial in counted:
        record = json.loads((tmp_path / "sweep" / str(trial.number) / "trial.json").read_text())
        assert record["number"] == trial.number


def test_joblib_launcher_runs_jobs_in_other_processes(tmp_path):
    events = tmp_path / "events.jsonl"
    callback = f"hydra.sweeper.callbacks=[{{_target_: hooks.EventLog, path: '{events}'}}]"
    sweep(
        tmp_path,
        "hydra/launcher=joblib",
        "hydra.launcher.n_jobs=2",
        "hydra.sweeper.n_jobs=2",
        "hydra.sweeper.n_trials=4",
        callback,
    )
    study = load(tmp_path)
    assert states(study) == ["COMPLETE"] * 4
    sweeper_pid = json.loads(events.read_text().splitlines()[0])["pid"]
    assert all(t.user_attrs["job_pid"] != sweeper_pid for t in study.trials)
    assert all(sorted(t.intermediate_values) == [0, 1, 2] for t in study.trials)
    assert sorted(p.name for p in (tmp_path / "sweep").glob("[0-9]*")) == ["0", "1", "2", "3"]


@pytest.mark.parametrize("schedule", ["async", "batch"])
def test_a_long_trial_holds_up_the_others_only_in_batches(tmp_path, schedule):
    # Trial 0 runs 5 s; the others are quick. Async: the other worker runs trials 1-3
    # meanwhile. Batch: trial 2 waits for the round of trials 0 and 1 to end.
    sweep(
        tmp_path,
        "hydra/launcher=joblib",
        "hydra.launcher.n_jobs=2",
        "hydra.sweeper.n_jobs=2",
        "hydra.sweeper.n_trials=4",
        f"hydra.sweeper.schedule={schedule}",
        "hang_on=[0]",
        "hang_s=5",
    )
    study = load(tmp_path)
    assert states(study) == ["COMPLETE"] * 4
    first, *others = study.trials
    if schedule == "async":
        assert others[1].datetime_start < first.datetime_complete  # trial 1's worker went on
    else:
        assert others[1].datetime_start >= first.datetime_complete
    workers = results(tmp_path)["workers"]
    assert workers["schedule"] == schedule and workers["slots"] == 2 and workers["jobs"] == 4
    assert 5 <= workers["busy_s"] <= 2 * workers["wall_s"]
    assert workers["idle_share"] == pytest.approx(
        1 - workers["busy_s"] / (2 * workers["wall_s"]), abs=1e-3
    )


@pytest.mark.parametrize(
    ("fault", "reason"), [("die_on", "job lost: "), ("term_on", "preempted: SIGTERM")]
)
def test_a_job_lost_with_its_worker_is_retried_not_counted_as_a_failure(tmp_path, fault, reason):
    # Trial 1's joblib worker dies (os._exit: the launcher raises instead of returning),
    # or is told to stop (SIGTERM: its job raises TrialPreempted).
    proc = sweep(
        tmp_path,
        "hydra/launcher=joblib",
        "hydra.launcher.n_jobs=2",
        "hydra.sweeper.n_jobs=1",
        "hydra.sweeper.n_trials=3",
        f"{fault}=[1]",
    )  # max_failure_rate is 0: a counted failure would stop the sweep
    study = load(tmp_path)
    assert states(study) == ["COMPLETE", "FAIL", "COMPLETE", "COMPLETE"]
    lost, retry = study.trials[1], study.trials[2]  # the retry runs next
    assert lost.user_attrs[book.FAIL_REASON].startswith(reason)
    assert retry.params == lost.params and retry.system_attrs["failed_trial"] == 1
    assert f"Trial 1: {reason}" in proc.stdout and "retrying it" in proc.stdout


def test_in_memory_storage_with_a_process_launcher_is_refused(tmp_path):
    proc = sweep(tmp_path, "hydra/launcher=joblib", "hydra.sweeper.storage=null", ok=False)
    assert proc.returncode != 0
    assert "is null (in memory), but JoblibLauncher runs jobs in other processes" in proc.stderr


def test_custom_search_space_and_callbacks(tmp_path):
    events = tmp_path / "events.jsonl"
    sweep(
        tmp_path,
        "hydra.sweeper.custom_search_space=hooks.conditional_y",
        "~hydra.sweeper.params.y",
        "fail_on=[2]",
        "hydra.sweeper.max_failure_rate=0.5",
        "hydra.sweeper.n_trials=4",
        f"hydra.sweeper.callbacks=[{{_target_: hooks.EventLog, path: '{events}'}}]",
    )
    study = load(tmp_path)
    for trial in study.trials:
        limit = 1.0 if trial.params["kind"] == "a" else 5.0
        assert abs(trial.params["y"]) <= limit
        assert trial.distributions["y"] == FloatDistribution(-limit, limit)
    log = [json.loads(line) for line in events.read_text().splitlines()]
    assert [e["event"] for e in log] == ["on_sweep_start"] + ["on_trial_end"] * 4 + ["on_sweep_end"]
    assert [(e["number"], e["state"]) for e in log[1:5]] == [
        (0, "COMPLETE"),
        (1, "COMPLETE"),
        (2, "FAIL"),
        (3, "COMPLETE"),
    ]


def test_drop_frames_clears_every_chained_traceback():
    """A failed job's exception chain (``raise ... from`` inside an ``except``) keeps the
    frames of both errors alive; drop_frames clears them all."""
    import gc
    import weakref

    class Held:
        pass

    refs = []

    def inner():
        held = Held()
        refs.append(weakref.ref(held))
        raise KeyError("inner")

    def outer():
        try:
            inner()
        except KeyError:
            held = Held()
            refs.append(weakref.ref(held))
            raise RuntimeError("outer") from ValueError("cause")

    try:
        outer()
    except RuntimeError as err:
        kept = err  # as Hydra's JobReturn keeps it
    sweep_job.drop_frames(kept)
    gc.collect()
    assert len(refs) == 2 and [r() for r in refs] == [None, None]
    assert isinstance(kept.__context__, KeyError)  # the chain itself is kept


# ---------------------------------------------------------------- confirmation

CONFIRM = [
    "hydra.sweeper.confirm.top_k=2",
    "hydra.sweeper.confirm.seeds=[1,2]",
    "hydra.sweeper.confirm.seed_key=seed",
    "seed_noise=0.5",
]


def confirmations(tmp_path: Path) -> list[optuna.trial.FrozenTrial]:
    return load(tmp_path, "toy.confirm").trials


def test_the_top_trials_are_confirmed_with_more_seeds_outside_n_trials(tmp_path):
    from finqa_exp.sweep.confirm import confirmed, top_trials

    sweep(tmp_path, "hydra.sweeper.n_trials=4", *CONFIRM)
    study = load(tmp_path)
    assert len(study.trials) == 4  # confirmations do not count toward n_trials
    top = top_trials(study, 2)
    runs = confirmations(tmp_path)
    assert sorted((t.user_attrs["confirms"], t.user_attrs["seed"]) for t in runs) == sorted(
        (t.number, s) for t in top for s in (1, 2)
    )
    assert all(t.state == TrialState.COMPLETE for t in runs)
    for run in runs:  # the confirmed trial's params, with its seed, in a folder of its own
        original = study.trials[run.user_attrs["confirms"]]
        assert run.params == {**original.params, "seed": run.user_attrs["seed"]}
        record = json.loads(
            (tmp_path / "sweep" / f"confirm-{run.number}" / "trial.json").read_text()
        )
        assert record["seed"] == run.user_attrs["seed"] and record["x"] == original.params["x"]
        assert record["number"] == run.number
    assert load(tmp_path, "toy.confirm").user_attrs["confirms_study"] == "toy"
    ranked = confirmed(study)
    assert [len(c.values) for c in ranked] == [3, 3]
    means = [c.mean for c in ranked]
    assert means == sorted(means)  # minimize: best mean first
    first = ranked[0]
    assert first.values[0] == first.trial.value  # the trial's own run, then seeds 1 and 2
    assert list(first.values[1:]) == [t.value for t in first.confirmations]

    sweep(tmp_path, "hydra.sweeper.n_trials=4", *CONFIRM)  # nothing missing: nothing runs
    assert len(confirmations(tmp_path)) == 4
    sweep(
        tmp_path,
        "hydra.sweeper.n_trials=4",
        *CONFIRM[:1],
        "hydra.sweeper.confirm.seeds=[1,2,3]",
        *CONFIRM[2:],
    )
    assert len(confirmations(tmp_path)) == 6  # only seed 3 of the top 2 was missing


def test_a_killed_confirmation_is_run_again_and_nothing_else(tmp_path):
    live = ["hydra.sweeper.heartbeat_interval=1", "hydra.sweeper.grace_period=2", "hang_s=60"]
    proc = start_sweep(tmp_path, "hydra.sweeper.n_trials=3", *CONFIRM, *live, "hang_seed=2")
    wait_until(lambda: (tmp_path / "sweep" / "hung-seed-2").exists(), timeout=120)
    wait_until(
        lambda: any(
            t.state == TrialState.RUNNING and t.user_attrs.get("seed") == 2
            for t in confirmations(tmp_path)
        )
    )
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    before = confirmations(tmp_path)
    done = {t.number for t in before if t.state == TrialState.COMPLETE}
    killed = [t for t in before if t.state == TrialState.RUNNING]
    assert len(killed) == 1 and done  # seed 1 of the best trial finished before the kill

    wait_until(lambda: time.time() - book.last_beat(killed[0]) > 2.5)  # stale by then
    sweep(tmp_path, "hydra.sweeper.n_trials=3", *CONFIRM, *live, "hang_seed=2")
    after = confirmations(tmp_path)
    assert after[killed[0].number].state == TrialState.FAIL
    assert after[killed[0].number].user_attrs["fail_reason"].startswith("stale")
    complete = [t for t in after if t.state == TrialState.COMPLETE]
    pairs = sorted((t.user_attrs["confirms"], t.user_attrs["seed"]) for t in complete)
    assert len(pairs) == len(set(pairs)) == 4  # every pair once: none ran twice
    assert done <= {t.number for t in complete}  # the finished ones were kept, not re-run
    assert len(load(tmp_path).trials) == 3


def test_confirmation_settings_are_checked(tmp_path):
    proc = sweep(tmp_path, "hydra.sweeper.confirm.top_k=2", ok=False)
    assert proc.returncode != 0
    assert (
        "hydra.sweeper.confirm: confirm.top_k > 0 needs confirm.seeds and confirm.seed_key"
        in proc.stderr
    )
    proc = sweep(tmp_path, "hydra.sweeper.confirm.only=true", ok=False)
    assert proc.returncode != 0
    assert "hydra.sweeper.confirm.only=true needs confirm.top_k > 0" in proc.stderr


def test_sigterm_stops_an_in_process_sweep_and_the_next_run_retries_its_trial(tmp_path):
    # The basic launcher runs the job in the sweep's own process: SIGTERM stops the sweep.
    proc = sweep(tmp_path, "hydra.sweeper.n_trials=3", "term_on=[1]", ok=False)
    assert proc.returncode == 128 + 15, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1].startswith("stopped: SIGTERM")
    study = load(tmp_path)
    assert states(study) == ["COMPLETE", "FAIL", "WAITING"]
    assert "TrialPreempted: SIGTERM" in study.trials[1].user_attrs[book.FAIL_REASON]
    sweep(tmp_path, "hydra.sweeper.n_trials=3", "term_on=[1]")  # its marker: SIGTERM once
    study = load(tmp_path)
    assert states(study) == ["COMPLETE", "FAIL", "COMPLETE", "COMPLETE"]
    assert study.trials[2].system_attrs["failed_trial"] == 1


def test_the_checkpoints_of_a_trial_that_fails_for_good_are_removed(tmp_path):
    # Trial 1's worker dies with its checkpoint folder recorded, and max_retry=0: nothing
    # will resume it, so the sweeper removes the folder its job could not.
    sweep(
        tmp_path,
        "hydra/launcher=joblib",
        "hydra.launcher.n_jobs=2",
        "hydra.sweeper.n_jobs=1",
        "hydra.sweeper.n_trials=3",
        "hydra.sweeper.max_retry=0",
        "hydra.sweeper.max_failure_rate=0.5",
        "die_on=[1]",
        "checkpoint=true",
    )
    study = load(tmp_path)
    assert states(study) == ["COMPLETE", "FAIL", "COMPLETE"]
    assert study.trials[1].system_attrs["finqa_optuna:checkpoint"].endswith("ckpt-1")
    assert list(tmp_path.rglob("ckpt-*")) == []
