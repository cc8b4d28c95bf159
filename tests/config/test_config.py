"""Config tests: every preset composes (hub ones without downloading), bad values fail early,
and the builders turn config into the right library objects."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from finqa_exp.config import ConfigError, LoraConfig, QuantConfig, flatten, validate
from finqa_exp.modeling import lora_config, quantization_config
from tests.conftest import CONF, compose_cfg

GROUPS = {
    group: sorted(p.stem for p in (CONF / group).glob("*.yaml"))
    for group in ("model", "data", "quant", "tracking", "experiment")
}


@pytest.mark.parametrize(
    "override",
    [f"{g}={name}" for g, names in GROUPS.items() for name in names],
)
def test_every_preset_composes_and_validates(override, tmp_path):
    extra = ["data.path=pairs.csv"] if override in ("data=local", "data=text") else []
    cfg = compose_cfg([override, *extra], tmp_path)
    conf = validate(cfg)
    assert Path(conf.paths.studies_dir).is_absolute()
    assert conf.tracking.uri.startswith("sqlite:////") or conf.tracking.backend == "none"


def test_seed_tinyllama_is_the_reference_recipe(tmp_path):
    conf = validate(compose_cfg(["experiment=seed_tinyllama"], tmp_path))
    assert conf.model.name_or_path == "TinyLlama/TinyLlama-1.1B-Chat-v1.0"
    assert (conf.data.source, conf.data.path) == ("hub", "gbharti/finance-alpaca")
    assert (conf.data.subset_size, conf.data.test_size, conf.data.max_length) == (1000, 100, 512)
    assert conf.data.prompt_template == "### Question: {question}\n\n### Answer: "
    assert (conf.lora.r, conf.lora.alpha, conf.lora.dropout) == (16, 32, 0.05)
    assert conf.lora.target_modules == ["q_proj", "k_proj", "v_proj", "o_proj"]
    assert (conf.quant.load_in_4bit, conf.quant.quant_type) == (True, "nf4")
    t = conf.train
    assert (t.learning_rate, t.batch_size, t.epochs) == (2e-4, 8, 3)
    assert (t.warmup_steps, t.scheduler) == (100, "linear")


def test_seed_llama2_7b_is_the_reference_recipe(tmp_path):
    conf = validate(compose_cfg(["experiment=seed_llama2_7b"], tmp_path))
    assert conf.model.name_or_path == "meta-llama/Llama-2-7b-hf"
    assert (conf.lora.r, conf.lora.alpha, conf.lora.target_modules) == (8, 32, ["q_proj", "v_proj"])
    assert (conf.train.learning_rate, conf.train.batch_size, conf.train.epochs) == (1e-4, 4, 5)
    assert conf.quant.load_in_4bit


def test_seed_llama2_7b_domain_is_the_recipe_on_plain_text(tmp_path):
    conf = validate(compose_cfg(["experiment=seed_llama2_7b_domain"], tmp_path))
    assert conf.model.name_or_path == "meta-llama/Llama-2-7b-hf"
    assert (conf.lora.r, conf.lora.alpha, conf.lora.target_modules) == (8, 32, ["q_proj", "v_proj"])
    assert (conf.train.learning_rate, conf.train.batch_size, conf.train.epochs) == (1e-4, 4, 5)
    assert (conf.data.format, conf.data.source, conf.data.text_column) == ("text", "hub", "text")
    assert (conf.data.subset_size, conf.data.test_size, conf.data.prompt_template) == (
        1000, 100, "{question}"
    )  # fmt: skip
    assert (conf.objective.metrics, conf.objective.directions) == (("perplexity",), ("minimize",))


def test_text_data_brings_its_objective_and_keeps_the_users(tmp_path):
    conf = validate(compose_cfg(["data=finance_text"], tmp_path))
    assert (conf.data.format, conf.data.max_length, conf.data.test_size) == ("text", 256, 12)
    # Your own text is named after its path, so each corpus has a study of its own.
    for path, name in (("/data/filings/", "filings"), ("notes.jsonl", "notes"), ("o/news", "news")):
        own = validate(compose_cfg(["data=text", f"data.path={path}"], tmp_path))
        assert own.data.name == name
    assert (conf.objective.metric, conf.objective.direction) == ("perplexity", "minimize")
    own = ["data=finance_text", "objective.metric=eval_loss", "objective.direction=minimize"]
    assert validate(compose_cfg(own, tmp_path)).objective.metric == "eval_loss"
    from finqa_exp.trial import check_objective_names

    with pytest.raises(ConfigError, match=r"minimize does not fit objective\.metric=rougeL"):
        validate(compose_cfg(["data=finance_text", "objective.metric=rougeL"], tmp_path))
    rouge = ["data=finance_text", "objective.metric=rougeL", "objective.direction=maximize"]
    rouge = validate(compose_cfg(rouge, tmp_path))
    with pytest.raises(ConfigError, match=r"objective\.metric=rougeL is not a metric a trial"):
        check_objective_names(rouge, {"perplexity"})
    templated = ["data=finance_text", "data.prompt_template='Q: {question}'"]
    with pytest.raises(ConfigError, match=r"must be '\{question\}' for data.format=text"):
        validate(compose_cfg(templated, tmp_path))


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("data.format=csv", "data.format must be one of ('qa', 'text'), got 'csv'"),
        ("eval.probe_words=0", "eval.probe_words must be >= 1, got 0"),
        ("train.learning_rate=0", "train.learning_rate must be > 0, got 0.0"),
        ("train.learning_rate=-1e-4", "train.learning_rate must be > 0, got -0.0001"),
        ("lora.r=0", "lora.r must be >= 1, got 0"),
        ("train.batch_size=0", "train.batch_size must be >= 1, got 0"),
        ("lora.dropout=1.5", "lora.dropout must be in [0, 1), got 1.5"),
        ("train.scheduler=warp", "train.scheduler must be one of"),
        ("quant.compute_dtype=float8", "quant.compute_dtype must be one of"),
        ("data.test_size=0", "data.test_size must be > 0"),
        ("objective.metric=eval_loss", "does not fit objective.metric=eval_loss"),
        ("objective.metric=delta_rougeL", None),
        ("objective.metric=[rougeL,rougeL]", "objective.metric lists a metric twice"),
        (
            "objective.metric=[rougeL,numeric_accuracy]",
            "objective.direction has 1 entries for 2 objective.metric entries",
        ),
        ("objective.direction=up", "objective.direction must be one of"),
        ("data=local", "data.path is required for data.source=local"),
    ],
)
def test_bad_values_fail_validation(override, message, tmp_path):
    cfg = compose_cfg([override], tmp_path)
    if message is None:  # a good value among the bad, so the check is not refusing all
        validate(cfg)
        return
    with pytest.raises(ConfigError) as err:
        validate(cfg)
    assert message in str(err.value)


def test_several_objectives_make_a_multi_objective_trial(tmp_path):
    cfg = compose_cfg(
        ["objective.metric=[rougeL,eval_loss]", "objective.direction=[maximize,minimize]"], tmp_path
    )
    conf = validate(cfg)
    assert conf.objective.metrics == ("rougeL", "eval_loss")
    assert conf.objective.directions == ("maximize", "minimize")
    from finqa_exp.trial import check_objective_names, objective_choices

    assert {"numeric_accuracy", "delta_rougeL_ci_low", "base_rougeL", "eval_loss"} <= (
        objective_choices({"rougeL", "numeric_accuracy"})
    )
    check_objective_names(conf, {"rougeL"})
    check_objective_names(conf, None)  # names not known yet: the trial checks them
    bad = validate(compose_cfg(["objective.metric=bleu"], tmp_path))
    with pytest.raises(ConfigError, match=r"^objective\.metric=bleu is not a metric a trial logs"):
        check_objective_names(bad, {"rougeL"})
    check_objective_names(bad, {"rougeL", "bleu"})  # once eval.metrics has it


@pytest.mark.parametrize(
    "override", ["train.lr=1e-3", "train.learning_rate=abc", "lora.r=1.5", "model=gpt5"]
)
def test_unknown_keys_and_wrong_types_fail_at_composition(override, tmp_path):
    with pytest.raises(ConfigCompositionException):
        compose_cfg([override], tmp_path)


def test_quantization_config_is_nf4_with_double_quant():
    q = quantization_config(QuantConfig(compute_dtype="bfloat16"), torch.device("cpu"))
    assert q.load_in_4bit and q.bnb_4bit_quant_type == "nf4" and q.bnb_4bit_use_double_quant
    assert q.bnb_4bit_compute_dtype == torch.bfloat16
    auto = quantization_config(QuantConfig(), torch.device("cpu"))
    assert auto.bnb_4bit_compute_dtype == torch.float32  # auto on CPU
    assert quantization_config(QuantConfig(load_in_4bit=False), torch.device("cpu")) is None


def test_lora_config_from_config():
    lc = lora_config(LoraConfig(r=16, alpha=32, dropout=0.05, target_modules=["q_proj", "o_proj"]))
    assert (lc.r, lc.lora_alpha, lc.lora_dropout) == (16, 32, 0.05)
    assert set(lc.target_modules) == {"q_proj", "o_proj"}
    assert lc.task_type == "CAUSAL_LM"


def test_flatten_gives_dotted_params():
    flat = flatten(OmegaConf.create({"train": {"learning_rate": 1e-3}, "lora": {"r": 8}}))
    assert flat == {"train.learning_rate": 1e-3, "lora.r": 8}


def test_train_callbacks_are_instantiated_from_their_targets(tmp_path):
    from finqa_exp.training import extra_callbacks

    spec = "{_target_: transformers.EarlyStoppingCallback, early_stopping_patience: 2}"
    conf = validate(compose_cfg([f"+train.callbacks.stop={spec}"], tmp_path))
    (callback,) = extra_callbacks(conf.train.callbacks)
    assert type(callback).__name__ == "EarlyStoppingCallback"
    assert callback.early_stopping_patience == 2


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("3", "train.callbacks.stop must be a mapping with a '_target_'"),
        ("{_target_: no_such_pkg.Callback}", "no module 'no_such_pkg'"),
    ],
)
def test_bad_train_callbacks_are_config_errors(spec, message, tmp_path):
    with pytest.raises(ConfigError, match=message):
        validate(compose_cfg([f"+train.callbacks.stop={spec}"], tmp_path))
