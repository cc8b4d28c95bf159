"""Reports: ``python -m finqa_exp.report`` against stores with known numbers.

The stores are written in-process (an Optuna study in SQLite, MLflow runs through
finqa_exp.tracking) with numbers chosen by hand, so every figure in the report can be
checked against them; one slow test runs a real sweep, its report and ``ask``.
"""

from __future__ import annotations

import datetime as dt
import math
import os
import re
import statistics
import subprocess
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import optuna
import pytest
from omegaconf import OmegaConf
from optuna.distributions import CategoricalDistribution, FloatDistribution
from optuna.trial import FrozenTrial, TrialState

from finqa_exp import stats, tracking
from finqa_exp.config import PathsConfig, TrackingConfig, flatten
from finqa_exp.report import build as report
from finqa_exp.report.data import LABELS, STATES, TrialRow
from finqa_exp.report.numbers import (
    busy_seconds,
    examples_reported,
    planned_examples,
    steps_per_epoch,
)
from finqa_exp.sweep.confirm import confirmed
from tests.conftest import compose_cfg

REPO = Path(__file__).resolve().parents[2]
DISTS = {
    "lora.r": CategoricalDistribution([4, 8, 16, 32]),
    "train.batch_size": CategoricalDistribution([2, 4, 8, 16]),
    "train.learning_rate": FloatDistribution(1e-5, 1e-3, log=True),
}
T0 = dt.datetime(2026, 1, 1, 12, 0, 0)


@dataclass
class FakeTrial:
    """One trial as the sweep would leave it: Optuna record plus MLflow run."""

    state: TrialState
    params: dict
    value: float | None = None
    start_s: float = 0.0  # seconds after T0
    wall_s: float | None = None  # Optuna start -> end
    evals: dict[int, float] = field(default_factory=dict)  # step -> eval loss
    metrics: dict[str, float] = field(default_factory=dict)
    fail_reason: str | None = None
    epochs: int = 3
    train_examples: int = 168

    def steps_per_epoch(self) -> int:
        return math.ceil(self.train_examples / self.params["train.batch_size"])

    def intermediate(self) -> dict[int, float]:
        """Eval losses as the sweep reports them to Optuna: at training examples seen (each
        eval here ends an epoch), negated (the study maximizes)."""
        per_epoch = self.steps_per_epoch()
        return {round(s / per_epoch) * self.train_examples: -v for s, v in self.evals.items()}


def rouge_metrics(tuned: tuple, base: tuple, **extra: float) -> dict[str, float]:
    keys = ("rouge1", "rouge2", "rougeL")
    out = dict(zip(keys, tuned)) | {f"base_{k}": v for k, v in zip(keys, base)}
    return out | {f"delta_{k}": t - b for k, t, b in zip(keys, tuned, base)} | extra


BASE = (0.20, 0.05, 0.18)
# Trial 1 wins (rougeL 0.40), then 0 and 4; 2 is pruned after its first epoch of 3 (84 steps
# of batch 2, 168 examples); 3 failed. Each trial trains on 168 examples an epoch.
TRIALS = [
    FakeTrial(
        TrialState.COMPLETE,
        {"lora.r": 16, "train.batch_size": 8, "train.learning_rate": 2e-4},
        value=0.30,
        start_s=0,
        wall_s=60,
        evals={21: 2.5, 42: 2.2, 63: 2.0},
        metrics=rouge_metrics(
            (0.35, 0.15, 0.30),
            BASE,
            eval_loss=2.0,
            train_time_s=50,
            trial_time_s=58,
            train_steps=63,
        ),
    ),
    FakeTrial(
        TrialState.COMPLETE,
        {"lora.r": 8, "train.batch_size": 4, "train.learning_rate": 5e-4},
        value=0.40,
        start_s=60,
        wall_s=90,
        evals={42: 2.1, 84: 1.8, 126: 1.7},
        metrics=rouge_metrics(
            (0.44, 0.22, 0.40),
            BASE,
            eval_loss=1.7,
            train_time_s=84,
            trial_time_s=88,
            train_steps=126,
        ),
    ),
    FakeTrial(
        TrialState.PRUNED,
        {"lora.r": 4, "train.batch_size": 2, "train.learning_rate": 1e-5},
        start_s=150,
        wall_s=30,
        evals={84: 4.0},
    ),
    FakeTrial(
        TrialState.FAIL,
        {"lora.r": 32, "train.batch_size": 16, "train.learning_rate": 1e-3},
        start_s=180,
        wall_s=5,
        fail_reason="FloatingPointError: train loss is nan at step 3",
    ),
    FakeTrial(
        TrialState.COMPLETE,
        {"lora.r": 4, "train.batch_size": 16, "train.learning_rate": 3e-5},
        value=0.25,
        # Overlaps trial 3 (a second worker): wall time counts the overlap once.
        start_s=183,
        wall_s=40,
        evals={11: 3.0, 22: 2.8, 33: 2.6},
        metrics=rouge_metrics(
            (0.30, 0.10, 0.25),
            BASE,
            eval_loss=2.6,
            train_time_s=33,
            trial_time_s=38,
            train_steps=33,
        ),
    ),
]
SAMPLES = [
    {
        "question": "What is a bond's | yield *to* maturity?",
        "reference": "The total return if held to maturity.",
        "base_answer": "A bond is <b>money</b>.",
        "tuned_answer": "The return of a bond held to maturity.",
    },
    {
        "question": "What is EBITDA?",
        "reference": "Earnings before interest, taxes, depreciation and amortization.",
        "base_answer": "It is a number.",
        "tuned_answer": "Earnings before interest and taxes.",
    },
]


