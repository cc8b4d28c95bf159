"""Answer metrics: numeric accuracy on formatted numbers, and evaluate modules loaded from
local paths offline (the hub is never asked)."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from finqa_exp import metrics
from finqa_exp.metrics import MetricError

REFERENCE_CASES = [
    # (answer, reference, score)
    ("Net income was $1,628.89 million.", "1628.89", 1.0),
    ("Net income was $1,268.89 million.", "$1,628.89", 0.0),  # ROUGE can't tell; this can
    ("About $1,628.89.", "1628.9", 1.0),  # rounded to the reference's precision
    ("About 1628.9.", "$1,628.89", 0.0),  # less precise than the reference
    ("The margin is 0.12 of sales.", "a 12 % margin", 1.0),  # a percentage is its fraction
    ("The margin is 12%.", "0.12", 1.0),
    ("The margin is 13%.", "12 %", 0.0),
    ("It fell by -5.2 points.", "a change of -5.2", 1.0),
    ("It changed by 5.2 points.", "a change of -5.2", 0.0),  # the sign counts
    ("It fell \u22125.2 points.", "-5.2", 1.0),  # a typographic minus
    (
        "Sales were 4,100,000 in 2019-2020.",
        "In 2019 sales were $4,100,000.",
        1.0,
    ),  # key: most digits
    ("No numbers here.", "It returned 7%.", 0.0),
    ("Anything at all, 42.", "A bond is a loan.", None),  # no number: does not count
]


@pytest.fixture(scope="module")
def numeric_accuracy():
    return metrics.load(["numeric_accuracy"])["numeric_accuracy"]


@pytest.mark.parametrize(("answer", "reference", "expected"), REFERENCE_CASES)
def test_numeric_accuracy_on_formatted_numbers(numeric_accuracy, answer, reference, expected):
    out = numeric_accuracy.compute(predictions=[answer], references=[reference])
    if expected is None:
        assert out["numeric_questions"] == 0 and math.isnan(out["numeric_accuracy"])
    else:
        assert out == {"numeric_accuracy": expected, "numeric_questions": 1}


def test_numeric_accuracy_counts_only_numeric_references(numeric_accuracy):
    answers = [a for a, _, _ in REFERENCE_CASES]
    references = [r for _, r, _ in REFERENCE_CASES]
    scores, counts, per_question = metrics.compute(numeric_accuracy, answers, references)
    expected = [e for _, _, e in REFERENCE_CASES]
    assert per_question["numeric_accuracy"] == expected
    numeric = [e for e in expected if e is not None]
    assert counts == {"numeric_questions": len(numeric)}
    assert scores == {"numeric_accuracy": pytest.approx(sum(numeric) / len(numeric))}


def test_per_question_scores_in_one_call_equal_one_call_per_question(numeric_accuracy):
    answers = [a for a, _, _ in REFERENCE_CASES]
    references = [r for _, r, _ in REFERENCE_CASES]
    out = numeric_accuracy.compute(predictions=answers, references=references, per_question=True)
    one_by_one = [
        numeric_accuracy.compute(predictions=[a], references=[r])
        for a, r in zip(answers, references)
    ]
    expected = [o["numeric_accuracy"] if o["numeric_questions"] else None for o in one_by_one]
    assert out["per_question"] == {"numeric_accuracy": expected}


def test_score_names_are_known_before_any_model(numeric_accuracy):
    rouge = {"rouge1", "rouge2", "rougeL"}
    assert metrics.expected_scores(["numeric_accuracy"]) == {*rouge, "numeric_accuracy"}
    assert metrics.expected_scores(["bleu"]) is None  # a hub metric's names: once loaded
    assert metrics.score_names({"numeric_accuracy": numeric_accuracy}) == {
        *rouge, "numeric_accuracy"
    }  # fmt: skip


LENGTH_METRIC = """
import datasets
import evaluate


class AnswerLength(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="words per answer", citation="", inputs_description="",
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Value("string")}
            ),
        )

    def _compute(self, predictions, references):
        return {"answer_words": sum(len(p.split()) for p in predictions) / len(predictions)}
"""


def test_an_evaluate_metric_loads_from_a_local_path_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    folder = tmp_path / "answer_length"
    folder.mkdir()
    (folder / "answer_length.py").write_text(LENGTH_METRIC)
    module = metrics.load([str(folder)])[str(folder)]
    scores, counts, per_question = metrics.compute(module, ["one two", "three"], ["x", "y"])
    assert scores == {"answer_words": 1.5} and counts == {}
    assert per_question == {"answer_words": [2.0, 1.0]}  # one call per question
    assert metrics.score_names({"len": module}) == {"rouge1", "rouge2", "rougeL", "answer_words"}


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("./no/such/metric", "eval.metrics: no metric file or folder at ./no/such/metric"),
        ("nope.py", "eval.metrics: no metric file or folder at nope.py"),
    ],
)
def test_a_metric_that_is_not_there_is_a_one_line_error(name, message):
    with pytest.raises(MetricError, match="^" + message.replace(".", r"\.") + "$"):
        metrics.load([name])


def test_a_broken_metric_names_itself(tmp_path):
    folder = tmp_path / "broken"
    folder.mkdir()
    (folder / "broken.py").write_text("raise ImportError('needs a package you lack')\n")
    with pytest.raises(MetricError, match=r"cannot load '.*broken'.*needs a package you lack"):
        metrics.load([str(folder)])


def finqa(root: Path, *args: str) -> subprocess.CompletedProcess:
    """``python -m finqa_exp *args`` run by a user in ``root``."""
    return subprocess.run(
        [sys.executable, "-m", "finqa_exp", *args],
        cwd=root, capture_output=True, text=True, timeout=120,
        env={**os.environ, "FINQA_EXP_ROOT": str(root)},
    )  # fmt: skip


def test_the_trial_refuses_a_missing_metric_before_any_model_loads(tmp_path):
    proc = finqa(tmp_path, "eval.metrics=[./nope]", "tracking=none")
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip() == "error: eval.metrics: no metric file or folder at ./nope"
    assert not (tmp_path / ".cache").exists()  # no model built


def test_an_objective_that_is_not_logged_is_refused_before_any_model_loads(tmp_path):
    proc = finqa(tmp_path, "objective.metric=numeric_acuracy", "tracking=none")
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().startswith(
        "error: objective.metric=numeric_acuracy is not a metric a trial logs: the scores are "
        "['numeric_accuracy', 'rouge1', 'rouge2', 'rougeL']"
    )
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / ".cache").exists()  # no model built


def test_a_sweep_refuses_a_missing_metric_before_its_first_trial(tmp_path):
    proc = finqa(tmp_path, "-m", "eval.metrics=[./nope]", f"hydra.sweep.dir={tmp_path}/multirun")
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().endswith("error: eval.metrics: no metric file or folder at ./nope")
    assert not (tmp_path / "studies").exists()  # no study, so zero trials
