"""Use the winner: answer questions with a study's champion, or export it for the hub.

    python -m finqa_exp.ask "What is EBITDA?"                       # the registered champion
    python -m finqa_exp.ask "What is EBITDA?" "What is a bond?" --model finqa_tiny_finqa_sample
    python -m finqa_exp.ask "What is EBITDA?" --run-id RUN_ID       # any trial's run
    python -m finqa_exp.ask --export DIR                             # adapter + model card
    python -m finqa_exp.ask --export DIR --merged                    # base + adapter, merged
    python -m finqa_exp.ask --export DIR --push-to-hub user/finqa-lora
    python -m finqa_exp.ask "What is EBITDA?" tracking.uri=sqlite:////abs/mlflow.db

The champion is the version that alias ``champion`` of a registered model points at (set by
``python -m finqa_exp.report`` and at the end of every sweep); with no ``--model``, the one
registered model that has the alias. It is the trial's logged MLflow model
(finqa_exp/serving), loaded by the same code as ``mlflow models serve`` and
``mlflow.pyfunc.load_model``: its base (bundled, or a hub id at its commit), quantization,
prompt template and adapter. A run logged before trials logged models is rebuilt from its
``config.yaml`` and ``adapter/`` (the tiny base from the cache, from the same data split).
Answers are greedy, as in evaluation. ``key=value`` arguments override ``conf/ask.yaml``.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
import tempfile
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

from finqa_exp.config import ConfigError, FinqaConfig, PathsConfig, TrackingConfig, validate
from finqa_exp.errors import BadInput, exit_on_bad_input, hydra_error_line
from finqa_exp.serving import answerer, hub, spec
from finqa_exp.serving import export as export_lib
from finqa_exp.serving.card import CardFacts
from finqa_exp.serving.spec import ServeSettings
from finqa_exp.tracking import CHAMPION_ALIAS, Champion, RunStore, names, redact
from finqa_exp.tracking.models import read_model

log = logging.getLogger("finqa_exp.ask")

# A Hydra override (`tracking.uri=...`, `+x=1`, `~y`), as opposed to a question.
_OVERRIDE = re.compile(r"^(~|\+{1,2})?[A-Za-z_][\w.@/-]*(=|$)")


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
    # A folder to export to (--export), the merged model rather than the adapter (--merged),
    # a hub repo to upload it to (--push-to-hub) and the card's licence (--license).
    export: str | None = None
    merged: bool = False
    push_to_hub: str | None = None
    license: str | None = None


ConfigStore.instance().store(name="ask_schema", node=AskConfig)


@dataclass(frozen=True)
class Winner:
    """A trial's run as a model: its logged config, its parts and settings (the logged
    model's, or rebuilt from the run for one logged before models were)."""

    run_id: str
    label: str
    conf: FinqaConfig
    artifacts: dict[str, str]
    settings: ServeSettings
    version_tags: dict[str, str]


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


def resolve_run(conf: AskConfig, store: RunStore) -> tuple[str, str, Champion | None]:
    """The run to load, how to name it, and the registry version: ``--run-id``, or the
    alias's version."""
    if conf.run_id:
        if store.run(conf.run_id) is None:
            raise AskError(f"no run {conf.run_id} in {redact(store.uri)}")
        return conf.run_id, f"run {conf.run_id}", None
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
    return champ.run_id, label, champ


def trial_config(text: str, cache_dir: str) -> FinqaConfig:
    """The trial's logged config, with this machine's cache (a tiny base is built there)."""
    cfg = OmegaConf.create(text)
    cfg.paths.cache_dir = cache_dir
    return validate(cfg)


def fetch_winner(conf: AskConfig, store: RunStore, workdir: Path) -> Winner:
    """The run's model, downloaded into ``workdir``: the registered version's (or, with
    --run-id, the run's) logged model, else the run's bare adapter."""
    run_id, label, champ = resolve_run(conf, store)
    text = store.text(run_id, names.CONFIG_ARTIFACT)
    if text is None:
        raise AskError(f"run {run_id} has no config.yaml: it is not a finqa-exp trial")
    trial = trial_config(text, conf.paths.cache_dir)
    tags = store.version_tags(champ) if champ is not None else {}
    if champ is not None:
        source = store.model_location(champ.model_id) if champ.model_id else None
    else:
        model = store.logged_model(run_id)
        source = model.artifact_location if model is not None else None
    if source is not None:
        artifacts, config = read_model(store.download_model(source, workdir / "model"))
        return Winner(run_id, label, trial, artifacts, ServeSettings.from_dict(config), tags)
    if not store.has_artifact(run_id, names.ADAPTER_ARTIFACT):
        raise AskError(f"run {run_id} has no adapter (tracking.log_adapter=false, or it failed)")
    log.warning("run %s has no logged model: rebuilding it from its config and adapter", run_id)
    adapter = store.download(run_id, names.ADAPTER_ARTIFACT, workdir)
    settings = spec.settings_for(trial, None, run_id)
    artifacts = spec.artifacts_for(adapter, base_source(trial), settings)
    return Winner(run_id, label, trial, artifacts, settings, tags)


