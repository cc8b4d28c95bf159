"""A chat app: ask a question, see the champion's answer beside its base model's (Gradio).

    python -m finqa_exp.app                                   # the champion, on 127.0.0.1:7860
    python -m finqa_exp.app --model finqa_tiny_finqa_sample --port 7861
    python -m finqa_exp.app --run-id RUN_ID                   # any trial's run
    python -m finqa_exp.app --host 0.0.0.0                    # reachable from other machines
    python -m finqa_exp.app tracking.uri=http://mlflow-host:5000

The model loads as ``python -m finqa_exp.ask`` and ``mlflow models serve`` load it
(finqa_exp/serving/answerer.py); the base's answers come from the same loaded model with
its adapter switched off, so the base costs no second copy in memory. The example questions
are the run's logged test questions; the header shows the model, version, study and scores.
From Python, with gradio_client::

    Client("http://127.0.0.1:7860").predict("What is EBITDA?", api_name="/ask")  # (tuned, base)
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from finqa_exp import ask
from finqa_exp.errors import BadInput, exit_on_bad_input
from finqa_exp.serving import answerer
from finqa_exp.tracking import RunStore, names

log = logging.getLogger("finqa_exp.app")
N_EXAMPLES = 6


class AppError(BadInput, RuntimeError):
    """The app cannot start (gradio missing, port taken); one line."""


class ChatModel:
    """The tuned model, answering as itself and as its base (adapter off)."""

    def __init__(self, tuned: answerer.Answerer):
        self.tuned = tuned

    def both(self, question: str) -> tuple[str, str]:
        question = (question or "").strip()
        if not question:
            return "", ""
        (tuned,) = self.tuned.answer([question])
        with self.tuned.model.disable_adapter():
            (base,) = self.tuned.answer([question])
        return tuned, base


def header(winner: ask.Winner, metrics: dict[str, float]) -> str:
    """Markdown: which model this is and how it scored."""
    tags = winner.version_tags
    study = tags.get(names.STUDY_TAG)
    lines = [f"## finqa-exp: {winner.label}"]
    if study:
        lines.append(f"Study **{study}**, trial {tags.get(names.TRIAL_NUMBER_TAG, '?')}.")
    scores = []
    for key in ("rouge1", "rouge2", "rougeL", "numeric_accuracy", names.PERPLEXITY):
        if key in metrics:
            base = metrics.get(f"base_{key}")
            was = f" (base {base:.4f})" if base is not None else ""
            scores.append(f"{key} {metrics[key]:.4f}{was}")
    if scores:
        lines.append("Held-out scores of the fine-tuned model: " + ", ".join(scores) + ".")
    if "objective_mean" in tags:
        metric = winner.conf.objective.metrics[0]
        lines.append(
            f"Confirmed over {tags.get('n_seeds')} training seeds: {metric} mean "
            f"{float(tags['objective_mean']):.4f} (sd {float(tags['objective_std']):.4f})."
        )
    lines.append(f"Loaded: {winner.settings.base_kind} base; answers are greedy.")
    return "\n\n".join(lines)


def build(chat: ChatModel, title: str, examples: list[str], label: str = "Question") -> Any:
    """The Gradio page: a question box (a text model's: a prompt to complete), the two
    answers side by side, examples."""
    import gradio as gr

    with gr.Blocks(title="finqa-exp chat") as demo:
        gr.Markdown(title)
        question = gr.Textbox(label=label, elem_id="question", lines=2)
        button = gr.Button("Ask", variant="primary", elem_id="ask")
        with gr.Row():
            tuned = gr.Textbox(label="Fine-tuned (champion)", elem_id="tuned", lines=6)
            base = gr.Textbox(label="Base model", elem_id="base", lines=6)
        if examples:
            gr.Examples(examples=[[q] for q in examples], inputs=question)
        # One model, its adapter switched off for the base's answer: one question at a time.
        one = {"concurrency_limit": 1, "concurrency_id": "model"}
        button.click(chat.both, inputs=question, outputs=[tuned, base], api_name="ask", **one)
        question.submit(chat.both, inputs=question, outputs=[tuned, base], api_name=False, **one)
    return demo


def example_questions(store: RunStore, run_id: str) -> list[str]:
    """The run's logged test questions (samples.json)."""
    rows = store.table(run_id, names.SAMPLES_ARTIFACT)
    return [q for r in rows if (q := r.get("question") or r.get("prompt"))][:N_EXAMPLES]


def run(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m finqa_exp.app",
        description="Chat with a sweep's champion beside its base model (Gradio).",
    )
    parser.add_argument("overrides", nargs="*", help="key=value overrides of conf/ask.yaml")
    parser.add_argument("--model", help="registered model name (default: the only champion)")
    parser.add_argument("--alias", help="registry alias (default: champion)")
    parser.add_argument("--run-id", help="use this MLflow run instead of the registry")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: local)")
    parser.add_argument("--port", type=int, default=7860)
    args = parser.parse_args(argv)
    with exit_on_bad_input("finqa_exp.app"):
        if importlib.util.find_spec("gradio") is None:  # before any model loads
            raise AppError("gradio is not installed: pip install -e '.[app]'")
        conf = ask.compose(args.overrides)
        for key, value in (("registered_model", args.model), ("alias", args.alias),
                           ("run_id", args.run_id)):  # fmt: skip
            if value is not None:
                setattr(conf, key, value)
        store = RunStore(conf.tracking.uri)
        with tempfile.TemporaryDirectory() as tmp:
            winner = ask.fetch_winner(conf, store, Path(tmp))
            print(f"model: {winner.label}", file=sys.stderr)
            tuned = answerer.load(winner.artifacts, ask.asked_settings(winner, conf))
            record = store.run(winner.run_id)
            title = header(winner, record.metrics if record else {})
            label = "Prompt to complete" if winner.conf.data.format == "text" else "Question"
            examples = example_questions(store, winner.run_id)
            demo = build(ChatModel(tuned), title, examples, label)
            try:
                demo.launch(server_name=args.host, server_port=args.port, show_error=True)
            except OSError as err:  # the port is taken, or the address is not this machine's
                raise AppError(f"cannot serve on {args.host}:{args.port}: {err}") from err
    return 0


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # nothing leaves the machine
    sys.exit(run(sys.argv[1:]))


if __name__ == "__main__":
    main()
