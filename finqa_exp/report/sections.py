"""What a sweep report says, section by section, as document blocks.

Used by ``python -m finqa_exp.report study=NAME`` (finqa_exp/report/build.py): document() turns
the studies (finqa_exp/report/data.py) and the file names of their plots into the blocks
that finqa_exp/report/render.py writes as Markdown and HTML. For each study: summary,
winners, base vs best, what each hyperparameter did, loss curves and example answers; a
side-by-side table first when there are several. The numbers come from report_data and
report_numbers; here they only get words and a layout.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from finqa_exp.report.data import (
    FINISHED,
    LABELS,
    STATES,
    StudyData,
    TrialRow,
    plural,
    state_counts,
)
from finqa_exp.report.examples import examples_blocks
from finqa_exp.report.numbers import (
    Savings,
    compute_spent,
    effects,
    gaps_to_best,
    improvement_pct,
    pruning_savings,
    wall_time,
)
from finqa_exp.report.pareto import objective_text, pareto_blocks
from finqa_exp.report.render import (
    NONE,
    Block,
    Bullets,
    Code,
    Heading,
    Image,
    Para,
    Strong,
    Table,
    Text,
    fmt_duration,
    fmt_interval,
    fmt_num,
    fmt_pct,
    fmt_value,
)
from finqa_exp.report.verdict import confirmed_blocks, fmt_gap, verdict_blocks
from finqa_exp.tracking.names import PERPLEXITY as PPL

MAX_FAILURES = 10  # failed trials listed with their reasons
ROUGE = (("rouge1", "ROUGE-1"), ("rouge2", "ROUGE-2"), ("rougeL", "ROUGE-L"))
PERPLEXITY = ((PPL, "perplexity"),)  # a text study's (data.format=text)


def is_text(data: StudyData) -> bool:
    """Whether the study's trials were scored on text, by perplexity, not ROUGE."""
    return data.best.metric(PPL) is not None


def scores(data: StudyData) -> tuple[tuple[str, str], ...]:
    """The study's headline scores, (key, label): ROUGE-1/2/L, or perplexity for text."""
    return PERPLEXITY if is_text(data) else ROUGE


def reason_text(trial: TrialRow) -> str:
    reason = (trial.fail_reason or "no reason recorded").splitlines()[0]
    return f"trial {trial.number}: {reason[:300]}"


def override_line(params: Mapping[str, Any]) -> str:
    from finqa_exp.sweep.search_space import format_value

    return " ".join(f"{k}={format_value(v)}" for k, v in sorted(params.items()))


def report_title(names: Sequence[str]) -> str:
    return "Sweep report: " + " vs ".join(names)


def partial_note(data: StudyData) -> Para | None:
    if not data.unfinished:
        return None
    return Para(
        (
            Strong(f"partial: {plural(data.unfinished, 'trial')} running/waiting"),
            f" in study {data.name}; the numbers below cover its {data.finished} finished trials.",
        )
    )


def savings_text(s: Savings) -> Text:
    if s.pruned == 0:
        return "Pruning saved nothing: no trial was pruned."
    if s.known == 0:
        return (
            f"Pruning stopped {plural(s.pruned, 'trial')}; their full length is not in the stores."
        )
    share = s.examples_skipped / s.examples_unpruned * 100 if s.examples_unpruned else 0.0
    text = (
        f"Pruning saved {plural(s.examples_skipped, 'training example')}: it stopped "
        f"{plural(s.known, 'trial')} after {s.examples_run} of the {s.examples_planned} "
        "examples they would have trained on in full, which is "
        f"{share:.0f}% of the {s.examples_unpruned} examples all finished trials would have "
        "trained on unpruned (full length: train.epochs x the training examples, or "
        "train.max_steps x the batch)."
    )
    if s.seconds_saved is not None:
        text += (
            f" At the complete trials' mean {s.seconds_per_example * 1000:.2f} ms of training "
            f"per example, that is about {fmt_duration(s.seconds_saved)} of training time."
        )
    if s.known < s.pruned:
        text += f" ({plural(s.pruned - s.known, 'pruned trial')} of unknown length left out.)"
    return text


