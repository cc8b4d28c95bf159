"""``python -m finqa_exp.ask``: the champion answers, as ``mlflow.pyfunc`` does, and exports
its adapter or merged model with a model card, for the hub.

A toy base (a 1-layer Llama saved to a folder, named by model.name_or_path) and a LoRA
adapter with random, non-zero B weights are logged as a trial's run and model (by the
trial's own ``log_served_model``), so the answers the adapter gives are known before ask
loads it back from MLflow. A second run has only the adapter, as runs logged before trials
logged models do.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import peft
import pytest
import torch
from omegaconf import OmegaConf

from finqa_exp import ask, evaluation, modeling, tracking
from finqa_exp.config import QuantConfig, TrackingConfig, validate
from finqa_exp.serving.export import CARD, EXPORT_INFO
from finqa_exp.trial import log_served_model
from tests.conftest import compose_cfg, toy_base

REPO = Path(__file__).resolve().parents[1]
QUESTIONS = ["What is a dividend?", "What does EBITDA measure?"]
MODEL = "toy-champion"
EXAMPLES = ["What is a Roth IRA?", "What is a bond ladder?"]  # the run's logged test questions
METRICS = {"rouge1": 0.41, "rouge2": 0.22, "rougeL": 0.38, "base_rouge1": 0.31,
           "base_rouge2": 0.12, "base_rougeL": 0.28, "train_examples": 333}  # fmt: skip


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
    """A finished trial's run (config.yaml, metrics, adapter/ and its logged model)
    registered as MODEL@champion, and a run with only config.yaml and adapter/."""
    root = tmp_path_factory.mktemp("ask")
    source = toy_base(root / "base")
    cfg = compose_cfg(
        [f"paths.root_dir={root}", f"model.name_or_path={source}", "model.name=toy", "lora.r=4",
         "eval.max_new_tokens=12", "eval.batch_size=8"],
        root / "out",
    )  # fmt: skip
    conf = validate(cfg)
    model = with_adapter(cfg, source)
    tokenizer = modeling.load_tokenizer(source, conf.model)
    model.save_pretrained(root / "adapter")
    tokenizer.save_pretrained(root / "adapter")
    template = conf.data.prompt_template
    expected = evaluation.generate_answers(model, tokenizer, template, QUESTIONS, 12, 8)
    tracker = tracking.MlflowTracker(tracking_cfg(root))
    run_ids = []
    for with_model in (True, False):
        run_ids.append(tracker.start_run("trial-0", {"study": "toy-study", "trial_number": "0"}))
        tracker.log_text(OmegaConf.to_yaml(cfg, resolve=True), "config.yaml")
        tracker.log_metrics(METRICS)
        tracker.log_table([{"question": q} for q in EXAMPLES], "samples.json")
        tracker.log_artifacts(root / "adapter", "adapter")
        if with_model:
            base = SimpleNamespace(model=model.get_base_model(), source=str(source))
            samples = [{"question": QUESTIONS[0], "tuned_answer": expected[0]}]
            assert log_served_model(conf, base, root / "adapter", samples, tracker, "trial-0")
        tracker.end_run(tracking.FINISHED)
    tracking.RunStore(tracking_cfg(root).uri).register_champion(
        MODEL, run_ids[0], tags={"objective_mean": "0.25", "objective_std": "0.01",
                                 "n_seeds": "3", "objective_values": "0.24 0.25 0.26",
                                 "searched": "lora.r=4, train.learning_rate=0.001"},
    )  # fmt: skip
    return root, cfg, run_ids[0], expected, run_ids[1]


def args(root: Path) -> list[str]:
    return [f"tracking.uri=sqlite:///{root}/mlflow.db", f"paths.root_dir={root}"]


def test_questions_and_overrides_are_told_apart():
    items = ["What is P/E?", "tracking.uri=sqlite:////x/mlflow.db", "+extra=1", "Is 2=2 true?"]
    assert ask.split_args(items) == (
        ["What is P/E?", "Is 2=2 true?"],
        ["tracking.uri=sqlite:////x/mlflow.db", "+extra=1"],
    )


def test_champion_answers_as_the_trial_model_did(logged, capsys):
    root, _, run_id, expected, _ = logged
    assert ask.run([*QUESTIONS, *args(root), "--max-new-tokens", "12"]) == 0
    out = capsys.readouterr()
    assert f"{MODEL} version 1 (champion), run {run_id}" in out.err
    assert f"base {logged[0] / 'base'}, 4-bit NF4, as trained, on cpu" in out.err
    assert out.out == "".join(f"Q: {q}\nA: {a}\n\n" for q, a in zip(QUESTIONS, expected))
    assert any(expected)  # the toy model says something


def test_run_id_and_model_name_pick_the_same_run(logged, capsys):
    root, _, run_id, expected, _ = logged
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

    root, cfg, run_id, _, _ = logged
    target = tmp_path / "merged"
    assert ask.run([*args(root), "--export-merged", str(target)]) == 0

    merged = AutoModelForCausalLM.from_pretrained(target)
    tokenizer = AutoTokenizer.from_pretrained(target)
    assert not any("lora" in name for name in merged.state_dict())
    assert merged.config.use_cache
    info = json.loads((target / EXPORT_INFO).read_text())
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


def test_pyfunc_load_model_answers_as_ask_does(logged, monkeypatch):
    import mlflow

    # MLflow refuses to unpickle a model then: ours loads from code and safetensors only.
    monkeypatch.setenv("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "false")
    root, _, run_id, expected, _ = logged
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking_cfg(root).uri)
    model = mlflow.pyfunc.load_model(f"models:/{MODEL}@champion")
    assert model.metadata.run_id == run_id
    assert model.predict(QUESTIONS, params={"max_new_tokens": 12}) == expected
    assert model.predict(QUESTIONS[0]) == expected[:1]  # one question as a string


def test_the_logged_model_holds_no_pickle(logged):
    root, _, run_id, _, _ = logged
    store = tracking.RunStore(tracking_cfg(root).uri)
    folder = Path(store.model_location(store.logged_model(run_id).model_id).removeprefix("file://"))
    files = {p.suffix for p in folder.rglob("*") if p.is_file()}
    assert ".safetensors" in files
    assert not files & {".pkl", ".pickle", ".bin", ".pt", ".pth", ".joblib"}
    assert "python_model.pkl" not in {p.name for p in folder.rglob("*")}


def test_a_run_without_a_logged_model_is_rebuilt_and_answers_the_same(logged, capsys):
    root, _, _, expected, bare_run = logged
    assert ask.run([*QUESTIONS, *args(root), "--run-id", bare_run]) == 0
    out = capsys.readouterr()
    assert out.out == "".join(f"Q: {q}\nA: {a}\n\n" for q, a in zip(QUESTIONS, expected))


def test_export_writes_the_adapter_with_a_card_of_the_runs_figures(logged, tmp_path):
    from safetensors.torch import load_file

    root, cfg, run_id, _, _ = logged
    target = tmp_path / "adapter"
    assert ask.run([*args(root), "--export", str(target)]) == 0
    got, want = (load_file(d / "adapter_model.safetensors") for d in (target, root / "adapter"))
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)
    base = modeling.load_base_model(root / "base", validate(cfg).model,
                                    QuantConfig(name="none", load_in_4bit=False),
                                    torch.device("cpu"))  # fmt: skip
    loaded = peft.PeftModel.from_pretrained(base, str(target))  # loads with peft
    assert any("lora_B" in n for n, _ in loaded.named_parameters())
    card = (target / CARD).read_text()
    assert card.startswith("---\nlicense: other\n")
    assert "library_name: peft" in card
    assert "| base | 0.3100 | 0.1200 | 0.2800 |" in card
    assert "| fine-tuned | 0.4100 | 0.2200 | 0.3800 |" in card
    assert "Confirmed over 3 training seeds: rougeL mean 0.2500 (sd 0.0100" in card
    assert f"MLflow run `{run_id}`, trial 0 of the Optuna study `toy-study`" in card
    assert "| LoRA rank r | 4 |" in card
    assert (
        "Searched by the study, this trial's values: lora.r=4, train.learning_rate=0.001." in card
    )
    assert json.loads((target / EXPORT_INFO).read_text())["merged"] is False


def push_command(root: Path, target: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "finqa_exp.ask", *args(root), "--export", str(target),
         "--push-to-hub", "someone/finqa-lora"],
        cwd=root, capture_output=True, text=True, timeout=300,
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "HF_HOME": str(target.parent),
             **env},
    )  # fmt: skip


@pytest.mark.parametrize(
    ("env", "says"),
    [
        ({"HF_HUB_OFFLINE": "1", "HF_TOKEN": "hf_x"}, "HF_HUB_OFFLINE is set"),
        ({}, "no Hugging Face token (set HF_TOKEN or run `hf auth login`)"),
        # A hub that does not answer: a port on this machine that nothing listens on.
        ({"HF_TOKEN": "hf_x", "HF_ENDPOINT": "http://127.0.0.1:9"}, "the hub at"),
    ],
    ids=["offline", "no-token", "unreachable"],
)
def test_push_to_hub_fails_in_one_line_before_any_model_loads(logged, tmp_path, env, says):
    root, *_ = logged
    target = tmp_path / "export"
    proc = push_command(root, target, env)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --push-to-hub someone/finqa-lora: ")
    assert says in lines[0]
    assert not target.exists()  # nothing exported, no model loaded


def test_push_to_hub_uploads_the_export(logged, tmp_path, monkeypatch):
    import huggingface_hub

    calls = []

    class FakeApi:
        def __init__(self, token=None):
            self.token = token

        def whoami(self):
            return {"name": "someone"}

        def create_repo(self, repo_id, **kwargs):
            calls.append(("create", repo_id, kwargs))
            return f"https://huggingface.co/{repo_id}"

        def upload_folder(self, repo_id, folder_path, **kwargs):
            calls.append(("upload", repo_id, sorted(p.name for p in Path(folder_path).iterdir())))

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    monkeypatch.setenv("HF_TOKEN", "hf_test")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    root, *_ = logged
    target = tmp_path / "export"
    assert ask.run([*args(root), "--export", str(target), "--push-to-hub", "me/finqa"]) == 0
    assert calls[0] == ("create", "me/finqa", {"repo_type": "model", "private": True,
                                               "exist_ok": True})  # fmt: skip
    assert calls[1][:2] == ("upload", "me/finqa")
    assert {CARD, EXPORT_INFO, "adapter_model.safetensors"} <= set(calls[1][2])


def test_a_request_with_nothing_to_do_is_one_line(logged, capsys):
    root, *_ = logged
    assert exit_code([*args(root)]) == 2
    assert capsys.readouterr().err.strip() == "error: give a question, or --export DIR"
    assert exit_code(["What?", *args(root), "push_to_hub=me/finqa"]) == 2  # key=value too
    assert capsys.readouterr().err.strip() == (
        "error: --merged and --push-to-hub go with --export DIR"
    )
