"""A real text sweep (``-m data=finance_text``): pruning, a champion, and a report that
shows perplexity and the completions before and after, beside a Q&A study."""

from __future__ import annotations

import math

import optuna
import pytest

from finqa_exp import stats, tracking
from finqa_exp.corpus import SEED_PROMPT
from finqa_exp.report import build as report
from finqa_exp.report.render import md_escape
from finqa_exp.sweep.confirm import confirmed
from tests.report.test_report import (
    TRIALS,
    command,
    records,
    report_cfg,
    table,
    write_study,
)

pytestmark = pytest.mark.slow
NAME = "finqa_tiny_finance_text"

SWEEP = [
    "data=finance_text",
    "train.epochs=2",
    "train.batch_size=16",
    "eval.max_new_tokens=16",
    "eval.num_samples=3",
    "eval.batch_size=1",  # ask completes one prompt at a time: the same computation
    "hydra.sweeper.n_trials=3",
    "hydra.sweeper.params={train.learning_rate: 'tag(log, interval(1e-4, 3e-3))',"
    " lora.r: 'choice(4, 16)'}",
    # Trials 0 and 1 learn (and are the pruner's startup trials); trial 2 barely moves and
    # is pruned at its first check, worse than their median.
    "hydra.sweeper.enqueue_trials=[{train.learning_rate: 3e-3, lora.r: 16},"
    " {train.learning_rate: 1.5e-3, lora.r: 4}, {train.learning_rate: 1e-5, lora.r: 4}]",
    "hydra/sweeper/pruner=median",
    "hydra.sweeper.pruner.n_startup_trials=2",
    "hydra.sweeper.confirm.top_k=2",
    "hydra.sweeper.confirm.seeds=[1]",
]


def perplexity_lead(store, best_runs, other_runs) -> str:
    """The best's lead as the report must give it: the difference of the perplexities of
    each side's per-document NLL (averaged over its runs), with the bootstrap over the
    held-out documents."""

    def nll(run_ids):
        tables = [store.table(r, "scores.json") for r in run_ids]
        return [sum(t[i]["tuned_nll"] for t in tables) / len(tables) for i in range(len(tables[0]))]

    tokens = [r["tokens"] for r in store.table(best_runs[0], "scores.json")]
    best, other = nll(best_runs), nll(other_runs)
    lead = math.exp(sum(other) / sum(tokens)) - math.exp(sum(best) / sum(tokens))
    low, high = stats.perplexity_interval(other, tokens, best)
    return f"{lead:.4f} ({low:.4f} to {high:.4f})"


def cell(text: str) -> str:
    return md_escape(text).replace("\n", "<br>")


def test_text_sweep_prunes_and_reports_perplexity_and_completions(tmp_path, cache_dir):
    cache = f"paths.cache_dir={cache_dir}"
    proc = command(
        tmp_path, "finqa_exp", "-m", f"hydra.sweep.dir={tmp_path}/multirun", cache, *SWEEP
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    study = optuna.load_study(study_name=NAME, storage=f"sqlite:///{tmp_path}/studies/{NAME}.db")
    assert study.direction.name == "MINIMIZE"
    states = [t.state.name for t in study.trials]
    assert states == ["COMPLETE", "COMPLETE", "PRUNED"]
    best = study.best_trial
    store = tracking.RunStore(f"sqlite:///{tmp_path}/mlflow.db")
    run = store.run(best.user_attrs["mlflow_run_id"])
    assert best.value == pytest.approx(run.metrics["perplexity"])
    assert run.metrics["perplexity"] < run.metrics["base_perplexity"]
    champ = store.champion(NAME)
    assert champ is not None

    proc = command(tmp_path, "finqa_exp.report", f"study={NAME}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    md = (tmp_path / "reports" / NAME / "report.md").read_text()
    assert "- Objective: `perplexity` (minimized)" in md
    winner = records(md, "rank")[0]
    assert winner["trial"] == str(best.number)
    assert winner["perplexity (objective)"] == f"{best.value:.4f}"
    base, tuned = run.metrics["base_perplexity"], run.metrics["perplexity"]
    low, high = run.metrics["delta_perplexity_ci_low"], run.metrics["delta_perplexity_ci_high"]
    assert table(md, "metric")[0] == [
        "perplexity",
        f"{base:.4f}",
        f"{tuned:.4f}",
        f"{(base - tuned) / base * 100:+.1f}%",  # a fall is the improvement
        f"{low:.4f} to {high:.4f}",
    ]
    assert "ROUGE-" not in md  # no ROUGE column: text is scored by perplexity
    # Is the winner real? Leads paired over the held-out blocks, single runs and over seeds.
    runner = next(t for t in study.trials if t.state.name == "COMPLETE" and t != best)
    single = perplexity_lead(
        store, [best.user_attrs["mlflow_run_id"]], [runner.user_attrs["mlflow_run_id"]]
    )
    assert records(md, "rank")[1]["best's lead, 95 % interval"] == single
    top = confirmed(study)
    seeds = [[c.trial.user_attrs["mlflow_run_id"]] + [
        t.user_attrs["mlflow_run_id"] for t in c.confirmations] for c in top]  # fmt: skip
    section = md.split("## Is the winner real? The top")[1]
    assert records(section, "rank")[1]["best's lead, 95 % interval"] == perplexity_lead(
        store, seeds[0], seeds[1]
    )
    docs = len(store.table(run.run_id, "scores.json"))
    assert docs == 12
    assert f"2 seeds each, paired over {docs} held-out documents" in md or (
        f"on these {docs} held-out documents, averaged over seeds" in md
    )
    assert f"## Completions before and after fine-tuning (best trial {best.number})" in md
    samples = store.table(run.run_id, "samples.json")
    assert samples[0]["prompt"] == SEED_PROMPT and len(samples) == 3
    assert f"**P1.** {SEED_PROMPT} ..." in md
    first = table(md.split("**P1.**")[1], "")  # the seed prompt's: no held-out text
    assert first == [
        ["base", cell(samples[0]["base_completion"])],
        ["tuned", cell(samples[0]["tuned_completion"])],
    ]

    # The champion completes a prompt as the trial's tuned model did.
    proc = command(tmp_path, "finqa_exp.ask", SEED_PROMPT, cache)
    assert proc.returncode == 0, proc.stderr[-3000:]
    champion_samples = store.table(champ.run_id, "samples.json")
    assert proc.stdout == f"Q: {SEED_PROMPT}\nA: {champion_samples[0]['tuned_completion']}\n\n"

    # A Q&A study and this text study side by side: each with its own score.
    adapter = tmp_path / "adapter_src"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text('{"r": 8}')
    write_study(tmp_path, "known", TRIALS, adapter)
    folder = report.write_report(report_cfg(tmp_path, "known", NAME))
    rows = records((folder / "report.md").read_text(), "study")
    assert [(r["study"], r["objective"], r["score"]) for r in rows] == [
        ("`known`", "rougeL max", "ROUGE-L"),
        (f"`{NAME}`", "perplexity min", "perplexity"),
    ]
    assert rows[1]["best trial"] == f"{tuned:.4f}" and rows[1]["base"] == f"{base:.4f}"