def tracking_cfg(root: Path) -> TrackingConfig:
    return TrackingConfig(
        uri=f"sqlite:///{root}/mlflow.db",
        experiment_name="finqa",
        artifact_location=str(root / "mlartifacts"),
    )


def report_cfg(root: Path, *studies: str, **kw) -> report.ReportConfig:
    paths = PathsConfig(
        root_dir=str(root),
        cache_dir=str(root / ".cache"),
        output_dir=str(root / "out"),
        studies_dir=str(root / "studies"),
        reports_dir=str(root / "reports"),
    )
    return report.ReportConfig(
        paths=paths,
        tracking=tracking_cfg(root),
        studies=list(studies),
        storage=f"sqlite:///{root}/studies/{{study}}.db",
        **kw,
    )


def log_run(tracker, cfg, study: str, number: int, fake: FakeTrial, adapter: Path) -> str:
    """The trial's MLflow run as trial.py writes it: params, per-step losses, summary metrics
    (the final eval loss among them, at step 0), samples and adapter."""
    cfg = cfg.copy()
    for key, value in {**fake.params, "train.epochs": fake.epochs}.items():
        OmegaConf.update(cfg, key, value)
    run_id = tracker.start_run(f"trial-{number}", {"study": study, "trial_number": str(number)})
    tracker.log_params(flatten(cfg))
    tracker.log_text(OmegaConf.to_yaml(cfg, resolve=True), "config.yaml")
    tracker.log_metrics(
        {"train_examples": fake.train_examples, "steps_per_epoch": fake.steps_per_epoch()}
    )
    for i, (step, loss) in enumerate(sorted(fake.evals.items())):
        if i == 0:
            tracker.log_metrics({"train_loss": loss + 0.6}, step=1)
        tracker.log_metrics({"train_loss": loss + 0.3, "eval_loss": loss}, step=step)
    if fake.metrics:
        tracker.log_metrics(fake.metrics)
    if fake.state == TrialState.COMPLETE:
        tracker.log_table(SAMPLES, "samples.json")
        tracker.log_artifacts(adapter, "adapter")
    if fake.state.is_finished():
        status = {TrialState.COMPLETE: "FINISHED", TrialState.PRUNED: "KILLED"}
        tracker.set_tags({"optuna_state": fake.state.name})
        tracker.end_run(status.get(fake.state, "FAILED"))
    return run_id


