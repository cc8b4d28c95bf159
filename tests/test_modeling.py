"""Model preparation: the dtype policy decided at load, activation checkpointing and the
memory estimate behind ``model.gradient_checkpointing=auto``. CPU, on a toy Llama."""

from __future__ import annotations

import types
from pathlib import Path

import pytest
import torch

from finqa_exp import modeling, training
from finqa_exp.config import DataConfig, LoraConfig, ModelConfig, QuantConfig, TrainConfig
from finqa_exp.data import load_splits, tokenize
from finqa_exp.evaluation import generate_answers
from finqa_exp.tracking import NullTracker
from tests.conftest import toy_base

CPU = torch.device("cpu")
TEMPLATE = "### Question: {question}\n\n### Answer: "
QUESTIONS = ["What is a dividend?", "What does EBITDA measure?", "What is a bond?"]


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> Path:
    return toy_base(tmp_path_factory.mktemp("toy"))


def plain_dtypes(model) -> dict[str, torch.dtype]:
    """The dtype of every base weight that is not 4-bit (embeddings, norms, LM head)."""
    return {
        n: p.dtype
        for n, p in model.named_parameters()
        if type(p).__name__ != "Params4bit" and "lora_" not in n
    }


def test_the_base_is_used_as_loaded_so_base_tuned_and_ask_run_the_same_weights(toy):
    quant = QuantConfig(compute_dtype="bfloat16")  # as on a GPU with native bf16
    base = modeling.load_base_model(toy, ModelConfig(), quant, CPU)
    tokenizer = modeling.load_tokenizer(toy, ModelConfig())
    loaded = plain_dtypes(base)
    assert loaded and set(loaded.values()) == {torch.bfloat16}
    before = generate_answers(base, tokenizer, TEMPLATE, QUESTIONS, 8, 3)

    model = modeling.add_lora(base, LoraConfig(r=4), gradient_checkpointing=False)
    # peft's prepare_model_for_kbit_training would cast these to fp32 here, in place.
    assert plain_dtypes(model.get_base_model()) == loaded
    assert all(not p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)
    assert any(p.requires_grad for n, p in model.named_parameters() if "lora_" in n)

    # The next trial (or the base score) sees the base as it was loaded...
    assert modeling.remove_lora(model) is base
    assert plain_dtypes(base) == loaded
    assert generate_answers(base, tokenizer, TEMPLATE, QUESTIONS, 8, 3) == before
    # ... and so does `ask`, which loads it afresh with the same function.
    again = modeling.load_base_model(toy, ModelConfig(), quant, CPU)
    assert plain_dtypes(again) == loaded
    assert generate_answers(again, tokenizer, TEMPLATE, QUESTIONS, 8, 3) == before


def llama_shape(attn: str) -> types.SimpleNamespace:
    return types.SimpleNamespace(
        hidden_size=2048,
        num_attention_heads=32,
        num_hidden_layers=22,
        vocab_size=32000,
        _attn_implementation=attn,
    )


def test_activation_estimate_counts_attention_scores_only_where_they_exist():
    s, b = 512, 8
    eager = modeling.activation_bytes(llama_shape("eager"), b, s)
    sdpa = modeling.activation_bytes(llama_shape("sdpa"), b, s)
    assert eager - sdpa == 5 * 32 * s * s * b * 22
    assert sdpa == 34 * s * b * 2048 * 22 + 8 * s * b * 32000


def test_auto_checkpointing_counts_memory_pytorch_holds_cached(monkeypatch):
    gib = 2**30
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda dev=None: (1 * gib, 80 * gib))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda dev=None: 6 * gib)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda dev=None: 1 * gib)
    dev = torch.device("cuda")
    assert modeling.available_gpu_bytes(dev) == 6 * gib  # 1 free + 5 cached, unused
    config = llama_shape("sdpa")
    need = modeling.activation_bytes(config, 4, 512)
    # Judged on the driver's free memory alone it would need checkpointing; a first trial,
    # with nothing cached yet, would not. Counting the cache, neither does.
    assert 0.8 * 1 * gib < need < 0.8 * 6 * gib
    assert not modeling.use_gradient_checkpointing("auto", config, 4, 512, dev)
    # Eager attention's scores tip the same batch over.
    assert modeling.use_gradient_checkpointing("auto", llama_shape("eager"), 4, 512, dev)
    assert modeling.use_gradient_checkpointing("true", config, 4, 512, CPU)
    assert not modeling.use_gradient_checkpointing("auto", config, 4, 512, CPU)


def _train(toy: Path, checkpointing: bool, tmp_path: Path) -> tuple[list[float], int]:
    """Four steps of LoRA training on the toy base; (losses, decoder-layer forward calls)."""
    from transformers import set_seed

    tokenizer = modeling.load_tokenizer(toy, ModelConfig())
    base = modeling.load_base_model(toy, ModelConfig(), QuantConfig(), CPU)
    splits = load_splits(DataConfig())
    data = tokenize(tokenizer, TEMPLATE, splits.train[:32], 256, f"ckpt-{toy}")
    set_seed(0)
    model = modeling.add_lora(base, LoraConfig(r=4), gradient_checkpointing=checkpointing)
    if checkpointing:  # non-reentrant: peft's {} would leave torch on the reentrant kind
        funcs = [layer._gradient_checkpointing_func for layer in base.model.layers]
        assert funcs and all(f.keywords == {"use_reentrant": False} for f in funcs)
    calls = []
    for layer in model.get_base_model().model.layers:
        # Inside the layer (transformers checkpoints its forward, not its hooks), and a
        # pre-hook: the recomputation stops once it has what the backward pass needs.
        layer.self_attn.register_forward_pre_hook(lambda *_: calls.append(1))
    cfg = TrainConfig(
        batch_size=8, max_steps=4, logging_steps=1, eval_strategy="no", learning_rate=1e-2
    )
    result = training.train(model, tokenizer, data, None, cfg, tmp_path, CPU, NullTracker())
    return [loss for _, loss in result.history.train], len(calls)


def test_checkpointing_trains_to_the_same_losses_by_computing_layers_twice(toy, tmp_path):
    plain_losses, plain_calls = _train(toy, False, tmp_path / "plain")
    ckpt_losses, ckpt_calls = _train(toy, True, tmp_path / "ckpt")
    assert len(plain_losses) == 4 and plain_losses[-1] < plain_losses[0]
    assert ckpt_losses == pytest.approx(plain_losses, rel=1e-5)
    # The cost: each layer's forward runs again during the backward pass.
    assert ckpt_calls == 2 * plain_calls


def test_hub_commit_reads_the_commit_a_load_left_in_the_hub_cache(tmp_path, monkeypatch):
    """What a served model records of a hub base: the commit, from the cache, offline."""
    from huggingface_hub import constants

    sha = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "models--org--fin"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(sha)
    (repo / "snapshots" / sha).mkdir(parents=True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert modeling.hub_commit("org/fin", None) == sha
    assert modeling.hub_commit("org/fin", "main") == sha
    assert modeling.hub_commit("org/never-loaded", None) is None
    assert modeling.hub_commit(str(tmp_path), None) is None  # a folder has no commit
    assert modeling.hub_commit(None, None) is None  # the tiny model
