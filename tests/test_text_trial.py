"""A whole trial on plain text (``data=finance_text``): the Llama-2 project's workload on
the offline tiny model. It adapts a base pre-trained on Q&A pairs to a corpus it has
never read; held-out perplexity must fall, and the run must hold what a user looks for."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from mlflow import MlflowClient

from finqa_exp import corpus, modeling, text_eval
from finqa_exp.config import validate
from finqa_exp.trial import execute

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def text_trial(tmp_path_factory, cache_dir):
    from tests.conftest import compose_cfg

    root = tmp_path_factory.mktemp("text")
    overrides = [
        f"paths.root_dir={root}", f"paths.cache_dir={cache_dir}", "data=finance_text",
        "train.epochs=2", "eval.max_new_tokens=16", "eval.num_samples=4",
    ]  # fmt: skip
    cfg = compose_cfg(overrides, root / "run")
    return cfg, execute(cfg)


def test_perplexity_falls_clearly_below_the_bases(text_trial):
    _, result = text_trial
    m = result.metrics
    assert result.objective == m["perplexity"]
    assert m["perplexity"] < 0.8 * m["base_perplexity"], m
    assert m["delta_perplexity"] == pytest.approx(m["perplexity"] - m["base_perplexity"])
    assert m["delta_perplexity_ci_low"] <= m["delta_perplexity"] <= m["delta_perplexity_ci_high"]
    assert m["delta_perplexity_ci_high"] < 0  # the fall is real, block by block
    assert m["perplexity_ci_low"] <= m["perplexity"] <= m["perplexity_ci_high"]
    assert not any(k.startswith(("rouge", "base_rouge", "numeric")) for k in m)
    # eval_loss is the Trainer's mean over the same blocks: close to log perplexity.
    assert math.log(m["perplexity"]) == pytest.approx(m["eval_loss"], rel=0.05)


def test_training_sees_only_packed_blocks_of_training_documents(text_trial):
    cfg, result = text_trial
    conf = validate(cfg)
    splits = corpus.load_corpus(conf.data)
    tokenizer = modeling.load_tokenizer(result.adapter_dir, conf.model)
    train = [tokenizer(d.text)["input_ids"] for d in splits.train]
    blocks = corpus.pack(train, conf.data.max_length, tokenizer.eos_token_id)
    logged = MlflowClient(conf.tracking.uri).get_run(result.run_id).data.metrics
    assert logged["train_examples"] == len(blocks)
    assert logged["train_tokens"] == conf.train.epochs * sum(map(len, blocks))
    held_out = {d.name for d in splits.test}
    assert held_out and not held_out & {d.name for d in splits.train}


def test_run_logs_probes_base_and_tuned_and_why_rouge_is_missing(text_trial, tmp_path):
    cfg, result = text_trial
    conf = validate(cfg)
    client = MlflowClient(conf.tracking.uri)
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    assert "no reference answers" in run.data.tags["scores_skipped"]
    for key in ("perplexity", "base_perplexity", "delta_perplexity", "eval_loss"):
        assert math.isfinite(run.data.metrics[key]), key
    path = client.download_artifacts(result.run_id, "samples.json", str(tmp_path))
    table = json.loads(Path(path).read_text())
    assert table["columns"] == ["prompt", "held_out_text", "base_completion", "tuned_completion"]
    rows = [dict(zip(table["columns"], r)) for r in table["data"]]
    assert len(rows) == 4 and rows[0]["prompt"] == corpus.SEED_PROMPT
    test_text = " ".join(" ".join(d.text.split()) for d in corpus.load_corpus(conf.data).test)
    for row in rows[1:]:  # the openings of held-out documents, and what they say next
        assert f"{row['prompt']} {row['held_out_text']}" in test_text
    assert all(r["base_completion"] and r["tuned_completion"] for r in rows)
    assert [r["tuned_completion"] for r in rows] != [r["base_completion"] for r in rows]
    # Every held-out document's tokens and NLL: the perplexities recomputed from them.
    path = client.download_artifacts(result.run_id, "scores.json", str(tmp_path))
    table = json.loads(Path(path).read_text())
    docs = [dict(zip(table["columns"], r)) for r in table["data"]]
    assert [d["document"] for d in docs] == [d.name for d in corpus.load_corpus(conf.data).test]
    tokens = sum(d["tokens"] for d in docs)
    assert tokens == run.data.metrics["perplexity_tokens"]
    for side, metric in (("tuned", "perplexity"), ("base", "base_perplexity")):
        ppl = math.exp(sum(d[f"{side}_nll"] for d in docs) / tokens)
        assert ppl == pytest.approx(run.data.metrics[metric], rel=1e-9), side


def test_logged_adapter_reproduces_the_logged_perplexity_and_completions(text_trial, monkeypatch):
    """The run's MLflow model completes the probes as the trial did, and its adapter on the
    base gives the logged perplexity: what the champion of a text study serves."""
    import mlflow
    import peft
    import torch

    cfg, result = text_trial
    conf = validate(cfg)
    client = MlflowClient(conf.tracking.uri)
    run = client.get_run(result.run_id)
    (output,) = run.outputs.model_outputs
    monkeypatch.setenv("MLFLOW_TRACKING_URI", conf.tracking.uri)
    model = mlflow.pyfunc.load_model(f"models:/{output.model_id}")
    prompts = [s["prompt"] for s in result.samples]
    assert model.predict(prompts) == [s["tuned_completion"] for s in result.samples]

    splits = corpus.load_corpus(conf.data)
    source = modeling.base_model_source(conf, splits)
    base = modeling.load_base_model(source, conf.model, conf.quant, torch.device("cpu"))
    tuned = peft.PeftModel.from_pretrained(base, str(result.adapter_dir))
    tokenizer = modeling.load_tokenizer(result.adapter_dir, conf.model)
    test = [tokenizer(d.text)["input_ids"] for d in splits.test]
    blocks = corpus.pack(test, conf.data.max_length, tokenizer.eos_token_id)
    # Every token after the first of its block, but the BOS markers opening documents.
    per_token = text_eval.token_nll(tuned, blocks)
    bos = tokenizer.bos_token_id
    scored = [v for b, nll in zip(blocks, per_token) for t, v in zip(b[1:], nll) if t != bos]
    assert len(scored) == run.data.metrics["perplexity_tokens"]
    assert len(scored) == sum(map(len, blocks)) - len(blocks) - len(test) + sum(
        b[0] == bos for b in blocks
    )  # fmt: skip
    ppl = math.exp(sum(scored) / len(scored))
    assert ppl == pytest.approx(run.data.metrics["perplexity"], rel=1e-6)