def write_study(
    root: Path, name: str, trials: list[FakeTrial], adapter: Path, second: dict | None = None
) -> optuna.Study:
    """An Optuna study and its MLflow runs, as a sweep with these outcomes leaves them;
    with ``second`` (trial number -> numeric accuracy), a study of two objectives."""
    (root / "studies").mkdir(exist_ok=True)
    study = optuna.create_study(
        study_name=name,
        storage=f"sqlite:///{root}/studies/{name}.db",
        directions=["maximize"] * (2 if second else 1),
    )
    if second:
        with warnings.catch_warnings():  # experimental in Optuna
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names(["rougeL", "numeric_accuracy"])
    tracker = tracking.MlflowTracker(tracking_cfg(root))
    cfg = compose_cfg([f"paths.root_dir={root}"], root / "out")
    for number, fake in enumerate(trials):
        attrs = {}
        if fake.state != TrialState.WAITING:  # a waiting trial has no run yet
            attrs["mlflow_run_id"] = log_run(tracker, cfg, name, number, fake, adapter)
        if fake.fail_reason:
            attrs["fail_reason"] = fake.fail_reason
        if fake.evals:
            attrs["step_unit"] = "train_examples"
        start = T0 + dt.timedelta(seconds=fake.start_s)
        end = None if fake.wall_s is None else start + dt.timedelta(seconds=fake.wall_s)
        study.add_trial(
            FrozenTrial(
                number=number,
                state=fake.state,
                value=None if second else fake.value,
                values=[fake.value, second[number]] if second and fake.value else None,
                datetime_start=None if fake.state == TrialState.WAITING else start,
                datetime_complete=end,
                params=fake.params,
                distributions=DISTS,
                user_attrs=attrs,
                system_attrs={},
                intermediate_values=fake.intermediate(),
                trial_id=number,
            )
        )
    return study


def scaled(trials: list[FakeTrial], factor: float) -> list[FakeTrial]:
    """The same trials with every objective and ROUGE scaled: a second, different study."""
    out = []
    for t in trials:
        keys = {"rouge1", "rouge2", "rougeL"}
        metrics = {k: v * factor if k in keys else v for k, v in t.metrics.items()}
        value = None if t.value is None else t.value * factor
        out.append(FakeTrial(**{**t.__dict__, "metrics": metrics, "value": value}))
    return out


RUNNING = [
    *TRIALS[:2],
    FakeTrial(
        TrialState.RUNNING,
        {"lora.r": 4, "train.batch_size": 2, "train.learning_rate": 1e-4},
        start_s=150,
        evals={84: 3.0},
    ),
    FakeTrial(
        TrialState.WAITING, {"lora.r": 8, "train.batch_size": 2, "train.learning_rate": 1e-4}
    ),
]
FAILED = [TRIALS[3], TRIALS[3]]


@pytest.fixture(scope="module")
def stores(tmp_path_factory) -> Path:
    """One MLflow store and a folder of studies: known (TRIALS), known2 (scaled), running
    (a sweep in progress), broken (all failed), empty."""
    root = tmp_path_factory.mktemp("stores")
    adapter = root / "adapter_src"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text('{"r": 8}')
    write_study(root, "known", TRIALS, adapter)
    write_study(root, "known2", scaled(TRIALS, 0.5), adapter)
    write_study(root, "running", RUNNING, adapter)
    write_study(root, "broken", FAILED, adapter)
    write_study(root, "empty", [], adapter)
    # Numeric accuracy as a second objective: trials 1 (best ROUGE-L) and 0 (best numeric
    # accuracy) are the Pareto front; 4 is worse than both on both.
    write_study(root, "two", TRIALS, adapter, second={0: 0.9, 1: 0.5, 4: 0.2})
    return root


def run_ids(root: Path, name: str) -> dict[int, str]:
    study = optuna.load_study(study_name=name, storage=f"sqlite:///{root}/studies/{name}.db")
    return {t.number: t.user_attrs.get("mlflow_run_id") for t in study.trials}


def table(md: str, first_header: str, header: bool = False) -> list[list[str]]:
    """Rows of the Markdown table whose header starts with ``| first_header |``."""
    lines = md.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {first_header} |"))
    rows = []
    for line in lines[start : start + 1] * header + lines[start + 2 :]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split(" | ")])
    return rows


def records(md: str, first_header: str) -> list[dict[str, str]]:
    header, *rows = table(md, first_header, header=True)
    return [dict(zip(header, row)) for row in rows]


# ----------------------------------------------------------------------------- numbers


