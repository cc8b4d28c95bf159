"""Scoring text trials: perplexity against a hand computation, its bootstrap interval."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from finqa_exp import stats, text_eval
from tests.test_evaluation import tiny_model  # noqa: F401


def test_perplexity_is_the_hand_computed_mean_token_nll(tiny_model):  # noqa: F811
    """exp(mean of -log p(token | the tokens before it in its block)), computed here one
    block and one position at a time from the model's softmax; batching and padding of
    unequal blocks must not change it."""
    model, tok = tiny_model
    texts = ["The bond pays a fixed coupon every year.", "Yields rise.", "A stock is a share."]
    blocks = [tok(t)["input_ids"] for t in texts]
    per_block = []
    for block in blocks:
        nll = 0.0
        for t in range(1, len(block)):
            logits = model(input_ids=torch.tensor([block[:t]])).logits[0, -1]
            nll -= torch.log_softmax(logits.double(), dim=-1)[block[t]].item()
        per_block.append(nll)
    n = sum(len(b) - 1 for b in blocks)
    by_hand = math.exp(sum(per_block) / n)
    for batch_size in (1, 2, 3):
        ppl, count = text_eval.perplexity(model, blocks, batch_size)
        assert count == n
        assert ppl == pytest.approx(by_hand, rel=1e-5)
        per_token = text_eval.token_nll(model, blocks, batch_size)
        assert [len(v) for v in per_token] == [len(b) - 1 for b in blocks]
        assert [sum(v) for v in per_token] == pytest.approx(per_block, rel=1e-5)
    with pytest.raises(ValueError, match="at least 2 tokens"):
        text_eval.perplexity(model, [[5]])


def test_perplexity_leaves_a_training_model_in_training_mode(tiny_model):  # noqa: F811
    model, tok = tiny_model
    model.train()
    try:
        text_eval.perplexity(model, [tok("Yields rise.")["input_ids"]])
        assert model.training
    finally:
        model.eval()


def test_perplexity_interval_resamples_blocks():
    rng = np.random.default_rng(1)
    tokens = rng.integers(100, 256, size=30)
    base = tokens * rng.normal(5.0, 0.3, size=30)  # per-block NLL sums, about 5 nats a token
    tuned = base - tokens * 0.5  # every block 0.5 nats a token better
    ppl = math.exp(tuned.sum() / tokens.sum())
    low, high = stats.perplexity_interval(tuned, tokens)
    assert low < ppl < high
    d_low, d_high = stats.perplexity_interval(tuned, tokens, base)
    change = ppl - math.exp(base.sum() / tokens.sum())
    assert d_low <= change <= d_high < 0
    assert stats.perplexity_interval(tuned, tokens) == (low, high)  # a fixed seed
    # The same scores on both sides: no change, whatever the resample.
    assert stats.perplexity_interval(base, tokens, base) == (0.0, 0.0)
    assert all(math.isnan(x) for x in stats.perplexity_interval([], []))


def test_nll_is_summed_by_the_document_each_token_belongs_to_without_bos_markers():
    # Two blocks of 4 packed from documents of 3, 2 and 3 tokens (EOS included): positions
    # belong to documents 0 0 0 1 | 1 2 2 2; BOS (id 2) opens documents 1 and 2.
    blocks = [[2, 10, 1, 2], [1, 2, 11, 1]]
    groups = [[0, 0, 0, 1], [1, 2, 2, 2]]
    nll = [[0.5, 0.25, 9.0], [9.0, 0.75, 0.125]]  # per position 1.. of each block
    sums, counts = text_eval.grouped_nll(blocks, nll, groups, 3, skip={2})
    # Block 0: 10 (doc 0) 0.5, EOS (doc 0) 0.25, BOS skipped; block 1: BOS skipped,
    # 11 (doc 2) 0.75, EOS (doc 2) 0.125; a block's first token has nothing before it.
    assert (sums, counts) == ([0.75, 0.0, 0.875], [2, 0, 2])
    assert text_eval.grouped_nll(blocks, nll, groups, 3)[1] == [2, 1, 3]
