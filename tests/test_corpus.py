"""Plain-text corpora: reading documents, cleaning, the split by document, packing."""

from __future__ import annotations

import json

import pytest

from finqa_exp import corpus
from finqa_exp.corpus import DataError, Document
from finqa_exp.data import bundled_path, read_table


def docs(*texts):
    return [Document(f"d{i}", t) for i, t in enumerate(texts)]


def test_the_bundled_corpus_is_prose_of_its_own():
    found = corpus.read_documents(corpus.bundled_corpus())
    kept, stats = corpus.clean(found)
    assert len(kept) == len(found) >= 50 and stats.duplicates == stats.empty == 0
    paragraphs = [p for d in kept for p in d.text.split("\n\n")[1:]]  # the title aside
    assert len(paragraphs) >= 250
    assert any("The investment tests performed indicate" in d.text for d in kept)

    # Distinct from the Q&A answers the tiny base is pre-trained on: no 12-word run shared.
    def runs(text):
        words = text.lower().split()
        return {" ".join(words[i : i + 12]) for i in range(len(words) - 11)}

    answers = set().union(*(runs(r["output"]) for r in read_table(bundled_path())))
    assert not any(runs(p) & answers for p in paragraphs)


def test_documents_from_a_folder_a_text_file_and_jsonl(tmp_path):
    folder = tmp_path / "filings"
    (folder / "sub").mkdir(parents=True)
    (folder / "b.md").write_text("# B\n\nsecond")
    (folder / "sub" / "a.txt").write_text("first")
    (folder / "notes.csv").write_text("ignored")
    assert [(d.name, d.text) for d in corpus.read_documents(folder)] == [
        ("b.md", "# B\n\nsecond"), ("sub/a.txt", "first"),
    ]  # fmt: skip
    single = tmp_path / "report.txt"
    single.write_text("one para\nstill one\n\ntwo\n\n\nthree")
    assert [d.text.strip() for d in corpus.read_documents(single)] == [
        "one para\nstill one", "two", "three",
    ]  # fmt: skip
    lines = tmp_path / "docs.jsonl"
    lines.write_text("\n".join(json.dumps({"body": t, "id": i}) for i, t in enumerate("xy")))
    assert [d.text for d in corpus.read_documents(lines, "body")] == ["x", "y"]


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        (None, None, "no .txt or .md files in"),
        ("missing.txt", None, "file not found"),
        ("a.pdf", b"%PDF", "unsupported file type '.pdf'"),
        ("a.jsonl", b'{"body": "x"}', "no text column 'text'"),
        ("e.jsonl", b"", "file is empty"),
        ("bad.txt", b"\xff\xfe\xfa", "cannot read"),
    ],
)
def test_unusable_sources_are_one_line_errors(tmp_path, name, content, message):
    path = tmp_path / name if name else tmp_path
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(DataError, match=message) as err:
        corpus.read_documents(path)
    assert "\n" not in str(err.value)


def test_empty_and_repeated_documents_are_dropped():
    kept, stats = corpus.clean(docs("A bond.", "  ", "a  BOND.", "A stock.", ""))
    assert [d.text for d in kept] == ["A bond.", "A stock."]
    assert (stats.documents, stats.empty, stats.duplicates, stats.kept) == (5, 2, 1, 2)


def test_the_split_is_by_document_and_the_same_for_the_same_seed():
    all_docs = docs(*(f"document {i}" for i in range(20)))
    train, test = corpus.split(all_docs, 0.2, seed=7)
    assert len(test) == 4 and not {d.name for d in train} & {d.name for d in test}
    assert sorted(d.name for d in train + test) == sorted(d.name for d in all_docs)
    assert corpus.split(all_docs, 0.2, seed=7) == (train, test)
    assert corpus.split(all_docs, 0.2, seed=8) != (train, test)


def test_too_little_text_is_refused_before_any_model_loads():
    with pytest.raises(DataError, match=r"only 1 usable document\(s\) after cleaning"):
        corpus.prepare(docs("one", "", "ONE"), 0.5, 0, 16)
    with pytest.raises(DataError, match=r"fewer than one block of data\.max_length=512 tokens"):
        corpus.prepare(docs("short text", "another", "a third"), 1, 0, 512)
    with pytest.raises(DataError, match="leaves no training documents"):
        corpus.prepare(docs("a", "b"), 2, 0, 1)


@pytest.mark.parametrize("block", [1, 3, 7, 64])
def test_packing_loses_and_repeats_no_token_and_no_block_crosses_the_split(block):
    # Each document's token ids are its own (doc i: i*100 + j), so a block shows its origin.
    ids = {i: [i * 100 + j for j in range(1, 2 + (i * 7) % 11)] for i in range(12)}
    eos = 0
    train_docs, test_docs = corpus.split(docs(*(str(i) for i in ids)), 0.25, seed=1)
    packed = {}
    for name, part in (("train", train_docs), ("test", test_docs)):
        tokens = [ids[int(d.text)] for d in part]
        blocks = corpus.pack(tokens, block, eos)
        assert all(len(b) == block for b in blocks[:-1]) and 0 < len(blocks[-1]) <= block
        assert [t for b in blocks for t in b] == [t for d in tokens for t in (*d, eos)]
        packed[name] = {t // 100 for b in blocks for t in b if t != eos}
    assert packed["train"] == {int(d.text) for d in train_docs}
    assert not packed["train"] & packed["test"]
