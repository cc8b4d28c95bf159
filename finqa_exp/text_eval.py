"""Scoring a text (domain adaptation) trial: held-out perplexity and completion probes,
for the base and the tuned model (``data.format=text``; finqa_exp/corpus.py).

Perplexity is exp of the mean next-token negative log-likelihood over the held-out
split's packed blocks (BOS markers aside), with a bootstrap interval over the held-out
documents. Probes are greedy
completions of prompts (by default the opening words of held-out documents and the
Llama-2 project's own example), shown base beside tuned, as that project showed them.
ROUGE and ``eval.metrics`` need reference answers, which text has not: they are skipped,
and the run says so (``scores_skipped``).
"""

from __future__ import annotations

import json
import logging
import math
import os
import uuid
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from finqa_exp import corpus, stats
from finqa_exp.config import EvalConfig, FinqaConfig
from finqa_exp.data import cache_key
from finqa_exp.evaluation import generate_answers
from finqa_exp.modeling import Base
from finqa_exp.tracking import names

log = logging.getLogger(__name__)

SCORE = names.PERPLEXITY
CACHE_FORMAT = 2  # of the cached base scores: 2 sums by document, without BOS markers
NLL_BATCH = 4  # blocks scored at a time


@torch.no_grad()
def token_nll(model: Any, blocks: list[list[int]], batch_size: int = 4) -> list[list[float]]:
    """Per block, the negative log-likelihood of each token that has one before it in its
    block (positions 1 to the end). Blocks of unequal length are padded per batch and the
    padding is left out, so the batch size does not change the result."""
    import torch.nn.functional as F

    was_training = model.training
    model.eval()  # no dropout in a score
    device = next(model.parameters()).device
    out: list[list[float]] = []
    for start in range(0, len(blocks), batch_size):
        batch = blocks[start : start + batch_size]
        width = max(len(b) for b in batch)
        ids = torch.zeros(len(batch), width, dtype=torch.long)
        mask = torch.zeros(len(batch), width, dtype=torch.long)
        for row, block in enumerate(batch):
            ids[row, : len(block)] = torch.tensor(block)
            mask[row, : len(block)] = 1
        ids, mask = ids.to(device), mask.to(device)
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
        nll = F.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none").cpu()
        out += [nll[row, : len(block) - 1].tolist() for row, block in enumerate(batch)]
    if was_training:
        model.train()
    return out


def grouped_nll(
    blocks: list[list[int]],
    nll: list[list[float]],
    groups: list[list[int]],
    n_groups: int,
    skip: set[int] = frozenset(),  # type: ignore[assignment]
) -> tuple[list[float], list[int]]:
    """Summed NLL and scored tokens per group (a held-out document): each scored token
    counts for the group of its position (``groups``, as corpus.block_documents gives);
    tokens in ``skip`` (corpus.scored_ids) are left out."""
    sums, counts = [0.0] * n_groups, [0] * n_groups
    for block, values, owners in zip(blocks, nll, groups):
        for t in range(1, len(block)):
            if block[t] not in skip:
                sums[owners[t]] += values[t - 1]
                counts[owners[t]] += 1
    return sums, counts


def perplexity(model: Any, blocks: list[list[int]], batch_size: int = 4) -> tuple[float, int]:
    """Held-out perplexity of packed token ``blocks`` and the number of tokens it was
    computed on: exp of the mean negative log-likelihood of every token that has one
    before it in its block."""
    values = [v for block in token_nll(model, blocks, batch_size) for v in block]
    if not values:
        raise ValueError("perplexity needs a block of at least 2 tokens")
    return math.exp(sum(values) / len(values)), len(values)


@dataclass
class TextScores:
    """A model's perplexity on the held-out documents (per document too) and its
    completions."""

    scores: dict[str, float]  # {"perplexity": ...}, as Answers.scores
    nll: list[float]  # per held-out document: summed over its scored tokens
    tokens: list[int]  # per held-out document: its scored tokens
    completions: list[str]


