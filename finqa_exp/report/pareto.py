"""A multi-objective study in the report: its objectives and its Pareto front.

Used by finqa_exp/report/sections.py for a study swept with several objectives, e.g.

    python -m finqa_exp -m 'objective.metric=[rougeL,numeric_accuracy]' \\
        'objective.direction=[maximize,maximize]' hydra.sweeper.study_name=finqa_two
    python -m finqa_exp.report study=finqa_two
"""

from __future__ import annotations

from typing import Any

from finqa_exp.report.data import StudyData, plural
from finqa_exp.report.render import (
    NONE,
    Block,
    Code,
    Heading,
    Para,
    Table,
    Text,
    fmt_num,
    fmt_value,
)


def _way(maximize: bool) -> str:
    return "maximized" if maximize else "minimized"


def objective_text(data: StudyData) -> Text:
    if not data.objectives:
        return ("Objective: ", Code(data.metric), f" ({_way(data.maximize)})")
    parts: list[Any] = ["Objectives: "]
    for i, (name, up) in enumerate(zip(data.objectives, data.maximizes)):
        parts += [", " if i else "", Code(name), f" ({_way(up)})"]
    n = len(data.pareto)
    parts.append(f"; the first ranks the trials; {plural(n, 'trial')} {'is' if n == 1 else 'are'}")
    parts.append(" on the Pareto front")
    return tuple(parts)


def pareto_blocks(data: StudyData, level: int) -> list[Block]:
    """A multi-objective study's Pareto front: no other trial is better on every objective."""
    if not data.objectives:
        return []
    names = list(data.distributions)
    by_number = {t.number: t for t in data.trials}
    front = sorted(
        (by_number[n] for n in data.pareto),
        key=lambda t: (-t.values[0] if data.maximize else t.values[0], t.number),
    )
    rows = tuple(
        (
            str(t.number),
            *(fmt_value(t.params.get(n, NONE)) for n in names),
            *(fmt_num(v) for v in t.values),
            Code(t.run.run_id) if t.run else NONE,
        )
        for t in front
    )
    header = ("trial", *names, *data.objectives, "MLflow run")
    return [
        Heading(level, "Pareto front"),
        Para(
            f"{plural(len(front), 'trial')} where no other trial is at least as good on every "
            "objective and better on one. Which to use is a trade-off only you can make; the "
            "rest of this report ranks by the first objective."
        ),
        Table(header, rows, (True, *[True] * (len(header) - 2), False)),
    ]
