"""Use the winner: answer questions with a study's champion, or export it merged for serving.

    python -m finqa_exp.ask "What is EBITDA?"                       # the registered champion
    python -m finqa_exp.ask "What is EBITDA?" "What is a bond?" --model finqa_tiny_finqa_sample
    python -m finqa_exp.ask "What is EBITDA?" --run-id RUN_ID       # any trial's run
    python -m finqa_exp.ask --export-merged DIR                      # base + adapter, merged
    python -m finqa_exp.ask "What is EBITDA?" tracking.uri=sqlite:////abs/mlflow.db

The champion is the version that alias ``champion`` of a registered model points at (set by
``python -m finqa_exp.report`` and at the end of every sweep); with no ``--model``, the one
registered model that has the alias. Everything else comes from the run itself: its logged
``config.yaml`` says which base model (for the offline tiny model: rebuilt or reused from the
cache exactly as the trial built it, from the same data split), how it was quantized and the
prompt template; its ``adapter/`` holds the LoRA weights and the tokenizer. Answers are
greedy, as in evaluation. ``key=value`` arguments override ``conf/ask.yaml``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
import tempfile
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

from finqa_exp.config import (
    ConfigError,
    FinqaConfig,
    PathsConfig,
    QuantConfig,
    TrackingConfig,
    validate,
)
from finqa_exp.errors import BadInput, exit_on_bad_input, hydra_error_line
from finqa_exp.tracking import CHAMPION_ALIAS, RunStore, names, redact

log = logging.getLogger("finqa_exp.ask")

# A Hydra override (`tracking.uri=...`, `+x=1`, `~y`), as opposed to a question.
_OVERRIDE = re.compile(r"^(~|\+{1,2})?[A-Za-z_][\w.@/-]*(=|$)")
EXPORT_INFO = "finqa_export.json"


class AskError(BadInput, RuntimeError):
    """No model to ask (no champion, unknown run, a base that does not match); one line."""


@dataclass
class AskConfig:
    """``conf/ask.yaml``: which stores, which run, how long the answers."""

    paths: PathsConfig = field(default_factory=PathsConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    # Registered model whose alias to use; null: the only registered model with the alias.
    registered_model: str | None = None
    alias: str = CHAMPION_ALIAS
    # A run id instead of the registry (any trial with an adapter).
    run_id: str | None = None
    # null: the trial's own eval.max_new_tokens.
    max_new_tokens: int | None = None
    # null: the trial's eval.batch_size (the same batches give the trial's very answers).
    batch_size: int | None = None
    # A folder to write the merged model to, instead of answering.
    export_merged: str | None = None


ConfigStore.instance().store(name="ask_schema", node=AskConfig)


@dataclass(frozen=True)
class Winner:
    """A trial's run as a model: what was asked for, its logged config and adapter folder."""

    run_id: str
    label: str
    conf: FinqaConfig
    adapter_dir: Path


# ----------------------------------------------------------------------------- command line


def split_args(items: Sequence[str]) -> tuple[list[str], list[str]]:
    """Questions and Hydra overrides, told apart by the ``key=value`` form."""
    questions = [i for i in items if not _OVERRIDE.match(i)]
    overrides = [i for i in items if _OVERRIDE.match(i)]
    return questions, overrides


def compose(overrides: Sequence[str]) -> AskConfig:
    """``conf/ask.yaml`` with the overrides, typed and checked."""
    from hydra import compose as hydra_compose
    from hydra import initialize

    from finqa_exp.config import register_configs

    register_configs()
    try:
        with initialize(config_path="../conf", version_base="1.3"):
            cfg = hydra_compose(config_name="ask", overrides=list(overrides))
        obj = OmegaConf.to_object(cfg)
    except Exception as err:  # bad override or type: Hydra's first line says which
        raise ConfigError(hydra_error_line(err)) from err
    assert isinstance(obj, AskConfig)
    return obj