@dataclass
class TextEvaluator:
    """How a text trial scores a model: evaluation.Evaluator's counterpart."""

    ev: EvalConfig
    probes: list[tuple[str, str]]  # (prompt, what the held-out document says next)
    test: list[corpus.Document]
    block_size: int
    # What the run records for not computing ROUGE and eval.metrics.
    skipped = "rouge and eval.metrics: text data has no reference answers"

    @classmethod
    def from_config(cls, conf: FinqaConfig, splits: corpus.TextSplits) -> TextEvaluator:
        ev = conf.eval
        probes = corpus.probe_prompts(splits.test, ev.probes, ev.num_samples, ev.probe_words)
        return cls(ev, probes, splits.test, conf.data.max_length)

    def score_names(self) -> set[str]:
        return {SCORE}

    def score_tuned(self, model: Any, base: Base) -> TextScores:
        """Perplexity of ``model`` on the base's held-out blocks, summed by document (the
        unit its intervals resample: blocks of one document are not independent), and
        its completions of the probes."""
        blocks = list(base.eval_ds["input_ids"])
        lengths = [len(ids) + 1 for ids in corpus.document_tokens(base.tokenizer, self.test)]
        groups = corpus.block_documents(lengths, self.block_size)
        assert [len(g) for g in groups] == [len(b) for b in blocks], "blocks out of step"
        # A few blocks at a time: full-vocabulary logits of a 7B model take GBs at 16.
        per_token = token_nll(model, blocks, NLL_BATCH)
        skip = corpus.scored_ids(base.tokenizer)
        nll, tokens = grouped_nll(blocks, per_token, groups, len(lengths), skip)
        completions = generate_answers(
            model, base.tokenizer, "{question}", [p for p, _ in self.probes],
            self.ev.max_new_tokens, self.ev.batch_size,
        )  # fmt: skip
        ppl = math.exp(sum(nll) / sum(tokens))
        return TextScores({SCORE: ppl}, nll, tokens, completions)

    def score_base(
        self, conf: FinqaConfig, base: Base, timed: Callable[[], AbstractContextManager]
    ) -> TextScores:
        """The base model's scores: computed (inside ``timed()``) once for a model,
        quantization, corpus, block size and probes, then read from the cache."""
        key = cache_key(
            CACHE_FORMAT, base.source, conf.model.revision, asdict(conf.quant), base.data_key,
            self.probes, self.ev.max_new_tokens, self.ev.batch_size, str(base.device.type),
        )  # fmt: skip
        path = Path(conf.paths.cache_dir) / "base_perplexity" / f"{key}.json"
        if path.is_file():
            return TextScores(**json.loads(path.read_text()))
        log.info("scoring the base model on %d held-out blocks", len(base.eval_ds))
        with timed():
            scores = self.score_tuned(base.model, base)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.{uuid.uuid4().hex}.tmp")
        tmp.write_text(json.dumps(asdict(scores)))
        tmp.replace(path)  # atomic: parallel workers read whole files only
        return scores

    def metrics(self, before: TextScores, after: TextScores) -> dict[str, float]:
        """Perplexity of both models, its change, and their bootstrap intervals over the
        held-out documents."""
        ev = self.ev
        low, high = stats.perplexity_interval(
            after.nll, after.tokens, None, ev.bootstrap_resamples, ev.ci_level
        )
        d_low, d_high = stats.perplexity_interval(
            after.nll, after.tokens, before.nll, ev.bootstrap_resamples, ev.ci_level
        )
        return {
            SCORE: after.scores[SCORE],
            f"base_{SCORE}": before.scores[SCORE],
            f"delta_{SCORE}": after.scores[SCORE] - before.scores[SCORE],
            f"{SCORE}_ci_low": low,
            f"{SCORE}_ci_high": high,
            f"delta_{SCORE}_ci_low": d_low,
            f"delta_{SCORE}_ci_high": d_high,
            "perplexity_tokens": float(sum(after.tokens)),
        }

    def samples(self, before: TextScores, after: TextScores) -> list[dict[str, str]]:
        """One row per probe: the prompt, what the held-out document says next (empty for
        a prompt of one's own), and the base and tuned completions."""
        return [
            {"prompt": p, "held_out_text": ref, "base_completion": b, "tuned_completion": t}
            for (p, ref), b, t in zip(self.probes, before.completions, after.completions)
        ]

    def tables(self, before: TextScores, after: TextScores) -> dict[str, list[dict[str, Any]]]:
        """Every held-out document's scored tokens and summed NLL for base and tuned
        (scores.json): the perplexities, their intervals, and the report's leads between
        trials are recomputed from them."""
        rows = [
            {"document": d.name, "tokens": n, "base_nll": b, "tuned_nll": t}
            for d, n, b, t in zip(self.test, after.tokens, before.nll, after.nll)
        ]
        return {names.SCORES_ARTIFACT: rows}
