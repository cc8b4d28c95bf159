"""finqa_exp/serving: what a logged model holds, how its input is read, how its base is
quantized at load time, and its model card. Pure functions, no model."""

from __future__ import annotations

import pandas as pd
import pytest

from finqa_exp.config import QuantConfig, validate
from finqa_exp.serving import card, spec
from finqa_exp.serving.answerer import base_source, load_quant
from tests.conftest import compose_cfg


@pytest.fixture
def conf(tmp_path):
    return validate(compose_cfg([f"paths.root_dir={tmp_path}"], tmp_path / "out"))


def test_settings_round_trip_and_name_the_base(conf, tmp_path):
    tiny = spec.settings_for(conf, None, "run1")
    assert (tiny.base_kind, tiny.base, tiny.revision) == ("bundled", None, None)
    assert spec.ServeSettings.from_dict(tiny.to_dict()) == tiny
    assert spec.artifacts_for("/a", "/tiny", tiny) == {"adapter": "/a", "base": "/tiny"}

    conf.model.name_or_path, conf.model.revision = "TinyLlama/TinyLlama-1.1B-Chat-v1.0", "main"
    hub = spec.settings_for(conf, "fe8a4ea1ffedaf415f4da2f062534de366a451e6", None)
    assert (hub.base_kind, hub.revision) == ("hub", "fe8a4ea1ffedaf415f4da2f062534de366a451e6")
    assert spec.artifacts_for("/a", conf.model.name_or_path, hub) == {"adapter": "/a"}
    assert spec.settings_for(conf, None, None).revision == "main"  # no commit seen: as asked

    conf.model.name_or_path = str(tmp_path)
    local = spec.settings_for(conf, None, None)
    assert (local.base_kind, local.base, local.revision) == ("local", str(tmp_path), None)


def test_a_model_with_an_unknown_settings_format_is_refused(conf):
    data = spec.settings_for(conf, None, None).to_dict()
    data["format"] = 99
    with pytest.raises(spec.SpecError, match="format 99"):
        spec.ServeSettings.from_dict(data)


def test_base_source_is_bundled_hub_or_an_existing_folder(conf, tmp_path):
    tiny = spec.settings_for(conf, None, None)
    assert base_source({"adapter": "/a", "base": "/b"}, tiny) == "/b"
    with pytest.raises(spec.SpecError, match="bundled, but it has none"):
        base_source({"adapter": "/a"}, tiny)
    conf.model.name_or_path = str(tmp_path / "gone")
    (tmp_path / "gone").mkdir()
    local = spec.settings_for(conf, None, None)
    (tmp_path / "gone").rmdir()
    with pytest.raises(spec.SpecError, match="not on this machine"):
        base_source({"adapter": "/a"}, local)


@pytest.mark.parametrize(
    ("model_input", "questions"),
    [
        ("What is a bond?", ["What is a bond?"]),
        (["A?", "B?"], ["A?", "B?"]),
        (pd.DataFrame({0: ["A?", "B?"]}), ["A?", "B?"]),  # mlflow models serve's {"inputs": [...]}
        (pd.DataFrame({"question": ["A?"]}), ["A?"]),
        ({"question": ["A?", "B?"]}, ["A?", "B?"]),
    ],
)
def test_questions_are_read_from_every_input_form(model_input, questions):
    assert spec.questions_from(model_input) == questions


@pytest.mark.parametrize(
    "model_input", [[""], ["A?", 3], pd.DataFrame({"a": ["x"], "b": ["y"]}), {"a": 1, "b": 2}]
)
def test_bad_input_is_one_clear_error(model_input):
    with pytest.raises(spec.SpecError):
        spec.questions_from(model_input)


def test_load_quant_keeps_4bit_where_the_machine_allows_it():
    nf4 = QuantConfig()
    assert load_quant(nf4, "cuda", True) == (nf4, "4-bit NF4, as trained")
    assert load_quant(nf4, "cpu", True)[0].load_in_4bit  # bitsandbytes' CPU kernel
    plain, note = load_quant(nf4, "mps", True)
    assert not plain.load_in_4bit and note == "not quantized (no 4-bit on mps; trained 4-bit NF4)"
    plain, note = load_quant(nf4, "cuda", False)
    assert not plain.load_in_4bit and "bitsandbytes is not installed" in note
    none = QuantConfig(name="none", load_in_4bit=False)
    assert load_quant(none, "cuda", True) == (none, "not quantized, as trained")


def test_card_licence_scores_and_usage(conf):
    metrics = {"rouge1": 0.45, "rouge2": 0.25, "rougeL": 0.42, "base_rouge1": 0.35,
               "base_rouge2": 0.18, "base_rougeL": 0.32, "train_examples": 900}  # fmt: skip
    facts = card.CardFacts(conf=conf, run_id="r1", metrics=metrics, run_tags={})
    text = card.model_card(facts)
    assert text.startswith("---\nlicense: apache-2.0\n")  # the tiny model is ours
    assert "| base | 0.3500 | 0.1800 | 0.3200 |\n| fine-tuned | 0.4500 | 0.2500 | 0.4200 |" in text
    assert "Confirmed" not in text  # no confirmation: no such line
    assert "PeftModel.from_pretrained(base" in text
    facts = card.CardFacts(
        conf=conf, run_id="r1", metrics=metrics, run_tags={}, merged=True, license="llama2"
    )
    merged = card.model_card(facts)
    assert merged.startswith("---\nlicense: llama2\n") and "library_name" not in merged
    assert 'AutoModelForCausalLM.from_pretrained("PATH_OR_REPO")' in merged