def test_report_numbers_match_the_stores(stores):
    folder = report.write_report(report_cfg(stores, "known"))
    md = (folder / "report.md").read_text()
    ids = run_ids(stores, "known")

    assert "- Trials: 3 complete, 1 pruned, 1 failed" in md
    # Trials ran 0-60, 60-150, 150-180, 180-185 and 183-223 s: busy 223 s, summed 225 s.
    assert "- Wall time: 3m 43s with at least one trial running" in md
    assert table(md, "ended") == [
        ["complete", "3", "3m 10s", "3m 04s", "2m 47s"],  # 60+90+40; 58+88+38; 50+84+33
        ["pruned", "1", "30.0 s", "-", "-"],
        ["failed", "1", "5.0 s", "-", "-"],
        ["**total**", "5", "3m 45s", "3m 04s", "2m 47s"],
    ]
    # Trial 2 was pruned after 1 of its 3 epochs of 168 examples: 168 of 504, 336 skipped.
    # Unpruned total: 3 complete x 504 + 504 = 2016; 336 / 2016 = 17%.
    # Seconds per example: mean of 50/504, 84/504, 33/504 = 0.110450 -> 336 x that = 37.1 s.
    assert (
        "Pruning saved 336 training examples: it stopped 1 trial after 168 of the 504 examples"
        in md
    )
    assert "which is 17% of the 2016 examples all finished trials would have trained on" in md
    assert "mean 110.45 ms of training per example, that is about 37.1 s of training" in md
    assert "- trial 3: FloatingPointError: train loss is nan at step 3" in md

    winners = table(md, "rank")
    assert [(row[1], row[-1]) for row in winners] == [
        ("1", f"`{ids[1]}`"),
        ("0", f"`{ids[0]}`"),
        ("4", f"`{ids[4]}`"),
    ]
    # rank, trial, lora.r, batch, lr, ROUGE-1/2/L, eval loss, objective's interval and the
    # best's lead (these fake runs logged no intervals or per-question scores), train time
    assert winners[0][:12] == [
        "1",
        "1",
        "8",
        "4",
        "5.00e-04",
        "0.4400",
        "0.2200",
        "0.4000",
        "1.7000",
        "-",
        "-",
        "84.0 s",
    ]
    assert "`python -m finqa_exp lora.r=8 train.batch_size=4 train.learning_rate=0.0005`" in md
    assert table(md, "metric") == [
        ["ROUGE-1", "0.2000", "0.4400", "+120.0%", "-"],  # these fake runs logged no
        ["ROUGE-2", "0.0500", "0.2200", "+340.0%", "-"],  # intervals
        ["ROUGE-L", "0.1800", "0.4000", "+122.2%", "-"],
    ]


def test_report_shows_what_each_param_did(stores):
    md = (report.write_report(report_cfg(stores, "known")) / "report.md").read_text()
    sections = md.split("### ")
    by_param = {s.split("`")[1]: table(s, "value") for s in sections[1:4]}
    assert by_param["lora.r"] == [  # every choice, in numeric order, sampled or not
        ["4", "1", "1", "0", "0.2500", "0.2500"],
        ["8", "1", "0", "0", "0.4000", "0.4000"],
        ["16", "1", "0", "0", "0.3000", "0.3000"],
        ["32", "0", "0", "1", "-", "-"],
    ]
    assert by_param["train.learning_rate"] == [  # per decade
        ["\\[1e-05, 1e-04)", "1", "1", "0", "0.2500", "0.2500"],
        ["\\[1e-04, 1e-03)", "2", "0", "0", "0.4000", "0.3500"],
        ["\\[1e-03, 1e-02)", "0", "0", "1", "-", "-"],
    ]
    study = optuna.load_study(study_name="known", storage=f"sqlite:///{stores}/studies/known.db")
    want = optuna.importance.get_param_importances(
        study, evaluator=optuna.importance.FanovaImportanceEvaluator(seed=0)
    )
    text = ", ".join(f"{k} {v:.2f}" for k, v in sorted(want.items(), key=lambda kv: -kv[1]))
    assert f"(fANOVA on 3 complete trials; rough with this few; sums to 1): {text}." in md.replace(
        "\\_", "_"
    )


