"""``data``: where a trial's data comes from and how it becomes training examples
(conf/data/): Q&A pairs, or plain text for domain adaptation.

    python -m finqa_exp data=local data.path=my_pairs.csv
    python -m finqa_exp data=finance_text
    python -m finqa_exp data=text data.path=filings/
"""

from __future__ import annotations

from dataclasses import dataclass, field

from finqa_exp.config.checks import _require


@dataclass
class ColumnsConfig:
    """Which source columns hold the question, its optional context and the answer."""

    instruction: str = "instruction"
    input: str | None = "input"
    output: str = "output"


@dataclass
class DataConfig:
    """Where the data comes from and how it becomes training examples: Q&A pairs
    (``format: qa``), or plain text documents packed into blocks (``format: text``)."""

    name: str = "finqa_sample"
    format: str = "qa"
    # bundled: the set shipped in finqa_exp/resources; hub: a datasets hub id in `path`;
    # local: a file (JSON, JSONL, CSV or Parquet pairs; .txt, .md or .jsonl text) or, for
    # text, a folder of .txt/.md documents in `path`.
    source: str = "bundled"
    path: str | None = None
    hub_split: str = "train"
    columns: ColumnsConfig = field(default_factory=ColumnsConfig)
    text_column: str = "text"  # of a text .jsonl file or hub dataset
    prompt_template: str = "### Question: {question}\n\n### Answer: "
    subset_size: int | None = None
    test_size: float = 0.1
    seed: int = 42
    max_length: int = 512
    min_answer_words: int = 3

    def __post_init__(self) -> None:
        formats = ("qa", "text")
        _require(
            self.format in formats, f"data.format must be one of {formats}, got '{self.format}'"
        )
        sources = ("bundled", "hub", "local")
        _require(
            self.source in sources, f"data.source must be one of {sources}, got '{self.source}'"
        )
        if self.source in ("hub", "local"):
            _require(bool(self.path), f"data.path is required for data.source={self.source}")
        _require(
            "{question}" in self.prompt_template,
            f"data.prompt_template must contain '{{question}}', got {self.prompt_template!r}",
        )
        _require(
            self.format == "qa" or self.prompt_template == "{question}",
            "data.prompt_template must be '{question}' for data.format=text (a completion "
            f"continues the prompt as written; data=text sets it), got {self.prompt_template!r}",
        )
        _require(self.test_size > 0, f"data.test_size must be > 0, got {self.test_size}")
        if self.test_size >= 1:
            _require(
                float(self.test_size).is_integer(),
                "data.test_size must be a fraction in (0, 1) or a whole count, "
                f"got {self.test_size}",
            )
        if self.subset_size is not None:
            _require(
                self.subset_size >= 2, f"data.subset_size must be >= 2, got {self.subset_size}"
            )
        _require(self.max_length >= 16, f"data.max_length must be >= 16, got {self.max_length}")
        _require(
            self.min_answer_words >= 0,
            f"data.min_answer_words must be >= 0, got {self.min_answer_words}",
        )