def summary_blocks(data: StudyData, plots: Mapping[str, str], level: int) -> list[Block]:
    counts = state_counts(data.trials)
    busy, span = wall_time(data.trials)
    blocks: list[Block] = [
        Heading(level, "Summary"),
        Bullets(
            (
                objective_text(data),
                "Trials: " + ", ".join(f"{n} {LABELS[s]}" for s, n in counts.items() if n),
                (
                    f"Wall time: {fmt_duration(busy)} with at least one trial "
                    f"running (first start to last end: {fmt_duration(span)})"
                ),
                ("Stores: ", Code(data.storage), " (Optuna) and MLflow runs by trial"),
            )
        ),
        Para("Compute spent, by how the trials ended (sums over the trials):"),
    ]
    rows = []
    for key, spent in compute_spent(data.trials).items():
        label = Strong("total") if key == "total" else LABELS[key]
        sums = (spent.wall_s, spent.trial_time_s, spent.train_time_s)
        rows.append((label, str(spent.trials), *(fmt_duration(v) for v in sums)))
    blocks.append(
        Table(
            ("ended", "trials", "trial wall time (Optuna)", "trial_time_s", "train_time_s"),
            tuple(rows),
            (False, True, True, True, True),
        )
    )
    blocks.append(Para(savings_text(pruning_savings(data.trials))))
    failed = [t for t in data.trials if t.state == "FAIL"]
    if failed:
        blocks.append(Para("Failed trials:"))
        shown = [reason_text(t) for t in failed[:MAX_FAILURES]]
        if len(failed) > MAX_FAILURES:
            shown.append(f"and {len(failed) - MAX_FAILURES} more")
        blocks.append(Bullets(tuple(shown)))
    if "history" in plots:
        blocks.append(Image(plots["history"], f"optimization history of {data.name}"))
    return blocks


def winners_blocks(data: StudyData, top_k: int, level: int) -> list[Block]:
    names = list(data.distributions)
    # The objective is one of the shown metrics unless the study optimized something else.
    shown = {**dict(scores(data)), "eval_loss": "eval loss"}
    extra = () if data.metric in shown else (f"{data.metric} (objective)",)
    labels = [f"{v} (objective)" if k == data.metric else v for k, v in shown.items()]
    interval = f"{shown.get(data.metric, data.metric)}, 95 % interval"
    gaps = gaps_to_best(data)
    lead = "best's lead, 95 % interval"
    header = (
        "rank", "trial", *names, *extra, *labels, interval, lead, "train time", "MLflow run",
    )  # fmt: skip
    rows = []
    for rank, t in enumerate(data.ranked[:top_k], start=1):
        rows.append(
            (
                str(rank),
                str(t.number),
                *(fmt_value(t.params.get(n, NONE)) for n in names),
                *((fmt_num(t.value),) if extra else ()),
                *(fmt_num(t.metric(key)) for key in shown),
                fmt_interval(t.metric(f"{data.metric}_ci_low"), t.metric(f"{data.metric}_ci_high")),
                fmt_gap(gaps.get(t.number)),
                fmt_duration(t.metric("train_time_s")),
                Code(t.run.run_id) if t.run else NONE,
            )
        )
    best = data.best
    blocks: list[Block] = [
        Heading(level, f"Winners (top {min(top_k, len(data.ranked))} of {len(data.ranked)})"),
        Table(tuple(header), tuple(rows), (True, True, *[True] * (len(header) - 3), False)),
        *verdict_blocks(data, gaps, top_k),
        Para(("Best trial ", Strong(str(best.number)), "; to train it again:")),
        Para(Code(f"python -m finqa_exp {override_line(best.params)}")),
    ]
    if data.champion is not None:
        c = data.champion
        top = data.confirmed[0].trial if data.confirmed else None
        if top is not None and top.run and c.run_id == top.run.run_id:
            whose = f"trial {top.number}, the best mean over seeds"
        elif best.run and c.run_id == best.run.run_id:
            whose = "this study's best trial"
        else:
            whose = "another run"
        blocks.append(
            Para(
                (
                    "Registered: model ",
                    Code(c.model_name),
                    f" version {c.version}, alias ",
                    Code(c.alias),
                    f" ({whose}, run ",
                    Code(c.run_id),
                    "); ask it with ",
                    Code(f'python -m finqa_exp.ask --model {c.model_name} "..."'),
                )
            )
        )
    return blocks


def base_vs_best_blocks(data: StudyData, level: int) -> list[Block]:
    best = data.best
    rows = []
    shown = [
        *scores(data),
        *(
            (("numeric_accuracy", "numeric accuracy"),)
            if best.metric("numeric_accuracy") is not None
            else ()
        ),
    ]
    for key, label in shown:
        base, tuned = best.metric(f"base_{key}"), best.metric(key)
        gap = fmt_interval(best.metric(f"delta_{key}_ci_low"), best.metric(f"delta_{key}_ci_high"))
        better = improvement_pct(base, tuned)
        if key == PPL and better is not None:
            better = -better  # lower is better: a fall is the improvement
        rows.append((label, fmt_num(base), fmt_num(tuned), fmt_pct(better), gap))
    header = ("metric", "base", "tuned", "improvement", "tuned - base, 95 % interval")
    blocks: list[Block] = [
        Heading(level, f"Base vs best (trial {best.number})"),
        Table(header, tuple(rows), (False, True, True, True, True)),
    ]
    if is_text(data):
        n = int(best.metric("perplexity_tokens") or 0)
        blocks.append(
            Para(
                f"Perplexity of the held-out documents ({plural(n, 'token')}); interval: "
                "bootstrap over the documents. ROUGE is not computed: text has no reference "
                "answers."
            )
        )
    if best.metric("numeric_questions") is not None:
        n = int(best.metric("numeric_questions") or 0)
        blocks.append(
            Para(
                f"Intervals: paired bootstrap over the test questions (numeric accuracy: the "
                f"{plural(n, 'question')} whose reference holds a number)."
            )
        )
    return blocks


