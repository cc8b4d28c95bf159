"""The best trial's examples in a report: test questions with the reference, base and
tuned answers, or for a text study its probes completed by the base and the tuned model
(the Llama-2 project's before/after form)."""

from __future__ import annotations

from finqa_exp.report.data import StudyData
from finqa_exp.report.render import Block, Heading, Para, Strong, Table


def examples_blocks(data: StudyData, level: int) -> list[Block]:
    if not data.samples:
        return []
    if "prompt" in data.samples[0]:
        return completions_blocks(data, level)
    blocks: list[Block] = [
        Heading(level, f"Example answers (best trial {data.best.number}, test questions)")
    ]
    for i, row in enumerate(data.samples, start=1):
        blocks.append(Para((Strong(f"Q{i}."), " " + str(row.get("question", "")))))
        blocks.append(
            Table(
                ("", "answer"),
                (
                    ("reference", str(row.get("reference", ""))),
                    ("base", str(row.get("base_answer", ""))),
                    ("tuned", str(row.get("tuned_answer", ""))),
                ),
            )
        )
    return blocks


def completions_blocks(data: StudyData, level: int) -> list[Block]:
    """A text study's probes, completed by the base and by the best trial's model."""
    blocks: list[Block] = [
        Heading(level, f"Completions before and after fine-tuning (best trial {data.best.number})")
    ]
    for i, row in enumerate(data.samples, start=1):
        prompt = str(row.get("prompt", ""))
        blocks.append(Para((Strong(f"P{i}."), " " + prompt + " ...")))
        rows = [("base", str(row.get("base_completion", ""))),
                ("tuned", str(row.get("tuned_completion", "")))]  # fmt: skip
        if row.get("held_out_text"):
            rows.insert(0, ("held-out text", str(row["held_out_text"])))
        blocks.append(Table(("", "completion"), tuple(rows)))
    return blocks