def test_report_links_plots_and_examples(stores):
    folder = report.write_report(report_cfg(stores, "known"))
    md = (folder / "report.md").read_text()
    html = (folder / "report.html").read_text()
    pngs = sorted(p.name for p in folder.glob("*.png"))
    assert pngs == ["curves.png", "history.png", "importance.png", "objective.png", "parallel.png"]
    assert sorted(re.findall(r"!\[[^]]*\]\(([^)]+)\)", md)) == pngs
    # One self-contained file: every image inline, nothing fetched.
    assert html.count('src="data:image/png;base64,') == len(pngs)
    assert not re.search(r'(src|href)="(?!data:)', html)
    # Answers are shown as text: markup in them is escaped, never rendered.
    assert "**Q1.** What is a bond's \\| yield \\*to\\* maturity?" in md
    assert "| base | A bond is \\<b\\>money\\</b\\>. |" in md
    assert "A bond is &lt;b&gt;money&lt;/b&gt;." in html
    assert "<td>tuned</td><td>Earnings before interest and taxes.</td>" in html


def test_regenerating_gives_the_same_bytes(stores):
    cfg = report_cfg(stores, "known")
    first = report.write_report(cfg)
    before = {p.name: p.read_bytes() for p in first.iterdir()}
    again = report.write_report(cfg)
    assert {p.name: p.read_bytes() for p in again.iterdir()} == before
    assert not [p for p in (stores / "reports").iterdir() if p.name.startswith(".")]


# ----------------------------------------------------------------------------- champion


def test_report_registers_the_best_trial_once(stores):
    report.write_report(report_cfg(stores, "known"))
    report.write_report(report_cfg(stores, "known"))
    store = tracking.RunStore(tracking_cfg(stores).uri)
    champ = store.champion("known")
    assert champ is not None and champ.run_id == run_ids(stores, "known")[1]
    versions = store.client.search_model_versions("name = 'known'")
    assert [str(v.version) for v in versions] == [champ.version]  # no second version
    md = (stores / "reports" / "known" / "report.md").read_text()
    assert f"Registered: model `known` version {champ.version}, alias `champion`" in md


def test_champion_versions_follow_the_runs(stores):
    store = tracking.RunStore(tracking_cfg(stores).uri)
    ids = run_ids(stores, "known")
    first = store.register_champion("moving", ids[0])
    assert (first.version, first.created) == ("1", True)
    assert store.register_champion("moving", ids[0]).created is False
    assert store.register_champion("moving", ids[1]).version == "2"
    back = store.register_champion("moving", ids[0])  # back to the first run: its version
    assert (back.version, back.created) == ("1", False)
    assert store.champion("moving").run_id == ids[0]
    with pytest.raises(tracking.TrackingError, match="no 'adapter' artifact"):
        store.register_champion("moving", ids[2])  # pruned: no adapter


def test_sweep_end_registers_the_champion(stores):
    study = optuna.load_study(study_name="known2", storage=f"sqlite:///{stores}/studies/known2.db")
    cfg = tracking_cfg(stores)
    callback = tracking.StudyRun(
        uri=cfg.uri,
        artifact_location=cfg.artifact_location,
        registered_model="sweep-{study}",
    )
    callback.on_sweep_start(study)
    callback.on_sweep_end(study)
    champ = tracking.RunStore(cfg.uri).champion("sweep-known2")
    assert champ is not None and champ.run_id == run_ids(stores, "known2")[1]
    parent = tracking.RunStore(cfg.uri).run(study.user_attrs["mlflow_parent_run_id"])
    assert parent.tags["champion"] == f"sweep-known2/{champ.version}"