# ----------------------------------------------------------------------------- the run


def resolve_run(conf: AskConfig, store: RunStore) -> tuple[str, str]:
    """The run id to load and how to name it: ``--run-id``, or the alias's version."""
    if conf.run_id:
        if store.run(conf.run_id) is None:
            raise AskError(f"no run {conf.run_id} in {redact(store.uri)}")
        return conf.run_id, f"run {conf.run_id}"
    where = redact(store.uri)
    if conf.registered_model:
        champ = store.champion(conf.registered_model, conf.alias)
        if champ is None:
            listed = ", ".join(c.model_name for c in store.champions(conf.alias)) or "none"
            raise AskError(
                f"no model '{conf.registered_model}' with alias '{conf.alias}' in {where}; "
                f"models with it: {listed}"
            )
    else:
        found = store.champions(conf.alias)
        if not found:
            raise AskError(
                f"no registered model has alias '{conf.alias}' in {where}: run "
                "`python -m finqa_exp.report study=NAME` (or a sweep) first, or pass --run-id"
            )
        if len(found) > 1:
            names = ", ".join(c.model_name for c in found)
            raise AskError(f"several models have alias '{conf.alias}' ({names}): pick --model")
        champ = found[0]
    label = f"{champ.model_name} version {champ.version} ({champ.alias}), run {champ.run_id}"
    return champ.run_id, label


def trial_config(text: str, cache_dir: str) -> FinqaConfig:
    """The trial's logged config, with this machine's cache (a tiny base is built there)."""
    cfg = OmegaConf.create(text)
    cfg.paths.cache_dir = cache_dir
    return validate(cfg)


def fetch_winner(conf: AskConfig, store: RunStore, workdir: Path) -> Winner:
    run_id, label = resolve_run(conf, store)
    text = store.text(run_id, names.CONFIG_ARTIFACT)
    if text is None:
        raise AskError(f"run {run_id} has no config.yaml: it is not a finqa-exp trial")
    if not store.has_artifact(run_id, names.ADAPTER_ARTIFACT):
        raise AskError(f"run {run_id} has no adapter (tracking.log_adapter=false, or it failed)")
    adapter = store.download(run_id, names.ADAPTER_ARTIFACT, workdir)
    return Winner(run_id, label, trial_config(text, conf.paths.cache_dir), adapter)


def base_source(trial: FinqaConfig) -> str:
    """Where the trial's base model is: its hub id or folder, or the tiny one, rebuilt from
    the same data split (or found in the cache) as the trial built it."""
    from finqa_exp import data as data_lib
    from finqa_exp.modeling import base_model_source

    splits = data_lib.load_splits(trial.data) if not trial.model.name_or_path else None
    return base_model_source(trial, splits)


def check_tokenizers(base: Any, adapter: Any) -> None:
    """A rebuilt tiny base must speak the adapter's vocabulary, or answers are noise."""
    if base.get_vocab() != adapter.get_vocab():
        raise AskError(
            "the base model's tokenizer differs from the one the adapter was trained with "
            "(a different data split or model.tiny settings?)"
        )


def load_tuned(winner: Winner, merged_dtype: bool = False) -> tuple[Any, Any]:
    """(peft model, tokenizer): the base as the trial loaded it, plus the adapter.

    ``merged_dtype`` loads the base unquantized (``quant.compute_dtype``: fp32 on CPU), as
    merging LoRA weights into 4-bit weights would round them away.
    """
    from finqa_exp import devices

    dev = devices.device()  # first: importing peft (and bitsandbytes) starts CUDA
    import peft

    from finqa_exp import modeling

    trial = winner.conf
    source = base_source(trial)
    tokenizer = modeling.load_tokenizer(winner.adapter_dir, trial.model)
    check_tokenizers(modeling.load_tokenizer(source, trial.model), tokenizer)
    quant = trial.quant
    if merged_dtype:
        quant = QuantConfig(name="none", load_in_4bit=False, compute_dtype=quant.compute_dtype)
    base = modeling.load_base_model(source, trial.model, quant, dev)
    model = peft.PeftModel.from_pretrained(base, str(winner.adapter_dir))
    model.eval()
    return model, tokenizer