def params_blocks(data: StudyData, plots: Mapping[str, str], level: int) -> list[Block]:
    blocks: list[Block] = [Heading(level, "What each hyperparameter did")]
    if data.importances:
        ranked = sorted(data.importances.items(), key=lambda kv: (-kv[1], kv[0]))
        text = ", ".join(f"{k} {v:.2f}" for k, v in ranked)
        blocks.append(Para(f"Importance ({data.importance_note}; sums to 1): {text}."))
    else:
        blocks.append(Para(f"Importance: {data.importance_note}."))
    if "importance" in plots:
        blocks.append(Image(plots["importance"], "hyperparameter importance"))
    for name in data.distributions:
        rows = tuple(
            (
                e.label,
                *(str(e.counts[s]) for s in FINISHED),
                fmt_num(e.best),
                fmt_num(e.mean),
            )
            for e in effects(data, name)
        )
        blocks.append(Heading(level + 1, (Code(name),)))
        header = ("value", "complete", "pruned", "failed", f"best {data.metric}", "mean")
        blocks.append(Table(header, rows, (False, True, True, True, True, True)))
    for key, alt in (
        ("objective", "objective against each param"),
        ("parallel", "parallel coordinates"),
    ):
        if key in plots:
            blocks.append(Image(plots[key], alt))
    return blocks


def curves_blocks(data: StudyData, plots: Mapping[str, str], level: int) -> list[Block]:
    if "curves" not in plots:
        return []
    return [
        Heading(level, f"Loss curves of the top {len(data.curves)} trials"),
        Image(plots["curves"], "train and eval loss of the top trials"),
    ]


def study_blocks(data: StudyData, plots: Mapping[str, str], top_k: int, level: int) -> list[Block]:
    blocks: list[Block] = []
    note = partial_note(data)
    if note is not None:
        blocks.append(note)
    blocks += summary_blocks(data, plots, level)
    blocks += winners_blocks(data, top_k, level)
    blocks += pareto_blocks(data, level)
    blocks += confirmed_blocks(data, level)
    blocks += base_vs_best_blocks(data, level)
    blocks += params_blocks(data, plots, level)
    blocks += curves_blocks(data, plots, level)
    blocks += examples_blocks(data, level)
    return blocks


def comparison_blocks(studies: Sequence[StudyData], plots: Mapping[str, str]) -> list[Block]:
    rows = []
    for d in studies:
        b = d.best
        counts = state_counts(d.trials)
        key, headline = scores(d)[-1]  # ROUGE-L, or perplexity: Q&A and text side by side
        rows.append(
            (
                Code(d.name),
                "/".join(str(counts[s]) for s in STATES),
                f"{d.metric} {'max' if d.maximize else 'min'}",
                fmt_num(b.value),
                Code(override_line(b.params)),
                headline,
                fmt_num(b.metric(f"base_{key}")),
                fmt_num(b.metric(key)),
                fmt_duration(compute_spent(d.trials)["total"].wall_s),
            )
        )
    header = ("study", "trials c/p/f/r/w", "objective", "best", "best params")
    header += ("score", "base", "best trial", "compute")
    aligns = (False, False, False, True, False, False, True, True, True)
    blocks: list[Block] = [Heading(2, "Side by side"), Table(header, tuple(rows), aligns)]
    if "compare" in plots:
        blocks.append(Image(plots["compare"], "best objective so far per study"))
    return blocks


def document(
    studies: Sequence[StudyData], plots: Mapping[str, Mapping[str, str]], top_k: int
) -> list[Block]:
    """The whole report. ``plots`` maps each study's name (and "" for the comparison) to
    its plots, kind -> file name; ``top_k`` trials are listed as winners."""
    blocks: list[Block] = [Heading(1, report_title([d.name for d in studies]))]
    blocks += [n for d in studies if (n := partial_note(d)) is not None] if len(studies) > 1 else []
    if len(studies) == 1:
        return blocks + study_blocks(studies[0], plots[studies[0].name], top_k, 2)
    blocks += comparison_blocks(studies, plots.get("", {}))
    for d in studies:
        blocks.append(Heading(2, ("Study ", Code(d.name))))
        blocks += study_blocks(d, plots[d.name], top_k, 3)
    return blocks
