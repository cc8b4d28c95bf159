"""Smoke tests of whole trials on the offline tiny model: the real code path, on CPU.

Each asserts behaviour: LoRA weights moved and base weights did not, the loss is
finite and falls, the MLflow run holds what a user looks for, and the logged adapter
reproduces the logged score.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest
import torch
from mlflow import MlflowClient

from finqa_exp import data as data_lib
from finqa_exp import evaluation, modeling, tiny
from finqa_exp.config import DataConfig, TinyModelConfig, validate
from finqa_exp.trial import execute

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def default_trial(tmp_path_factory, cache_dir):
    from tests.conftest import FAST, compose_cfg

    root = tmp_path_factory.mktemp("trial")
    cfg = compose_cfg(
        [f"paths.root_dir={root}", f"paths.cache_dir={cache_dir}", *FAST], root / "run"
    )
    return cfg, execute(cfg)


def test_trial_trains_lora_and_leaves_the_base_alone(default_trial):
    cfg, result = default_trial
    conf = validate(cfg)
    model = result.model
    lora_b = {n: p for n, p in model.named_parameters() if "lora_B" in n}
    assert lora_b and all(p.abs().sum() > 0 for p in lora_b.values())  # B starts at zero
    assert all(("lora_" in n) == p.requires_grad for n, p in model.named_parameters())

    splits = data_lib.load_splits(conf.data)
    source = tiny.build_tiny_base(conf.model.tiny, splits.train, conf.paths.cache_dir)
    fresh = modeling.load_base_model(source, conf.model, conf.quant, torch.device("cpu"))
    tuned_base = dict(model.get_base_model().named_parameters())
    for name, param in fresh.named_parameters():
        peft_name = name.replace(".weight", ".base_layer.weight").replace(
            ".base_layer.base_layer", ".base_layer"
        )
        tuned = tuned_base.get(name) if name in tuned_base else tuned_base[peft_name]
        assert torch.equal(tuned.data, param.data), name


def test_trial_loss_is_finite_and_falls(default_trial):
    _, result = default_trial
    losses = [loss for _, loss in result.history.train]
    assert len(losses) >= 3 and all(math.isfinite(x) for x in losses)
    assert losses[-1] < losses[0]
    assert result.history.eval and all(math.isfinite(x) for _, x in result.history.eval)


def test_tuned_model_beats_its_base(default_trial):
    _, result = default_trial
    assert result.metrics["rougeL"] > result.metrics["base_rougeL"] + 0.05
    assert result.objective == result.metrics["rougeL"]


def test_mlflow_run_holds_params_metrics_artifacts_and_tags(default_trial, tmp_path):
    cfg, result = default_trial
    conf = validate(cfg)
    client = MlflowClient(conf.tracking.uri)
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    params = run.data.params
    assert float(params["train.learning_rate"]) == conf.train.learning_rate
    assert params["lora.r"] == str(conf.lora.r) and params["model.name"] == "tiny"
    metrics = run.data.metrics
    for key in (
        "rouge1",
        "rouge2",
        "rougeL",
        "eval_loss",
        "train_time_s",
        "tokens_per_s",
        "peak_memory_mb",
        "trial_time_s",
    ):
        assert key in metrics and math.isfinite(metrics[key]), key
    for key in ("rouge1", "rouge2", "rougeL"):
        assert metrics[f"delta_{key}"] == pytest.approx(metrics[key] - metrics[f"base_{key}"])
    steps = client.get_metric_history(result.run_id, "train_loss")
    assert len(steps) == len(result.history.train) >= 3
    assert len(client.get_metric_history(result.run_id, "eval_loss")) >= 2
    tags = run.data.tags
    assert len(tags["git_commit"]) == 40 and tags["git_dirty"] in ("True", "False")
    assert tags["version.torch"] and tags["device"].startswith("cpu")
    files = {a.path for a in client.list_artifacts(result.run_id)}
    assert {"config.yaml", "samples.json", "adapter"} <= files
    adapter_files = {a.path for a in client.list_artifacts(result.run_id, "adapter")}
    assert "adapter/adapter_model.safetensors" in adapter_files
    assert "adapter/tokenizer.json" in adapter_files
    table = json.loads(
        Path(client.download_artifacts(result.run_id, "samples.json", str(tmp_path))).read_text()
    )
    assert table["columns"] == ["question", "reference", "base_answer", "tuned_answer"]
    assert len(table["data"]) == conf.eval.num_samples
    assert [row[1] for row in table["data"]] == [s["reference"] for s in result.samples[:10]]


def test_logged_per_question_scores_give_the_logged_means_and_intervals(default_trial, tmp_path):
    """Anyone can recompute a run's scores and intervals from its scores.json (to its 10
    decimals: MLflow's table format rounds there)."""
    from finqa_exp import stats

    cfg, result = default_trial
    conf = validate(cfg)
    client = MlflowClient(conf.tracking.uri)
    logged = client.get_run(result.run_id).data.metrics
    path = client.download_artifacts(result.run_id, "scores.json", str(tmp_path))
    table = pd.DataFrame(**json.loads(Path(path).read_text()))
    assert len(table) == conf.eval.max_questions  # every scored question, not a sample
    assert list(table.columns[:4]) == ["question", "reference", "base_answer", "tuned_answer"]
    numeric = table["reference"].str.contains(r"\d")
    assert logged["numeric_questions"] == numeric.sum() > 0
    assert table.loc[~numeric, "tuned_numeric_accuracy"].isna().all()
    for key in ("rouge1", "rouge2", "rougeL", "numeric_accuracy"):
        tuned = [None if pd.isna(v) else v for v in table[f"tuned_{key}"]]
        base = [None if pd.isna(v) else v for v in table[f"base_{key}"]]
        assert logged[key] == pytest.approx(table[f"tuned_{key}"].mean(), abs=1e-9), key
        assert logged[f"base_{key}"] == pytest.approx(table[f"base_{key}"].mean(), abs=1e-9)
        low, high = stats.paired_bootstrap(tuned, base, conf.eval.bootstrap_resamples)
        assert (logged[f"delta_{key}_ci_low"], logged[f"delta_{key}_ci_high"]) == pytest.approx(
            (low, high), abs=1e-9
        )
        assert low <= logged[f"delta_{key}"] <= high, key
        assert logged[f"{key}_ci_low"] <= logged[key] <= logged[f"{key}_ci_high"], key


