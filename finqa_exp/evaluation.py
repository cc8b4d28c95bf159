"""Evaluation: greedy answers to held-out questions, scored with ROUGE-1/2/L.

Answers are generated in batches, left-padded, longest prompts first, and decoded
from the new tokens only. Scores are rouge-score's F-measures averaged over the
test questions (``evaluate.load("rouge")`` would need the hub).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch

from finqa_exp.prompts import format_prompt

ROUGE_KEYS = ("rouge1", "rouge2", "rougeL")


def rouge(predictions: list[str], references: list[str]) -> dict[str, float]:
    """Mean ROUGE-1/2/L F1 of ``predictions`` against ``references`` (stemmed)."""
    from rouge_score import rouge_scorer

    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    if not references:
        raise ValueError("no references to score")
    scorer = rouge_scorer.RougeScorer(list(ROUGE_KEYS), use_stemmer=True)
    totals = dict.fromkeys(ROUGE_KEYS, 0.0)
    for pred, ref in zip(predictions, references):
        scores = scorer.score(ref, pred)
        for key in ROUGE_KEYS:
            totals[key] += scores[key].fmeasure
    return {key: totals[key] / len(references) for key in ROUGE_KEYS}


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


def score(
    model: Any,
    tokenizer: Any,
    template: str,
    questions: list[str],
    references: list[str],
    max_new_tokens: int,
    batch_size: int,
) -> tuple[dict[str, float], list[str]]:
    """ROUGE scores and the answers they were computed from."""
    answers = generate_answers(model, tokenizer, template, questions, max_new_tokens, batch_size)
    return rouge(answers, references), answers


def cache_key(*parts: Any) -> str:
    """Stable hash of the things a base score depends on (model, data, prompt, eval)."""
    blob = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def load_cached(cache_dir: str | Path, key: str) -> dict[str, Any] | None:
    path = Path(cache_dir) / "base_scores" / f"{key}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def save_cached(cache_dir: str | Path, key: str, record: dict[str, Any]) -> None:
    path = Path(cache_dir) / "base_scores" / f"{key}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{id(record)}.tmp")
    tmp.write_text(json.dumps(record, indent=1))
    tmp.replace(path)  # atomic: parallel workers read whole files only
