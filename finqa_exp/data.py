"""Financial Q&A data: load, clean, split and tokenize.

Sources (``conf/data``): the set bundled with the package (``data=finqa_sample``), a
datasets-hub id (``data=finance_alpaca``) or a local JSON, JSONL, CSV or Parquet file
(``data=local data.path=FILE``). Alpaca columns (instruction, input, output) are expected;
``data.columns.*`` maps others, and question/answer or prompt/response files are
recognised as they are::

    python -m finqa_exp data=local data.path=my_pairs.csv

Every check here runs before any model is loaded, and each failure is a DataError
whose message names the file and the problem.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar

from finqa_exp.config import DataConfig
from finqa_exp.errors import BadInput
from finqa_exp.prompts import format_prompt, merge_instruction

T = TypeVar("T")

IGNORE_INDEX = -100  # label value the loss skips (transformers' convention)

# Column names tried, in order, when the configured one is not in the file.
_ALIASES = {
    "instruction": ("instruction", "question", "prompt", "query"),
    "input": ("input", "context"),
    "output": ("output", "answer", "response", "completion"),
}
_READERS = {".jsonl": "jsonl", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


class DataError(BadInput, ValueError):
    """The data cannot be used; the message says which file and why."""


@dataclass(frozen=True)
class QAPair:
    question: str  # instruction and input merged
    answer: str


@dataclass
class CleanStats:
    rows: int = 0
    unpaired: int = 0
    short_answers: int = 0
    duplicates: int = 0
    kept: int = 0


@dataclass
class Splits:
    train: list[QAPair]
    test: list[QAPair]
    stats: CleanStats

    def fingerprint(self) -> str:
        """Stable id of the exact pairs in both splits (keys the caches)."""
        h = hashlib.sha256()
        for name, pairs in (("train", self.train), ("test", self.test)):
            h.update(name.encode())
            for p in pairs:
                h.update(p.question.encode() + b"\0" + p.answer.encode() + b"\1")
        return h.hexdigest()[:16]


def bundled_path() -> Path:
    """The financial Q&A set shipped with the package (alpaca JSONL, written by us)."""
    return Path(str(resources.files("finqa_exp") / "resources" / "finqa_sample.jsonl"))


# ----------------------------------------------------------------------------- loading


def read_table(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a local JSON, JSONL, CSV or Parquet file, or DataError naming what is wrong."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data.path: file not found: {path}")
    kind = _READERS.get(path.suffix.lower())
    if kind is None:
        raise DataError(
            f"data.path: unsupported file type '{path.suffix}' ({path}); "
            f"use one of {', '.join(sorted(_READERS))}"
        )
    if path.stat().st_size == 0:
        raise DataError(f"data.path: file is empty: {path}")
    try:
        rows = _read(path, kind)
    except DataError:
        raise
    except Exception as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise DataError(f"data.path: cannot read {path} as {kind}: {first}") from err
    if not rows:
        raise DataError(f"data.path: file has no rows: {path}")
    return rows


def _read(path: Path, kind: str) -> list[dict[str, Any]]:
    if kind == "jsonl":
        rows = []
        with path.open(encoding="utf-8") as f:
            for lineno, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as err:
                    raise DataError(
                        f"data.path: {path} line {lineno} is not valid JSON "
                        f"(truncated file?): {err.msg}"
                    ) from err
                if not isinstance(row, dict):
                    raise DataError(f"data.path: {path} line {lineno} is not a JSON object")
                rows.append(row)
        return rows
    if kind == "json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise DataError(
                f"data.path: {path} is not valid JSON (truncated file?): "
                f"{err.msg} at line {err.lineno}"
            ) from err
        if (
            isinstance(data, dict)
            and len(data) == 1
            and isinstance(next(iter(data.values())), list)
        ):
            data = next(iter(data.values()))  # {"data": [...]} style wrappers
        if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
            raise DataError(f"data.path: {path} must hold a list of objects")
        return data
    import pandas as pd

    frame = pd.read_csv(path) if kind == "csv" else pd.read_parquet(path)
    return frame.to_dict(orient="records")


def load_hub_rows(path: str, split: str) -> list[dict[str, Any]]:
    """Rows of a datasets-hub dataset. The only network call of the data layer."""
    import datasets

    return list(datasets.load_dataset(path, split=split))


def resolve_columns(columns: list[str], cfg: DataConfig, source: str) -> dict[str, str | None]:
    """Map our fields to the source's columns, trying known aliases; DataError if one is missing."""
    wanted = {
        "instruction": cfg.columns.instruction,
        "input": cfg.columns.input,
        "output": cfg.columns.output,
    }
    mapping: dict[str, str | None] = {}
    for fld, configured in wanted.items():
        if fld == "input" and configured is None:
            mapping[fld] = None
            continue
        candidates = (configured, *_ALIASES[fld])
        found = next((c for c in candidates if c in columns), None)
        if found is None and fld != "input":
            raise DataError(
                f"{source}: missing column '{configured}' for the {fld} "
                f"(columns: {', '.join(map(str, columns))}); set data.columns.{fld}=NAME"
            )
        mapping[fld] = found
    return mapping


