"""Plain financial text for domain adaptation: documents, a split by document, packed blocks.

Where Q&A data (finqa_exp/data.py) is pairs, a corpus is documents (filings, reports,
policies), as in the Llama-2 project we learn from::

    docs = read_documents("filings/")              # a folder of .txt/.md files
    docs = read_documents("notes.jsonl", "text")   # one document per line's text column
    train, test, stats = prepare(docs, test_size=0.1, seed=42, block_size=512)
    blocks = pack([tokenizer(d.text)["input_ids"] for d in train], 512, eos_id)

    splits = load_corpus(conf.data)                # the same, as a trial does it (data.format=text)

Empty and repeated documents are dropped, the held-out split is by document (no text of a
test document is trained on), and each split is tokenized once and packed into blocks of
``block_size`` tokens, with an end-of-text token after each document, so no compute goes
to padding and the loss covers every token. Every check here runs before any model loads
(the size check counts characters: a byte-level token is at least one character), and
each failure is a DataError naming the source and the problem.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from finqa_exp import data
from finqa_exp.config import DataConfig
from finqa_exp.data import DataError, load_hub_rows, read_table

TEXT_SUFFIXES = (".txt", ".md")
TABLE_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")  # one document per row
# The Llama-2 project's own example prompt: its completions showed the adaptation.
SEED_PROMPT = "The investment tests performed indicate"


@dataclass(frozen=True)
class Document:
    name: str  # file name, or file:line / hub:row
    text: str


@dataclass
class CorpusStats:
    documents: int = 0
    empty: int = 0
    duplicates: int = 0
    kept: int = 0


@dataclass
class TextSplits:
    """A corpus split by document (data.Splits' counterpart for ``data.format=text``)."""

    train: list[Document]
    test: list[Document]
    stats: CorpusStats
    source: str

    def fingerprint(self) -> str:
        """Stable id of the exact documents in both splits (keys the caches)."""
        h = hashlib.sha256()
        for name, docs in (("train", self.train), ("test", self.test)):
            h.update(name.encode())
            for d in docs:
                h.update(d.text.encode() + b"\1")
        return h.hexdigest()[:16]


def bundled_corpus() -> Path:
    """The financial text corpus shipped with the package (Markdown, written by us)."""
    return Path(str(resources.files("finqa_exp") / "resources" / "finance_text"))


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"data.path: cannot read {path} as UTF-8 text: {err}") from err


def _from_rows(rows: list[dict[str, Any]], column: str, source: str) -> list[Document]:
    columns = list(dict.fromkeys(k for row in rows[:1000] for k in row))
    if column not in columns:
        raise DataError(
            f"{source}: no text column '{column}' (columns: {', '.join(columns)}); "
            f"set data.text_column"
        )
    return [Document(f"{source}:{i + 1}", str(r.get(column) or "")) for i, r in enumerate(rows)]


def read_documents(path: str | Path, text_column: str = "text") -> list[Document]:
    """The documents of a folder (each .txt/.md file one document, in name order), a table
    (each row's ``text_column`` of a .jsonl, .json, .csv or .parquet file), or a single
    .txt/.md file (each paragraph, separated by a blank line, one document)."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix.lower() in TEXT_SUFFIXES)
        if not files:
            raise DataError(f"data.path: no .txt or .md files in {path}")
        return [Document(str(p.relative_to(path)), _read_text(p)) for p in files]
    if not path.is_file():
        raise DataError(f"data.path: file not found: {path}")
    if path.suffix.lower() in TABLE_SUFFIXES:
        return _from_rows(read_table(path), text_column, str(path))
    if path.suffix.lower() not in TEXT_SUFFIXES:
        raise DataError(
            f"data.path: unsupported file type '{path.suffix}' ({path}) for text data; "
            f"use a folder, .txt, .md, or a table ({', '.join(TABLE_SUFFIXES)})"
        )
    paragraphs = _read_text(path).split("\n\n")
    return [Document(f"{path.name}:{i + 1}", p) for i, p in enumerate(paragraphs)]


def hub_documents(repo: str, split: str, text_column: str) -> list[Document]:
    """The documents of a hub dataset's text column."""
    return _from_rows(load_hub_rows(repo, split), text_column, f"hub dataset {repo}")


def clean(docs: list[Document]) -> tuple[list[Document], CorpusStats]:
    """Documents without the empty ones and without repeats (whitespace and case aside)."""
    stats = CorpusStats(documents=len(docs))
    seen: set[str] = set()
    kept = []
    for doc in docs:
        text = doc.text.strip()
        if not text:
            stats.empty += 1
            continue
        key = hashlib.sha256(" ".join(text.lower().split()).encode()).hexdigest()
        if key in seen:
            stats.duplicates += 1
            continue
        seen.add(key)
        kept.append(Document(doc.name, text))
    stats.kept = len(kept)
    return kept, stats


