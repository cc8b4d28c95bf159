"""Logged models: a trial's tuned model in MLflow's model format, found and loaded back.

The trial (finqa_exp/trial.py) logs its model with :func:`log_pyfunc_model`, linked to
its run; the registry's champion (tracking/store.py) is that model; ``ask`` and the app
download it and read its parts with :func:`read_model` (finqa_exp/serving/answerer.py
loads them, as the model's own code does under ``mlflow.pyfunc.load_model``). Models are
"models from code" (a Python file named by path), so nothing here pickles Python objects.
"""

from __future__ import annotations

import functools
import importlib.metadata
import os
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

# What a served model needs installed beside finqa-exp itself (not on PyPI: serve with
# `--env-manager local` where finqa-exp is installed), at the versions it was logged with.
REQUIREMENTS = (
    "torch", "transformers", "peft", "accelerate", "bitsandbytes", "safetensors",
    "tokenizers", "omegaconf", "mlflow",
)  # fmt: skip


@functools.cache  # once per process: a sweep's trials share it
def pip_requirements() -> list[str]:
    found = []
    for dist in REQUIREMENTS:
        try:
            version = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
        found.append(f"{dist}=={version.split('+')[0]}")  # 2.5.1+cpu: the local build tag
    return found


def log_pyfunc_model(
    client: Any,
    experiment_id: str,
    run_id: str,
    name: str,
    code_path: str | Path,
    artifacts: dict[str, str],
    model_config: dict[str, Any],
    example: tuple[list[str], list[str]],
    params: dict[str, Any],
    tags: dict[str, str] | None = None,
) -> str:
    """Log a pyfunc model from ``code_path`` with ``artifacts`` (folders, copied in) and
    ``model_config`` (its settings), linked to ``run_id`` as one of its outputs; returns
    the logged model's id.

    Through the client, like every write of ours (no global tracking URI), and without
    MLflow's serving check of the input example, which would load the model a second
    time (a second 7B base in GPU memory beside the trial's)."""
    import mlflow.pyfunc
    from mlflow.entities import LoggedModelOutput, LoggedModelStatus
    from mlflow.models import Model, infer_signature

    questions, answers = example
    signature = infer_signature(questions, answers, params=params)
    # The run's params (the trial's whole config) go with the model, as MLflow's own
    # log_model copies them: the UI's model page lists them beside its metrics.
    run_params = client.get_run(run_id).data.params
    model = client.create_logged_model(
        experiment_id, name=name, source_run_id=run_id, tags=tags, params=run_params,
        model_type="finqa-lora",
    )  # fmt: skip
    try:
        with tempfile.TemporaryDirectory() as tmp:
            local = Path(tmp) / "model"
            meta = Model(artifact_path=model.artifact_location, run_id=run_id,
                         model_id=model.model_id)  # fmt: skip
            with warnings.catch_warnings(), _quiet_downloads():
                # MLflow asks for type hints on predict; the signature here is explicit.
                warnings.filterwarnings("ignore", message=".*type hints.*")
                mlflow.pyfunc.save_model(
                    str(local), mlflow_model=meta, python_model=str(code_path),
                    artifacts=artifacts, model_config=model_config, signature=signature,
                    input_example=questions[:1], pip_requirements=list(pip_requirements()),
                )  # fmt: skip
            client.log_model_artifacts(model.model_id, str(local))
        client.log_outputs(run_id, [LoggedModelOutput(model.model_id, step=0)])
        client.finalize_logged_model(model.model_id, LoggedModelStatus.READY)
    except BaseException:
        client.finalize_logged_model(model.model_id, LoggedModelStatus.FAILED)
        raise
    return model.model_id


def run_model(client: Any, run_id: str) -> Any | None:
    """The run's READY logged model (the latest, if several), or None."""
    from mlflow.entities import LoggedModelStatus

    run = client.get_run(run_id)
    found = client.search_logged_models(
        [run.info.experiment_id],
        filter_string=f"source_run_id = '{run_id}'",
        order_by=[{"field_name": "creation_timestamp", "ascending": False}],
    )
    # In Python: the SQL store does not filter on status.
    ready = [m for m in found if m.status == LoggedModelStatus.READY]
    return ready[0] if ready else None


def download_model(uri: str, source: str, dst: str | Path) -> Path:
    """A model's folder (``source``: its artifact location) copied into ``dst``."""
    import mlflow.artifacts

    Path(dst).mkdir(parents=True, exist_ok=True)
    local = mlflow.artifacts.download_artifacts(
        artifact_uri=source, dst_path=str(dst), tracking_uri=uri
    )
    return Path(local)


def read_model(local_dir: str | Path) -> tuple[dict[str, str], dict[str, Any]]:
    """A downloaded pyfunc model's artifacts (name -> local path) and ``model_config``,
    read from its MLmodel file, as ``load_context`` would get them."""
    from mlflow.models import Model

    local = Path(local_dir)
    flavor = Model.load(str(local)).flavors.get("python_function", {})
    artifacts = {k: str(local / v["path"]) for k, v in (flavor.get("artifacts") or {}).items()}
    return artifacts, dict(flavor.get("config") or {})


@contextmanager
def _quiet_downloads() -> Iterator[None]:
    """No progress bars for MLflow's copies of local folders into a model."""
    key = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"
    old = os.environ.get(key)
    os.environ[key] = "false"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = old