def base_source(trial: FinqaConfig) -> str:
    """Where the trial's base model is: its hub id or folder, or the tiny one, rebuilt from
    the same data split (or found in the cache) as the trial built it."""
    from finqa_exp import data as data_lib
    from finqa_exp.modeling import base_model_source

    splits = data_lib.load_splits(trial.data) if not trial.model.name_or_path else None
    return base_model_source(trial, splits)


def asked_settings(winner: Winner, conf: AskConfig) -> ServeSettings:
    """The model's settings with ``conf/ask.yaml``'s generation overrides, if any."""
    settings = winner.settings
    if conf.max_new_tokens:
        settings = replace(settings, max_new_tokens=conf.max_new_tokens)
    if conf.batch_size:
        settings = replace(settings, batch_size=conf.batch_size)
    return settings


def answer(winner: Winner, questions: Sequence[str], conf: AskConfig) -> list[str]:
    """Greedy answers, loaded as the pyfunc model loads (finqa_exp/serving/answerer.py)."""
    tuned = answerer.load(winner.artifacts, asked_settings(winner, conf))
    return tuned.answer(list(questions))


def export(winner: Winner, store: RunStore, conf: AskConfig, target: Path) -> Path:
    """The adapter or merged model in ``target`` with a model card of the run's figures."""
    record = store.run(winner.run_id)
    facts = CardFacts(
        conf=winner.conf,
        run_id=winner.run_id,
        metrics=record.metrics if record else {},
        run_tags=record.tags if record else {},
        version_tags=winner.version_tags,
        label=winner.label,
        merged=conf.merged,
        base_revision=winner.settings.revision,
        license=conf.license,
    )
    return export_lib.export(winner.artifacts, winner.settings, facts, target)


# ----------------------------------------------------------------------------- entry point


def parse(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str], list[str]]:
    parser = argparse.ArgumentParser(
        prog="python -m finqa_exp.ask",
        description="Answer financial questions with a sweep's champion (or any trial run).",
    )
    parser.add_argument("items", nargs="*", help="questions, and key=value overrides")
    parser.add_argument("--model", help="registered model name (default: the only champion)")
    parser.add_argument("--alias", help=f"registry alias (default: {CHAMPION_ALIAS})")
    parser.add_argument("--run-id", help="use this MLflow run instead of the registry")
    parser.add_argument("--export", metavar="DIR", help="write the adapter and a card to DIR")
    parser.add_argument("--merged", action="store_true", help="export the merged model")
    parser.add_argument("--export-merged", metavar="DIR", help="same as --export DIR --merged")
    parser.add_argument("--push-to-hub", metavar="REPO", help="upload the export to the hub")
    parser.add_argument("--license", help="the card's licence id (default: apache-2.0 for "
                        "the tiny model, other for a hub base)")  # fmt: skip
    parser.add_argument("--max-new-tokens", type=int, help="answer length in tokens")
    args = parser.parse_intermixed_args(argv)  # questions and flags in any order
    if args.export_merged:
        args.export, args.merged = args.export_merged, True
    questions, overrides = split_args(args.items)
    return args, questions, overrides


def check_request(conf: AskConfig, questions: Sequence[str]) -> None:
    """Something to do, once flags and ``key=value`` overrides are in (AskError if not)."""
    if not questions and not conf.export:
        raise AskError("give a question, or --export DIR")
    if (conf.merged or conf.push_to_hub) and not conf.export:
        raise AskError("--merged and --push-to-hub go with --export DIR")


def run(argv: Sequence[str]) -> int:
    args, questions, overrides = parse(argv)
    with exit_on_bad_input("finqa_exp.ask"):
        conf = compose(overrides)
        for key, value in (
            ("registered_model", args.model),
            ("alias", args.alias),
            ("run_id", args.run_id),
            ("export", args.export),
            ("push_to_hub", args.push_to_hub),
            ("license", args.license),
            ("max_new_tokens", args.max_new_tokens),
        ):
            if value is not None:
                setattr(conf, key, value)
        conf.merged = conf.merged or args.merged
        check_request(conf, questions)
        target = Path(conf.export).absolute() if conf.export else None
        if target is not None:
            export_lib.check_target(target)
        # Before anything loads: offline or without a token, say so now.
        token = hub.check_access(conf.push_to_hub) if conf.push_to_hub else None
        store = RunStore(conf.tracking.uri)
        with tempfile.TemporaryDirectory() as tmp:
            winner = fetch_winner(conf, store, Path(tmp))
            print(f"model: {winner.label}", file=sys.stderr)
            if target is not None:
                out = export(winner, store, conf, target)
                kind = "merged model" if conf.merged else "adapter"
                print(f"{kind} and model card written to {out}", file=sys.stderr)
                if token is not None:
                    url = hub.push(out, conf.push_to_hub, token)
                    print(f"uploaded to {url}", file=sys.stderr)
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
