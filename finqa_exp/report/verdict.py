"""The report's answer to "is the winner real?": intervals of the best's lead, and the
top trials confirmed over seeds (finqa_exp/sweep/confirm.py).

Pure: every number comes from the StudyData (finqa_exp/report/numbers.py computes them), so
tests can recompute each one from the logged per-question scores.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence

from finqa_exp.report.data import ConfirmedRow, StudyData, TrialRow, plural
from finqa_exp.report.numbers import Gap, confirmed_gaps, expected_best, seed_noise
from finqa_exp.report.render import (
    NONE,
    Block,
    Heading,
    Para,
    Table,
    fmt_duration,
    fmt_interval,
    fmt_num,
    fmt_value,
)

SEED_NOTE = "Each trial is one training run: seed-to-seed noise is not in these intervals."


def fmt_gap(gap: Gap | None) -> str:
    return NONE if gap is None else f"{gap.mean:.4f} ({fmt_interval(gap.low, gap.high)})"


def _cheapest(trials: Sequence[TrialRow]) -> TrialRow:
    return min(trials, key=lambda t: (t.metric("train_time_s") or math.inf, t.number))


def _tie_sentence(
    best: int, tied: Sequence[TrialRow], group: Sequence[TrialRow], paired: str
) -> str:
    cheapest = _cheapest(group)
    listed = ", ".join(str(t.number) for t in tied)
    return (
        f"Is the winner real? Not yet: trial {best}'s lead over {plural(len(tied), 'trial')} "
        f"({listed}) has a 95 % interval that includes 0 on these {paired}, so "
        f"they are indistinguishable at this budget; the cheapest of them to train is trial "
        f"{cheapest.number} ({fmt_duration(cheapest.metric('train_time_s'))})."
    )


def verdict_blocks(data: StudyData, gaps: Mapping[int, Gap], top_k: int) -> list[Block]:
    """Single runs: whether the best's lead over each top trial is beyond the test
    questions' noise. Left to the confirmed section when the study was confirmed."""
    others = [t for t in data.ranked[1:top_k] if t.number in gaps]
    if not others or data.confirmed:
        return []
    paired = plural(len(data.question_scores[data.best.number]), data.unit)
    best = data.best.number
    tied = [t for t in others if not gaps[t.number].clear]
    if tied:
        text = _tie_sentence(best, tied, [data.best, *tied], paired)
    else:
        runner, g = others[0], gaps[others[0].number]
        text = (
            f"Is the winner real? On these {paired}, trial {best} beats the runner-up, "
            f"trial {runner.number}, by {g.mean:.4f} (95 % interval {g.low:.4f} to {g.high:.4f})."
        )
    return [Para(f"{text} {SEED_NOTE}")]


def _seeds(row: ConfirmedRow) -> str:
    return ", ".join("own" if s is None else str(s) for s in row.seeds)


def confirmed_blocks(data: StudyData, level: int) -> list[Block]:
    """The confirmed leaderboard, the seed noise beside the leaderboard's gaps, the verdict,
    and the expected best objective as a function of the number of trials."""
    rows = data.confirmed
    if not rows:
        return []
    names = list(data.distributions)
    gaps = confirmed_gaps(data)
    header = (
        "rank", "trial", *names, "seeds", f"{data.metric}: mean", "spread (sd)", "single run",
        "best's lead, 95 % interval", "train time",
    )  # fmt: skip
    table = tuple(
        (
            str(rank),
            str(r.trial.number),
            *(fmt_value(r.trial.params.get(n, NONE)) for n in names),
            _seeds(r),
            fmt_num(r.mean),
            fmt_num(r.std),
            fmt_num(r.values[0]),
            fmt_gap(gaps.get(r.trial.number)),
            fmt_duration(r.trial.metric("train_time_s")),
        )
        for rank, r in enumerate(rows, start=1)
    )
    blocks: list[Block] = [
        Heading(level, f"Is the winner real? The top {plural(len(rows), 'trial')}, over seeds"),
        Table(header, table, (True, True, *[True] * (len(header) - 2))),
    ]
    blocks += [Para(p) for p in _noise_and_verdict(data, gaps)]
    blocks += _expected_best_blocks(data)
    return blocks


def _noise_and_verdict(data: StudyData, gaps: Mapping[int, Gap]) -> list[str]:
    rows = data.confirmed
    out = []
    noise = seed_noise(rows)
    ranked = [t.value for t in data.ranked[: len(rows)] if t.value is not None]
    steps = [abs(a - b) for a, b in itertools.pairwise(ranked)]
    if noise is not None and steps:
        listed = ", ".join(f"{s:.4f}" for s in steps)
        smaller = sum(s < noise for s in steps)
        verdict = (
            "all smaller than one seed's noise: their single-run order is noise"
            if smaller == len(steps)
            else f"{smaller} of {len(steps)} smaller than one seed's noise"
        )
        out.append(
            f"Seed-to-seed noise of {data.metric}: sd {noise:.4f} (pooled over "
            f"{plural(len(rows), 'configuration')}); the single-run leaderboard's gaps between "
            f"neighbours at the top are {listed}, {verdict}."
        )
    best, single = rows[0], data.best
    if best.trial.number != single.number:
        out.append(
            f"The winner changed: the single-run best was trial {single.number}; over seeds, "
            f"trial {best.trial.number} has the best mean."
        )
    others = [r for r in rows[1:] if r.trial.number in gaps]
    if others:
        paired = plural(len(best.question_means or ()), data.unit)
        tied = [r.trial for r in others if not gaps[r.trial.number].clear]
        if tied:
            group = [best.trial, *tied]
            out.append(
                _tie_sentence(best.trial.number, tied, group, f"{paired}, averaged over seeds")
            )
        else:
            runner, g = others[0], gaps[others[0].trial.number]
            out.append(
                f"Trial {best.trial.number} beats trial {runner.trial.number} by {g.mean:.4f} "
                f"(95 % interval {g.low:.4f} to {g.high:.4f}; {len(best.values)} seeds each, "
                f"paired over {paired})."
            )
    return out


def _expected_best_blocks(data: StudyData) -> list[Block]:
    values = [t.value for t in data.ranked if t.value is not None]
    if len(values) < 2:
        return []
    counts = sorted({1, 2, 4, 8, 16, 32, len(values)} & set(range(1, len(values) + 1)))
    rows = []
    for n in counts:
        mean, sd = expected_best(values, n, data.maximize)
        rows.append((str(n), fmt_num(mean), fmt_num(sd)))
    return [
        Para(
            f"Expected best {data.metric} for a study of n trials (Dodge et al. 2019, drawn from "
            f"this study's {len(values)} complete trials): if it still improves at n = "
            f"{len(values)}, more trials would likely help."
        ),
        Table(("trials", "expected best", "sd"), tuple(rows), (True, True, True)),
    ]