def test_logged_adapter_reproduces_the_logged_rouge(default_trial, tmp_path):
    import peft

    cfg, result = default_trial
    conf = validate(cfg)
    client = MlflowClient(conf.tracking.uri)
    adapter = client.download_artifacts(result.run_id, "adapter", str(tmp_path))
    splits = data_lib.load_splits(conf.data)
    source = tiny.build_tiny_base(conf.model.tiny, splits.train, conf.paths.cache_dir)
    base = modeling.load_base_model(source, conf.model, conf.quant, torch.device("cpu"))
    model = peft.PeftModel.from_pretrained(base, adapter)
    tokenizer = modeling.load_tokenizer(adapter, conf.model)
    test = splits.test[: conf.eval.max_questions]
    evaluator = evaluation.Evaluator.from_config(conf)
    scores = evaluator.answer(model, tokenizer, test).scores
    logged = client.get_run(result.run_id).data.metrics
    for key in ("rouge1", "rouge2", "rougeL"):
        assert scores[key] == pytest.approx(logged[key], abs=1e-9), key


def test_logged_model_answers_as_the_trial_scored_it(default_trial, monkeypatch):
    """The run's MLflow model (what `mlflow models serve` and the champion are), loaded by
    mlflow.pyfunc, gives the answers whose ROUGE the trial logged."""
    import mlflow

    cfg, result = default_trial
    conf = validate(cfg)
    client = MlflowClient(conf.tracking.uri)
    run = client.get_run(result.run_id)
    (output,) = run.outputs.model_outputs
    model_info = client.get_logged_model(output.model_id)
    assert model_info.source_run_id == result.run_id and model_info.name == run.info.run_name
    monkeypatch.setenv("MLFLOW_TRACKING_URI", conf.tracking.uri)
    model = mlflow.pyfunc.load_model(f"models:/{output.model_id}")
    test = data_lib.load_splits(conf.data).test[: conf.eval.max_questions]
    answers = model.predict([p.question for p in test])
    scores = evaluation.rouge(answers, [p.answer for p in test])
    for key in ("rouge1", "rouge2", "rougeL"):
        assert scores[key] == pytest.approx(run.data.metrics[key], abs=1e-9), key
    assert [t.name for t in model.metadata.get_input_schema().input_types()] == ["string"]
    assert model.metadata.get_params_schema().params[0].name == "max_new_tokens"


