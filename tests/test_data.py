"""Unit tests for the data layer: reading, cleaning, prompts, split, tokenizing."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from finqa_exp import data as D
from finqa_exp.config import DataConfig
from finqa_exp.prompts import format_prompt, merge_instruction

TEMPLATE = DataConfig().prompt_template
ALPACA = {"instruction": "instruction", "input": "input", "output": "output"}


def rows(*triples):
    return [{"instruction": i, "input": c, "output": o} for i, c, o in triples]


def test_prompt_is_the_seed_format():
    assert format_prompt(TEMPLATE, "What is APR?") == "### Question: What is APR?\n\n### Answer: "


def test_instruction_and_input_are_merged():
    assert merge_instruction("Compute the yield.", "Price $80, dividend $2.") == (
        "Compute the yield.\nPrice $80, dividend $2."
    )
    assert merge_instruction("  What is a bond? ", "") == "What is a bond?"
    assert merge_instruction("What is a bond?", None) == "What is a bond?"


def test_clean_drops_unpaired_short_and_duplicate_rows():
    raw = rows(
        ("What is a stock?", "", "A share of ownership in a company."),
        ("what is a  STOCK?", "", "Duplicate question, differently spaced and cased."),
        ("What is a bond?", "", ""),  # no answer
        ("", "", "An answer without a question."),
        ("What is APR?", "", "Yearly rate."),  # too short
        ("Compute the yield.", "Price $80, dividend $2.", "Yield is 2 / 80 = 2.5%."),
        ("Compute the yield.", "Price $50, dividend $2.", "Yield is 2 / 50 = 4.0%."),
    )
    raw.append({"instruction": "What is a bond?", "output": None})
    raw.append({"instruction": float("nan"), "input": "", "output": "NaN question from pandas."})
    pairs, stats = D.clean(raw, ALPACA, min_answer_words=3)
    assert [p.question for p in pairs] == [
        "What is a stock?",
        "Compute the yield.\nPrice $80, dividend $2.",
        "Compute the yield.\nPrice $50, dividend $2.",
    ]
    assert (stats.rows, stats.unpaired, stats.short_answers, stats.duplicates, stats.kept) == (
        9,
        4,
        1,
        1,
        3,
    )


def pairs(n):
    return [D.QAPair(f"question {i}?", f"answer number {i} is here") for i in range(n)]


def test_split_is_deterministic_and_sized():
    train, test = D.split(pairs(50), test_size=0.1, seed=7)
    assert (len(train), len(test)) == (45, 5)
    assert not set(train) & set(test)
    assert D.split(pairs(50), 0.1, 7) == (train, test)
    assert D.split(pairs(50), 0.1, 8) != (train, test)


def test_split_takes_subset_then_count():
    # The seed recipe: 1,000 pairs, 900/100.
    train, test = D.split(pairs(1500), test_size=100, seed=42, subset_size=1000)
    assert (len(train), len(test)) == (900, 100)


def test_split_rejects_no_training_pairs():
    with pytest.raises(D.DataError, match="leaves no training pairs"):
        D.split(pairs(5), test_size=5, seed=0)


class CharTokenizer:
    """Stand-in tokenizer: one id per character, BOS=1, EOS=2."""

    bos_token_id, eos_token_id, pad_token_id = 1, 2, 0

    def __call__(self, text, add_special_tokens=True):
        ids = [ord(c) for c in text]
        return {"input_ids": ([self.bos_token_id] if add_special_tokens else []) + ids}


def test_labels_cover_answer_and_eos_only():
    pair = D.QAPair("Q?", "A.")
    ex = D.tokenize_pair(CharTokenizer(), TEMPLATE, pair, max_length=512)
    prompt = format_prompt(TEMPLATE, "Q?")
    n_prompt = 1 + len(prompt)
    assert ex["input_ids"] == [1, *map(ord, prompt), ord("A"), ord("."), 2]
    assert ex["labels"][:n_prompt] == [D.IGNORE_INDEX] * n_prompt
    assert ex["labels"][n_prompt:] == [ord("A"), ord("."), 2]
    assert ex["attention_mask"] == [1] * len(ex["input_ids"])


def test_truncation_keeps_prompt_and_drops_examples_without_answer_tokens():
    pair = D.QAPair("Q?", "A long answer that will not fit.")
    prompt_len = 1 + len(format_prompt(TEMPLATE, "Q?"))
    ex = D.tokenize_pair(CharTokenizer(), TEMPLATE, pair, max_length=prompt_len + 3)
    assert len(ex["input_ids"]) == len(ex["labels"]) == prompt_len + 3
    assert [x for x in ex["labels"] if x != D.IGNORE_INDEX] == [ord("A"), ord(" "), ord("l")]
    assert D.tokenize_pair(CharTokenizer(), TEMPLATE, pair, max_length=prompt_len) is None


def test_tokenize_is_reused_for_the_same_key():
    ps = pairs(4)
    first = D.tokenize(CharTokenizer(), TEMPLATE, ps, 512, key="k-test-reuse")
    again = D.tokenize(CharTokenizer(), TEMPLATE, pairs(2), 512, key="k-test-reuse")
    assert again is first and len(first) == 4


# ----------------------------------------------------------------------------- files

QA = [
    {"question": f"How does question {i} work?", "answer": f"It works by answering number {i}."}
    for i in range(20)
]


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv", ".parquet"])
def test_local_files_with_question_answer_columns(tmp_path, suffix):
    path = tmp_path / f"pairs{suffix}"
    frame = pd.DataFrame(QA)
    if suffix == ".jsonl":
        frame.to_json(path, orient="records", lines=True)
    elif suffix == ".json":
        path.write_text(json.dumps(QA))
    elif suffix == ".csv":
        frame.to_csv(path, index=False)
    else:
        frame.to_parquet(path)
    splits = D.load_splits(DataConfig(source="local", path=str(path), test_size=0.25))
    assert (len(splits.train), len(splits.test)) == (15, 5)
    assert {p.question for p in splits.train + splits.test} == {r["question"] for r in QA}


def test_column_mapping_from_config(tmp_path):
    path = tmp_path / "custom.csv"
    pd.DataFrame(
        {"q": ["What is a stock?"] * 2, "ctx": ["", "In the US."], "a": ["a b c d"] * 2}
    ).to_csv(path, index=False)
    cfg = DataConfig(source="local", path=str(path), test_size=1)
    cfg.columns.instruction, cfg.columns.input, cfg.columns.output = "q", "ctx", "a"
    splits = D.load_splits(cfg)
    assert sorted(p.question for p in splits.train + splits.test) == [
        "What is a stock?",
        "What is a stock?\nIn the US.",
    ]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "file not found"),
        ("", "file is empty"),
        ('{"instruction": "What is a stock?", "output": "A share of a comp', "not valid JSON"),
        ('{"q": "What?", "a": "Something long enough here."}\n', "missing column 'instruction'"),
    ],
)
def test_bad_files_name_the_problem(tmp_path, content, message):
    path = tmp_path / "bad.jsonl"
    if content is not None:
        path.write_text(content)
    with pytest.raises(D.DataError, match=message) as err:
        D.load_splits(DataConfig(source="local", path=str(path)))
    assert str(path) in str(err.value)


def test_unsupported_suffix(tmp_path):
    path = tmp_path / "pairs.xlsx"
    path.write_text("x")
    with pytest.raises(D.DataError, match=r"unsupported file type '\.xlsx'"):
        D.read_table(path)


def test_hub_source_calls_only_the_hub_loader(monkeypatch):
    calls = []

    def fake_hub(path, split):
        calls.append((path, split))
        return [
            {"instruction": f"Q{i}?", "input": "", "output": f"answer {i} is long"}
            for i in range(30)
        ]

    monkeypatch.setattr(D, "load_hub_rows", fake_hub)
    splits = D.load_splits(DataConfig(source="hub", path="gbharti/finance-alpaca", test_size=10))
    assert calls == [("gbharti/finance-alpaca", "train")]
    assert (len(splits.train), len(splits.test)) == (20, 10)


# ----------------------------------------------------------------------------- bundled set


def test_bundled_set_is_a_real_financial_qa_set():
    raw = D.read_table(D.bundled_path())
    assert all(set(r) == {"instruction", "input", "output"} for r in raw)
    pairs_, stats = D.clean(raw, ALPACA, min_answer_words=3)
    assert stats.kept >= 300 and stats.duplicates == 0
    text = " ".join(p.question + " " + p.answer for p in pairs_).lower()
    for topic in ("invest", "bank", "retire", "credit", "loan", "trad", "budget", "tax"):
        assert text.count(topic) >= 10, topic
    with_context = [r for r in raw if r["input"].strip()]
    assert len(with_context) >= 20
    assert sum("$" in p.answer and "=" in p.answer for p in pairs_) >= 30  # computed answers
