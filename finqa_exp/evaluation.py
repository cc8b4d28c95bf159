"""Evaluation: greedy answers to held-out questions, scored per question and as a whole.

Answers are generated in batches, left-padded, longest prompts first, and decoded
from the new tokens only. ROUGE-1/2/L are rouge-score's F-measures averaged over the
test questions (``evaluate.load("rouge")`` would need the hub); ``eval.metrics`` adds
``evaluate`` modules (finqa_exp/metrics). Every score is kept per question too, for the
per-question table and the paired bootstrap intervals (finqa_exp/stats.py).
"""

from __future__ import annotations

import json
import logging
import os
import uuid
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from finqa_exp import metrics as metrics_lib
from finqa_exp import stats
from finqa_exp.config import EvalConfig, FinqaConfig
from finqa_exp.data import QAPair, cache_key
from finqa_exp.modeling import Base
from finqa_exp.prompts import format_prompt
from finqa_exp.tracking import names

log = logging.getLogger(__name__)

ROUGE_KEYS = metrics_lib.ROUGE_KEYS
CACHE_FORMAT = 2  # of the cached base answers: 2 added per-question scores and counts


def rouge_per_question(predictions: list[str], references: list[str]) -> dict[str, list[float]]:
    """ROUGE-1/2/L F1 of each prediction against its reference (stemmed)."""
    from rouge_score import rouge_scorer

    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    if not references:
        raise ValueError("no references to score")
    scorer = rouge_scorer.RougeScorer(list(ROUGE_KEYS), use_stemmer=True)
    per_question: dict[str, list[float]] = {key: [] for key in ROUGE_KEYS}
    for pred, ref in zip(predictions, references):
        scores = scorer.score(ref, pred)
        for key in ROUGE_KEYS:
            per_question[key].append(scores[key].fmeasure)
    return per_question


def rouge(predictions: list[str], references: list[str]) -> dict[str, float]:
    """Mean ROUGE-1/2/L F1 of ``predictions`` against ``references`` (stemmed)."""
    per_question = rouge_per_question(predictions, references)
    return {key: _mean(values) for key, values in per_question.items()}


def _mean(values: list[float]) -> float:
    total = 0.0
    for v in values:  # summed in question order: the same float as summing as we go
        total += v
    return total / len(values)


@torch.inference_mode()
def generate_answers(
    model: Any,
    tokenizer: Any,
    template: str,
    questions: list[str],
    max_new_tokens: int,
    batch_size: int,
) -> list[str]:
    """Greedy answers, in the order of ``questions``."""
    prompts = [format_prompt(template, q) for q in questions]
    encoded = [tokenizer(p, add_special_tokens=True)["input_ids"] for p in prompts]
    # Longest first: similar lengths share a batch (less padding), and an out-of-memory
    # error, if any, comes on the first batch.
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
    answers: list[str] = [""] * len(encoded)
    was_training = model.training
    model.eval()
    dev = next(p.device for p in model.parameters())
    pad_id = tokenizer.pad_token_id
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        width = max(len(encoded[i]) for i in idx)
        ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for row, i in enumerate(idx):  # left padding: every prompt ends where answers start
            seq = encoded[i]
            ids[row, width - len(seq) :] = torch.tensor(seq)
            mask[row, width - len(seq) :] = 1
        out = model.generate(
            input_ids=ids.to(dev),
            attention_mask=mask.to(dev),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            num_beams=1,
            pad_token_id=pad_id,
            eos_token_id=tokenizer.eos_token_id,
            use_cache=True,
        )
        for row, i in enumerate(idx):
            answers[i] = tokenizer.decode(out[row, width:], skip_special_tokens=True).strip()
    if was_training:
        model.train()
    return answers


@dataclass
class Answers:
    """Greedy answers to the test questions, and their scores: over all questions, per
    question (None where a question does not count) and counts (``numeric_questions``)."""

    scores: dict[str, float]
    answers: list[str]
    per_question: dict[str, list[float | None]] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)