def test_trial_on_a_question_answer_csv(make_cfg, tmp_path):
    rows = data_lib.read_table(data_lib.bundled_path())[:80]
    path = tmp_path / "pairs.csv"
    pd.DataFrame(
        {"question": [r["instruction"] for r in rows], "answer": [r["output"] for r in rows]}
    ).to_csv(path, index=False)
    cfg = make_cfg("data=local", f"data.path={path}", "tracking=none", "train.epochs=1")
    result = execute(cfg)  # builds a tiny base for this data in-process
    assert result.run_id is None
    assert math.isfinite(result.objective) and 0 <= result.objective <= 1
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()
    again = execute(cfg)  # reads it from the cache: same seed, same result
    assert again.metrics["eval_loss"] == result.metrics["eval_loss"]
    assert again.objective == result.objective


def test_trial_on_an_alpaca_jsonl(make_cfg, tmp_path):
    rows = data_lib.read_table(data_lib.bundled_path())[80:170]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = execute(make_cfg("data=local", f"data.path={path}", "train.epochs=1"))
    client = MlflowClient(validate(make_cfg()).tracking.uri)
    run = client.get_run(result.run_id)
    assert run.data.params["data.path"] == str(path) and run.info.status == "FINISHED"
    with_context = [r for r in rows if r["input"]]
    questions = {s["question"] for s in result.samples}
    assert with_context and len(result.samples) == 9  # 10% of 90 pairs
    assert questions <= {f"{r['instruction']}\n{r['input']}".strip() for r in rows}


def test_hub_preset_runs_the_hub_code_path(make_cfg, monkeypatch, cache_dir):
    """experiment=seed_tinyllama with the two hub calls answered locally."""
    import transformers

    bundled = data_lib.read_table(data_lib.bundled_path())
    asked: dict[str, object] = {}

    def fake_dataset(path, split):
        asked["dataset"] = (path, split)
        return bundled

    # Any local causal LM stands in for TinyLlama: the default tiny base.
    local = tiny.build_tiny_base(
        TinyModelConfig(), data_lib.load_splits(DataConfig()).train, cache_dir
    )
    real_model, real_tok = (
        transformers.AutoModelForCausalLM.from_pretrained,
        transformers.AutoTokenizer.from_pretrained,
    )

    def fake_model(name, **kwargs):
        asked["model"] = (name, kwargs.get("quantization_config"))
        return real_model(str(local), **kwargs)

    def fake_tokenizer(name, **kwargs):
        asked["tokenizer"] = name
        return real_tok(str(local), **kwargs)

    monkeypatch.setattr(data_lib, "load_hub_rows", fake_dataset)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", fake_model)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", fake_tokenizer)
    cfg = make_cfg(
        "experiment=seed_tinyllama",
        "data.subset_size=120",
        "data.test_size=12",
        "train.max_steps=3",
        "train.warmup_steps=1",
        "tracking=none",
        "eval.max_new_tokens=8",
    )
    result = execute(cfg)
    assert asked["dataset"] == ("gbharti/finance-alpaca", "train")
    assert asked["tokenizer"] == "TinyLlama/TinyLlama-1.1B-Chat-v1.0"
    name, qconfig = asked["model"]
    assert name == "TinyLlama/TinyLlama-1.1B-Chat-v1.0"
    assert qconfig.bnb_4bit_quant_type == "nf4" and qconfig.bnb_4bit_use_double_quant
    targets = {n.split(".")[-4] for n, _ in result.model.named_parameters() if "lora_A" in n}
    assert targets == {"q_proj", "k_proj", "v_proj", "o_proj"}
    assert result.metrics["train_steps"] == 3


class FailAtStep:
    """A Trainer callback that breaks a trial mid-training (``train.callbacks``)."""

    def __init__(self, step: int):
        self.step = step

    def __getattr__(self, name):  # every other TrainerCallback event: do nothing
        if name.startswith("on_"):
            return lambda *args, **kwargs: None
        raise AttributeError(name)

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise RuntimeError(f"injected failure at step {self.step}")