def load_rows(cfg: DataConfig) -> tuple[list[dict[str, Any]], str]:
    """Raw rows and a label for messages, from the configured source."""
    if cfg.source == "bundled":
        path = Path(cfg.path) if cfg.path else bundled_path()
        return read_table(path), str(path)
    if cfg.source == "local":
        return read_table(cfg.path), str(cfg.path)
    return load_hub_rows(cfg.path, cfg.hub_split), f"hub dataset {cfg.path}"


# ----------------------------------------------------------------------------- cleaning


def _text(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return str(value).strip()


def clean(
    rows: list[dict[str, Any]], mapping: dict[str, str | None], min_answer_words: int
) -> tuple[list[QAPair], CleanStats]:
    """Q&A pairs without unpaired rows, too-short answers or repeated questions."""
    stats = CleanStats(rows=len(rows))
    seen: set[str] = set()
    pairs: list[QAPair] = []
    for row in rows:
        instruction = _text(row.get(mapping["instruction"]))
        context = _text(row.get(mapping["input"])) if mapping["input"] else ""
        answer = _text(row.get(mapping["output"]))
        if not instruction or not answer:
            stats.unpaired += 1
            continue
        if len(answer.split()) < min_answer_words:
            stats.short_answers += 1
            continue
        question = merge_instruction(instruction, context)
        key = " ".join(question.lower().split())
        if key in seen:
            stats.duplicates += 1
            continue
        seen.add(key)
        pairs.append(QAPair(question=question, answer=answer))
    stats.kept = len(pairs)
    return pairs, stats


def split(
    items: list[T],
    test_size: float,
    seed: int,
    subset_size: int | None = None,
    noun: str = "pairs",
) -> tuple[list[T], list[T]]:
    """Deterministic subset and train/test split of Q&A pairs (or a corpus's documents,
    ``noun``): the same seed gives the same split. ``test_size`` is a fraction or a count."""
    order = list(items)
    random.Random(seed).shuffle(order)
    if subset_size is not None:
        order = order[:subset_size]
    n_test = int(test_size) if test_size >= 1 else max(1, round(len(order) * test_size))
    if n_test >= len(order):
        raise DataError(
            f"data.test_size={test_size} leaves no training {noun} "
            f"({len(order)} {noun} after cleaning)"
        )
    return order[n_test:], order[:n_test]


def load_splits(cfg: DataConfig) -> Splits:
    """Load, clean and split the configured data. Raises DataError; loads no model."""
    rows, source = load_rows(cfg)
    columns = list(dict.fromkeys(k for row in rows[:1000] for k in row))
    mapping = resolve_columns(columns, cfg, source)
    pairs, stats = clean(rows, mapping, cfg.min_answer_words)
    if len(pairs) < 2:
        raise DataError(
            f"{source}: only {len(pairs)} usable pair(s) after cleaning "
            f"({stats.unpaired} unpaired, {stats.short_answers} short answers, "
            f"{stats.duplicates} duplicates of {stats.rows} rows)"
        )
    train, test = split(pairs, cfg.test_size, cfg.seed, cfg.subset_size)
    return Splits(train=train, test=test, stats=stats)


# ----------------------------------------------------------------------------- tokenizing


def tokenize_pair(
    tokenizer: Any, template: str, pair: QAPair, max_length: int
) -> dict[str, list[int]] | None:
    """Token ids of prompt + answer + EOS, with the loss on answer tokens only.

    Truncated at ``max_length``; None when not one answer token survives truncation.
    """
    prompt_ids = tokenizer(format_prompt(template, pair.question), add_special_tokens=True)[
        "input_ids"
    ]
    answer_ids = tokenizer(pair.answer, add_special_tokens=False)["input_ids"]
    answer_ids = [*answer_ids, tokenizer.eos_token_id]
    input_ids = (prompt_ids + answer_ids)[:max_length]
    labels = ([IGNORE_INDEX] * len(prompt_ids) + answer_ids)[:max_length]
    if all(label == IGNORE_INDEX for label in labels):
        return None
    return {"input_ids": input_ids, "attention_mask": [1] * len(input_ids), "labels": labels}


_TOKENIZED: dict[str, Any] = {}


def tokenize(tokenizer: Any, template: str, pairs: list[QAPair], max_length: int, key: str) -> Any:
    """A datasets.Dataset of tokenized pairs, built once per ``key`` in this process.

    The key must identify tokenizer, pairs, template and max length; trials of a sweep
    that run in one process reuse the result instead of tokenizing again.
    """
    if key in _TOKENIZED:
        return _TOKENIZED[key]
    import datasets

    rows = [r for p in pairs if (r := tokenize_pair(tokenizer, template, p, max_length))]
    if not rows:
        raise DataError("no example keeps an answer token within data.max_length")
    ds = datasets.Dataset.from_list(rows)
    _TOKENIZED[key] = ds
    return ds


def cache_key(*parts: Any) -> str:
    """Stable hash of the things a cache entry depends on (model, data, prompt, eval)."""
    blob = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