def split(
    docs: list[Document], test_size: float, seed: int, subset_size: int | None = None
) -> tuple[list[Document], list[Document]]:
    """A deterministic split by document: ``test_size`` a fraction or a count of them
    (of ``subset_size`` documents drawn first, if given)."""
    return data.split(docs, test_size, seed, subset_size, noun="documents")


def prepare(
    docs: list[Document],
    test_size: float,
    seed: int,
    block_size: int,
    source: str = "corpus",
    subset_size: int | None = None,
) -> tuple[list[Document], list[Document], CorpusStats]:
    """Clean, split by document and check that the training split fills a block."""
    kept, stats = clean(docs)
    if len(kept) < 2:
        raise DataError(
            f"{source}: only {len(kept)} usable document(s) after cleaning "
            f"({stats.empty} empty, {stats.duplicates} duplicates of {stats.documents})"
        )
    train, test = split(kept, test_size, seed, subset_size)
    chars = sum(len(d.text) + 1 for d in train)
    if chars < block_size:
        raise DataError(
            f"{source}: the training documents hold {chars} characters, fewer than one "
            f"block of data.max_length={block_size} tokens"
        )
    return train, test, stats


def pack(token_ids: list[list[int]], block_size: int, eos_id: int) -> list[list[int]]:
    """One split's documents as consecutive blocks of ``block_size`` tokens: each document's
    tokens, then ``eos_id``, end to end. Every token is in exactly one block, in order;
    the last block holds the remainder and may be shorter."""
    stream = [t for ids in token_ids for t in (*ids, eos_id)]
    return [stream[i : i + block_size] for i in range(0, len(stream), block_size)]


def load_corpus(cfg: DataConfig) -> TextSplits:
    """Read, clean and split the configured text (``data.format=text``). Raises DataError;
    loads no model."""
    if cfg.source == "hub":
        assert cfg.path is not None
        docs, source = hub_documents(cfg.path, cfg.hub_split, cfg.text_column), cfg.path
    else:
        path = Path(cfg.path) if cfg.path else bundled_corpus()
        docs, source = read_documents(path, cfg.text_column), str(path)
    train, test, stats = prepare(
        docs, cfg.test_size, cfg.seed, cfg.max_length, source, cfg.subset_size
    )
    return TextSplits(train, test, stats, source)


_BLOCKS: dict[str, Any] = {}


def document_tokens(tokenizer: Any, docs: list[Document]) -> list[list[int]]:
    """Each document's token ids as the tokenizer starts a text (Llama: with BOS), as a
    prompt is at generation; :func:`pack` ends each with EOS."""
    return [tokenizer(d.text)["input_ids"] for d in docs]


def scored_ids(tokenizer: Any) -> set[int]:
    """Token ids a packed block's loss and perplexity leave out: the BOS that opens each
    document is a format marker, always predictable after the EOS before it, not text."""
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    return {bos} if bos is not None and bos != eos else set()


def blocks_dataset(tokenizer: Any, docs: list[Document], block_size: int, key: str) -> Any:
    """A datasets.Dataset of one split's packed blocks, labels = input_ids (the loss covers
    every token but BOS markers); built once per ``key`` in this process, like
    data.tokenize."""
    if key in _BLOCKS:
        return _BLOCKS[key]
    import datasets

    blocks = pack(document_tokens(tokenizer, docs), block_size, tokenizer.eos_token_id)
    skip = scored_ids(tokenizer)
    rows = [
        {
            "input_ids": b,
            "attention_mask": [1] * len(b),
            "labels": [data.IGNORE_INDEX if t in skip else t for t in b],
        }
        for b in blocks
    ]
    _BLOCKS[key] = ds = datasets.Dataset.from_list(rows)
    return ds


def block_documents(lengths: list[int], block_size: int) -> list[list[int]]:
    """For blocks packed (:func:`pack`) from documents of ``lengths`` tokens each, EOS
    included: the index of the document every position of every block belongs to."""
    stream = [i for i, n in enumerate(lengths) for _ in range(n)]
    return [stream[i : i + block_size] for i in range(0, len(stream), block_size)]


def probe_prompts(
    test: list[Document], probes: list[str] | None, count: int, words: int
) -> list[tuple[str, str]]:
    """(prompt, what the document says next) pairs to complete: ``probes`` as given (no
    reference), or ``count`` of them: SEED_PROMPT, then the first ``words`` words of
    held-out documents."""
    if probes is not None:
        return [(p, "") for p in probes]
    pairs = [(SEED_PROMPT, "")]
    for doc in test[: max(count - 1, 0)]:
        lines = doc.text.splitlines()
        while lines and (not lines[0].strip() or lines[0].startswith("#")):
            lines.pop(0)  # a Markdown title is not how the prose opens
        split = " ".join(lines).split() or doc.text.split()
        pairs.append((" ".join(split[:words]), " ".join(split[words : words + 60])))
    return pairs[:count]
