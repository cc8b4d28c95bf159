"""ROUGE scoring and batched, left-padded generation."""

from __future__ import annotations

import pytest
import torch

from finqa_exp import evaluation
from finqa_exp.config import TinyModelConfig
from finqa_exp.data import QAPair, cache_key
from finqa_exp.tiny import llama_config, train_tokenizer


def test_rouge_identical_and_disjoint():
    same = evaluation.rouge(["the bond pays interest"], ["the bond pays interest"])
    assert same == {"rouge1": 1.0, "rouge2": 1.0, "rougeL": 1.0}
    none = evaluation.rouge(["apples oranges"], ["bond yield"])
    assert none == {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}


def test_rouge_known_value_is_the_mean_f1():
    # "a stock is ownership" vs "a stock is a share": unigram overlap 3 (a, stock, is),
    # P = 3/4, R = 3/5 -> F1 = 2/3; a perfect second pair averages it with 1.
    scores = evaluation.rouge(["a stock is ownership", "x y"], ["a stock is a share", "x y"])
    assert scores["rouge1"] == pytest.approx((2 / 3 + 1) / 2)


def test_rouge_rejects_mismatched_lists():
    with pytest.raises(ValueError, match="1 predictions for 2 references"):
        evaluation.rouge(["a"], ["a", "b"])


@pytest.fixture(scope="module")
def tiny_model():
    from transformers import LlamaForCausalLM

    texts = [
        f"Question {i}: what is the yield of bond {i}? It pays {i} dollars." for i in range(40)
    ]
    tok = train_tokenizer(texts, vocab_size=300)
    torch.manual_seed(0)
    shape = TinyModelConfig(hidden_size=64, intermediate_size=128, num_layers=1, num_heads=2)
    model = LlamaForCausalLM(llama_config(shape, tok)).eval()
    return model, tok


def test_batched_generation_matches_one_at_a_time(tiny_model):
    model, tok = tiny_model
    template = "### Question: {question}\n\n### Answer: "
    questions = ["What is a bond?", "Why would a long question about yields differ?", "Tax?"]
    batched = evaluation.generate_answers(model, tok, template, questions, 8, batch_size=3)
    single = [
        evaluation.generate_answers(model, tok, template, [q], 8, batch_size=1)[0]
        for q in questions
    ]
    assert batched == single
    assert all(isinstance(a, str) and a for a in batched)


def test_base_score_cache_roundtrip(tmp_path):
    key = cache_key("model", {"r": 1}, QAPair("q", "a").question)
    assert evaluation.load_cached(tmp_path, key) is None
    evaluation.save_cached(tmp_path, key, evaluation.Answers({"rougeL": 0.5}, ["x"]))
    assert evaluation.load_cached(tmp_path, key) == evaluation.Answers({"rougeL": 0.5}, ["x"])
    assert cache_key("model", {"r": 2}, "q") != key