def test_sweep_end_retries_a_summary_write_that_lost_a_race(stores, monkeypatch):
    """Workers of one study end it together and set the same new parent tags; the store
    refuses the second insert of a row (the CI's PostgreSQL did). The loser retries."""
    from finqa_exp.tracking import study_run

    study = optuna.load_study(study_name="known2", storage=f"sqlite:///{stores}/studies/known2.db")
    cfg = tracking_cfg(stores)
    callback = tracking.StudyRun(uri=cfg.uri, artifact_location=cfg.artifact_location)
    callback.on_sweep_start(study)
    real, calls = callback.tracker.set_tags, []

    def racing(tags):
        calls.append(sorted(tags))
        if len(calls) == 1:  # the other worker inserted the row first
            raise RuntimeError(
                "BAD_REQUEST: (psycopg.errors.UniqueViolation) duplicate key value violates "
                'unique constraint "tag_pk"'
            )
        real(tags)

    monkeypatch.setattr(callback.tracker, "set_tags", racing)
    monkeypatch.setattr(study_run.time, "sleep", lambda s: None)
    callback.on_sweep_end(study)
    assert (
        calls[0] == calls[1] == ["best.lora.r", "best.train.batch_size", "best.train.learning_rate"]
    )
    parent = tracking.RunStore(cfg.uri).run(study.user_attrs["mlflow_parent_run_id"])
    assert parent.status == "FINISHED" and parent.tags["best.lora.r"] == "8"
    assert parent.metrics["best_trial"] == 1.0

    def broken(tags):
        raise RuntimeError("connection reset")  # not a race: no retry

    monkeypatch.setattr(callback.tracker, "set_tags", broken)
    assert study_run.concurrent_write(RuntimeError("UNIQUE constraint failed: tags.key"))
    with pytest.raises(RuntimeError, match="connection reset"):
        study_run.retry_concurrent(lambda: broken({}))


# ----------------------------------------------------------------------------- other cases


def test_running_study_is_partial_and_keeps_its_champion_unset(stores):
    folder = report.write_report(report_cfg(stores, "running"))
    md = (folder / "report.md").read_text()
    assert "**partial: 2 trials running/waiting** in study running" in md
    assert "- Trials: 2 complete, 1 running, 1 waiting" in md
    assert tracking.RunStore(tracking_cfg(stores).uri).champion("running") is None
    assert "Registered:" not in md


@pytest.mark.parametrize(
    ("study", "message"),
    [
        ("empty", "study 'empty' has no trials yet"),
        (
            "broken",
            "study 'broken' has no complete trial (2 failed); first failure: "
            "FloatingPointError: train loss is nan at step 3",
        ),
    ],
)
def test_nothing_to_report(stores, study, message):
    with pytest.raises(report.ReportError) as err:
        report.write_report(report_cfg(stores, study))
    assert str(err.value) == message
    assert not (stores / "reports" / study).exists()


