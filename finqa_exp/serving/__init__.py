"""Serving: a trial's tuned model as an MLflow model that anyone can load or serve.

Each complete trial logs its adapter as an MLflow pyfunc model, "models from code"
(finqa_exp/serving/pyfunc_model.py, named by path: no pickled Python), with its weights as
safetensors; a study's champion is that model, registered. So the MLflow tools work on it::

    mlflow models serve -m models:/finqa_tiny_finqa_sample@champion --env-manager local
    mlflow.pyfunc.load_model("models:/finqa_tiny_finqa_sample@champion").predict(["Why?"])

By job: ``spec`` says what the model holds (artifacts, settings, input); ``answerer``
loads base and adapter and answers, for the pyfunc model, ``python -m finqa_exp.ask`` and
``python -m finqa_exp.app`` alike; ``card`` writes an export's model card.
"""

from pathlib import Path

# The models-from-code file a trial logs (the file is copied into the model).
MODEL_CODE = Path(__file__).with_name("pyfunc_model.py")
