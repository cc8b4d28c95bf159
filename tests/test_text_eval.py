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
        nll, counts = text_eval.block_nll(model, blocks, batch_size)
        assert counts == [len(b) - 1 for b in blocks]
        assert nll == pytest.approx(per_block, rel=1e-5)
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
