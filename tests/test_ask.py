"""``python -m finqa_exp.ask``: the champion answers, and exports as a plain merged model.

A toy "hub" model (a 1-layer Llama saved to a folder, named by model.name_or_path) and a
LoRA adapter with random, non-zero B weights are logged as a trial's run, so the answers
the adapter gives are known before ask loads it back from MLflow.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import peft
import pytest
import torch
from omegaconf import OmegaConf

from finqa_exp import ask, evaluation, modeling, tracking
from finqa_exp.config import QuantConfig, TrackingConfig, validate
from tests.conftest import compose_cfg, toy_base

REPO = Path(__file__).resolve().parents[1]
QUESTIONS = ["What is a dividend?", "What does EBITDA measure?"]
MODEL = "toy-champion"


def tracking_cfg(root: Path) -> TrackingConfig:
    return TrackingConfig(
        uri=f"sqlite:///{root}/mlflow.db", artifact_location=str(root / "mlartifacts")
    )


def with_adapter(cfg, source: Path):
    """The trial's base (4-bit, as it loads it) with a LoRA adapter whose B is not zero."""
    conf = validate(cfg)
    base = modeling.load_base_model(source, conf.model, conf.quant, torch.device("cpu"))
    torch.manual_seed(1)
    model = modeling.add_lora(base, conf.lora, False)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    return model


@pytest.fixture(scope="module")
def logged(tmp_path_factory):
    """A finished trial's run (config.yaml + adapter/) registered as MODEL@champion."""
    root = tmp_path_factory.mktemp("ask")
    source = toy_base(root / "base")
    cfg = compose_cfg(
        [f"paths.root_dir={root}", f"model.name_or_path={source}", "model.name=toy", "lora.r=4"],
        root / "out",
    )
    model = with_adapter(cfg, source)
    tokenizer = modeling.load_tokenizer(source, validate(cfg).model)
    model.save_pretrained(root / "adapter")
    tokenizer.save_pretrained(root / "adapter")
    expected = evaluation.generate_answers(
        model, tokenizer, validate(cfg).data.prompt_template, QUESTIONS, 12, 8
    )
    tracker = tracking.MlflowTracker(tracking_cfg(root))
    run_id = tracker.start_run("trial-0", {})
    tracker.log_text(OmegaConf.to_yaml(cfg, resolve=True), "config.yaml")
    tracker.log_artifacts(root / "adapter", "adapter")
    tracker.end_run(tracking.FINISHED)
    tracking.RunStore(tracking_cfg(root).uri).register_champion(MODEL, run_id)
    return root, cfg, run_id, expected


def args(root: Path) -> list[str]:
    return [f"tracking.uri=sqlite:///{root}/mlflow.db", f"paths.root_dir={root}"]


def test_questions_and_overrides_are_told_apart():
    items = ["What is P/E?", "tracking.uri=sqlite:////x/mlflow.db", "+extra=1", "Is 2=2 true?"]
    assert ask.split_args(items) == (
        ["What is P/E?", "Is 2=2 true?"],
        ["tracking.uri=sqlite:////x/mlflow.db", "+extra=1"],
    )


def test_champion_answers_as_the_trial_model_did(logged, capsys):
    root, _, run_id, expected = logged
    assert ask.run([*QUESTIONS, *args(root), "--max-new-tokens", "12"]) == 0
    out = capsys.readouterr()
    assert f"{MODEL} version 1 (champion), run {run_id}" in out.err
    assert out.out == "".join(f"Q: {q}\nA: {a}\n\n" for q, a in zip(QUESTIONS, expected))
    assert any(expected)  # the toy model says something


def test_run_id_and_model_name_pick_the_same_run(logged, capsys):
    root, _, run_id, expected = logged
    for flags in (["--run-id", run_id], ["--model", MODEL]):
        assert ask.run([QUESTIONS[0], *args(root), "--max-new-tokens", "12", *flags]) == 0
        assert capsys.readouterr().out == f"Q: {QUESTIONS[0]}\nA: {expected[0]}\n\n"


def exit_code(argv: list[str]) -> int:
    """``ask.run``'s exit code for bad input (it exits, as the command does)."""
    with pytest.raises(SystemExit) as exited:
        ask.run(argv)
    return exited.value.code


def test_no_champion_or_unknown_run_is_one_line(logged, tmp_path, capsys):
    root, *_ = logged
    assert exit_code(["What?", *args(root), "--model", "nope"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        f"error: no model 'nope' with alias 'champion' in sqlite:///{root}/mlflow.db; "
        f"models with it: {MODEL}"
    )
    assert exit_code(["What?", *args(root), "--run-id", "0" * 32]) == 2
    assert capsys.readouterr().err.strip().startswith(f"error: no run {'0' * 32} in ")


def test_ask_command_without_champion_exits_with_one_line(logged, tmp_path):
    root, *_ = logged
    store = tracking.RunStore(tracking_cfg(root).uri)
    store.client.delete_registered_model_alias(MODEL, "champion")
    try:
        proc = ask_command(root)
    finally:
        store.client.set_registered_model_alias(MODEL, "champion", "1")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines() == [
        f"error: no registered model has alias 'champion' in sqlite:///{root}/mlflow.db: "
        "run `python -m finqa_exp.report study=NAME` (or a sweep) first, or pass --run-id"
    ]
    assert proc.stdout == ""
    proc = ask_command(tmp_path)  # no store at all
    assert proc.returncode == 2
    assert proc.stderr.strip() == (
        f"error: tracking.uri=sqlite:///{tmp_path}/mlflow.db: no MLflow store there"
    )
    assert not (tmp_path / "mlflow.db").exists()


def ask_command(root: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "finqa_exp.ask", "What is a bond?", *args(root)],
        cwd=root,
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_export_merged_is_a_plain_model_with_the_adapter_folded_in(logged, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root, cfg, run_id, _ = logged
    target = tmp_path / "merged"
    assert ask.run([*args(root), "--export-merged", str(target)]) == 0

    merged = AutoModelForCausalLM.from_pretrained(target)
    tokenizer = AutoTokenizer.from_pretrained(target)
    assert not any("lora" in name for name in merged.state_dict())
    assert merged.config.use_cache
    info = json.loads((target / ask.EXPORT_INFO).read_text())
    assert info["run_id"] == run_id
    assert info["prompt_template"] == validate(cfg).data.prompt_template

    # The same adapter on an unquantized base, unmerged: the merged model must match it.
    fp32 = QuantConfig(name="none", load_in_4bit=False, compute_dtype="float32")
    source = root / "base"
    reference = modeling.load_base_model(source, validate(cfg).model, fp32, torch.device("cpu"))
    reference = peft.PeftModel.from_pretrained(reference, str(root / "adapter")).eval()
    ids = tokenizer(["### Question: What is a bond?\n\n### Answer: "], return_tensors="pt")
    with torch.no_grad():
        want = reference(**ids).logits
        got = merged(**ids).logits
        plain = reference.get_base_model()
        with reference.disable_adapter():
            base_logits = plain(**ids).logits
    assert torch.allclose(got, want, atol=1e-4)
    assert not torch.allclose(got, base_logits, atol=1e-2)  # the adapter did change it

    assert exit_code([*args(root), "--export-merged", str(target)]) == 2  # never overwrites
