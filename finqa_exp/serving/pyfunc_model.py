"""The MLflow pyfunc model of a finqa-exp trial, logged as "models from code".

MLflow copies this file into the model and runs it to load the model, so a model loaded
from a shared registry unpickles nothing: the settings are YAML (``model_config``), the
adapter and the bundled base safetensors. It needs finqa-exp installed where it loads::

    mlflow models serve -m models:/finqa_tiny_finqa_sample@champion --env-manager local
    curl -s 127.0.0.1:5000/invocations -H 'Content-Type: application/json' \
        -d '{"inputs": ["What is EBITDA?"], "params": {"max_new_tokens": 32}}'

Input: questions (a list of strings, or one column); output: one answer each.
"""

from __future__ import annotations

import warnings
from typing import Any

import mlflow.pyfunc
from mlflow.models import set_model

# MLflow suggests type hints on predict; this model's signature is logged explicitly.
warnings.filterwarnings("ignore", message=".*Add type hints to the `predict` method")


class FinqaModel(mlflow.pyfunc.PythonModel):
    """Greedy answers of a tuned LoRA model, loaded by finqa_exp/serving/answerer.py."""

    def load_context(self, context: Any) -> None:
        from finqa_exp.serving import answerer, spec

        settings = spec.ServeSettings.from_dict(dict(context.model_config))
        self.answerer = answerer.load(context.artifacts, settings)

    # No type hints: MLflow would read a signature from them; the logged one is explicit.
    def predict(self, context, model_input, params=None):
        from finqa_exp.serving.spec import questions_from

        max_new = (params or {}).get("max_new_tokens")
        return self.answerer.answer(questions_from(model_input), max_new)


set_model(FinqaModel())