def test_missing_study_lists_the_others_on_one_line(stores):
    env = {**os.environ, "PYTHONPATH": str(REPO), "FINQA_EXP_ROOT": str(stores)}
    proc = subprocess.run(
        [sys.executable, "-m", "finqa_exp.report", "study=nope"],
        cwd=stores,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2  # bad input
    assert proc.stderr.strip() == (
        f"error: no study 'nope' in {stores}/studies; "
        "studies there: broken, empty, known, known2, running, two"
    )
    assert not (stores / "studies" / "nope.db").exists()


def test_studies_side_by_side(stores):
    folder = report.write_report(report_cfg(stores, "known", "known2"))
    assert folder.name == "known+known2"
    md = (folder / "report.md").read_text()
    rows = table(md, "study")
    assert [(r[0], r[3]) for r in rows] == [("`known`", "0.4000"), ("`known2`", "0.2000")]
    assert md.count("## Study `") == 2
    assert "compare.png" in md and (folder / "known2-history.png").is_file()
    store = tracking.RunStore(tracking_cfg(stores).uri)
    assert store.champion("known2").run_id == run_ids(stores, "known2")[1]


def test_a_multi_objective_study_reports_its_pareto_front(stores):
    md = (report.write_report(report_cfg(stores, "two")) / "report.md").read_text()
    assert (
        "- Objectives: `rougeL` (maximized), `numeric_accuracy` (maximized); the first ranks "
        "the trials; 2 trials are on the Pareto front" in md
    )
    front = records(md, "trial")
    assert [(r["trial"], r["rougeL"], r["numeric\\_accuracy"]) for r in front] == [
        ("1", "0.4000", "0.5000"),
        ("0", "0.3000", "0.9000"),
    ]
    assert [r[1] for r in table(md, "rank")] == ["1", "0", "4"]  # ranked by the first
    store = tracking.RunStore(tracking_cfg(stores).uri)
    assert store.champion("two").run_id == run_ids(stores, "two")[1]


def test_study_shorthand_on_the_command_line():
    assert report.study_shorthand(["study=a", "study=[a,b]", "top_k=3"]) == [
        "studies=[a]",
        "studies=[a,b]",
        "top_k=3",
    ]


def test_planned_examples_and_busy_time():
    def row(params: dict, reported: tuple, metrics: dict | None = None) -> TrialRow:
        run = tracking.RunRecord("r", "KILLED", params, metrics or {}, {})
        return TrialRow(0, "PRUNED", None, {}, run, 0.0, 1.0, reported)

    base = {"train.batch_size": "4", "train.gradient_accumulation_steps": "2"}
    epochs = {**base, "train.max_steps": "-1", "train.eval_strategy": "epoch"}
    # max_steps x 8 examples a step; else epochs x the training examples the run logged
    assert planned_examples(row({**base, "train.max_steps": "40"}, (5,))) == 320
    new = row({**epochs, "train.epochs": "2.5"}, (96, 192), {"train_examples": 96.0})
    assert planned_examples(new) == 240
    assert examples_reported(new) == (96, 192)
    assert steps_per_epoch(new) is None  # it logged no steps_per_epoch
    assert planned_examples(row(epochs | {"train.epochs": "3"}, (10,))) is None  # unknown
    assert busy_seconds([(0, 10), (5, 12), (20, 21)]) == 13


def test_a_perplexity_lead_is_the_difference_of_perplexities_over_the_same_blocks():
    from finqa_exp.report.numbers import _lead

    tokens = [255, 255, 100]
    best, other = [900.0, 950.0, 400.0], [1000.0, 1000.0, 420.0]  # summed NLL per block
    gap = _lead(best, other, maximize=False, tokens=tokens)
    ppl = lambda nll: math.exp(sum(nll) / sum(tokens))  # noqa: E731
    assert gap.mean == pytest.approx(ppl(other) - ppl(best)) and gap.mean > 0
    assert (gap.low, gap.high) == stats.perplexity_interval(other, tokens, best)
    assert _lead(best, other, maximize=False, tokens=tokens[:2]) is None  # other blocks


# ----------------------------------------------------------------------------- real sweep

SWEEP = [
    "train.max_steps=10",
    "train.eval_strategy=steps",
    "train.eval_steps=5",
    "train.logging_steps=2",
    "train.batch_size=16",
    "eval.max_new_tokens=16",
    "eval.max_questions=4",
    "eval.num_samples=4",
    "eval.batch_size=1",  # ask answers one question at a time: the same computation
    "hydra.sweeper.n_trials=3",
    "hydra.sweeper.params={train.learning_rate: 'tag(log, interval(1e-4, 3e-3))',"
    " lora.r: 'choice(4, 16)'}",
    # Trial 0 learns fast; trial 1 barely moves and is pruned at its first eval (step 5).
    "hydra.sweeper.enqueue_trials=[{train.learning_rate: 3e-3, lora.r: 16},"
    " {train.learning_rate: 1e-5, lora.r: 4}]",
    "hydra/sweeper/pruner=median",
    "hydra.sweeper.pruner.n_startup_trials=1",
    # The complete trials train again with seed 1 (confirmation).
    "hydra.sweeper.confirm.top_k=2",
    "hydra.sweeper.confirm.seeds=[1]",
]


def command(root: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "FINQA_EXP_ROOT": str(root)}
    return subprocess.run(
        [sys.executable, "-m", *args], cwd=root, env=env, capture_output=True, text=True
    )


@pytest.mark.slow
def test_real_sweep_report_champion_and_ask(tmp_path, cache_dir):
    name = "finqa_tiny_finqa_sample"
    cache = f"paths.cache_dir={cache_dir}"  # the tiny base other slow tests built
    proc = command(
        tmp_path, "finqa_exp", "-m", f"hydra.sweep.dir={tmp_path}/multirun", cache, *SWEEP
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    study = optuna.load_study(study_name=name, storage=f"sqlite:///{tmp_path}/studies/{name}.db")
    best = study.best_trial
    store = tracking.RunStore(f"sqlite:///{tmp_path}/mlflow.db")
    champ = store.champion(name)  # registered by the sweep's end: the best mean over seeds
    top = confirmed(study)
    assert len(top) == sum(t.state.name == "COMPLETE" for t in study.trials)
    assert champ is not None and champ.run_id == top[0].trial.user_attrs["mlflow_run_id"]
    version = store.client.get_model_version(name, champ.version)
    assert float(version.tags["objective_mean"]) == pytest.approx(top[0].mean)
    assert version.tags["n_seeds"] == "2"

    proc = command(tmp_path, "finqa_exp.report", f"study={name}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    md = (tmp_path / "reports" / name / "report.md").read_text()
    states = [t.state.name for t in study.trials]
    assert states[:2] == ["COMPLETE", "PRUNED"]
    counts = ", ".join(f"{states.count(s)} {LABELS[s]}" for s in STATES if s in states)
    assert f"- Trials: {counts}" in md
    pruned = states.count("PRUNED")  # each ran 5 of its 10 steps of 16 examples
    assert f"Pruning saved {80 * pruned} training examples: it stopped {pruned} trial" in md
    for t in study.trials:
        if t.state.name == "PRUNED":  # timed too, like a complete trial
            assert t.user_attrs["timings"]["time_train_s"] > 0
            assert list(t.intermediate_values) == [80]
    winner = records(md, "rank")[0]
    best_run = best.user_attrs["mlflow_run_id"]
    assert winner["trial"] == str(best.number) and winner["MLflow run"] == f"`{best_run}`"
    run = store.run(best_run)
    assert winner["ROUGE-L (objective)"] == f"{best.value:.4f}" == f"{run.metrics['rougeL']:.4f}"
    base, tuned = run.metrics["base_rougeL"], run.metrics["rougeL"]
    low, high = run.metrics["delta_rougeL_ci_low"], run.metrics["delta_rougeL_ci_high"]
    assert table(md, "metric")[2] == [
        "ROUGE-L",
        f"{base:.4f}",
        f"{tuned:.4f}",
        f"{(tuned - base) / base * 100:+.1f}%",
        f"{low:.4f} to {high:.4f}",
    ]
    assert table(md, "metric")[3][0] == "numeric accuracy"
    interval = f"{run.metrics['rougeL_ci_low']:.4f} to {run.metrics['rougeL_ci_high']:.4f}"
    assert winner["ROUGE-L, 95 % interval"] == interval
    assert "champion" in md and len(store.client.search_model_versions(f"name = '{name}'")) == 1
    check_confirmed_table(md, top, store, tmp_path)
    assert store.champion(name).run_id == champ.run_id  # the report keeps the same winner
    assert command(tmp_path, "finqa_exp.report", f"study={name}").returncode == 0
    assert (tmp_path / "reports" / name / "report.md").read_text() == md

    # The champion answers the test questions exactly as the trial's tuned model did.
    samples = store.table(champ.run_id, "samples.json")[:2]
    questions = [s["question"] for s in samples]
    proc = command(tmp_path, "finqa_exp.ask", *questions, cache)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout == "".join(
        f"Q: {s['question']}\nA: {s['tuned_answer']}\n\n" for s in samples
    )


def check_confirmed_table(md: str, top: list, store: tracking.RunStore, tmp: Path) -> None:
    """The confirmed leaderboard, recomputed from the logged per-question scores."""
    section = md.split("## Is the winner real? The top")[1]
    rows = records(section, "rank")
    assert [r["trial"] for r in rows] == [str(c.trial.number) for c in top]

    def question_means(c) -> list[float]:
        runs = [c.trial, *c.confirmations]
        per_seed = [
            [r["tuned_rougeL"] for r in store.table(t.user_attrs["mlflow_run_id"], "scores.json")]
            for t in runs
        ]
        return [sum(q) / len(q) for q in zip(*per_seed)]

    for row, c in zip(rows, top):
        assert row["seeds"] == "own, 1"
        assert row["rougeL: mean"] == f"{statistics.fmean(c.values):.4f}"
        assert row["spread (sd)"] == f"{statistics.stdev(c.values):.4f}"
        assert row["single run"] == f"{c.trial.value:.4f}"
    if len(top) > 1:
        best, other = question_means(top[0]), question_means(top[1])
        diffs = [a - b for a, b in zip(best, other)]
        low, high = stats.paired_bootstrap(best, other)
        lead = f"{statistics.fmean(diffs):.4f} ({low:.4f} to {high:.4f})"
        assert rows[1]["best's lead, 95 % interval"] == lead
