"""What a logged model holds: its artifacts, its settings (MLflow's ``model_config``) and
its input, as plain data. Pure functions, no torch: the trial writes them and
finqa_exp/serving/answerer.py reads them back.

The settings name the base in one of three ways:

- ``bundled``: inside the model (artifact ``base``). The offline tiny model is small, so
  a served champion needs no cache and no network;
- ``hub``: a hub repo id and its exact commit, not a copy of 7B weights;
- ``local``: a folder on the machine that trained it (it must exist where it is served).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from finqa_exp.config import FinqaConfig, ModelConfig, QuantConfig
from finqa_exp.errors import BadInput

ADAPTER, BASE = "adapter", "base"  # artifact names inside the model
FORMAT = 1  # of the settings below; a loader refuses one it does not know
EXAMPLE_QUESTION = "What is the difference between a stock and a bond?"


class SpecError(BadInput, ValueError):
    """A model's settings or input that this loader cannot use, or an export folder in the
    way; one line."""


@dataclass(frozen=True)
class ServeSettings:
    """How to rebuild and ask the model: base, quantization, prompt and generation."""

    base_kind: str  # bundled | hub | local
    base: str | None  # hub repo id or folder; None when bundled
    revision: str | None  # hub commit the trial loaded
    model_name: str
    trust_remote_code: bool
    quant: QuantConfig
    prompt_template: str
    max_new_tokens: int
    batch_size: int
    run_id: str | None = None

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["format"] = FORMAT
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ServeSettings:
        data = dict(data)
        found = data.pop("format", None)
        if found != FORMAT:
            raise SpecError(f"model settings format {found!r}: this finqa-exp reads {FORMAT}")
        data["quant"] = QuantConfig(**data["quant"])
        return cls(**data)

    def model_config(self, source: str) -> ModelConfig:
        """The ModelConfig that loads the base from ``source`` (a folder or a repo id)."""
        return ModelConfig(
            name=self.model_name,
            name_or_path=source,
            revision=self.revision if self.base_kind == "hub" else None,
            trust_remote_code=self.trust_remote_code,
        )


def base_kind(name_or_path: str | None) -> str:
    """``bundled`` for the tiny model, ``local`` for an existing folder, else ``hub``."""
    if not name_or_path:
        return "bundled"
    return "local" if Path(name_or_path).is_dir() else "hub"


def settings_for(conf: FinqaConfig, revision: str | None, run_id: str | None) -> ServeSettings:
    """A trial's settings: ``revision`` is the hub commit its base was loaded at."""
    kind = base_kind(conf.model.name_or_path)
    base = None if kind == "bundled" else conf.model.name_or_path
    if kind == "local":
        base = str(Path(base).resolve())
    return ServeSettings(
        base_kind=kind,
        base=base,
        revision=(revision or conf.model.revision) if kind == "hub" else None,
        model_name=conf.model.name,
        trust_remote_code=conf.model.trust_remote_code,
        quant=conf.quant,
        prompt_template=conf.data.prompt_template,
        max_new_tokens=conf.eval.max_new_tokens,
        batch_size=conf.eval.batch_size,
        run_id=run_id,
    )


def artifacts_for(adapter_dir: str | Path, base_source: str, settings: ServeSettings) -> dict:
    """The folders a model carries: the adapter always, the base only when bundled."""
    found = {ADAPTER: str(adapter_dir)}
    if settings.base_kind == "bundled":
        found[BASE] = str(base_source)
    return found


def questions_from(model_input: Any) -> list[str]:
    """The questions in a pyfunc input: a string, a list of strings, a dict or DataFrame
    with one column (``mlflow models serve`` hands ``{"inputs": [...]}`` over as one)."""
    if isinstance(model_input, str):
        items: list[Any] = [model_input]
    elif hasattr(model_input, "columns"):  # a pandas DataFrame
        if len(model_input.columns) != 1:
            cols = list(model_input.columns)
            raise SpecError(f"expected one column of questions, got columns {cols}")
        items = model_input.iloc[:, 0].tolist()
    elif isinstance(model_input, dict):
        if len(model_input) != 1:
            raise SpecError(f"expected one key of questions, got {sorted(model_input)}")
        (value,) = model_input.values()
        items = [value] if isinstance(value, str) else list(value)
    else:
        items = list(model_input)
    bad = [q for q in items if not isinstance(q, str) or not q.strip()]
    if bad:
        raise SpecError(f"every question must be a non-empty string, got {bad[0]!r}")
    return items
