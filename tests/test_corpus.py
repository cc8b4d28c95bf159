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


def test_a_trials_corpus_comes_from_its_data_config(tmp_path, monkeypatch):
    from finqa_exp.config import DataConfig

    text = {"format": "text", "prompt_template": "{question}", "max_length": 64}
    bundled = corpus.load_corpus(DataConfig(**text))
    assert (len(bundled.train), len(bundled.test)) == (55, 6)
    assert bundled.fingerprint() == corpus.load_corpus(DataConfig(**text)).fingerprint()
    other_seed = corpus.load_corpus(DataConfig(**text, seed=1))
    assert other_seed.fingerprint() != bundled.fingerprint()
    subset = corpus.load_corpus(DataConfig(**text, subset_size=20, test_size=4))
    assert (len(subset.train), len(subset.test)) == (16, 4)

    rows = [{"body": f"Document {i} on bonds and coupons. " * 4} for i in range(10)]
    monkeypatch.setattr(corpus, "load_hub_rows", lambda path, split: rows)
    hub = DataConfig(**text, source="hub", path="owner/news", text_column="body", test_size=2)
    splits = corpus.load_corpus(hub)
    assert (len(splits.train), len(splits.test), splits.source) == (8, 2, "owner/news")
    with pytest.raises(DataError, match=r"^hub dataset owner/news: no text column 'text'"):
        corpus.load_corpus(DataConfig(**{**text, "source": "hub", "path": "owner/news"}))


def test_probes_are_the_seed_prompt_and_held_out_openings():
    test = docs(
        "# Bond Prices\n\nWhen rates rise, the price of a fixed-rate bond falls to match.",
        "Banks lend out most of what they take in as deposits.",
    )
    probes = corpus.probe_prompts(test, None, count=3, words=4)
    assert probes == [
        (corpus.SEED_PROMPT, ""),
        ("When rates rise, the", "price of a fixed-rate bond falls to match."),  # no title
        ("Banks lend out most", "of what they take in as deposits."),
    ]
    assert corpus.probe_prompts(test, None, count=2, words=4) == probes[:2]
    assert corpus.probe_prompts(test, ["Dividends are"], count=3, words=4) == [
        ("Dividends are", "")
    ]


def test_blocks_have_their_labels_and_every_token_of_the_split():
    class Tok:  # one id per character; the tokenizer's BOS first, as a text starts
        eos_token_id, bos_token_id = 1, 2

        def __call__(self, text):
            return {"input_ids": [self.bos_token_id, *(ord(c) for c in text)]}

    split = docs("abc", "defgh", "ij")
    ds = corpus.blocks_dataset(Tok(), split, 4, "test-blocks-key")
    assert [r["input_ids"] for r in ds] == [[2, 97, 98, 99], [1, 2, 100, 101],
                                            [102, 103, 104, 1], [2, 105, 106, 1]]  # fmt: skip
    # The loss covers every token but the BOS markers (id 2) that open documents.
    assert [r["labels"] for r in ds] == [[-100, 97, 98, 99], [1, -100, 100, 101],
                                         [102, 103, 104, 1], [-100, 105, 106, 1]]  # fmt: skip
    assert all(r["attention_mask"] == [1] * len(r["input_ids"]) for r in ds)
    assert corpus.blocks_dataset(Tok(), [], 4, "test-blocks-key") is ds  # cached by key


def test_every_position_of_a_block_knows_its_document():
    lengths = [3, 5, 2]  # tokens per document, EOS included
    owners = corpus.block_documents(lengths, 4)
    assert owners == [[0, 0, 0, 1], [1, 1, 1, 1], [2, 2]]
    stream = [[7] * (n - 1) for n in lengths]
    assert [len(b) for b in corpus.pack(stream, 4, 1)] == [len(o) for o in owners]


def test_a_table_of_documents_in_any_format(tmp_path):
    path = tmp_path / "notes.csv"
    path.write_text("title,body\nBonds,Bonds pay coupons.\nStocks,Stocks pay dividends.\n")
    found = corpus.read_documents(path, "body")
    assert [d.text for d in found] == ["Bonds pay coupons.", "Stocks pay dividends."]