def answer(winner: Winner, questions: Sequence[str], conf: AskConfig) -> list[str]:
    """Greedy answers with the trial's prompt template and generation length."""
    from finqa_exp.evaluation import generate_answers

    model, tokenizer = load_tuned(winner)
    max_new = conf.max_new_tokens or winner.conf.eval.max_new_tokens
    batch = conf.batch_size or winner.conf.eval.batch_size
    template = winner.conf.data.prompt_template
    return generate_answers(model, tokenizer, template, list(questions), max_new, batch)


def export_merged(winner: Winner, target: Path) -> Path:
    """Base + adapter merged (peft merge_and_unload) into ``target`` with the tokenizer:
    a plain causal LM for ``AutoModelForCausalLM.from_pretrained``."""
    if target.exists() and any(target.iterdir()):
        raise AskError(f"export folder {target} is not empty")
    model, tokenizer = load_tuned(winner, merged_dtype=True)
    merged = model.merge_and_unload()
    merged.config.use_cache = True  # training turned it off; serving wants it
    target.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(target)
    tokenizer.save_pretrained(target)
    # How to prompt it: a served model must be asked in the form it was tuned on.
    info = {
        "run_id": winner.run_id,
        "source": winner.label,
        "base_model": winner.conf.model.name_or_path or f"tiny ({winner.conf.model.name})",
        "prompt_template": winner.conf.data.prompt_template,
        "max_new_tokens": winner.conf.eval.max_new_tokens,
    }
    (target / EXPORT_INFO).write_text(json.dumps(info, indent=2) + "\n")
    return target


# ----------------------------------------------------------------------------- entry point


def run(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m finqa_exp.ask",
        description="Answer financial questions with a sweep's champion (or any trial run).",
    )
    parser.add_argument("items", nargs="*", help="questions, and key=value overrides")
    parser.add_argument("--model", help="registered model name (default: the only champion)")
    parser.add_argument("--alias", help=f"registry alias (default: {CHAMPION_ALIAS})")
    parser.add_argument("--run-id", help="use this MLflow run instead of the registry")
    parser.add_argument("--export-merged", metavar="DIR", help="write the merged model to DIR")
    parser.add_argument("--max-new-tokens", type=int, help="answer length in tokens")
    args = parser.parse_intermixed_args(argv)  # questions and flags in any order
    questions, overrides = split_args(args.items)
    if not questions and not args.export_merged:
        parser.error("give a question, or --export-merged DIR")
    with exit_on_bad_input("finqa_exp.ask"):
        conf = compose(overrides)
        for key, value in (
            ("registered_model", args.model),
            ("alias", args.alias),
            ("run_id", args.run_id),
            ("export_merged", args.export_merged),
            ("max_new_tokens", args.max_new_tokens),
        ):
            if value is not None:
                setattr(conf, key, value)
        store = RunStore(conf.tracking.uri)
        with tempfile.TemporaryDirectory() as tmp:
            winner = fetch_winner(conf, store, Path(tmp))
            print(f"model: {winner.label}", file=sys.stderr)
            if conf.export_merged:
                out = export_merged(winner, Path(conf.export_merged).absolute())
                print(f"merged model written to {out}", file=sys.stderr)
            if questions:
                for question, reply in zip(questions, answer(winner, questions, conf)):
                    print(f"Q: {question}\nA: {reply}\n")
    return 0


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    # The answers are the output: no loading bars or deprecation notices around them.
    warnings.filterwarnings("ignore", category=FutureWarning)
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    sys.exit(run(sys.argv[1:]))


if __name__ == "__main__":
    main()