@dataclass
class Evaluator:
    """How a trial scores a model on Q&A data: its test questions, prompt, eval settings
    and ``evaluate`` metrics (finqa_exp/text_eval.py's TextEvaluator is the text one).

    A trial calls ``score_base``, ``score_tuned``, then ``metrics``, ``samples`` and
    ``tables`` on the two results."""

    template: str
    ev: EvalConfig
    metrics_modules: dict[str, Any]  # evaluate modules by name (finqa_exp/metrics)
    test: list[QAPair] = field(default_factory=list)
    skipped = None  # no score is left out

    @classmethod
    def from_config(cls, conf: FinqaConfig, test: list[QAPair] | None = None) -> Evaluator:
        """Loads ``eval.metrics`` (MetricError before any model loads if one cannot be);
        scores the first ``eval.max_questions`` of ``test``."""
        test = (test or [])[: conf.eval.max_questions or None]
        modules = metrics_lib.load(conf.eval.metrics)
        return cls(conf.data.prompt_template, conf.eval, modules, test)

    def score_names(self) -> set[str]:
        """Every score this evaluator logs (ROUGE and the metrics' float outputs)."""
        return metrics_lib.score_names(self.metrics_modules)

    def score_base(
        self, conf: FinqaConfig, base: Base, timed: Callable[[], AbstractContextManager]
    ) -> Answers:
        """The base model's answers to the test questions, scored (cached: base_answers)."""
        return base_answers(self, conf, base, self.test, timed)

    def score_tuned(self, model: Any, base: Base) -> Answers:
        """``model``'s answers to the test questions, scored."""
        return self.answer(model, base.tokenizer, self.test)

    def metrics(self, before: Answers, after: Answers) -> dict[str, float]:
        """The tuned scores and counts, the base's (``base_<k>``), the change
        (``delta_<k>``) and the bootstrap intervals of both."""
        return {
            **after.scores,
            **{k: float(v) for k, v in after.counts.items()},
            **{f"base_{k}": v for k, v in before.scores.items()},
            **{f"delta_{k}": after.scores[k] - before.scores[k] for k in after.scores},
            **intervals(before, after, self.ev),
        }

    def samples(self, before: Answers, after: Answers) -> list[dict[str, str]]:
        return sample_rows(self.test, before, after)

    def tables(self, before: Answers, after: Answers) -> dict[str, list[dict[str, Any]]]:
        """The per-question scores of both models (names.SCORES_ARTIFACT)."""
        return {names.SCORES_ARTIFACT: score_table(self.test, before, after)}

    def answer(self, model: Any, tokenizer: Any, test: list[QAPair]) -> Answers:
        """The model's greedy answers to ``test``, scored."""
        questions = [p.question for p in test]
        answers = generate_answers(
            model, tokenizer, self.template, questions, self.ev.max_new_tokens, self.ev.batch_size
        )
        return self.score(answers, [p.answer for p in test])

    def score(self, answers: list[str], references: list[str]) -> Answers:
        """ROUGE and every metric of ``eval.metrics``, over all answers and per question."""
        rouge_scores = rouge_per_question(answers, references)
        result = Answers({k: _mean(v) for k, v in rouge_scores.items()}, answers)
        result.per_question.update(rouge_scores)
        for module in self.metrics_modules.values():
            scores, counts, per_question = metrics_lib.compute(module, answers, references)
            result.scores.update(scores)
            result.counts.update(counts)
            result.per_question.update(per_question)
        return result


def intervals(before: Answers, after: Answers, ev: EvalConfig) -> dict[str, float]:
    """Paired bootstrap intervals over the test questions, for each score: of the tuned
    mean (``<k>_ci_low``/``_high``) and of tuned minus base (``delta_<k>_ci_low``/``_high``)."""
    out = {}
    for key, tuned in after.per_question.items():
        base = before.per_question.get(key)
        spans = {key: stats.paired(tuned)}
        if base is not None:
            spans[f"delta_{key}"] = stats.paired(tuned, base)
        for name, diffs in spans.items():
            low, high = stats.bootstrap_interval(diffs, ev.bootstrap_resamples, ev.ci_level)
            out[f"{name}_ci_low"], out[f"{name}_ci_high"] = low, high
    return out


def score_table(test: list[QAPair], before: Answers, after: Answers) -> list[dict[str, Any]]:
    """One row per scored question: question, reference, both answers and every score of
    both models (``base_<k>``, ``tuned_<k>``)."""
    rows = []
    for i, pair in enumerate(test):
        row: dict[str, Any] = {
            "question": pair.question,
            "reference": pair.answer,
            "base_answer": before.answers[i],
            "tuned_answer": after.answers[i],
        }
        for key in after.per_question:
            row[f"base_{key}"] = before.per_question.get(key, [None] * len(test))[i]
            row[f"tuned_{key}"] = after.per_question[key][i]
        rows.append(row)
    return rows


def sample_rows(test: list[QAPair], before: Answers, after: Answers) -> list[dict[str, str]]:
    """One row per question: the reference, the base model's and the tuned model's answer."""
    return [
        {"question": p.question, "reference": p.answer, "base_answer": b, "tuned_answer": t}
        for p, b, t in zip(test, before.answers, after.answers)
    ]


def format_scores(scores: dict[str, float]) -> str:
    return " ".join(f"{k}={v:.4f}" for k, v in scores.items())


def load_cached(cache_dir: str | Path, key: str) -> Answers | None:
    """The base model's answers saved under ``key`` by an earlier trial, if any."""
    path = Path(cache_dir) / "base_scores" / f"{key}.json"
    if not path.is_file():
        return None
    record = json.loads(path.read_text())
    return Answers(record["scores"], record["answers"], record["per_question"], record["counts"])


def save_cached(cache_dir: str | Path, key: str, answers: Answers) -> None:
    path = Path(cache_dir) / "base_scores" / f"{key}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.{uuid.uuid4().hex}.tmp")
    tmp.write_text(json.dumps(asdict(answers), indent=1))
    tmp.replace(path)  # atomic: parallel workers read whole files only


def base_answers(
    evaluator: Evaluator,
    conf: FinqaConfig,
    base: Base,
    test: list[QAPair],
    timed: Callable[[], AbstractContextManager],
) -> Answers:
    """The base model's answers and scores: generated (inside ``timed()``) once for a model,
    quantization, data, prompt and eval settings, then read from the cache by every later
    trial."""
    key = cache_key(
        CACHE_FORMAT, base.source, conf.model.revision, asdict(conf.quant), base.data_key,
        conf.eval.max_new_tokens, conf.eval.max_questions, str(base.device.type),
        sorted(conf.eval.metrics),
    )  # fmt: skip
    answers = load_cached(conf.paths.cache_dir, key)
    if answers is None:
        log.info("scoring the base model on %d test questions", len(test))
        with timed():
            answers = evaluator.answer(base.model, base.tokenizer, test)
        save_cached(conf.paths.cache_dir, key, answers)
    return answers
