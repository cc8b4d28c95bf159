"""Prompt formatting: how a Q&A pair becomes the text the model sees.

The default template is the seed projects' ``### Question: ...\\n\\n### Answer: ...``;
``data.prompt_template`` changes it. Training and generation both go through
:func:`format_prompt`, so a model is always asked in the form it was tuned on.
"""

from __future__ import annotations


def merge_instruction(instruction: str, context: str | None) -> str:
    """One question from an alpaca ``instruction`` and its optional ``input`` context."""
    instruction = instruction.strip()
    context = (context or "").strip()
    return f"{instruction}\n{context}" if context else instruction


def format_prompt(template: str, question: str) -> str:
    """The prompt up to where the answer starts, e.g. ``### Question: q\\n\\n### Answer: ``."""
    return template.replace("{question}", question)