def test_later_trials_reuse_the_loaded_base_and_match_a_fresh_load(make_cfg):
    """A sweep's trials share one loaded 4-bit base: each adds its adapter, the next takes it
    out. A trial after others (one of them failed mid-training) scores exactly as the same
    trial on a freshly loaded base."""
    first = execute(make_cfg("tracking=none", "train.epochs=1"))
    base = modeling.shared_base.model
    fail = "+train.callbacks.fail={_target_: tests.test_trial.FailAtStep, step: 2}"
    with pytest.raises(RuntimeError, match="injected failure at step 2"):
        execute(make_cfg("tracking=none", "train.epochs=1", "lora.r=4", fail))
    two = ["objective.metric=[rougeL,eval_loss]", "objective.direction=[maximize,minimize]"]
    other = execute(make_cfg("tracking=none", "train.epochs=1", "train.learning_rate=3e-4", *two))
    again = execute(make_cfg("tracking=none", "train.epochs=1"))

    assert modeling.shared_base.model is base  # never loaded again
    assert other.objective == [other.metrics["rougeL"], other.metrics["eval_loss"]]
    assert other.objective[0] != first.objective
    for key in ("eval_loss", "final_train_loss", "rouge1", "rouge2", "rougeL"):
        assert again.metrics[key] == first.metrics[key], key
    assert again.samples == first.samples
    # Once its adapter is out, the shared base holds exactly the weights it was loaded with.
    assert modeling.shared_base.remove_adapter()
    conf = validate(make_cfg())
    source = tiny.build_tiny_base(
        conf.model.tiny, data_lib.load_splits(conf.data).train, conf.paths.cache_dir
    )
    fresh = modeling.load_base_model(source, conf.model, conf.quant, torch.device("cpu"))
    kept = dict(base.named_parameters())
    assert kept.keys() == dict(fresh.named_parameters()).keys()
    for name, param in fresh.named_parameters():
        assert torch.equal(kept[name].data, param.data), name


def test_how_often_a_trial_is_evaluated_does_not_change_what_it_learns(make_cfg):
    """Evals draw from the global RNG (each DataLoader iterator takes a seed): the Trainer
    keeps them from shifting the batch order and dropout of the training that follows."""
    cfg = ("tracking=none", "train.epochs=2", "eval.max_questions=4", "lora.dropout=0.1")
    each_epoch = execute(make_cfg(*cfg, "train.evals_per_epoch=1", "train.evals_first_epoch=1"))
    often = execute(make_cfg(*cfg, "train.evals_per_epoch=3", "train.evals_first_epoch=4"))
    for key in ("eval_loss", "final_train_loss", "rougeL"):
        assert often.metrics[key] == each_epoch.metrics[key], key
    assert often.samples == each_epoch.samples


def test_a_failed_trial_leaves_no_model_or_optimizer_behind(make_cfg, monkeypatch):
    """A sweep job that fails mid-training (here an injected out-of-memory error) frees its
    peft model, optimizer and LoRA weights before the next trial starts, though its
    exception, traceback and all, is still held (as Hydra's JobReturn holds it)."""
    import optuna

    from finqa_exp.sweep.job import TRIAL_ENV, TrialJob
    from finqa_exp.trial import run_trial
    from tests import faults

    study = optuna.create_study(study_name="gc", storage=optuna.storages.InMemoryStorage())
    monkeypatch.setenv(TRIAL_ENV, str(study.ask().number))
    job = TrialJob(run_trial, study._storage, "gc", study.sampler, study.pruner)
    watch = "+train.callbacks.fault={_target_: tests.faults.WatchAndRaiseAt, step: 2}"
    with pytest.raises(torch.OutOfMemoryError) as failed:
        job(make_cfg("tracking=none", "train.epochs=1", watch))

    assert failed.value.__traceback__ is not None
    assert len(faults.WATCHED) > 2  # the model, the optimizer and the LoRA weights
    assert [ref() for ref in faults.WATCHED if ref() is not None] == []
    # The base stays loaded for the next trial, without the failed trial's adapter.
    assert modeling.shared_base.model is not None and modeling.shared_base.adapted is None
    assert not any("lora_" in n for n, _ in modeling.shared_base.model.named_parameters())
